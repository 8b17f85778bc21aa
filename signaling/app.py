"""The aiohttp application: ``create_app(config)`` wires registry, APIs, pages and events."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import AsyncIterator

from aiohttp import WSMsgType, web

from relay.ice import default_host_addresses

from . import rooms, webrtc
from .invitations import setup_invitations
from .overlay_api import setup_overlay
from .pk_api import setup_pk
from .stock_api import setup_stock
from .auth import TokenSigner
from .config import Config
from .errors import ApiError, error_middleware
from .events import EventHub
from .keys import CONFIG, EVENTS, ROOMS, SIGNER

log = logging.getLogger("shelfcast.app")
STATIC = Path(__file__).parent / "static"


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    lines = [
        "# HELP shelfcast_rooms Rooms open.",
        "# TYPE shelfcast_rooms gauge",
        "# HELP shelfcast_viewers Viewers connected per room.",
        "# TYPE shelfcast_viewers gauge",
        "# HELP shelfcast_video_encoders Video encoders open per room.",
        "# TYPE shelfcast_video_encoders gauge",
        "# HELP shelfcast_host_live Whether the room's host is live.",
        "# TYPE shelfcast_host_live gauge",
        "# HELP shelfcast_frames_dropped_total Source frames replaced before encoding (newest-frame policy).",
        "# TYPE shelfcast_frames_dropped_total counter",
        "# HELP shelfcast_ingest_frames_dropped_total Host frames dropped at ingest to stay live (behind).",
        "# TYPE shelfcast_ingest_frames_dropped_total counter",
        "# HELP shelfcast_rung_viewers Viewers per ladder rung.",
        "# TYPE shelfcast_rung_viewers gauge",
        "# HELP shelfcast_rung_switches_total Rung switches completed by viewers.",
        "# TYPE shelfcast_rung_switches_total counter",
        "# HELP shelfcast_encode_seconds_total Time spent encoding video, per rung.",
        "# TYPE shelfcast_encode_seconds_total counter",
        "# HELP shelfcast_composite_seconds_total Time spent blending the overlay, per rung.",
        "# TYPE shelfcast_composite_seconds_total counter",
    ]
    open_rooms = [r for r in request.app[ROOMS] if not r.closed]
    lines.append(f"shelfcast_rooms {len(open_rooms)}")
    for room in open_rooms:
        label = f'room="{room.id}"'
        pipelines = room.media.pipelines()
        publisher = room.publisher
        ingest_dropped = 0
        if publisher is not None:
            queued = publisher.decode_queue.frames_dropped if publisher.decode_queue is not None else 0
            ingest_dropped = publisher.frames_skipped + queued
        lines += [
            f"shelfcast_ingest_frames_dropped_total{{{label}}} {ingest_dropped}",
            f"shelfcast_viewers{{{label}}} {len(room.viewers)}",
            f"shelfcast_video_encoders{{{label}}} {room.media.video_encoders}",
            f"shelfcast_host_live{{{label}}} {int(room.live)}",
            f"shelfcast_frames_dropped_total{{{label}}} {sum(p.frames_dropped for p in pipelines)}",
            f"shelfcast_rung_switches_total{{{label}}} {sum(int(v.describe()['switches']) for v in room.viewers.values())}",
        ]
        for rung, count in room.media.rung_viewers().items():
            lines.append(f'shelfcast_rung_viewers{{{label},rung="{rung}"}} {count}')
        for pipeline in pipelines:
            rung_label = f'{label},rung="{pipeline.name}"'
            lines.append(f"shelfcast_encode_seconds_total{{{rung_label}}} {pipeline.encode_seconds:.4f}")
            lines.append(f"shelfcast_composite_seconds_total{{{rung_label}}} {pipeline.composite_seconds:.4f}")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def room_events(request: web.Request) -> web.WebSocketResponse:
    """Push room state (live, viewer count) and later stock/alerts to a page."""
    room = request.app[ROOMS].get(request.match_info["room"])
    if room is None:
        raise ApiError(404, "room_not_found", f"no live room {request.match_info['room']!r}")
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
    await ws.prepare(request)
    subscription = request.app[EVENTS].subscribe(room.id)
    try:
        await ws.send_str(json.dumps({"type": "room", **room.describe()}))

        async def pump() -> None:
            while True:
                await ws.send_str(json.dumps(await subscription.get()))

        pump_task = asyncio.create_task(pump())
        try:
            async for msg in ws:  # pages only listen; reading keeps close frames flowing
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)
    finally:
        subscription.close()
    return ws


def _page(name: str):  # type: ignore[no-untyped-def]
    # Served whether or not the room exists: the page itself explains an unknown or ended room.
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    return handler


def create_app(config: Config) -> web.Application:
    config = config.with_generated_secrets()
    app = web.Application(middlewares=[webrtc.cors_middleware, error_middleware], client_max_size=1 << 20)
    app[CONFIG] = config
    app[EVENTS] = EventHub()
    app[SIGNER] = TokenSigner.from_data_dir(config.data_dir)
    ice_hosts = config.ice_hosts or default_host_addresses()
    app[ROOMS] = rooms.registry_from_app(app, ice_hosts)
    # Stock first: cleanup runs in reverse, so rooms (and their overlays) close before the stock store.
    setup_stock(app, app[ROOMS].get, room_auth=rooms.require_room_staff)
    setup_overlay(app)
    setup_invitations(app)
    setup_pk(app)

    async def rooms_lifecycle(app: web.Application) -> AsyncIterator[None]:
        restored = app[ROOMS].restore()  # after the stock store is open: overlays attach to them
        if restored:
            log.info("restored %d rooms", restored)
        yield
        await app[ROOMS].close()

    async def tell_pages(app: web.Application) -> None:
        app[ROOMS].shutting_down()  # before aiohttp closes the pages' sockets
        await asyncio.sleep(0.05)

    app.cleanup_ctx.append(rooms_lifecycle)
    app.on_shutdown.append(tell_pages)
    rooms.add_routes(app)
    webrtc.add_routes(app)
    app.router.add_get("/api/rooms/{room}/events", room_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/studio/{room}", _page("studio.html"))
    app.router.add_get("/watch/{room}", _page("watch.html"))
    app.router.add_get("/call/{room}", _page("call.html"))
    app.router.add_static("/static/", STATIC)
    return app
