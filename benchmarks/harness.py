"""Helpers shared by the media benchmarks: servers as subprocesses, a stamped 720p publisher, probe
viewers that decode and read the timecode, lightweight load viewers (no decode), CPU/RSS sampling.

Load viewers run in worker processes: ``python -m benchmarks.harness load --whep URL`` reads
commands on stdin (``add N``, ``count``, ``quit``) and answers one line each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import av
import numpy as np
import psutil
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack, VideoStreamTrack
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket

from relay.client import WebRtcClient, WhipError, whep_play, whip_publish  # noqa: F401 (re-exported)
from relay.aiortc_private import intercept_rtcp
from relay.codecs import Vp8Encoder
from relay.ice import rtc_configuration
from relay.synthetic import ToneTrack, colour_bars

from . import timecode as tc
from .common import RESULTS_DIR

ROOT = Path(__file__).resolve().parent.parent
RESULTS = RESULTS_DIR
RESULTS_QUICK = RESULTS_DIR / "quick"  # --quick runs (CI) land here, not over the full results
ADMIN_KEY = "bench-admin-key"
WIDTH, HEIGHT, FPS = 1280, 720, 30
PUBLISHER_BITRATE = 1_500_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_aiortc_vp8_bitrate(bitrate: int = PUBLISHER_BITRATE) -> None:
    """Make aiortc's own VP8 encoders in THIS process start (and stay) at ``bitrate``.

    aiortc starts at 500 kbit/s and follows REMB up to 1.5 Mbit/s; the benchmark publisher must be
    the same 720p30 1.5 Mbit/s stream for every variant, from the first frame.
    """
    from aiortc.codecs import vpx

    vpx.DEFAULT_BITRATE = bitrate
    vpx.MIN_BITRATE = bitrate
    vpx.MAX_BITRATE = bitrate


# --- processes -----------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A server (shelfcast or the naive relay) running as its own process."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    nodes: int = 1  # worker processes that must have joined before the server counts as up
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, ready_path: str = "/healthz", timeout: float = 20.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bench-{self.name}-")
        self.log_path = Path(self._tmp.name) / "server.log"
        log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.setdefault("SHELFCAST_DATA_DIR", str(Path(self._tmp.name) / "data"))
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(self.base + ready_path) as resp:
                        if resp.status < 500 and await self._all_nodes_up(http):
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not come up:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    async def _all_nodes_up(self, http: aiohttp.ClientSession) -> bool:
        if self.nodes <= 1:
            return True
        async with http.get(self.base + "/api/nodes") as resp:
            return resp.status == 200 and len((await resp.json())["nodes"]) >= self.nodes

    def log_tail(self, n: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def shelfcast_server(port: int | None = None, *, redis_url: str = "", workers: int = 1, egress: str = "native",
                     forward: bool = True) -> ServerProcess:
    port = port or free_port()
    # Every benchmark client comes from 127.0.0.1: the per-address limits would measure themselves.
    argv = [sys.executable, "-m", "signaling.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--join-limit", "0", "--order-limit", "0"]
    if redis_url:
        argv += ["--redis", redis_url, "--workers", str(workers)]
    argv += ["--egress", egress]
    name = "shelfcast" if workers == 1 else f"shelfcast-{workers}w"
    env = {"SHELFCAST_ADMIN_KEY": ADMIN_KEY, "SHELFCAST_FORWARD": "1" if forward else "0"}
    return ServerProcess(name, argv, port, env=env, nodes=workers)


def naive_server(port: int | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess("naive", [sys.executable, "-m", "benchmarks.naive_relay", "--port", str(port)], port)


@contextlib.asynccontextmanager
async def running(server: ServerProcess) -> AsyncIterator[ServerProcess]:
    try:
        await server.start()
        yield server
    finally:
        server.stop()


@dataclass
class Endpoints:
    whip: str
    whep: str
    watch: str | None
    host_token: str | None
    room: str
    tokens: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


async def seed_catalogue(http: aiohttp.ClientSession, server: ServerProcess) -> list[str]:
    """A warehouse and four variants, so shelfcast rooms are measured with the stock overlay ON."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    skus = {"bench-s": "S", "bench-m": "M", "bench-l": "L", "bench-xl": "XL"}
    async with http.put(f"{server.base}/api/warehouses/BENCH", json={"name": "Bench", "regions": ["US-West"]}, headers=admin) as resp:
        resp.raise_for_status()
    for sku, size in skus.items():
        body = {"name": "Cloud Hoodie 云朵连帽衫", "price": "39.00", "currency": "USD", "group": "hoodie", "attributes": {"size": size}}
        async with http.put(f"{server.base}/api/skus/{sku}", json=body, headers=admin) as resp:
            resp.raise_for_status()
    levels = [{"sku": sku, "on_hand": 50 * (i + 1)} for i, sku in enumerate(skus)]
    async with http.put(
        f"{server.base}/api/warehouses/BENCH/snapshot", json={"as_of": time.time(), "levels": levels}, headers=admin
    ) as resp:
        resp.raise_for_status()
    return list(skus)


