"""A userspace link emulator (a tiny netem/tbf) for adaptive-bitrate tests and benchmarks.

Kernel netem is not available on the CI and benchmark machines, so this module shapes traffic in
userspace: a UDP forwarder on loopback between ONE WebRTC client and the server's media port.

    client  <->  emu.address (listen socket)  [emulator]  (upstream socket)  <->  server media port

Every datagram from the client is forwarded byte-for-byte to ``upstream`` from a second socket owned
by the emulator, so the server sees the emulator as the client (ICE learns it as a peer-reflexive
candidate; STUN, DTLS and SRTP pass through untouched). Replies are forwarded to the client's
last-seen address. Each direction has its own :class:`LinkProfile` (rate cap with a tail-drop queue,
one-way delay, jitter, random loss), changeable at run time.

The shaping decisions live in :class:`LinkShaper`, which takes explicit times and does no I/O, so
they can be tested with exact tables; :class:`LinkEmulator` only moves datagrams and arms timers.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

Address = tuple[str, int]
Verdict = Literal["forward", "drop_loss", "drop_queue"]

# Timers firing within this much of a packet's due time send it right away: asyncio's own timer
# granularity is about a millisecond, re-arming for sub-millisecond remainders only adds wakeups.
_DUE_SLACK_S = 0.0005


@dataclass(frozen=True)
class LinkProfile:
    """One direction of the emulated link. The default is a perfect link: no cap, delay or loss."""

    rate_bps: float | None = None  # bit/s; None = unlimited (no queue, no token bucket)
    delay_ms: float = 0.0  # fixed one-way delay added after the bottleneck
    jitter_ms: float = 0.0  # uniform +/- jitter around delay_ms (never below zero added delay)
    loss: float = 0.0  # probability that a packet is lost before it reaches the bottleneck
    queue_bytes: int = 64_000  # bottleneck queue limit, like tbf's `limit`; beyond it: tail drop
    burst_bytes: int = 3_000  # token bucket depth, like tbf's `burst` (two full-size packets)
    allow_reorder: bool = False  # jitter may reorder packets (netem does); off by default

    def __post_init__(self) -> None:
        if self.rate_bps is not None and not (self.rate_bps > 0 and math.isfinite(self.rate_bps)):
            raise ValueError(f"rate_bps must be a positive finite number or None, got {self.rate_bps!r}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be a probability in [0, 1], got {self.loss!r}")
        if self.queue_bytes < 0 or self.burst_bytes < 0:
            raise ValueError("queue_bytes and burst_bytes must be >= 0")

    @property
    def shaped(self) -> bool:
        """False for the perfect link: packets can then be forwarded without any timer."""
        return bool(self.rate_bps is not None or self.delay_ms or self.jitter_ms or self.loss)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    departure: float | None = None  # when the packet leaves the bottleneck (seconds, caller's clock)
    deliver_at: float | None = None  # departure + delay + jitter (after the no-reorder clamp)


class LinkShaper:
    """Pure per-direction shaping logic: loss, then a token bucket with a byte-limited FIFO, then delay.

    ``offer(now, size)`` must be called with non-decreasing ``now``. The token bucket is kept as a
    level that may go negative: a negative level is the backlog the bucket still owes, so a packet's
    departure time is fixed on arrival (FIFO, constant rate) and no per-packet bookkeeping of the
    bucket is needed. That is exactly tbf's behaviour for a FIFO queue:
    ``departure_k = max(arrival_k, departure_{k-1}) + max(0, size_k - tokens) / rate``.
    """

    def __init__(self, profile: LinkProfile | None = None, *, seed: int | str | None = 0) -> None:
        self.profile = profile or LinkProfile()
        self._rng = random.Random(seed)
        self._tokens = float(self.profile.burst_bytes)  # a fresh bucket is full, like tbf
        self._t_tokens: float | None = None
        self._backlog: deque[tuple[float, int]] = deque()  # (departure, size) of packets still queued
        self._backlog_bytes = 0
        self._last_deliver = -math.inf

    def set_profile(self, profile: LinkProfile, now: float) -> None:
        """Change the link at ``now``. Packets already admitted keep their departure times."""
        self._refill(now)
        self._expire(now)
        self.profile = profile
        if self._backlog and profile.rate_bps is not None:
            # The bottleneck stays busy until the last admitted packet leaves; re-express that as
            # debt at the new rate so the next packet queues behind it instead of overtaking it.
            busy_until = self._backlog[-1][0]
            self._tokens = -(busy_until - now) * profile.rate_bps / 8.0
        else:
            self._tokens = min(self._tokens, float(profile.burst_bytes))

    def queue_bytes(self, now: float) -> int:
        """Bytes admitted to the bottleneck that have not left it yet at ``now``."""
        self._expire(now)
        return self._backlog_bytes

    def offer(self, now: float, size: int) -> Decision:
        p = self.profile
        self._expire(now)
        # Loss first, like netem on enqueue: a lost packet takes no room in the queue. The RNG is
        # only consulted when loss is configured, so a given seed gives the same losses whatever
        # the rest of the profile is.
        if p.loss and self._rng.random() < p.loss:
            return Decision("drop_loss")
        departure = now
        if p.rate_bps is not None:
            if self._backlog_bytes + size > p.queue_bytes:
                return Decision("drop_queue")  # tail drop: the packet never touches the bucket
            self._refill(now)
            self._tokens -= size
            if self._tokens < 0:
                departure = now + (-self._tokens) * 8.0 / p.rate_bps
                self._backlog.append((departure, size))
                self._backlog_bytes += size
        extra = p.delay_ms / 1000.0
        if p.jitter_ms:
            extra += self._rng.uniform(-p.jitter_ms, p.jitter_ms) / 1000.0
        deliver_at = departure + max(0.0, extra)
        if not p.allow_reorder:
            deliver_at = max(deliver_at, self._last_deliver)  # jitter never overtakes: FIFO delay line
        self._last_deliver = max(self._last_deliver, deliver_at)
        return Decision("forward", departure, deliver_at)

    def _refill(self, now: float) -> None:
        p = self.profile
        if self._t_tokens is not None and p.rate_bps is not None:
            elapsed = max(0.0, now - self._t_tokens)
            self._tokens = min(float(p.burst_bytes), self._tokens + elapsed * p.rate_bps / 8.0)
        self._t_tokens = now

    def _expire(self, now: float) -> None:
        while self._backlog and self._backlog[0][0] <= now:
            self._backlog_bytes -= self._backlog.popleft()[1]


@dataclass
class DirectionStats:
    packets: int = 0  # forwarded (actually sent on)
    bytes: int = 0
    dropped_queue: int = 0  # tail drops at the bottleneck
    dropped_loss: int = 0  # random loss
    queue_bytes: int = 0  # bytes waiting at the bottleneck when stats() was taken
    in_flight: int = 0  # packets admitted but not yet delivered (queue + delay line)


@dataclass
class LinkStats:
    downstream: DirectionStats = field(default_factory=DirectionStats)  # server -> client
    upstream: DirectionStats = field(default_factory=DirectionStats)  # client -> server
    client: Address | None = None  # the client's last-seen address


class _Direction:
    """One direction's shaper plus its delay line: a heap of due packets and at most one timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, profile: LinkProfile, seed: int | str | None) -> None:
        self.loop = loop
        self.shaper = LinkShaper(profile, seed=seed)
        self.counters = DirectionStats()
        self._heap: list[tuple[float, int, bytes]] = []
        self._seq = itertools.count()  # tie-breaker keeps FIFO order among equal due times
        self._timer: asyncio.TimerHandle | None = None
        self._due: float = math.inf
        self.send: Callable[[bytes], bool] | None = None  # set by the emulator; False: not sent

    def push(self, data: bytes) -> None:
        now = self.loop.time()
        if not self.shaper.profile.shaped and not self._heap:
            self._emit(data)  # perfect link and nothing pending: no timer, no added delay
            return
        decision = self.shaper.offer(now, len(data))
        if decision.verdict == "drop_loss":
            self.counters.dropped_loss += 1
            return
        if decision.verdict == "drop_queue":
            self.counters.dropped_queue += 1
            return
        assert decision.deliver_at is not None
        heapq.heappush(self._heap, (decision.deliver_at, next(self._seq), data))
        self._arm()

    def _arm(self) -> None:
        if not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None:
            if due >= self._due:
                return  # the armed timer fires first anyway
            self._timer.cancel()
        self._due = due
        self._timer = self.loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._due = math.inf
        limit = self.loop.time() + _DUE_SLACK_S
        while self._heap and self._heap[0][0] <= limit:
            self._emit(heapq.heappop(self._heap)[2])
        self._arm()

    def _emit(self, data: bytes) -> None:
        if self.send is not None and self.send(data):
            self.counters.packets += 1
            self.counters.bytes += len(data)

    def set_profile(self, profile: LinkProfile) -> None:
        self.shaper.set_profile(profile, self.loop.time())

    def snapshot(self) -> DirectionStats:
        c = self.counters
        return DirectionStats(
            c.packets, c.bytes, c.dropped_queue, c.dropped_loss, self.shaper.queue_bytes(self.loop.time()), len(self._heap)
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable etc.: a lossy link just loses the packet

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class LinkEmulator:
    """UDP forwarder between one client and ``upstream`` with per-direction shaping.

    ``seed`` makes loss and jitter reproducible (each direction has its own RNG stream).
    """

    def __init__(
        self,
        upstream: Address,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        *,
        downstream_profile: LinkProfile | None = None,
        upstream_profile: LinkProfile | None = None,
        seed: int = 0,
    ) -> None:
        self.upstream = (upstream[0], int(upstream[1]))
        self.listen_host = listen_host
        self.listen_port = listen_port
        self._profiles = (downstream_profile or LinkProfile(), upstream_profile or LinkProfile())
        self._seed = seed
        self._client: Address | None = None
        self._listen: _Endpoint | None = None
        self._out: _Endpoint | None = None
        self._down: _Direction | None = None
        self._up: _Direction | None = None
        self._closed = False

    @property
    def address(self) -> Address:
        """Where the client must send: the emulator's listen socket (after start())."""
        if self._listen is None or self._listen.transport is None:
            raise RuntimeError("LinkEmulator is not started")
        host, port = self._listen.transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def upstream_address(self) -> Address:
        """The emulator's own address as the server sees it (its peer-reflexive candidate)."""
        if self._out is None or self._out.transport is None:
            raise RuntimeError("LinkEmulator is not started")
        host, port = self._out.transport.get_extra_info("sockname")[:2]
        return host, port

    async def start(self) -> "LinkEmulator":
        if self._listen is not None or self._closed:
            raise RuntimeError("LinkEmulator can only be started once")
        loop = asyncio.get_running_loop()
        self._down = _Direction(loop, self._profiles[0], f"{self._seed}/down")
        self._up = _Direction(loop, self._profiles[1], f"{self._seed}/up")
        self._down.send = self._send_to_client
        self._up.send = self._send_to_server
        _, listen = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self._from_client), local_addr=(self.listen_host, self.listen_port)
        )
        self._listen = listen
        try:
            # A connected socket: the kernel picks the source address that reaches upstream, and
            # datagrams from anyone but the server are filtered out for us.
            _, out = await loop.create_datagram_endpoint(lambda: _Endpoint(self._from_server), remote_addr=self.upstream)
        except BaseException:
            await self.close()
            raise
        self._out = out
        return self

    def set_downstream(self, profile: LinkProfile) -> None:
        """Shape server -> client with ``profile`` from now on (queued packets keep their times)."""
        self._profiles = (profile, self._profiles[1])
        if self._down is not None:
            self._down.set_profile(profile)

    def set_upstream(self, profile: LinkProfile) -> None:
        """Shape client -> server with ``profile`` from now on."""
        self._profiles = (self._profiles[0], profile)
        if self._up is not None:
            self._up.set_profile(profile)

    @property
    def downstream(self) -> LinkProfile:
        return self._profiles[0]

    @property
    def upstream_profile(self) -> LinkProfile:
        return self._profiles[1]

    def stats(self) -> LinkStats:
        if self._down is None or self._up is None:
            return LinkStats(client=self._client)
        return LinkStats(self._down.snapshot(), self._up.snapshot(), self._client)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for direction in (self._down, self._up):
            if direction is not None:
                direction.close()
        endpoints = [e for e in (self._listen, self._out) if e is not None and e.transport is not None]
        for endpoint in endpoints:
            endpoint.transport.close()  # type: ignore[union-attr]
        # transport.close() releases the socket on the next loop turn: wait so callers can rely on it.
        await asyncio.gather(*(e.closed for e in endpoints))

    async def __aenter__(self) -> "LinkEmulator":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Datagram plumbing.

    def _from_client(self, data: bytes, addr: Address) -> None:
        self._client = (addr[0], addr[1])  # latest wins: follows a client whose port changes
        assert self._up is not None
        self._up.push(data)

    def _from_server(self, data: bytes, addr: Address) -> None:
        assert self._down is not None
        self._down.push(data)

    def _send_to_server(self, data: bytes) -> bool:
        if self._closed or self._out is None or self._out.transport is None:
            return False
        self._out.transport.sendto(data)
        return True

    def _send_to_client(self, data: bytes) -> bool:
        if self._closed or self._client is None or self._listen is None or self._listen.transport is None:
            return False  # nobody to deliver to yet
        self._listen.transport.sendto(data, self._client)
        return True


