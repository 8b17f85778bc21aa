"""/metrics: the families operators alert on, with values that follow what happens."""

from __future__ import annotations

from dataclasses import replace
from typing import AsyncIterator

import aiohttp
import pytest

from signaling.config import Config
from signaling.metrics import Histogram

from .conftest import RunningServer, start_server, until
from .test_overlay_e2e import seed_catalogue


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 0.5, 1.0))
    for value in (0.05, 0.1, 0.3, 0.7, 3.0):
        h.observe(value)
    assert h.render("join") == [
        'join_bucket{le="0.1"} 2',  # le is inclusive: 0.1 lands in the 0.1 bucket
        'join_bucket{le="0.5"} 3',
        'join_bucket{le="1.0"} 4',
        'join_bucket{le="+Inf"} 5',
        "join_sum 4.1500",
        "join_count 5",
    ]


@pytest.fixture
async def quick_stale_server(config: Config) -> AsyncIterator[RunningServer]:
    runner, app = await start_server(replace(config, stock=replace(config.stock, stale_after_s=0.5, tick_s=0.1)))
    async with aiohttp.ClientSession() as http:
        yield RunningServer(app, config.base_url, http)
    await runner.cleanup()


async def scrape(server: RunningServer) -> dict[str, float]:
    async with server.http.get(f"{server.base}/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


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
    assert counted['shelfcast_rejected_requests_total{status="401",reason="unauthorized"}'] == 1
    assert counted['shelfcast_rejected_requests_total{status="404",reason="room_not_found"}'] == 1
    assert counted["shelfcast_join_seconds_count"] == 0


async def _stale(server: RunningServer) -> bool:
    return (await scrape(server)).get('shelfcast_stock_feed_stale{warehouse="LAX"}') == 1