async def create_room(http: aiohttp.ClientSession, server: ServerProcess, title: str = "bench", mode: str = "show") -> Endpoints:
    if server.name == "naive":
        room = "bench"
        return Endpoints(f"{server.base}/whip/{room}", f"{server.base}/whep/{room}", None, None, room)
    skus = await seed_catalogue(http, server)
    async with http.post(
        f"{server.base}/api/rooms",
        json={"mode": mode, "title": title, "region": "US-West", "skus": skus},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"create room: {resp.status} {body}")
    room_id = body["id"]
    tokens = body["tokens"]
    return Endpoints(
        f"{server.base}/whip/{room_id}",
        f"{server.base}/whep/{room_id}",
        body["links"].get("watch"),
        tokens.get("host") or tokens.get("seller"),
        room_id,
        tokens,
        body["links"],
    )


async def overlay_state(http: aiohttp.ClientSession, server: ServerProcess, ep: Endpoints) -> dict[str, Any]:
    """Whether the stock overlay was drawn: its settings, and whether the room has SKUs to show."""
    state: dict[str, Any] = {"overlay_on": False, "room_skus": 0}
    if server.name != "shelfcast":
        return state
    with contextlib.suppress(aiohttp.ClientError, ValueError):
        async with http.get(f"{server.base}/api/rooms/{ep.room}/overlay") as resp:
            if resp.status == 200:
                state["overlay_settings"] = await resp.json()
        async with http.get(f"{server.base}/api/rooms/{ep.room}") as resp:
            if resp.status == 200:
                state["room_skus"] = len((await resp.json()).get("skus", []))
    state["overlay_on"] = bool(state.get("overlay_settings", {}).get("enabled")) and state["room_skus"] > 0
    return state