# SDP helpers.

_CANDIDATE_RE = re.compile(r"^a=candidate:\S+ (\d+) (\S+) \d+ (\S+) (\d+) typ (\S+)")


def host_candidate(host: str, port: int) -> str:
    return f"a=candidate:1 1 udp 2130706431 {host} {port} typ host"


def _connection_line(host: str) -> str:
    return f"c=IN {'IP6' if ':' in host else 'IP4'} {host}"


def rewrite_candidates(answer_sdp: str, host: str, port: int) -> str:
    """Point an SDP answer at ``host:port``: every ``a=candidate:`` goes, one host candidate comes in.

    Per media section (rejected ``m=`` lines with port 0 are left alone): the candidate is inserted
    where the first original candidate was (else at the end of the section, before
    ``a=end-of-candidates`` if present), the ``c=`` line and the ``m=`` port are set to it, and
    ``a=rtcp:`` lines carrying an address are dropped (with rtcp-mux they would only be stale).
    """
    newline = "\r\n" if "\r\n" in answer_sdp else "\n"
    lines = answer_sdp.replace("\r\n", "\n").split("\n")
    trailing = lines and lines[-1] == ""
    if trailing:
        lines.pop()
    candidate = host_candidate(host, port)
    out: list[str] = []
    section: list[str] | None = None  # lines of the current media section

    def flush() -> None:
        if section is None:
            return
        m_parts = section[0].split()
        if len(m_parts) >= 2 and m_parts[1].split("/")[0] == "0":
            out.extend(line for line in section if not line.startswith("a=candidate:"))
            return
        m_parts[1] = str(port)
        body: list[str] = [" ".join(m_parts)]
        placed = False
        has_c = False
        for line in section[1:]:
            if line.startswith("a=candidate:"):
                if not placed:
                    body.append(candidate)
                    placed = True
                continue
            if line.startswith("c="):
                body.append(_connection_line(host))
                has_c = True
                continue
            if line.startswith("a=rtcp:") and len(line.split()) > 1:
                continue
            if line == "a=end-of-candidates" and not placed:
                body.append(candidate)
                placed = True
            body.append(line)
        if not has_c:
            body.insert(2 if len(body) > 1 and body[1].startswith("i=") else 1, _connection_line(host))
        if not placed:
            body.append(candidate)
        out.extend(body)

    for line in lines:
        if line.startswith("m="):
            flush()
            section = [line]
        elif section is not None:
            section.append(line)
        elif line.startswith("c="):
            out.append(_connection_line(host))  # session-level connection line
        else:
            out.append(line)
    flush()
    return newline.join(out) + (newline if trailing else "")


