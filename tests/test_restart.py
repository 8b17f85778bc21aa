"""SIGTERM and restart: the server stops cleanly (exit 0) and comes back with its rooms, stock and the
reservations that were outstanding."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack

from .conftest import ADMIN_KEY, FrameCollector, free_port


async def start(port: int, data_dir: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "SHELFCAST_ADMIN_KEY": ADMIN_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def seed(http: aiohttp.ClientSession, base: str) -> None:
    for method, path, body in (
        ("PUT", "/api/warehouses/LAX", {"name": "Los Angeles", "regions": ["US-West"]}),
        ("PUT", "/api/skus/tee", {"name": "Tee", "price": "9.00", "currency": "USD"}),
        ("PUT", "/api/warehouses/LAX/snapshot", {"as_of": time.time(), "levels": [{"sku": "tee", "on_hand": 10}]}),
    ):
        async with http.request(method, base + path, json=body, headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()


async def sellable(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(f"{base}/api/stock/tee") as resp:
        return next(r["sellable"] for r in (await resp.json())["regions"] if r["region"] == "US-West")


async def test_sigterm_then_restart_keeps_rooms(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await start(port, tmp_path)
    async with aiohttp.ClientSession() as http:
        try:
            await seed(http, base)
            body = {"title": "evening show", "region": "US-West", "skus": ["tee"]}
            async with http.post(f"{base}/api/rooms", json=body, headers=ADMIN) as resp:
                room = await resp.json()
            # A reservation outstanding at the moment of the SIGTERM (not confirmed, still held).
            order_body = {"sku": "tee", "quantity": 3, "region": "US-West", "idempotency_key": "before-sigterm"}
            async with http.post(f"{base}/api/rooms/{room['id']}/orders", json=order_body) as resp:
                assert resp.status == 201
                order = (await resp.json())["order"]
            assert order["status"] == "reserved" and await sellable(http, base) == 7
            pub = await whip_publish(http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
            collector = FrameCollector()
            viewer = await whep_play(http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))
            await viewer.wait_connected()
            await collector.wait_for("video", 3)

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0  # graceful: peer connections closed, store flushed
            await collector.stop()
            await viewer.close()
            await pub.close()

            proc = await start(port, tmp_path)
            async with http.get(f"{base}/api/rooms/{room['id']}") as resp:
                assert resp.status == 200 and (await resp.json())["title"] == "evening show"
            # The reservation is still held, and confirming it works.
            async with http.get(f"{base}/api/rooms/{room['id']}/orders/{order['id']}") as resp:
                assert (await resp.json())["order"]["status"] == "reserved"
            assert await sellable(http, base) == 7
            async with http.post(f"{base}/api/rooms/{room['id']}/orders/{order['id']}/confirm", headers=ADMIN) as resp:
                assert resp.status == 200 and (await resp.json())["order"]["status"] == "confirmed"
            # The old links and tokens work: the host goes live again, a viewer watches.
            pub = await whip_publish(http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(160, 90)])
            collector = FrameCollector()
            viewer = await whep_play(http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))
            await collector.wait_for("video", 3)
            await viewer.close()
            await pub.close()
            await collector.stop()
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 15)
