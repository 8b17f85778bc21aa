"""Userspace link emulator: exact shaper tables, SDP rewriting, loopback UDP, a real WHEP viewer."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from relay.client import whip_publish
from relay.ice import rtc_configuration
from relay.linkemu import (
    Address,
    LinkEmulator,
    LinkProfile,
    LinkShaper,
    emulate_for,
    first_host_candidate,
    rewrite_candidates,
    strip_candidates,
)
from relay.synthetic import PatternTrack

from .conftest import FrameCollector, RunningServer

# --- pure shaper ------------------------------------------------------------------------------

# 80 kbit/s = 10 000 B/s: a 1000-byte packet takes exactly 0.1 s; bucket 1000 B; queue 2500 B.
TABLE_PROFILE = LinkProfile(rate_bps=80_000, queue_bytes=2_500, burst_bytes=1_000)
# (arrival s, size B) -> (verdict, departure s or None, queue bytes right after the arrival)
TABLE: list[tuple[float, int, str, float | None, int]] = [
    (0.00, 1000, "forward", 0.00, 0),  # full bucket: leaves at once, never queued
    (0.00, 1000, "forward", 0.10, 1000),  # bucket empty: waits one packet time
    (0.00, 1000, "forward", 0.20, 2000),
    (0.00, 1000, "drop_queue", None, 2000),  # 2000 + 1000 > 2500: tail drop, bucket untouched
    (0.05, 500, "forward", 0.25, 2500),  # exactly fills the queue (limit is inclusive)
    (0.10, 1000, "forward", 0.35, 2500),  # the 0.10 packet left: room again
    (0.12, 100, "drop_queue", None, 2500),
    (1.00, 1000, "forward", 1.00, 0),  # idle long enough: bucket refilled, capped at burst
    (1.00, 1500, "forward", 1.15, 1500),  # bigger than the bucket: sent after the missing 1500 B
]


def test_token_bucket_table() -> None:
    shaper = LinkShaper(TABLE_PROFILE)
    for now, size, verdict, departure, queued in TABLE:
        decision = shaper.offer(now, size)
        assert decision.verdict == verdict, (now, size)
        if departure is None:
            assert decision.departure is None and decision.deliver_at is None
        else:
            assert decision.departure == pytest.approx(departure, abs=1e-9), (now, size)
            assert decision.deliver_at == pytest.approx(departure, abs=1e-9)  # no delay configured
        assert shaper.queue_bytes(now) == queued, (now, size)
    assert shaper.queue_bytes(1.15) == 0


def test_pacing_table_without_burst() -> None:
    # A zero-depth bucket is a pure pacer: back-to-back packets are spaced by size / rate.
    shaper = LinkShaper(LinkProfile(rate_bps=8_000, burst_bytes=0, queue_bytes=10_000, delay_ms=10))
    got = [shaper.offer(0.0, size) for size in (100, 200, 100)]
    assert [d.departure for d in got] == pytest.approx([0.1, 0.3, 0.4])
    assert [d.deliver_at for d in got] == pytest.approx([0.11, 0.31, 0.41])  # + fixed one-way delay
    assert shaper.queue_bytes(0.0) == 400
    assert shaper.queue_bytes(0.3) == 100


def test_unlimited_profile_is_a_wire() -> None:
    shaper = LinkShaper(LinkProfile())
    assert not LinkProfile().shaped
    for i in range(100):
        d = shaper.offer(i * 0.001, 60_000)
        assert (d.verdict, d.departure, d.deliver_at) == ("forward", i * 0.001, i * 0.001)
    assert shaper.queue_bytes(1.0) == 0


def test_rate_change_keeps_admitted_departures() -> None:
    shaper = LinkShaper(LinkProfile(rate_bps=80_000, burst_bytes=0))
    first = shaper.offer(0.0, 1000)
    assert first.departure == pytest.approx(0.1)
    shaper.set_profile(LinkProfile(rate_bps=160_000, burst_bytes=0), now=0.0)
    # The new packet queues behind the one admitted at the old rate, then takes 0.05 s at the new rate.
    assert shaper.offer(0.0, 1000).departure == pytest.approx(0.15)
    assert shaper.queue_bytes(0.0) == 2000
    shaper.set_profile(LinkProfile(rate_bps=8_000, burst_bytes=0), now=0.12)  # slower again
    assert shaper.offer(0.12, 100).departure == pytest.approx(0.25)  # after 0.15, then 100 B at 1000 B/s


def test_jitter_never_reorders_unless_allowed() -> None:
    profile = LinkProfile(delay_ms=20, jitter_ms=15)
    fifo = LinkShaper(profile, seed=7)
    times = [fifo.offer(i * 0.001, 100).deliver_at for i in range(500)]
    assert times == sorted(times)
    assert all(t is not None and t >= i * 0.001 + 0.005 - 1e-9 for i, t in enumerate(times))  # delay - jitter
    loose = LinkShaper(LinkProfile(delay_ms=20, jitter_ms=15, allow_reorder=True), seed=7)
    times = [loose.offer(i * 0.001, 100).deliver_at for i in range(500)]
    assert times != sorted(times)  # 1 ms spacing with +/-15 ms jitter must reorder somewhere
    assert all(t is not None and i * 0.001 + 0.005 - 1e-9 <= t <= i * 0.001 + 0.035 + 1e-9 for i, t in enumerate(times))


def test_loss_is_reproducible_per_seed() -> None:
    def lost(seed: int) -> list[int]:
        shaper = LinkShaper(LinkProfile(loss=0.1), seed=seed)
        return [i for i in range(1000) if shaper.offer(i * 0.01, 100).verdict == "drop_loss"]

    assert lost(3) == lost(3)
    assert lost(3) != lost(4)
    assert 70 <= len(lost(3)) <= 130


def test_profile_validation() -> None:
    for bad in ({"rate_bps": 0}, {"loss": 1.5}, {"delay_ms": -1}, {"queue_bytes": -1}, {"rate_bps": float("inf")}):
        with pytest.raises(ValueError):
            LinkProfile(**bad)


# --- SDP --------------------------------------------------------------------------------------

ANSWER = "\r\n".join(
    [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=video 53669 UDP/TLS/RTP/SAVPF 97",
        "c=IN IP4 192.0.2.2",
        "a=sendonly",
        "a=mid:0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=rtcp-mux",
        "a=rtpmap:97 VP8/90000",
        "a=candidate:abc 1 tcp 1518280447 192.0.2.9 9 typ host tcptype passive",
        "a=candidate:f95 1 udp 2130706431 192.0.2.2 53669 typ host",
        "a=candidate:f96 1 udp 1694498815 203.0.113.5 61000 typ srflx raddr 192.0.2.2 rport 53669",
        "a=end-of-candidates",
        "a=ice-ufrag:WHeC",
        "a=setup:active",
        "m=audio 53669 UDP/TLS/RTP/SAVPF 96",
        "c=IN IP4 192.0.2.2",
        "a=mid:1",
        "a=rtcp-mux",
        "a=candidate:f95 1 udp 2130706431 192.0.2.2 53669 typ host",
        "a=ice-ufrag:WHeC",
        "m=application 0 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=mid:2",
        "",
    ]
)


def sections(sdp: str) -> list[list[str]]:
    out: list[list[str]] = []
    for line in sdp.split("\r\n"):
        if line.startswith("m="):
            out.append([line])
        elif out:
            out[-1].append(line)
    return out


def test_rewrite_candidates() -> None:
    rewritten = rewrite_candidates(ANSWER, "127.0.0.1", 40000)
    assert "\n" not in rewritten.replace("\r\n", "")  # CRLF kept throughout
    assert rewritten.endswith("\r\n")
    video, audio, data = sections(rewritten)
    for media in (video, audio):
        assert [line for line in media if line.startswith("a=candidate:")] == [
            "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host"
        ]
        assert [line for line in media if line.startswith("c=")] == ["c=IN IP4 127.0.0.1"]
        assert media[0].split()[1] == "40000"
        assert not any(line.startswith("a=rtcp:") for line in media)
    assert video.index("a=end-of-candidates") == video.index("a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host") + 1
    assert "a=end-of-candidates" not in audio  # not invented where the server did not send it
    assert data == ["m=application 0 UDP/DTLS/SCTP webrtc-datachannel", "c=IN IP4 0.0.0.0", "a=mid:2", ""]
    assert rewritten.startswith("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n")
    assert rewrite_candidates(rewritten, "127.0.0.1", 40000) == rewritten  # idempotent
    assert "c=IN IP6 ::1" in rewrite_candidates(ANSWER, "::1", 1)


def test_first_host_candidate_and_strip() -> None:
    assert first_host_candidate(ANSWER) == ("192.0.2.2", 53669)  # skips the TCP one
    stripped = strip_candidates(ANSWER)
    assert "a=candidate" not in stripped and "a=end-of-candidates" not in stripped
    assert "a=ice-ufrag:WHeC" in stripped
    with pytest.raises(ValueError):
        first_host_candidate(stripped)


# --- loopback UDP -----------------------------------------------------------------------------


class Peer(asyncio.DatagramProtocol):
    """A UDP socket that records (arrival time, payload, source) and can answer with ``reply``."""

    def __init__(self, reply: Any = None) -> None:
        self.reply = reply
        self.received: list[tuple[float, bytes, Address]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received.append((asyncio.get_running_loop().time(), data, addr))
        self.arrived.set()
        if self.reply is not None and self.transport is not None:
            self.transport.sendto(self.reply(data), addr)

    @property
    def address(self) -> Address:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    async def wait_count(self, count: int, timeout: float = 5.0) -> None:
        async def reached() -> None:
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(reached(), timeout)


async def open_peer(reply: Any = None) -> Peer:
    _, peer = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: Peer(reply), local_addr=("127.0.0.1", 0)
    )
    return peer


@pytest.fixture
async def link() -> Any:
    """A server peer that answers every datagram with its bytes reversed, a client peer, an emulator."""
    server = await open_peer(reply=lambda data: b"S" + data[::-1])
    client = await open_peer()
    emu = LinkEmulator(server.address, seed=11)
    await emu.start()
    yield server, client, emu
    await emu.close()
    for peer in (server, client):
        assert peer.transport is not None
        peer.transport.close()


async def test_bytes_pass_unchanged_both_ways(link: tuple[Peer, Peer, LinkEmulator]) -> None:
    server, client, emu = link
    payloads = [os.urandom(n) for n in (1, 20, 100, 1200, 1472)] + [b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)]
    assert client.transport is not None
    for payload in payloads:
        client.transport.sendto(payload, emu.address)
    await client.wait_count(len(payloads))
    assert [data for _, data, _ in server.received] == payloads
    assert [data for _, data, _ in client.received] == [b"S" + p[::-1] for p in payloads]
    # The server sees the emulator's own socket, the client sees the emulator's listen address.
    assert {addr for _, _, addr in server.received} == {emu.upstream_address}
    assert {addr for _, _, addr in client.received} == {emu.address}
    stats = emu.stats()
    assert stats.client == client.address
    total = sum(len(p) for p in payloads)
    assert (stats.upstream.packets, stats.upstream.bytes) == (len(payloads), total)
    assert (stats.downstream.packets, stats.downstream.bytes) == (len(payloads), total + len(payloads))


async def test_delay_is_added_per_direction(link: tuple[Peer, Peer, LinkEmulator]) -> None:
    server, client, emu = link
    emu.set_downstream(LinkProfile(delay_ms=60))
    emu.set_upstream(LinkProfile(delay_ms=40, jitter_ms=10))
    assert client.transport is not None
    loop = asyncio.get_running_loop()
    sent: list[float] = []
    for i in range(10):
        sent.append(loop.time())
        client.transport.sendto(i.to_bytes(2, "big"), emu.address)
        await asyncio.sleep(0.005)
    await client.wait_count(10)
    for i in range(10):
        up_at = server.received[i][0]
        down_at = client.received[i][0]
        assert up_at - sent[i] >= 0.030 - 0.002  # 40 ms - 10 ms jitter (timer granularity slack)
        assert down_at - up_at >= 0.060 - 0.002
        assert client.received[i][1] == b"S" + i.to_bytes(2, "big")[::-1]  # FIFO despite jitter


async def test_seeded_loss_count(link: tuple[Peer, Peer, LinkEmulator]) -> None:
    server, client, emu = link
    emu.set_upstream(LinkProfile(loss=0.2))
    assert client.transport is not None
    for i in range(500):
        client.transport.sendto(i.to_bytes(2, "big") + bytes(98), emu.address)
        if i % 50 == 49:
            await asyncio.sleep(0.005)  # keep loopback socket buffers far from full
    await asyncio.sleep(0.2)
    stats = emu.stats().upstream
    # Exact for seed=11 (the RNG stream is per direction, derived from the emulator's seed).
    assert stats.dropped_loss == 121
    assert stats.packets == len(server.received) == 500 - 121
    pure = LinkShaper(LinkProfile(loss=0.2), seed="11/up")
    assert sum(pure.offer(0.0, 100).verdict == "drop_loss" for _ in range(500)) == 121  # same stream
    # Survivors arrive in order, byte-for-byte.
    indices = [int.from_bytes(data[:2], "big") for _, data, _ in server.received]
    assert indices == sorted(indices)


async def test_rate_cap_and_tail_drop(link: tuple[Peer, Peer, LinkEmulator]) -> None:
    server, client, emu = link
    emu.set_downstream(LinkProfile(rate_bps=400_000, queue_bytes=64_000))
    assert client.transport is not None and server.transport is not None
    client.transport.sendto(b"hello", emu.address)  # teaches both sides each other's address
    await client.wait_count(1)
    emu_out = server.received[0][2]
    loop = asyncio.get_running_loop()
    packet = bytes(1200)
    interval = len(packet) * 8 / 1_000_000  # 1 Mbit/s offered
    start = loop.time()
    duration = 2.0
    sent = 0
    while (now := loop.time()) - start < duration:
        # Catch up on schedule after oversleeping so the offered rate really is 1 Mbit/s.
        while sent * interval <= now - start:
            server.transport.sendto(packet, emu_out)
            sent += 1
        await asyncio.sleep(interval)
    # The delivered rate is measured over a window that starts after the bucket's initial burst.
    window = (start + 0.3, start + duration)
    got = sum(len(data) for t, data, _ in client.received[1:] if window[0] <= t < window[1])
    rate = got * 8 / (window[1] - window[0])
    assert rate == pytest.approx(400_000, rel=0.10)
    stats = emu.stats().downstream
    assert stats.dropped_queue > 0
    assert 0 < stats.queue_bytes <= 64_000
    assert stats.dropped_loss == 0
    # Everything offered was either forwarded, dropped at the queue or is still in flight.
    assert stats.packets - 1 + stats.dropped_queue + stats.in_flight == sent


async def test_close_is_idempotent_and_releases_sockets() -> None:
    server = await open_peer(reply=lambda data: data)
    emu = LinkEmulator(server.address, downstream_profile=LinkProfile(delay_ms=500))
    await emu.start()
    client = await open_peer()
    assert client.transport is not None
    client.transport.sendto(b"x", emu.address)
    await asyncio.sleep(0.05)
    assert emu.stats().downstream.in_flight == 1  # a timer is pending on the delay line
    port = emu.address[1]
    await emu.close()
    await emu.close()
    assert emu.stats().downstream.in_flight == 0
    # The listen port is free again (the socket is really closed, not just scheduled for closing).
    again = LinkEmulator(server.address, listen_port=port)
    await again.start()
    await again.close()
    for peer in (server, client):
        assert peer.transport is not None
        peer.transport.close()


# --- a real aiortc WHEP viewer through the emulator -------------------------------------------


async def test_whep_viewer_through_emulator(server: RunningServer) -> None:
    room = await server.create_room()
    publisher = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
    collector = FrameCollector()
    pc = RTCPeerConnection(rtc_configuration())
    emu: LinkEmulator | None = None
    try:
        for kind in ("video", "audio"):
            pc.addTransceiver(kind, direction="recvonly")
        pc.on("track", collector.on_track)
        await pc.setLocalDescription(await pc.createOffer())
        # Without the client's own candidates the server can only reach it via the emulator's
        # peer-reflexive address; with them its checks find the direct path and media may bypass us.
        offer = strip_candidates(pc.localDescription.sdp)
        async with server.http.post(
            room["links"]["whep"], data=offer, headers={"Content-Type": "application/sdp"}
        ) as resp:
            assert resp.status == 201, await resp.text()
            answer = await resp.text()
        emu, rewritten = await emulate_for(
            answer, downstream_profile=LinkProfile(rate_bps=2_000_000, delay_ms=20, jitter_ms=5), seed=1
        )
        assert emu.upstream == first_host_candidate(answer)
        await pc.setRemoteDescription(RTCSessionDescription(rewritten, "answer"))

        async def connected() -> None:
            while pc.connectionState != "connected":
                assert pc.connectionState not in ("failed", "closed")
                await asyncio.sleep(0.02)

        await asyncio.wait_for(connected(), 10)
        await collector.wait_for("video", 15)
        assert collector.last_video is not None  # decoded, not just received
        stats = emu.stats()
        assert stats.downstream.packets > 15 and stats.downstream.bytes > 3_000
        assert stats.upstream.packets > 0  # STUN checks, DTLS and RTCP went through us too
        assert stats.client is not None

        # Cut the emulated downstream: the viewer must stall, proving there is no direct path.
        emu.set_downstream(LinkProfile(loss=1.0))
        await asyncio.sleep(0.5)  # drain what was already in flight and in the jitter buffer
        frozen = collector.frames["video"]
        dropped = emu.stats().downstream.dropped_loss
        await asyncio.sleep(0.7)
        assert collector.frames["video"] == frozen
        assert emu.stats().downstream.dropped_loss > dropped
    finally:
        await pc.close()
        await collector.stop()
        await publisher.close()
        if emu is not None:
            await emu.close()