def strip_candidates(offer_sdp: str) -> str:
    """Remove every ``a=candidate:`` and ``a=end-of-candidates`` line (for the client's offer).

    If the server learns the client's real host candidates it checks them directly, and the pair
    it finds can bypass the emulator. Without them (and without end-of-candidates, so it keeps
    waiting) its only way back to the client is the emulator's peer-reflexive address.
    """
    newline = "\r\n" if "\r\n" in offer_sdp else "\n"
    lines = offer_sdp.replace("\r\n", "\n").split("\n")
    kept = [line for line in lines if not line.startswith("a=candidate:") and line != "a=end-of-candidates"]
    return newline.join(kept)


def first_host_candidate(sdp: str) -> Address:
    """The address of the first UDP host candidate in ``sdp`` (component 1)."""
    for line in sdp.replace("\r\n", "\n").split("\n"):
        match = _CANDIDATE_RE.match(line.strip())
        if match and match.group(1) == "1" and match.group(2).lower() == "udp" and match.group(5) == "host":
            return match.group(3), int(match.group(4))
    raise ValueError("no UDP host candidate in the SDP")


async def emulate_for(answer_sdp: str, **kwargs: Any) -> tuple[LinkEmulator, str]:
    """Start an emulator in front of the answer's first UDP host candidate.

    ``kwargs`` go to :class:`LinkEmulator` (``listen_host``, ``downstream_profile``, ``seed``...).
    Returns the running emulator and the answer rewritten to point at it.
    """
    emu = LinkEmulator(first_host_candidate(answer_sdp), **kwargs)
    await emu.start()
    host, port = emu.address
    return emu, rewrite_candidates(answer_sdp, host, port)
