"""Several nodes sharing one Redis: a room published on one node is watched through the others."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Protocol

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack
from tests.tools.redis_server import RedisServer
from signaling.config import Config
from signaling.events import public_id
from signaling.keys import PLACEMENT

from .conftest import ADMIN_KEY, FrameCollector, RunningServer, start_server, until
from .test_overlay_e2e import SIZE, close_to, seed_catalogue, tile_colour


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
            # Its viewers' keyframe needs went back to the origin as (coalesced) PLIs.
            assert edge_room.media.upstream.pulls[0].stats.keyframe_requests >= 1
        async with b.http.get(f"{b.base}/metrics") as resp:
            assert f'shelfcast_upstream_pulls{{room="{room["id"]}"}} 1.0' in await resp.text()
        relays = [v for v in origin_room.viewers.values() if v.role == "relay"]
        assert len(relays) == 2 and all(v.keyframe_requests >= 1 for v in relays)
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


async def test_room_state_requests_reach_the_origin_from_any_node(three_nodes: list[RunningServer]) -> None:
    a, b, c = three_nodes
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    room = await a.create_room(title="invite across nodes")
    await until(lambda: all(n.rooms.get(room["id"]) is not None for n in (b, c)), 5, 0.05)
    pub = await whip_publish(a.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    collector = FrameCollector()
    viewer = await whep_play(b.http, f"{b.base}/whep/{room['id']}", on_track=collector.on_track, kinds=("video",))
    events = await b.http.ws_connect(f"{b.base.replace('http', 'ws')}/api/rooms/{room['id']}/events")
    try:
        await collector.wait_for("video", 3, timeout=15)
        session = viewer.location.rsplit("/", 1)[-1]
        viewer_id = public_id(session)  # the viewer's name where others see it
        await events.send_json({"type": "viewer", "session": session})  # B's page, as the watch page does
        # The host console's viewer list (answered by the origin, A) has the viewer watching on B,
        # and not the nodes pulling from A.
        await until(lambda: a.rooms.get(room["id"]).describe()["viewers"] == 1, 5, 0.05)
        async with c.http.get(f"{c.base}/api/rooms/{room['id']}/viewers", headers=admin) as resp:
            listed = await resp.json()
        assert [v["id"] for v in listed["viewers"]] == [viewer_id] and sum(listed["rungs"].values()) == 1
        # The overlay is set through C; the origin's compositor has it, and every node answers the same.
        async with c.http.put(f"{c.base}/api/rooms/{room['id']}/overlay", json={"position": "top-right"}, headers=admin) as resp:
            assert resp.status == 200, await resp.text()
        for node in (a, b, c):
            async with node.http.get(f"{node.base}/api/rooms/{room['id']}/overlay") as resp:
                assert (await resp.json())["position"] == "top-right"
        # The host invites the viewer watching on B through C; B's page hears of it; B accepts.
        async with c.http.post(f"{c.base}/api/rooms/{room['id']}/invitations", json={"viewer": viewer_id}, headers=admin) as resp:
            assert resp.status == 201, await resp.text()
            invitation = (await resp.json())["invitation"]
        while True:
            event = await events.receive_json(timeout=5)
            if event["type"] == "invitation":
                break
        assert event["id"] == invitation["id"] and event["viewer"] == viewer_id
        # B's page reconnects: the invitation, which lives on the origin A, reaches it again; a
        # stranger's page on B naming the viewer by its public id hears nothing of it.
        ws_url = f"{b.base.replace('http', 'ws')}/api/rooms/{room['id']}/events"
        again, stranger = await b.http.ws_connect(ws_url), await b.http.ws_connect(ws_url)
        try:
            await stranger.send_json({"type": "viewer", "session": viewer_id})
            await again.send_json({"type": "viewer", "session": session})
            while (event := await again.receive_json(timeout=5))["type"] != "invitation":
                pass
            assert event["id"] == invitation["id"] and event["state"] == "pending"
            with pytest.raises(asyncio.TimeoutError):
                while (await stranger.receive_json(timeout=1))["type"] != "invitation":
                    pass
        finally:
            await again.close()
            await stranger.close()
        async with b.http.post(f"{b.base}/api/invitations/{invitation['id']}/accept", json={"session": session}) as resp:
            assert resp.status == 200, await resp.text()
            call = (await resp.json())["call"]
        await until(lambda: c.rooms.get(call["id"]) is not None, 5, 0.05)  # the call is in the directory
    finally:
        await events.close()
        await collector.stop()
        await viewer.close()
        await pub.close()


class Endpoint(Protocol):
    """A node as a client sees it (in this process or another one)."""

    base: str
    http: aiohttp.ClientSession


async def stock_event_on_c_reaches_viewers_on_b_and_c(a: Endpoint, b: Endpoint, c: Endpoint) -> None:
    """Host on A, viewers through B and C decode frames; a stock event posted to C changes the
    overlay tile in the frames both viewers decode."""
    skus = {"hoodie-s": "S", "hoodie-m": "M"}
    await seed_catalogue(a, skus, on_hand=100)  # type: ignore[arg-type]
    body = {"mode": "show", "title": "stock across nodes", "region": "US-West", "skus": list(skus)}
    async with a.http.post(f"{a.base}/api/rooms", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 201, await resp.text()
        room = await resp.json()

    async def known_everywhere() -> bool:
        for node in (b, c):
            async with node.http.get(f"{node.base}/api/rooms/{room['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
                if resp.status != 200:
                    return False
        return True

    await until(known_everywhere, 5, 0.05)
    pub = await whip_publish(a.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(*SIZE)])
    collectors = [FrameCollector(), FrameCollector()]
    viewers = []
    try:
        for node, collector in zip((b, c), collectors):
            viewers.append(await whep_play(node.http, f"{node.base}/whep/{room['id']}", on_track=collector.on_track, kinds=("video",)))

        def tile(collector: FrameCollector, index: int) -> np.ndarray:
            assert collector.last_video is not None
            return tile_colour(collector.last_video.to_ndarray(format="rgb24").astype(float), index, len(skus))

        for collector in collectors:
            await collector.wait_for("video", 5, timeout=15)
            await collector.wait_until(lambda collector=collector: close_to(tile(collector, 0), "plenty"), timeout=10)
        posted = time.monotonic()
        async with c.http.post(
            f"{c.base}/api/stock/events",
            json={"events": [{"id": "ev-1", "warehouse": "LAX", "sku": "hoodie-s", "delta": -80, "seq": 1}]},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
        for collector in collectors:
            await collector.wait_until(lambda collector=collector: close_to(tile(collector, 0), "low"), timeout=5)
        print(f"stock event on C -> decoded on B and C: {(time.monotonic() - posted) * 1000:.0f} ms")
        assert all(close_to(tile(collector, 1), "plenty") for collector in collectors)
    finally:
        for collector in collectors:
            await collector.stop()
        for viewer in viewers:
            await viewer.close()
        await pub.close()


async def test_stock_event_posted_to_c_shows_in_frames_decoded_through_b_and_c(three_nodes: list[RunningServer]) -> None:
    await stock_event_on_c_reaches_viewers_on_b_and_c(*three_nodes)


async def test_pk_between_rooms_whose_origins_are_different_nodes(three_nodes: list[RunningServer]) -> None:
    from .test_call import SolidTrack
    from .test_pk import BLUE, RED, halves, looks

    node_a, node_b, node_c = three_nodes
    await seed_catalogue(node_a, {"tee-a": "S", "tee-b": "M"}, on_hand=50)
    a = await node_a.create_room(title="Anna", region="US-West", skus=["tee-a"])
    b = await node_a.create_room(title="Bo", region="US-West", skus=["tee-b"])
    await until(lambda: all(n.rooms.get(r["id"]) is not None for n in three_nodes for r in (a, b)), 5, 0.05)
    host_a = {"Authorization": f"Bearer {a['tokens']['host']}"}
    host_b = {"Authorization": f"Bearer {b['tokens']['host']}"}
    pub_a = await whip_publish(node_a.http, f"{node_a.base}/whip/{a['id']}", a["tokens"]["host"], [SolidTrack(RED, (640, 360))])
    pub_b = await whip_publish(node_b.http, f"{node_b.base}/whip/{b['id']}", b["tokens"]["host"], [SolidTrack(BLUE, (640, 360))])
    in_a, in_b = FrameCollector(), FrameCollector()
    viewer_a = await whep_play(node_c.http, f"{node_c.base}/whep/{a['id']}", on_track=in_a.on_track, kinds=("video",))
    viewer_b = await whep_play(node_b.http, f"{node_b.base}/whep/{b['id']}", on_track=in_b.on_track, kinds=("video",))
    republished = None
    try:
        await until(lambda: in_b.last_video is not None and looks(halves(in_b)[0], BLUE), 15)
        assert node_b.rooms.get(b["id"]).publisher is not None  # B's origin is node B
        # A's host invites B through node C: B's room moves to A's node (one process composes both).
        async with node_c.http.post(f"{node_c.base}/api/rooms/{a['id']}/pk", json={"room": b["id"], "duration_s": 180}, headers=host_a) as resp:
            assert resp.status == 201, await resp.text()
            pk_id = (await resp.json())["id"]
        assert node_b.rooms.get(b["id"]).publisher is None and node_b.rooms.get(b["id"]).media.upstream is not None
        # B's studio publishes again (the page does it by itself); through node B it reaches node A.
        republished = await whip_publish(node_b.http, f"{node_b.base}/whip/{b['id']}", b["tokens"]["host"], [SolidTrack(BLUE, (640, 360))])
        await until(lambda: node_a.rooms.get(b["id"]).live, 10, 0.05)
        async with node_b.http.post(f"{node_b.base}/api/pk/{pk_id}/accept", headers=host_b) as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "live"
        # B's viewer never left node B (an edge of B now) and sees the battle; so does A's, on node C.
        await until(lambda: looks(halves(in_b)[0], BLUE) and looks(halves(in_b)[1], RED), 15)
        await until(lambda: looks(halves(in_a)[0], RED) and looks(halves(in_a)[1], BLUE), 15)
        assert viewer_b.pc.connectionState == "connected"
    finally:
        for collector in (in_a, in_b):
            await collector.stop()
        for client in (viewer_a, viewer_b, pub_a, pub_b, republished):
            if client is not None:
                await client.close()


async def test_a_room_ended_on_one_node_ends_everywhere(three_nodes: list[RunningServer]) -> None:
    a, b, c = three_nodes
    room = await a.create_room(title="short show")
    await until(lambda: all(n.rooms.get(room["id"]) is not None for n in (b, c)), 5, 0.05)
    async with b.http.delete(f"{b.base}/api/rooms/{room['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 204
    await until(lambda: all(n.rooms.get(room["id"]) is None for n in (a, c)), 5, 0.05)
    async with c.http.get(f"{c.base}/api/rooms/{room['id']}") as resp:
        assert resp.status == 404
    # A node started now does not bring it back: the directory no longer has it.
    async with a.http.get(f"{a.base}/api/rooms", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert room["id"] not in [r["id"] for r in (await resp.json())["rooms"]]


async def test_losing_redis_degrades_health_but_not_playback(config: Config, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    runner, node = (await start_nodes(config, redis.url, tmp_path, 1))[0]
    collector = FrameCollector()
    try:
        room = await node.create_room()
        pub = await whip_publish(node.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
        viewer = await whep_play(node.http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))
        await collector.wait_for("video", 5, timeout=10)
        async with node.http.get(f"{node.base}/healthz") as resp:
            assert resp.status == 200
        redis.stop()

        async def degraded() -> bool:
            async with node.http.get(f"{node.base}/healthz") as resp:
                return resp.status == 503 and (await resp.json())["status"] == "degraded"

        await until(degraded, 10, 0.2)  # a load balancer now sends new people to other nodes
        count = collector.frames["video"]
        await collector.wait_for("video", count + 20, timeout=5)  # who is watching keeps watching
        await viewer.close()
        await pub.close()
    finally:
        await collector.stop()
        redis.stop()
        await node.http.close()
        await runner.cleanup()


async def test_a_host_publishing_through_b_takes_over_from_an_origin_whose_port_is_gone(config: Config, redis_url: str, tmp_path: Path) -> None:
    """The origin's port refuses connections: its process is gone. B ends its leases at once and
    takes the room instead of answering 503 until they run out."""
    nodes = await start_nodes(config, redis_url, tmp_path, 2)
    (runner_a, a), (runner_b, b) = nodes
    try:
        room = await a.create_room()
        await until(lambda: b.rooms.get(room["id"]) is not None, 5, 0.05)
        first = await whip_publish(a.http, f"{a.base}/whip/{room['id']}", room["tokens"]["host"], [PatternTrack(160, 90)])
        await first.close()
        for site in list(runner_a.sites):
            await site.stop()  # A's port is closed; its process (this one) still renews its leases
        again = await whip_publish(b.http, f"{b.base}/whip/{room['id']}", room["tokens"]["host"], [PatternTrack(160, 90)])
        try:
            await until(lambda: b.rooms.get(room["id"]).live, 10, 0.05)
            # A learns it lost the room at its next renewal.
            await until(lambda: not a.app[PLACEMENT].cluster.holds_origin(room["id"]), 5, 0.1)
        finally:
            await again.close()
    finally:
        for runner, node in nodes:
            await node.http.close()
            await runner.cleanup()
