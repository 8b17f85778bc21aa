"""Kill -9 the server mid-stream of feed events and orders, restart it, and check nothing was lost.

The server is a subprocess running a bare app built from ``setup_stock`` (this file's ``__main__``).
After the restart every acknowledged confirm is still confirmed, every acknowledged reservation is
still there under its idempotency key, and re-sending the whole event stream applies each event
exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"Authorization": "Bearer admin-key"}
FEED = {"Authorization": "Bearer feed-key"}
START = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = data_dir / f"server-{port}.log"
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "tests.test_stock_restart", str(data_dir), str(port)],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{base}/api/stock/none") as r:
                    if r.status == 404:
                        return proc, base
            except aiohttp.ClientConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()}")
            await asyncio.sleep(0.05)


def batches(n_batches: int, size: int) -> list[dict[str, Any]]:
    return [{"events": [{"id": f"e{b}-{i}", "warehouse": "W1", "sku": "a", "delta": 1, "seq": b * size + i + 1}
                        for i in range(size)]} for b in range(n_batches)]


async def test_kill_and_restart_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    proc, base = await start_server(tmp_path)
    acked_events: set[int] = set()
    reserved: dict[str, str] = {}  # idempotency key -> order id (acknowledged 201)
    confirmed: set[str] = set()  # order ids acknowledged as confirmed
    stream = batches(200, 10)
    try:
        async with aiohttp.ClientSession() as http:
            assert (await http.put(f"{base}/api/warehouses/W1", json={"name": "W", "regions": ["R"]},
                                   headers=ADMIN)).status == 200
            assert (await http.put(f"{base}/api/skus/a", json={"name": "A", "price": 1, "currency": "EUR"},
                                   headers=ADMIN)).status == 200
            r = await http.put(f"{base}/api/warehouses/W1/snapshot", headers=FEED,
                               json={"as_of": time.time(), "seq": 0, "levels": [{"sku": "a", "on_hand": START}]})
            assert r.status == 200

            async def feed() -> None:
                for i, batch in enumerate(stream):
                    async with http.post(f"{base}/api/stock/events", json=batch, headers=FEED) as r:
                        if r.status == 200:
                            acked_events.add(i)

            async def buyer(n: int) -> None:
                for j in range(1000):
                    key = f"b{n}-{j}"
                    async with http.post(f"{base}/api/rooms/r/orders",
                                         json={"sku": "a", "quantity": 1 + j % 3, "idempotency_key": key}) as r:
                        if r.status != 201:
                            continue
                        oid = (await r.json())["order"]["id"]
                        reserved[key] = oid
                    if j % 2 == 0:
                        async with http.post(f"{base}/api/rooms/r/orders/{oid}/confirm", headers=ADMIN) as r:
                            if r.status == 200:
                                confirmed.add(oid)

            async def killer() -> None:
                while len(confirmed) < 40 or len(acked_events) < 20:
                    await asyncio.sleep(0.005)
                proc.send_signal(signal.SIGKILL)

            await asyncio.gather(feed(), *(buyer(n) for n in range(4)), killer(), return_exceptions=True)
        proc.wait(5)
        assert proc.returncode == -signal.SIGKILL
        assert len(acked_events) < len(stream)  # it really died mid-stream
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc, base = await start_server(tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            for oid in confirmed:
                async with http.get(f"{base}/api/rooms/r/orders/{oid}") as r:
                    assert r.status == 200 and (await r.json())["order"]["status"] == "confirmed"
            for key, oid in reserved.items():  # same answer for a repeated key after the restart
                q = 1 + int(key.split("-")[1]) % 3
                async with http.post(f"{base}/api/rooms/r/orders",
                                     json={"sku": "a", "quantity": q, "idempotency_key": key}) as r:
                    assert r.status == 201 and (await r.json())["order"]["id"] == oid
            duplicates = applied = 0
            for i, batch in enumerate(stream):  # the feed re-sends everything, as a feed would
                async with http.post(f"{base}/api/stock/events", json=batch, headers=FEED) as r:
                    body = await r.json()
                    assert r.status == 200
                    if i in acked_events:
                        assert body["applied"] == 0 and len(body["duplicates"]) == len(batch["events"])
                    duplicates += len(body["duplicates"])
                    applied += body["applied"]
            assert applied + duplicates == 2000 and duplicates >= 10 * len(acked_events)
            async with http.get(f"{base}/api/stock/a") as r:
                level = (await r.json())["warehouses"][0]
        db = sqlite3.connect(tmp_path / "stock.sqlite3")
        try:
            shipped = db.execute("SELECT COALESCE(SUM(quantity), 0) FROM orders WHERE status='confirmed'").fetchone()[0]
            assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2000
        finally:
            db.close()
        assert level["on_hand"] == START + 2000 - shipped  # every event exactly once, every shipment once
        assert shipped >= sum(1 for _ in confirmed)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _serve(data_dir: str, port: int) -> None:
    from aiohttp import web

    from overlay.stock.model import RoomInfo
    from signaling.config import Config
    from signaling.errors import error_middleware
    from signaling.events import EventHub
    from signaling.keys import CONFIG, EVENTS
    from signaling.stock_api import setup_stock

    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = Config(data_dir=Path(data_dir), admin_key="admin-key", feed_key="feed-key")
    app[EVENTS] = EventHub()
    rooms = {"r": RoomInfo("r", "R", ("a",), None)}
    setup_stock(app, rooms.get)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
