"""Real aiortc peers on loopback: a synthetic host, viewers decoding what the relay sends."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import AsyncIterator

import pytest

from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket

from relay import egress
from relay.client import whep_play, whip_publish
from relay.sessions import INGEST_RECEIVE_BUFFER
from relay.synthetic import PatternTrack, ToneTrack
from signaling.config import Config

from .conftest import FrameCollector, RunningServer, serving_with_media

SMALL = (320, 180)


def encoder_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("shelfcast-")]


async def publish(server: RunningServer, room: dict, size: tuple[int, int] = SMALL, **kw):  # type: ignore[no-untyped-def]
    pub = await whip_publish(
        server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(*size), ToneTrack()], **kw
    )
    await pub.wait_connected()
    return pub


async def watch(server: RunningServer, room: dict) -> tuple[object, FrameCollector]:
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track)
    await viewer.wait_connected()
    return viewer, collector


@pytest.fixture
async def fixed_rung_server(config: Config) -> AsyncIterator[RunningServer]:
    """Adaptive bitrate off: every viewer on the one rung, to count encoders exactly."""
    async with serving_with_media(config, abr=False) as server:
        yield server


async def test_one_encoder_for_twenty_viewers(fixed_rung_server: RunningServer) -> None:
    server = fixed_rung_server
    room = await server.create_room(title="encode once")
    pub = await publish(server, room)
    media = server.rooms.get(room["id"]).media
    viewers: list[tuple[object, FrameCollector]] = []
    try:
        for n in range(1, 21):
            viewers.append(await watch(server, room))
            if n in (1, 5, 10, 20):
                await viewers[-1][1].wait_for("video", 3)
                assert media.video_encoders == 1, f"{n} viewers"
                assert media.audio_encoders == 1, f"{n} viewers"
        # Every viewer decodes video and audio, all from the one encoder.
        for _, collector in viewers:
            await collector.wait_for("video", 10)
            await collector.wait_for("audio", 10)
        assert [p.name for p in media.pipelines()] == ["180p"]  # the one rung a 320x180 source fills
        assert media.pipelines()[0].encoders_opened == 1
        assert len(encoder_threads()) == 2  # one video, one audio
    finally:
        for viewer, collector in viewers:
            await viewer.close()  # type: ignore[attr-defined]
            await collector.stop()
        await pub.close()


async def test_the_hosts_socket_takes_a_keyframe_burst(server: RunningServer) -> None:
    """The ingest socket's receive buffer is widened once the host is connected: a keyframe lost
    to a full buffer costs every viewer the picture."""
    room = await server.create_room(title="big buffer")
    pub = await publish(server, room)
    try:
        publisher = server.rooms.get(room["id"]).publisher
        assert publisher is not None
        fd = egress.transport_of(publisher.pc)
        assert fd is not None
        sock = socket.socket(fileno=os.dup(fd[0]))
        try:
            size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        finally:
            sock.close()
        # Linux reports twice what was set; as root (CI) the system cap does not apply
        limit = INGEST_RECEIVE_BUFFER if os.geteuid() == 0 else min(INGEST_RECEIVE_BUFFER, rmem_max())
        assert size >= 2 * limit
    finally:
        await pub.close()


def rmem_max() -> int:
    with open("/proc/sys/net/core/rmem_max") as f:
        return int(f.read())


async def test_h264_host_is_relayed_as_vp8(server: RunningServer) -> None:
    room = await server.create_room()
    pub = await publish(server, room, video_codec="video/H264")
    viewer, collector = await watch(server, room)
    try:
        assert server.rooms.get(room["id"]).publisher.video_codec == "video/H264"
        await collector.wait_for("video", 10)
        # Colour bars, not the dark slate: the host's picture got through.
        await collector.wait_until(lambda: collector.mean_colour().max() > 90)
    finally:
        await viewer.close()
        await collector.stop()
        await pub.close()


async def test_everything_released_when_sessions_end(server: RunningServer) -> None:
    room = await server.create_room()
    pub = await publish(server, room)
    viewer, collector = await watch(server, room)
    await collector.wait_for("video", 5)
    live_room = server.rooms.get(room["id"])
    server_viewer = next(iter(live_room.viewers.values()))
    assert len(encoder_threads()) == 2

    await viewer.close()
    await collector.stop()
    await collector.wait_until(lambda: not live_room.viewers)
    # The last viewer gone: encoders stopped, threads joined, the viewer's PC closed.
    assert server_viewer.pc.connectionState == "closed"
    assert encoder_threads() == []
    assert not live_room.media.running
    assert all(len(rung.fanout) == 0 for rung in live_room.media.rungs)

    server_publisher = live_room.publisher
    await pub.close()
    await collector.wait_until(lambda: live_room.publisher is None)
    assert server_publisher.pc.connectionState == "closed"
    assert not server_publisher._tasks


async def test_viewers_see_slate_while_host_is_away_and_resume(server: RunningServer) -> None:
    room = await server.create_room(title="slate")
    viewer, collector = await watch(server, room)
    live_room = server.rooms.get(room["id"])
    try:
        # Before the host: the "waiting for the host" slate (dark picture) keeps the player going.
        await collector.wait_for("video", 2)
        assert collector.mean_colour().max() < 80
        pub = await publish(server, room)
        await collector.wait_until(lambda: collector.mean_colour().max() > 90)
        assert live_room.live

        await pub.close()
        await collector.wait_until(lambda: not live_room.live)
        await collector.wait_until(lambda: collector.mean_colour().max() < 80)
        # The host comes back: the same viewer session resumes, no rejoin.
        pub = await publish(server, room)
        await collector.wait_until(lambda: collector.mean_colour().max() > 90)
        assert len(live_room.viewers) == 1
        await pub.close()
    finally:
        await viewer.close()
        await collector.stop()


async def test_keyframe_requests_are_routed_and_coalesced(fixed_rung_server: RunningServer) -> None:
    server = fixed_rung_server
    room = await server.create_room()
    pub = await publish(server, room)
    media = server.rooms.get(room["id"]).media
    joined = await asyncio.gather(*(watch(server, room) for _ in range(5)))
    try:
        for _, collector in joined:
            await collector.wait_for("video", 3)
        # Five viewers joining together cost at most two forced keyframes (coalesced per 0.5 s).
        [pipeline] = media.pipelines()
        assert pipeline.keyframes_forced <= 2
        await asyncio.sleep(0.6)  # a join's request still pending (coalesced) goes out meanwhile
        forced_before = pipeline.keyframes_forced

        # A PLI from a viewer reaches the shared encoder (aiortc alone would drop it).
        server_viewer = next(iter(server.rooms.get(room["id"]).viewers.values()))
        sender = next(t.sender for t in server_viewer.pc.getTransceivers() if t.kind == "video")
        burst = [RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=sender._ssrc) for _ in range(10)]
        for packet in burst:
            await sender._handle_rtcp_packet(packet)
        assert server_viewer.keyframe_requests == 10
        await joined[0][1].wait_until(lambda: pipeline.keyframes_forced == forced_before + 1)
        await asyncio.sleep(0.3)
        assert pipeline.keyframes_forced == forced_before + 1  # ten PLIs, one keyframe
    finally:
        for viewer, collector in joined:
            await viewer.close()  # type: ignore[attr-defined]
            await collector.stop()
        await pub.close()


async def test_metrics_describe_the_room(server: RunningServer) -> None:
    room = await server.create_room()
    pub = await publish(server, room)
    viewer, collector = await watch(server, room)
    try:
        await collector.wait_for("video", 5)
        async with server.http.get(f"{server.base}/metrics") as resp:
            text = await resp.text()
        label = f'room="{room["id"]}"'
        assert f"shelfcast_viewers{{{label}}} 1.0" in text
        assert f"shelfcast_host_live{{{label}}} 1.0" in text
        assert f'shelfcast_rung_viewers{{{label},rung="180p"}} 1.0' in text
        assert f"shelfcast_ingest_frames_dropped_total{{{label}}} 0.0" in text
        assert f'shelfcast_encode_seconds_total{{{label},rung="180p"}}' in text
    finally:
        await viewer.close()  # type: ignore[attr-defined]
        await collector.stop()
        await pub.close()
