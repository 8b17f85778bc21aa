"""Nodes as separate processes on loopback sharing one redis-server: an edge node dies and its
viewers' pages carry on through another node by themselves."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
from playwright.async_api import Browser, Page

from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack

from .conftest import ADMIN_KEY, FrameCollector, free_port, until
from .test_cluster import stock_event_on_c_reaches_viewers_on_b_and_c

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Node:
    proc: asyncio.subprocess.Process
    base: str


async def start_node(redis_url: str, data_dir: Path) -> Node:
    port = free_port()
    env = {**os.environ, "SHELFCAST_ADMIN_KEY": ADMIN_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
        "--redis", redis_url, "--workers", "1", "--join-limit", "0", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    node = Node(proc, f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as http:
        async def up() -> bool:
            try:
                async with http.get(node.base + "/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await until(up, 20, 0.1)
    return node


@pytest.fixture
async def nodes(redis_url: str, tmp_path: Path) -> AsyncIterator[list[Node]]:
    started = [await start_node(redis_url, tmp_path / f"node{i}") for i in range(3)]
    yield started
    for node in started:
        if node.proc.returncode is None:
            node.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(node.proc.wait(), 20)


async def decoded(page: Page) -> int:
    return await page.evaluate(
        """async () => {
            if (!window.player.pc) return 0;
            let n = 0;
            (await window.player.pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0; });
            return n;
        }"""
    )


async def test_three_processes_host_on_a_stock_event_on_c_shows_through_b_and_c(nodes: list[Node]) -> None:
    async with aiohttp.ClientSession() as http:
        a, b, c = (Client(node.base, http) for node in nodes)
        await stock_event_on_c_reaches_viewers_on_b_and_c(a, b, c)


@dataclass
class Client:
    base: str
    http: aiohttp.ClientSession


@pytest.mark.browser
async def test_edge_node_dies_and_its_viewers_play_on_through_another(nodes: list[Node], browser: Browser) -> None:
    a, b, _ = nodes
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{a.base}/api/rooms", json={"title": "three nodes"}, headers=ADMIN) as resp:
            room = await resp.json()
        pub = await whip_publish(http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
        context = await browser.new_context()
        try:
            page = await context.new_page()
            await page.goto(f"{b.base}/watch/{room['id']}")  # the viewer came in through node B
            await page.wait_for_function("window.player.status === 'playing' && shelfcast.nodes.list.length === 3", timeout=20000)
            await until(lambda: _more_than(page, 20), 15)
            b.proc.kill()  # SIGKILL: no goodbye to anyone
            killed_at = time.monotonic()
            await b.proc.wait()
            await page.wait_for_function(f"shelfcast.nodes.list[shelfcast.nodes.current] !== '{b.base}'", timeout=20000)
            await page.wait_for_function("window.player.status === 'playing'", timeout=20000)
            await until(lambda: _more_than(page, 10), 15, 0.1)  # frames decoded on the new connection
            resumed_s = time.monotonic() - killed_at
            print(f"viewer playing again {resumed_s:.1f} s after its node was killed")
            assert resumed_s < 12
        finally:
            await context.close()
            await pub.close()


async def _more_than(page: Page, frames: int) -> bool:
    return await decoded(page) > frames


@pytest.mark.browser
async def test_origin_dies_the_studio_republishes_and_edge_viewers_resume(nodes: list[Node], browser: Browser) -> None:
    a, b, _ = nodes
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{a.base}/api/rooms", json={"title": "origin dies"}, headers=ADMIN) as resp:
            room = await resp.json()
        context = await browser.new_context()
        collector = FrameCollector()
        viewer = None
        try:
            studio = await context.new_page()
            await studio.goto(room["links"]["studio"])  # the host's studio is on node A: A is the origin
            await studio.wait_for_function("window.studio.state === 'ready' && shelfcast.nodes.list.length === 3", timeout=20000)
            await studio.click("#golive")
            await studio.wait_for_function("window.studio.state === 'connected'", timeout=15000)
            viewer = await whep_play(http, f"{b.base}/whep/{room['id']}", on_track=collector.on_track, kinds=("video",))
            await collector.wait_for("video", 20, timeout=15)
            a.proc.kill()
            killed_at = time.monotonic()
            await a.proc.wait()
            # The studio finds another node by itself; the edge B takes the room over (or pulls from
            # whichever node did); B's viewer keeps its session and gets the host's picture again.
            await studio.wait_for_function("window.studio.sessions >= 2 && window.studio.state === 'connected'", timeout=30000)
            republished_s = time.monotonic() - killed_at
            count = collector.frames["video"]
            await collector.wait_for("video", count + 30, timeout=20)
            resumed_s = time.monotonic() - killed_at
            print(f"studio live again after {republished_s:.1f} s; edge viewer decoding the host after {resumed_s:.1f} s")
            assert viewer.pc.connectionState == "connected"  # never rejoined
            assert resumed_s < 30
        finally:
            await collector.stop()
            if viewer is not None:
                await viewer.close()
            await context.close()
