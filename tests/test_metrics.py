"""/metrics: the families operators alert on, with values that follow what happens."""

from __future__ import annotations

from dataclasses import replace
from typing import AsyncIterator

from pathlib import Path

import aiohttp
import pytest

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack
from signaling.config import Config
from signaling.keys import TELEMETRY

from .conftest import ADMIN_KEY, FrameCollector, RunningServer, start_server, until
from .test_overlay_e2e import seed_catalogue
from .test_workers import two_workers


@pytest.fixture
async def quick_stale_server(config: Config) -> AsyncIterator[RunningServer]:
    runner, app = await start_server(replace(config, stock=replace(config.stock, stale_after_s=0.5, tick_s=0.1)))
    async with aiohttp.ClientSession() as http:
        yield RunningServer(app, config.base_url, http)
    await runner.cleanup()


async def scrape_text(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        return await resp.text()


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


async def scrape(server: RunningServer) -> dict[str, float]:
    return samples(await scrape_text(server.http, server.base))


async def test_stock_staleness_and_rejections_show_in_metrics(quick_stale_server: RunningServer) -> None:
    server = quick_stale_server
    await seed_catalogue(server, {"tee": "M"}, on_hand=5)
    fresh = await scrape(server)
    assert fresh['shelfcast_stock_feed_stale{warehouse="LAX"}'] == 0
    assert 0 <= fresh['shelfcast_stock_feed_age_seconds{warehouse="LAX"}'] < 0.5
    # The feed goes silent: the warehouse shows stale, its age grows.
    await until(lambda: _stale(server), 5, 0.1)
    silent = await scrape(server)
    assert silent['shelfcast_stock_feed_age_seconds{warehouse="LAX"}'] >= 0.5
    # Refusals are counted by status and reason.
    async with server.http.post(f"{server.base}/api/rooms", json={"mode": "show"}) as resp:
        assert resp.status == 401
    async with server.http.get(f"{server.base}/api/rooms/nope") as resp:
        assert resp.status == 404
    counted = await scrape(server)
    assert counted['shelfcast_rejected_requests_total{reason="unauthorized",status="401"}'] == 1
    assert counted['shelfcast_rejected_requests_total{reason="room_not_found",status="404"}'] == 1
    assert counted["shelfcast_join_seconds_count"] == 0


async def _stale(server: RunningServer) -> bool:
    return (await scrape(server)).get('shelfcast_stock_feed_stale{warehouse="LAX"}') == 1


async def test_each_metric_is_one_group_and_counters_never_go_down(server: RunningServer) -> None:
    room = await server.create_room(title="counted")
    label = f'room="{room["id"]}"'
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))
    try:
        await collector.wait_for("video", 10)
        text = await scrape_text(server.http, server.base)
        # One HELP and one TYPE per family, right above all of its samples.
        helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
        assert len(helps) == len(set(helps)) and len(helps) >= 24
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP"):
                family = line.split()[2]
            elif not line.startswith("#"):
                assert family is not None and line.startswith(family), (family, line)
        during = samples(text)
        encoded = during[f'shelfcast_encode_seconds_total{{{label},rung="180p"}}']
        assert encoded > 0 and during[f"shelfcast_viewers{{{label}}}"] == 1
    finally:
        await viewer.close()
        await collector.stop()
        await pub.close()
    # The room ends: its encoders and viewers are gone, what they counted is not.
    async with server.http.delete(f"{server.base}/api/rooms/{room['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 204
    await until(lambda: server.rooms.get(room["id"]) is None, 5, 0.05)
    after = await scrape(server)
    assert after[f'shelfcast_encode_seconds_total{{{label},rung="180p"}}'] >= encoded
    assert f"shelfcast_viewers{{{label}}}" not in after and after["shelfcast_rooms"] == 0
    assert after["shelfcast_join_seconds_count"] == 1


async def test_scrapes_of_two_workers_add_up(redis_url: str, tmp_path: Path) -> None:
    """``--workers 2``: whichever worker answers a scrape, it counts every worker's requests."""
    async with two_workers(redis_url, tmp_path) as (base, _):
        for _ in range(40):  # a new connection each: the kernel spreads them over both workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
                async with fresh.get(f"{base}/api/rooms/nope") as resp:
                    assert resp.status == 404
        key = 'shelfcast_rejected_requests_total{reason="room_not_found",status="404"}'
        for _ in range(6):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
                counted = samples(await scrape_text(fresh, base))
            assert counted[key] == 40


async def test_a_room_that_ends_between_scrapes_keeps_what_it_counted(server: RunningServer) -> None:
    room = await server.create_room(title="short")
    rung = {"room": room["id"], "rung": "180p"}
    registry = server.app[TELEMETRY].registry
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))
    try:
        await collector.wait_for("video", 10)
        # No scrape: the counter grows while the room lives.
        await until(lambda: (registry.get_sample_value("shelfcast_encode_seconds_total", rung) or 0) > 0, 5, 0.1)
    finally:
        await viewer.close()
        await collector.stop()
        await pub.close()
    async with server.http.delete(f"{server.base}/api/rooms/{room['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 204
    await until(lambda: server.rooms.get(room["id"]) is None, 5, 0.05)
    assert (await scrape(server))[f'shelfcast_encode_seconds_total{{room="{room["id"]}",rung="180p"}}'] > 0