class CpuMeter:
    """CPU seconds (user + system, all threads) and RSS of another process and its children (the
    workers of ``serve --workers N``)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.procs = [self.proc, *self.proc.children(recursive=True)]

    def per_process_cpu_s(self) -> list[float]:
        out = []
        for p in self.procs:
            try:
                t = p.cpu_times()
                out.append(t.user + t.system)
            except psutil.Error:
                out.append(0.0)
        return out

    def cpu_s(self) -> float:
        return sum(self.per_process_cpu_s())

    def rss_mb(self) -> float:
        total = 0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 1e6

    def main_thread_cpu_s(self) -> float:
        """CPU seconds of the main threads (the asyncio event loops of our servers)."""
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                for t in p.threads():
                    if t.id == p.pid:
                        total += t.user_time + t.system_time
        return total

    async def measure(self, seconds: float) -> tuple[float, float]:
        """(cores used on average over ``seconds``, RSS MB at the end)."""
        c0, w0 = self.cpu_s(), time.monotonic()
        await asyncio.sleep(seconds)
        c1, w1 = self.cpu_s(), time.monotonic()
        return (c1 - c0) / (w1 - w0), self.rss_mb()


class MachineMeter:
    """Whole-machine busy cores, and how much of it is NOT this benchmark (its own process tree):
    other work on a shared machine that the figures should be read against."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self._start: tuple[float, float, float] | None = None

    def _tree_cpu(self) -> float:
        total = 0.0
        for p in [self.me, *self.me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def start(self) -> None:
        self._start = (time.monotonic(), self._busy(), self._tree_cpu())

    def stop(self) -> dict[str, float]:
        assert self._start is not None
        w0, b0, c0 = self._start
        wall = time.monotonic() - w0
        busy = (self._busy() - b0) / wall
        own = (self._tree_cpu() - c0) / wall
        return {"machine_busy_cores": round(busy, 3), "foreign_cores": round(max(0.0, busy - own), 3)}


class CpuWindow:
    """Cores used by several processes (and the server's event-loop thread) over one window."""

    def __init__(self, server: CpuMeter, others: dict[str, list[int]]) -> None:
        self.server = server
        self.others = {name: [psutil.Process(pid) for pid in pids] for name, pids in others.items()}

    def _sample(self) -> dict[str, float]:
        out = {"server": self.server.cpu_s(), "server_loop": self.server.main_thread_cpu_s(), "wall": time.monotonic()}
        for name, procs in self.others.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    async def measure(self, seconds: float) -> dict[str, float]:
        a = self._sample()
        await asyncio.sleep(seconds)
        b = self._sample()
        wall = b.pop("wall") - a.pop("wall")
        result = {f"{k}_cores": (b[k] - a[k]) / wall for k in a}
        result["rss_mb"] = self.server.rss_mb()
        return result


# --- publisher -----------------------------------------------------------------------------------


def _bars_yuv420(width: int, height: int) -> np.ndarray:
    bgr = colour_bars(width, height)
    return av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p").to_ndarray()


class StampedVideoTrack(VideoStreamTrack):
    """1280x720 at 30 fps: colour bars under a scrolling texture and a moving box, with the capture
    time (CLOCK_MONOTONIC, microseconds) and a sequence number burnt into the top-left corner at the
    moment the frame is handed to the encoder."""

    def __init__(self, width: int = WIDTH, height: int = HEIGHT) -> None:
        super().__init__()
        self.width, self.height = width, height
        self._base = _bars_yuv420(width, height)
        rng = np.random.default_rng(7)
        # A texture wider than the picture; each frame shows a different window (real motion).
        self._texture = rng.integers(-24, 24, (height, width + 512), dtype=np.int16)
        self.seq = 0
        self.sent: list[tuple[int, int]] = []  # (seq, capture_us), for delivery accounting

    def render(self, index: int) -> np.ndarray:
        arr = self._base.copy()
        h, w = self.height, self.width
        shift = (index * 8) % 512
        y = arr[:h].astype(np.int16)
        y += self._texture[:, shift : shift + w]
        np.clip(y, 0, 255, out=y)
        arr[:h] = y.astype(np.uint8)
        size = h // 4
        x = int((np.sin(index / 30.0) * 0.5 + 0.5) * (w - size))
        arr[(h - size) // 2 : (h + size) // 2, x : x + size] = 235
        return arr

    async def recv(self) -> av.VideoFrame:  # type: ignore[override]
        pts, time_base = await self.next_timestamp()
        arr = self.render(self.seq)
        capture = tc.now_us()
        tc.stamp_yuv420(arr, self.width, self.height, capture, self.seq)
        frame = av.VideoFrame.from_ndarray(arr, format="yuv420p")
        frame.pts = pts
        frame.time_base = time_base
        self.sent.append((self.seq, capture))
        if len(self.sent) > 100_000:
            del self.sent[:50_000]
        self.seq = (self.seq + 1) & tc.SEQ_MASK
        return frame


class EncodedStampedVideoTrack(StampedVideoTrack):
    """The same stamped picture, encoded here and handed to aiortc as VP8 packets (aiortc then only
    packetizes them).

    aiortc's own encoder (speed -6, two threads) cost the fan-out benchmark's driver ~0.8 cores
    at 720p30, and that core is taken from the server being measured on this 2-core machine. A real
    host encodes on its own phone or PC, so the capacity benchmarks use the server's cheap encoder
    settings (relay.codecs: speed 12, one thread, ~0.26 cores). aiortc ignores keyframe requests for
    pre-encoded tracks: ``answer_keyframe_requests(pc)`` after negotiation answers them here (the
    server asks after an ingest loss; without an answer its picture would wait for the next
    safety keyframe, every KEYFRAME_EVERY frames).
    """

    KEYFRAME_EVERY = 10 * FPS

    def __init__(self, width: int = WIDTH, height: int = HEIGHT, bitrate: int = PUBLISHER_BITRATE) -> None:
        super().__init__(width, height)
        self._encoder = Vp8Encoder(width, height, bitrate, FPS)
        self._encoded = 0
        self._keyframe_requested = False
        self.keyframe_requests = 0

    def answer_keyframe_requests(self, pc: RTCPeerConnection) -> None:
        sender = next(s for s in pc.getSenders() if s.track is self)

        def make_handler(original: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
            async def handle(packet: Any) -> None:
                if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                    self._keyframe_requested = True
                    self.keyframe_requests += 1
                await original(packet)

            return handle

        intercept_rtcp(sender, make_handler)

    async def recv(self) -> av.Packet:  # type: ignore[override]
        frame = await super().recv()
        keyframe = self._keyframe_requested or self._encoded % self.KEYFRAME_EVERY == 0
        self._keyframe_requested = False
        self._encoded += 1
        packets = await asyncio.to_thread(self._encoder.encode, frame, frame.pts, keyframe)
        packet = av.Packet(b"".join(bytes(p) for p in packets))
        packet.pts = frame.pts
        packet.time_base = frame.time_base
        return packet

    def stop(self) -> None:
        super().stop()
        self._encoder.close()


async def publish(http: aiohttp.ClientSession, ep: Any, *, encoded: bool = False) -> tuple[WebRtcClient, StampedVideoTrack]:
    """The benchmark host goes live in room ``ep`` (see publisher_tracks); returns the client and
    its video track (which records what it sent)."""
    video, audio = publisher_tracks(encoded=encoded)
    client = await whip_publish(http, ep.whip, ep.host_token or "", [video, audio], video_codec="video/VP8")
    if isinstance(video, EncodedStampedVideoTrack):
        video.answer_keyframe_requests(client.pc)
    return client, video


def publisher_tracks(*, encoded: bool = False) -> tuple[StampedVideoTrack, ToneTrack]:
    """The benchmark host's tracks; ``encoded`` for a host that encodes cheaply itself (see
    EncodedStampedVideoTrack), which the capacity benchmarks use."""
    return (EncodedStampedVideoTrack() if encoded else StampedVideoTrack()), ToneTrack()


# --- probe viewers (decode + read the code) ------------------------------------------------------


@dataclass
class Sample:
    seq: int
    capture_us: int
    decoded_us: int

    @property
    def latency_ms(self) -> float:
        return tc.elapsed_ms(self.capture_us, self.decoded_us)


class Probe:
    """Reads a viewer's remote tracks: video frames are decoded (by aiortc) and their code read;
    audio is drained so nothing queues up."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.unreadable = 0
        self.recording = False
        self.first_frame_at: float | None = None  # time.monotonic() of the first decoded frame
        self.first_frame = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind != "video":
                    continue
                now = tc.now_us()
                if self.first_frame_at is None:
                    self.first_frame_at = time.monotonic()
                    self.first_frame.set()
                if not self.recording:
                    continue
                code = tc.read_frame(frame)
                if code is None:
                    self.unreadable += 1
                else:
                    self.samples.append(Sample(code.seq, code.capture_us, now))
        except MediaStreamError:
            pass

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def latencies(samples: list[Sample]) -> list[float]:
    return [s.latency_ms for s in samples]


def delivery(samples: list[Sample], deadline_ms: float = 200.0) -> tuple[float, int, int]:
    """(share of frames on time, frames expected, frames on time) over the seq range seen.

    Frames are numbered consecutively at the publisher, so every missing number in the range was
    dropped somewhere (ingest, relay, network) and counts as late.
    """
    if not samples:
        return 0.0, 0, 0
    # unwrap the 16-bit sequence numbers
    seqs: list[int] = []
    base, last = 0, samples[0].seq
    on_time: set[int] = set()
    for s in samples:
        if s.seq < last and last - s.seq > 32768:
            base += 65536
        last = s.seq
        full = base + s.seq
        seqs.append(full)
        if s.latency_ms <= deadline_ms:
            on_time.add(full)
    expected = max(seqs) - min(seqs) + 1
    return len(on_time) / expected, expected, len(on_time)


async def probe_viewer(
    http: aiohttp.ClientSession, whep: str, kinds: tuple[str, ...] = ("video", "audio"), token: str | None = None
) -> tuple[WebRtcClient, Probe]:
    probe = Probe()
    client = await whep_play(http, whep, kinds=kinds, on_track=probe.on_track, token=token)
    return client, probe


async def direct_pair(video: MediaStreamTrack, audio: MediaStreamTrack | None) -> tuple[RTCPeerConnection, RTCPeerConnection, Probe]:
    """The floor: an aiortc publisher connected straight to an aiortc viewer, no server."""
    pub = RTCPeerConnection(rtc_configuration())
    sub = RTCPeerConnection(rtc_configuration())
    probe = Probe()
    sub.on("track", probe.on_track)
    pub.addTransceiver(video, direction="sendonly")
    if audio is not None:
        pub.addTransceiver(audio, direction="sendonly")
    await pub.setLocalDescription(await pub.createOffer())
    await sub.setRemoteDescription(RTCSessionDescription(pub.localDescription.sdp, "offer"))
    await sub.setLocalDescription(await sub.createAnswer())
    await pub.setRemoteDescription(RTCSessionDescription(sub.localDescription.sdp, "answer"))
    return pub, sub, probe


def stats(values: list[float]) -> dict[str, float]:
    from .common import percentile

    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "n": 0}
    return {
        "p50": round(percentile(values, 50), 2),
        "p95": round(percentile(values, 95), 2),
        "p99": round(percentile(values, 99), 2),
        "n": len(values),
    }


# --- lightweight load viewers (another process) --------------------------------------------------


class _RtpCounter:
    packets = 0
    bytes = 0


def _install_rtp_sink() -> None:
    """Receive RTP through ICE, DTLS and SRTP (unprotect) as usual, then count it instead of
    parsing, jitter-buffering and decoding it. Only ever called inside a load-worker process."""
    from aiortc.rtcdtlstransport import RTCDtlsTransport

    async def sink(self: Any, data: bytes, arrival_time_ms: int) -> None:
        _RtpCounter.packets += 1
        _RtpCounter.bytes += len(data)

    RTCDtlsTransport._handle_rtp_data = sink  # type: ignore[method-assign]


async def _load_worker(whep: str, batch: int) -> None:
    _install_rtp_sink()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    clients: list[WebRtcClient] = []
    # A connection per join, as separate people have: workers behind one port get their share.
    connector = aiohttp.TCPConnector(limit=batch, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> WebRtcClient:
            client = await whep_play(http, whep, kinds=("video", "audio"))
            await client.wait_connected(30)
            return client

        try:
            while True:
                line = (await reader.readline()).decode().strip()
                if not line or line == "quit":
                    break
                cmd, *args = line.split()
                if cmd == "add":
                    want = int(args[0])
                    failed = 0
                    while want > 0:
                        n = min(batch, want)
                        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
                        for r in results:
                            if isinstance(r, BaseException):
                                failed += 1
                            else:
                                clients.append(r)
                        want -= n
                    print(f"ok {len(clients)} failed {failed}", flush=True)
                elif cmd == "count":
                    connected = sum(c.pc.connectionState == "connected" for c in clients)
                    print(f"ok {connected} packets {_RtpCounter.packets} bytes {_RtpCounter.bytes}", flush=True)
                else:
                    print(f"error unknown command {cmd}", flush=True)
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


LOAD_NICE = 10


class LoadWorker:
    """Handle on a load-viewer worker process."""

    def __init__(self, whep: str, batch: int = 10) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.harness", "load", "--whep", whep, "--batch", str(batch)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.viewers = 0

    async def command(self, line: str, timeout: float = 300.0) -> str:
        return await ask_worker(self.proc, line, timeout, "load worker")

    async def packets(self) -> int:
        """RTP packets received so far by all of this worker's viewers."""
        return int((await self.command("count")).split()[3])

    async def add(self, n: int) -> int:
        if n <= 0:
            return 0
        parts = (await self.command(f"add {n}")).split()
        self.viewers = int(parts[1])
        return int(parts[3])  # failed

    def stop(self) -> None:
        quit_worker(self.proc, 15)


async def ask_worker(proc: subprocess.Popen[bytes], line: str, timeout: float, name: str,
                     log_tail: Callable[[], str] = lambda: "") -> str:
    """One command to a worker driven over stdin; its one-line answer, which must start with "ok"."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((line + "\n").encode())
    proc.stdin.flush()
    answer = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    text = answer.decode().strip()
    if not text.startswith("ok"):
        tail = log_tail()
        raise RuntimeError(f"{name}: {text or 'exited'}" + (f"\n{tail}" if tail else ""))
    return text


def quit_worker(proc: subprocess.Popen[bytes], wait_s: float) -> None:
    """Ask a worker driven over stdin to quit (it closes its peer connections); kill it if it does not."""
    if proc.poll() is None:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert proc.stdin is not None
            proc.stdin.write(b"quit\n")
            proc.stdin.flush()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def clean(value: Any) -> Any:
    """NaN -> None (null) all the way down, so the contract line is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # measuring an exported tree (git archive) of that commit
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def media_env() -> dict[str, Any]:
    import aiortc

    return {
        "aiortc": aiortc.__version__,
        "av": av.__version__,
        "commit": git_commit(),
        "publisher": f"{WIDTH}x{HEIGHT}@{FPS} VP8 {PUBLISHER_BITRATE // 1000} kbit/s (aiortc) + Opus tone",
        "clock": "CLOCK_MONOTONIC (time.monotonic_ns), same machine",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load-viewer worker (driven over stdin)")
    load.add_argument("--whep", required=True)
    load.add_argument("--batch", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "load":
        # Load viewers are sinks standing in for viewers on other machines: on a shared machine they
        # yield the CPU to the server under test and to the sampled viewers that measure it.
        os.nice(LOAD_NICE)
        asyncio.run(_load_worker(args.whep, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())

