"""Per-client rate limits on joins and orders: exact bucket arithmetic, 429 + Retry-After over HTTP,
nothing changed by a refused request, and viewers already watching unaffected by a flood."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import AsyncIterator

import aiohttp
import pytest

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack
from signaling.cli import parse_args
from signaling.config import NO_LIMIT, Config, RateLimit, config_from_env, parse_rate_limit
from signaling.limits import RateLimiter

from .conftest import ADMIN_KEY, FrameCollector, RunningServer, start_server, until
from .test_overlay_e2e import seed_catalogue

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


# (limit, [(time, expected wait)]): one client's requests in order; wait 0.0 means allowed.
BUCKET_CASES = [
    (RateLimit(60, 2), [(0.0, 0.0), (0.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (1.0, 1.0)]),
    (RateLimit(120, 1), [(0.0, 0.0), (0.1, 0.4), (0.5, 0.0), (10.0, 0.0), (10.0, 0.5)]),  # refill caps at burst
    (NO_LIMIT, [(0.0, 0.0)] * 5),
]


@pytest.mark.parametrize("limit, steps", BUCKET_CASES)
def test_token_bucket(limit: RateLimit, steps: list[tuple[float, float]]) -> None:
    limiter = RateLimiter(limit)
    assert [round(limiter.acquire("1.2.3.4", at), 6) for at, _ in steps] == [wait for _, wait in steps]


def test_buckets_are_per_client_and_memory_is_bounded() -> None:
    limiter = RateLimiter(RateLimit(60, 1), max_clients=100)
    assert limiter.acquire("a", 0.0) == 0.0
    assert limiter.acquire("a", 0.0) > 0
    assert limiter.acquire("b", 0.0) == 0.0  # another address has its own bucket
    for i in range(1000):  # a flood of distinct addresses, each refilled a second later
        limiter.acquire(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(limiter) <= 101
    assert limiter.acquire("spoofed-new", 1000.0) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [("60/30", RateLimit(60, 30)), ("90", RateLimit(90, 90)), ("0", NO_LIMIT), (" 2.5/1 ", RateLimit(2.5, 1))],
)
def test_parse_rate_limit(text: str, expected: RateLimit) -> None:
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["fast", "60/x", "-1", "60/-2", ""])
def test_parse_rate_limit_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate_limit(text)


def test_limits_from_cli_and_env() -> None:
    _, config = parse_args(["serve", "--join-limit", "30/5", "--order-limit", "0"])
    assert config.join_limit == RateLimit(30, 5) and not config.order_limit.enabled
    assert config_from_env(Config(), {"SHELFCAST_ORDER_LIMIT": "12/3"}).order_limit == RateLimit(12, 3)
    with pytest.raises(SystemExit):
        parse_args(["serve", "--join-limit", "lots"])


@pytest.fixture
async def limited(config: Config) -> AsyncIterator[RunningServer]:
    runner, app = await start_server(replace(config, join_limit=RateLimit(60, 3), order_limit=RateLimit(60, 2)))
    async with aiohttp.ClientSession() as http:
        yield RunningServer(app, config.base_url, http)
    await runner.cleanup()


async def metric(server: RunningServer, line_start: str) -> float:
    async with server.http.get(f"{server.base}/metrics") as resp:
        text = await resp.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else 0.0


async def test_join_flood_gets_429_and_watching_viewers_do_not_notice(limited: RunningServer) -> None:
    server = limited
    room = await server.create_room()
    live = server.rooms.get(room["id"])
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])  # join 1
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))  # join 2
    try:
        await viewer.wait_connected()
        await collector.wait_for("video", 5)
        await until(lambda: len(live.viewers) == 1, 5)

        async def join_attempt() -> tuple[int, str | None, str]:
            async with server.http.post(room["links"]["whep"], data="v=0\r\n", headers={"Content-Type": "application/sdp"}) as resp:
                return resp.status, resp.headers.get("Retry-After"), (await resp.json())["error"]["code"]

        frames_before = collector.frames["video"]
        answers = await asyncio.gather(*(join_attempt() for _ in range(200)))
        # One join left in the burst: that one reaches SDP validation (400), the rest are refused up front.
        assert sorted({(s, c) for s, _, c in answers}) == [(400, "bad_sdp"), (429, "rate_limited")]
        assert sum(1 for s, _, _ in answers if s == 429) == 199
        assert all(ra == "1" for s, ra, _ in answers if s == 429)  # 60/min: a token a second
        assert len(live.viewers) == 1  # nothing created by a refused join
        await collector.wait_for("video", frames_before + 10)  # the watching viewer keeps decoding
        assert viewer.pc.connectionState == "connected"
        assert await metric(server, 'shelfcast_rejected_requests_total{reason="rate_limited",status="429"}') == 199
        assert await metric(server, "shelfcast_join_seconds_count") == 1  # the viewer's join, timed
        # The bucket refills: a second later this address may join again.
        await asyncio.sleep(1.05)
        status, _, code = await join_attempt()
        assert (status, code) == (400, "bad_sdp")
    finally:
        await collector.stop()
        await viewer.close()
        await pub.close()


async def test_order_limit_refuses_without_reserving(limited: RunningServer) -> None:
    server = limited
    await seed_catalogue(server, {"tee": "M"}, on_hand=10)
    room = await server.create_room(region="US-West", skus=["tee"])
    url = f"{server.base}/api/rooms/{room['id']}/orders"
    statuses = []
    for i in range(4):
        body = {"sku": "tee", "quantity": 1, "region": "US-West", "idempotency_key": f"o{i}"}
        async with server.http.post(url, json=body) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert resp.headers["Retry-After"] == "1"
                assert (await resp.json())["error"]["code"] == "rate_limited"
    assert statuses == [201, 201, 429, 429]
    async with server.http.get(f"{server.base}/api/stock/tee") as resp:
        stock = await resp.json()
    assert [r["sellable"] for r in stock["regions"] if r["region"] == "US-West"] == [8], stock  # only the two accepted orders hold units


def test_media_settings_from_env_combine_and_bad_values_fail() -> None:
    both = config_from_env(Config(), {"SHELFCAST_EGRESS": "aiortc", "SHELFCAST_FORWARD": "0"})
    assert (both.media.egress, both.media.forward) == ("aiortc", False)
    assert config_from_env(Config(), {}).media == Config().media
    for env in ({"SHELFCAST_FORWARD": "yes"}, {"SHELFCAST_EGRESS": "fast"}):
        with pytest.raises(ValueError):
            config_from_env(Config(), env)
