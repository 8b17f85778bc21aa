from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import aiohttp
import av
import numpy as np
import pytest
from aiohttp import web
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from playwright.async_api import Browser, async_playwright

from tests.tools.chromium import CHROMIUM, CHROMIUM_FLAGS

from relay.client import whip_publish
from relay.synthetic import PatternTrack, ToneTrack

from signaling.app import create_app
from signaling.cli import server_ssl
from signaling.proxy import ClientAccessLogger
from signaling.config import NO_LIMIT, Config, MediaConfig
from signaling.keys import ROOMS

from tests.tools.coturn import Coturn
from tests.tools.redis_server import RedisServer

ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    app: web.Application
    base: str
    http: aiohttp.ClientSession

    @property
    def rooms(self):  # type: ignore[no-untyped-def]
        return self.app[ROOMS]

    async def create_room(self, **body: Any) -> dict[str, Any]:
        body.setdefault("mode", "show")
        body.setdefault("title", "test show")
        async with self.http.post(
            f"{self.base}/api/rooms", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            assert resp.status == 201, await resp.text()
            return await resp.json()


async def start_server(config: Config) -> tuple[web.AppRunner, web.Application]:
    """Served as ``shelfcast serve`` serves it (its access log; HTTPS when the config has TLS)."""
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log_class=ClientAccessLogger)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port, ssl_context=server_ssl(config)).start()
    return runner, app


@pytest.fixture
def config(tmp_path: Path) -> Config:
    port = free_port()
    # Every test client shares 127.0.0.1, so the per-address limits are off here; test_limits turns them on.
    # Test clients share the server's process and loop, so its load is theirs: load shedding is off
    # here too, and test_load turns it on.
    return Config(
        host="127.0.0.1", port=port, data_dir=tmp_path / "data", admin_key=ADMIN_KEY, join_limit=NO_LIMIT,
        order_limit=NO_LIMIT, media=MediaConfig(shed_load=False),
    )


@pytest.fixture
async def server(config: Config) -> AsyncIterator[RunningServer]:
    runner, app = await start_server(config)
    async with aiohttp.ClientSession() as http:
        yield RunningServer(app, config.base_url, http)
    await runner.cleanup()


class FrameCollector:
    """Reads a remote track and keeps counts and the latest decoded frame."""

    def __init__(self) -> None:
        self.frames: dict[str, int] = {"video": 0, "audio": 0}
        self.last_video: av.VideoFrame | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self.frames[track.kind] += 1
                if track.kind == "video":
                    self.last_video = frame  # type: ignore[assignment]
        except MediaStreamError:
            pass

    async def wait_for(self, kind: str, count: int, timeout: float = 10.0) -> None:
        async def reached() -> None:
            while self.frames[kind] < count:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(reached(), timeout)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async def reached() -> None:
            while not predicate():
                await asyncio.sleep(0.05)

        await asyncio.wait_for(reached(), timeout)

    def mean_colour(self) -> np.ndarray:
        assert self.last_video is not None
        return self.last_video.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
def collector_factory() -> Callable[[], FrameCollector]:
    return FrameCollector


async def until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2) -> None:
    """Poll a sync or async predicate until it holds (asyncio.TimeoutError otherwise)."""

    async def poll() -> None:
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)

    await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def serving_with_media(config: Config, **media: Any) -> AsyncIterator[RunningServer]:
    """A server like the ``server`` fixture's, with some media settings changed."""
    runner, app = await start_server(replace(config, media=replace(config.media, **media)))
    async with aiohttp.ClientSession() as http:
        yield RunningServer(app, config.base_url, http)
    await runner.cleanup()


@contextlib.asynccontextmanager
async def live_show(server: RunningServer, title: str) -> AsyncIterator[tuple[dict[str, Any], Any]]:
    """A room live with the project's own aiortc host (colour pattern + tone): (room as created, live room)."""
    room = await server.create_room(title=title)
    live_room = server.rooms.get(room["id"])
    publisher = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"],
                                   [PatternTrack(320, 180), ToneTrack()])
    try:
        await publisher.wait_connected()
        await until(lambda: live_room.live, timeout=20)
        yield room, live_room
    finally:
        await publisher.close()


def with_config(config: Config, **changes: Any) -> Config:
    return replace(config, **changes)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh redis-server per test (empty state), stopped afterwards."""
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    """A fresh coturn per test on a free loopback port, sharing ``coturn.secret`` (TURN REST scheme)."""
    with Coturn(tmp_path / "coturn") as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, driven by Playwright (never a downloaded browser)."""
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        await browser.close()
