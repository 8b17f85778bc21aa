"""Several nodes sharing one Redis: a room published on one node is watched through the others."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack
from signaling.config import Config
from signaling.keys import ROOMS

from .conftest import ADMIN_KEY, FrameCollector, RunningServer, start_server, until


async def start_nodes(config: Config, redis_url: str, tmp_path: Path, count: int) -> list[tuple[web.AppRunner, RunningServer]]:
    from .conftest import free_port

    nodes = []
    for i in range(count):
        port = free_port()
        node_config = replace(config, port=port, data_dir=tmp_path / f"node{i}", redis_url=redis_url)
        runner, app = await start_server(node_config)
        nodes.append((runner, RunningServer(app, node_config.base_url, aiohttp.ClientSession())))
    return nodes


@pytest.fixture
async def three_nodes(config: Config, redis_url: str, tmp_path: Path) -> AsyncIterator[list[RunningServer]]:
    nodes = await start_nodes(config, redis_url, tmp_path, 3)
    yield [server for _, server in nodes]
    for runner, server in nodes:
        await server.http.close()
        await runner.cleanup()


async def test_host_on_a_viewers_on_b_and_c(three_nodes: list[RunningServer]) -> None:
    a, b, c = three_nodes
    room = await a.create_room(title="cluster show")
    await until(lambda: b.rooms.get(room["id"]) is not None and c.rooms.get(room["id"]) is not None, 5, 0.05)
    pub = await whip_publish(a.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
    collectors = [FrameCollector() for _ in range(4)]
    viewers = []
    try:
        for node, collector in zip((b, b, c, c), collectors):
            viewers.append(await whep_play(node.http, f"{node.base}/whep/{room['id']}", on_track=collector.on_track, kinds=("video",)))
        for collector in collectors:
            await collector.wait_for("video", 10, timeout=15)
        origin_room = a.rooms.get(room["id"])
        # One pull per edge (one rung each here), not one per viewer; the origin encodes once per rung.
        assert origin_room.media.video_encoders == 1
        assert origin_room.audience == 0 and len(origin_room.viewers) == 2
        for edge in (b, c):
            edge_room = edge.rooms.get(room["id"])
            assert edge_room.media.upstream is not None and edge_room.media.video_encoders == 0
            assert list(edge_room.media.upstream.pulls) == [0]
        # Every node shows the whole room: live, 4 viewers.
        for node in (a, b, c):
            await until(lambda node=node: node.rooms.get(room["id"]).describe()["viewers"] == 4, 5, 0.05)
            assert node.rooms.get(room["id"]).describe()["live"], (node.base, node.rooms.get(room["id"]).elsewhere, node.rooms.get(room["id"]).live)
    finally:
        for collector in collectors:
            await collector.stop()
        for viewer in viewers:
            await viewer.close()
        await pub.close()
