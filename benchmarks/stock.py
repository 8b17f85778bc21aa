"""Stock side throughput over real HTTP: feed ingest, orders under concurrency, the last-units race.

    python -m benchmarks.stock [--quick]

Runs a bare app built from ``setup_stock`` on loopback with a durable SQLite store in a temp dir.
Metrics: ingest_events_per_s (batches of 500 events, one feed), orders_per_s and order latency
percentiles (N concurrent buyers, reserve only), and the race check (500 buyers for 100 units:
units sold must be exactly 100). Baseline: the targets a live show needs (a WMS feed at a few
thousand movements/s; a flash sale's order burst answered within 100 ms at p95).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from benchmarks.common import emit, env_info, percentile
from overlay.stock.model import RoomInfo
from signaling.config import Config
from signaling.errors import error_middleware
from signaling.events import EventHub
from signaling.keys import CONFIG, EVENTS
from signaling.stock_api import setup_stock

ADMIN = {"Authorization": "Bearer bench-admin"}
BASELINE = {"ingest_events_per_s": 5000, "orders_per_s": 300, "order_p95_ms": 100, "race_oversold": 0}


def build_app(data_dir: Path) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = Config(data_dir=data_dir, admin_key="bench-admin")
    app[EVENTS] = EventHub()
    rooms = {"show": RoomInfo("show", "US-West", ("big", "last"), None)}
    setup_stock(app, rooms.get)
    return app


async def run(quick: bool) -> dict[str, float]:
    n_events = 20_000 if quick else 200_000
    n_orders = 2_000 if quick else 20_000
    buyers = 100
    with tempfile.TemporaryDirectory() as tmp:
        server = TestServer(build_app(Path(tmp)))
        await server.start_server()
        base = str(server.make_url(""))
        try:
            conn = aiohttp.TCPConnector(limit=buyers + 10)
            async with aiohttp.ClientSession(base, connector=conn) as http:
                async def call(method: str, path: str, body: Any) -> int:
                    async with http.request(method, path, json=body, headers=ADMIN) as r:
                        await r.read()
                        return r.status

                assert await call("PUT", "/api/warehouses/LAX", {"name": "LAX", "regions": ["US-West"]}) == 200
                for sku in ("big", "last"):
                    assert await call("PUT", f"/api/skus/{sku}", {"name": sku, "price": "1", "currency": "USD"}) == 200
                assert await call("PUT", "/api/warehouses/LAX/snapshot", {
                    "as_of": time.time(), "levels": [{"sku": "big", "on_hand": 10 * n_orders},
                                                     {"sku": "last", "on_hand": 100}]}) == 200

                batch = 500
                t0 = time.perf_counter()
                for b in range(n_events // batch):
                    events = [{"id": f"e{b}-{i}", "warehouse": "LAX", "sku": "big", "delta": 1 if i % 2 else -1,
                               "seq": b * batch + i + 1} for i in range(batch)]
                    assert await call("POST", "/api/stock/events", {"events": events}) == 200
                ingest = n_events / (time.perf_counter() - t0)

                latencies: list[float] = []
                counter = iter(range(n_orders))

                async def buyer() -> None:
                    for i in counter:
                        start = time.perf_counter()
                        status = await call("POST", "/api/rooms/show/orders",
                                            {"sku": "big", "quantity": 1, "idempotency_key": f"o{i}"})
                        latencies.append(time.perf_counter() - start)
                        assert status == 201, status

                t0 = time.perf_counter()
                await asyncio.gather(*(buyer() for _ in range(buyers)))
                orders = n_orders / (time.perf_counter() - t0)

                statuses = await asyncio.gather(*(
                    call("POST", "/api/rooms/show/orders", {"sku": "last", "quantity": 1, "idempotency_key": f"r{i}"})
                    for i in range(500)))
                sold = statuses.count(201)
        finally:
            await server.close()
    return {
        "ingest_events_per_s": round(ingest, 1),
        "orders_per_s": round(orders, 1),
        "order_p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "order_p95_ms": round(percentile(latencies, 95) * 1000, 2),
        "order_p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "concurrent_buyers": buyers,
        "race_sold": sold,
        "race_oversold": max(0, sold - 100),
        "events": n_events,
        "orders": n_orders,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (seconds)")
    args = parser.parse_args()
    metrics = asyncio.run(run(args.quick))
    emit("stock", metrics, BASELINE, env_info(quick=args.quick, store="sqlite-wal", synchronous="FULL",
                                              transport="http-loopback"))


if __name__ == "__main__":
    main()
