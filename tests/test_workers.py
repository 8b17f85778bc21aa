"""``shelfcast serve --workers 2 --redis URL``: two processes behind one port share the work."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import psutil

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack

from .conftest import ADMIN_KEY, FrameCollector, free_port, until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@contextlib.asynccontextmanager
async def two_workers(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """``shelfcast serve --workers 2`` on a free port, yielded (base URL, process) once both workers
    are up; ended with SIGTERM, which must exit cleanly."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling.cli", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data"),
        "--redis", redis_url, "--workers", "2", "--join-limit", "0", env={**os.environ, "SHELFCAST_ADMIN_KEY": ADMIN_KEY},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:
            async def two_nodes() -> bool:
                try:
                    async with http.get(f"{base}/api/nodes") as resp:
                        return resp.status == 200 and len((await resp.json())["nodes"]) == 2
                except aiohttp.ClientError:
                    return False

            await until(two_nodes, 20, 0.2)
        yield base, proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_two_workers_share_viewers_and_cores(redis_url: str, tmp_path: Path) -> None:
    async with two_workers(redis_url, tmp_path) as (base, proc):
        await share_viewers_and_cores(base, proc)


async def share_viewers_and_cores(base: str, proc: asyncio.subprocess.Process) -> None:
    http = aiohttp.ClientSession()
    sessions: list[aiohttp.ClientSession] = []
    viewers, collectors = [], []
    pub = None
    try:
        async with http.post(f"{base}/api/rooms", json={"title": "two workers"}, headers=ADMIN) as resp:
            assert resp.status == 201
            room = await resp.json()
        pub = await whip_publish(http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(640, 360)])
        # Each viewer on its own connection: the kernel spreads connections over the workers.
        for _ in range(8):
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            sessions.append(session)
            collector = FrameCollector()
            collectors.append(collector)
            viewers.append(await whep_play(session, room["links"]["whep"], on_track=collector.on_track, kinds=("video",)))
        for collector in collectors:
            await collector.wait_for("video", 10, timeout=20)

        async def spread() -> bool:
            async with http.get(f"{base}/api/nodes") as resp:
                nodes = (await resp.json())["nodes"]
            return len(nodes) == 2 and all(n["audience"] > 0 for n in nodes) and sum(n["audience"] for n in nodes) == 8

        await until(spread, 10, 0.5)
        # Both processes work: CPU time of each worker grows while the viewers watch.
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        before = [w.cpu_times().user + w.cpu_times().system for w in workers]
        await asyncio.sleep(3)
        used = [w.cpu_times().user + w.cpu_times().system - b for w, b in zip(workers, before)]
        # The origin encodes; the other worker only forwards its pulled copy (cheap, but not idle).
        assert all(u > 0.02 for u in used), used
        # A session's DELETE reaches the worker holding it, whichever worker takes the request
        # (a new connection each: about half land on the other worker and are passed on).
        for viewer in viewers:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
                async with fresh.delete(viewer.location) as resp:
                    assert resp.status == 200, await resp.text()
            viewer.location = None
            await viewer.close()
        viewers.clear()

        async def nobody() -> bool:
            async with http.get(f"{base}/api/nodes") as resp:
                return sum(n["audience"] for n in (await resp.json())["nodes"]) == 0

        await until(nobody, 10, 0.5)
    finally:
        for viewer in viewers:
            await viewer.close()
        if pub is not None:
            await pub.close()
        for collector in collectors:
            await collector.stop()
        for session in sessions:
            await session.close()
        await http.close()
