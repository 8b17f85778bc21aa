"""Faults: a viewer that vanishes without a goodbye is released within a bounded time."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import AsyncIterator

import aiohttp
import pytest

from relay.client import whep_play, whip_publish
from relay.linkemu import LinkProfile
from relay.synthetic import PatternTrack
from signaling.config import Config

from .conftest import RunningServer, start_server, until


@pytest.fixture
async def quick_timeout_server(config: Config) -> AsyncIterator[RunningServer]:
    runner, app = await start_server(replace(config, media=replace(config.media, viewer_timeout_s=2.0)))
    async with aiohttp.ClientSession() as http:
        yield RunningServer(app, config.base_url, http)
    await runner.cleanup()


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
