"""Faults: a viewer that vanishes without a goodbye is released within a bounded time."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

import pytest

from relay.client import WhipError, whep_play, whip_publish
from relay.linkemu import LinkProfile
from relay.synthetic import PatternTrack
from signaling.config import Config

from .conftest import FrameCollector, RunningServer, serving_with_media, until


@pytest.fixture
async def quick_timeout_server(config: Config) -> AsyncIterator[RunningServer]:
    async with serving_with_media(config, viewer_timeout_s=2.0) as server:
        yield server


async def test_vanished_viewer_is_released(quick_timeout_server: RunningServer) -> None:
    server = quick_timeout_server
    room = await server.create_room()
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    viewer = await whep_play(server.http, room["links"]["whep"], link=LinkProfile())
    live = server.rooms.get(room["id"])
    try:
        await viewer.wait_connected()
        await until(lambda: len(live.viewers) == 1, 5)
        server_viewer = next(iter(live.viewers.values()))
        threads_before = {t.name for t in threading.enumerate()}
        assert any(name.startswith("shelfcast-video-encoder") for name in threads_before)
        # The viewer's network goes dark both ways: no goodbye, no RTCP, no ICE consent replies.
        assert viewer.link is not None
        viewer.link.set_downstream(LinkProfile(loss=1.0))
        viewer.link.set_upstream(LinkProfile(loss=1.0))
        await until(lambda: not live.viewers, 8)  # timeout 2 s + a watchdog tick, not ICE's 30 s
        assert server_viewer.closed and server_viewer.pc.connectionState == "closed"
        await until(lambda: not any(t.name.startswith("shelfcast-video-encoder") for t in threading.enumerate()), 5)
    finally:
        await viewer.close()
        await pub.close()


async def test_host_network_drop_and_return_without_viewers_rejoining(server: RunningServer) -> None:
    room = await server.create_room()
    live = server.rooms.get(room["id"])
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)], link=LinkProfile())
    collectors = [FrameCollector() for _ in range(2)]
    viewers = [await whep_play(server.http, room["links"]["whep"], on_track=c.on_track, kinds=("video",)) for c in collectors]
    try:
        for c in collectors:
            await c.wait_for("video", 5)
        first_publisher = live.publisher
        viewer_sessions = set(live.viewers)
        # The host's network goes dark both ways: no goodbye, no ICE consent replies.
        assert pub.link is not None
        pub.link.set_upstream(LinkProfile(loss=1.0))
        pub.link.set_downstream(LinkProfile(loss=1.0))
        # Viewers keep receiving (the slate) while the host is away.
        counts = [c.frames["video"] for c in collectors]
        await until(lambda: all(c.frames["video"] > n + 3 for c, n in zip(collectors, counts)), 10, 0.1)
        assert await _pipeline_headline(live) == "Host reconnecting..."
        # The host publishes again from a new connection before ICE has given up on the old one.
        await asyncio.sleep(3.5)
        assert live.publisher is first_publisher  # the old session is still there: ICE has not noticed
        again = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
        try:
            await until(lambda: live.publisher is not None and live.publisher is not first_publisher and live.publisher.frames_received > 10, 10)
            assert first_publisher.closed
            counts = [c.frames["video"] for c in collectors]
            await until(lambda: all(c.frames["video"] > n + 10 for c, n in zip(collectors, counts)), 10, 0.1)
            assert set(live.viewers) == viewer_sessions  # nobody rejoined
            assert all(v.pc.connectionState == "connected" for v in viewers)
            assert await _pipeline_headline(live) is None  # the host's picture, not the slate
        finally:
            await again.close()
    finally:
        for c in collectors:
            await c.stop()
        for v in viewers:
            await v.close()
        await pub.close()


async def test_a_live_host_is_not_taken_over(server: RunningServer) -> None:
    room = await server.create_room()
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    try:
        await until(lambda: server.rooms.get(room["id"]).publisher.frames_received > 5, 10)
        with pytest.raises(WhipError) as refused:
            await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
        assert refused.value.status == 409
    finally:
        await pub.close()


async def _pipeline_headline(live) -> str | None:  # type: ignore[no-untyped-def]
    pipeline = live.media.pipelines()[0]
    return pipeline.slate_headline


async def test_a_slow_join_is_not_mistaken_for_a_vanished_viewer(quick_timeout_server: RunningServer) -> None:
    """Silence counts from the moment the viewer is connected, not from its offer: a viewer whose
    set-up took longer than the timeout (a far-away link) is kept."""
    server = quick_timeout_server
    room = await server.create_room()
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    collector = FrameCollector()
    viewer = await whep_play(
        server.http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",),
        link=LinkProfile(delay_ms=900),  # ICE + DTLS take several round trips of 1.8 s
    )
    live = server.rooms.get(room["id"])
    try:
        await viewer.wait_connected(timeout=20)
        await collector.wait_for("video", 5, timeout=10)
        await asyncio.sleep(2.5)  # past the 2 s timeout after connecting: RTCP keeps it alive
        assert len(live.viewers) == 1 and viewer.pc.connectionState == "connected"
    finally:
        await collector.stop()
        await viewer.close()
        await pub.close()
