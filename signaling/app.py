"""The aiohttp application: ``create_app(config)`` wires registry, APIs, pages and events."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import AsyncIterator

from aiohttp import WSMsgType, web

from relay.ice import default_host_addresses
from relay.load import LoadMonitor
from relay.room import Room

from . import rooms, webrtc
from .webrtc import watcher_role
from .invitations import identify_page, setup_invitations
from .overlay_api import setup_overlay
from .pk_api import setup_pk
from .stock_api import setup_stock
from .auth import TokenSigner
from .config import WILDCARD_HOSTS, Config
from .errors import ApiError, error_middleware
from .rooms import room_of
from .events import EventHub
from .cluster import Cluster, NodeInfo, new_node_id
from .keys import CONFIG, EVENTS, LIMITERS, LOAD, PLACEMENT, ROOMS, SIGNER, TELEMETRY
from .health import setup_health
from .limits import Limiters
from .metrics import count_rejections, metrics, setup_metrics
from .placement import Placement, at_origin, handover
from .proxy import forwarded_middleware

log = logging.getLogger("shelfcast.app")
STATIC = Path(__file__).parent / "static"


async def list_nodes(request: web.Request) -> web.Response:
    """The nodes serving this deployment (pages fail over to another one's URL); ids and load for
    operators. One process: just this one."""
    placement = request.app.get(PLACEMENT)
    if placement is None:
        audience = sum(r.audience for r in request.app[ROOMS] if not r.closed)
        return web.json_response({"nodes": [{"url": request.app[CONFIG].base_url, "audience": audience}]})
    nodes = await placement.cluster.nodes()
    return web.json_response({"nodes": [{"id": n.id, "url": n.public_url, "audience": n.audience} for n in nodes]})


AUTH_WAIT_S = 5.0


async def _authenticate_page(ws: web.WebSocketResponse, room: Room, signer: TokenSigner) -> dict[str, object] | None:
    """A private room's events go only to a page that proves a token in its first message
    (browsers cannot set headers on a WebSocket, and a token in the URL would end up in logs).
    Returns that message (None: refused)."""
    try:
        msg = await ws.receive(timeout=AUTH_WAIT_S)
        first = json.loads(msg.data) if msg.type == WSMsgType.TEXT else None
        token = first.get("token") if isinstance(first, dict) and first.get("type") == "auth" else None
        watcher_role(room, token if isinstance(token, str) else None, signer)
        return first if isinstance(first, dict) else None
    except ApiError as err:
        await ws.send_str(json.dumps({"type": "error", **err.to_body()}))
        await ws.close(code=4000 + err.status, message=err.code.encode())
    except (asyncio.TimeoutError, ValueError):
        await ws.close(code=4401, message=b"unauthorized")
    return None


async def room_events(request: web.Request) -> web.WebSocketResponse:
    """Push room state (live, viewer count), stock, alerts and invitations to a page."""
    room = room_of(request)
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
    await ws.prepare(request)
    first = await _authenticate_page(ws, room, request.app[SIGNER]) if room.private else {}
    if first is None:
        return ws
    subscription = request.app[EVENTS].subscribe(room.id)
    identify_page(request.app, subscription, first)
    try:
        await ws.send_str(json.dumps({"type": "room", **room.describe()}))

        async def pump() -> None:
            while True:
                await ws.send_str(json.dumps(await subscription.get()))

        pump_task = asyncio.create_task(pump())
        try:
            async for msg in ws:  # pages only say who they are; reading keeps close frames flowing
                if msg.type == WSMsgType.ERROR:
                    break
                if msg.type == WSMsgType.TEXT:
                    identify_page(request.app, subscription, msg.data)
        finally:
            pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)
    finally:
        subscription.close()
    return ws


def _page(name: str):
    # Served whether or not the room exists: the page itself explains an unknown or ended room.
    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    return handler


async def _join_cluster(app: web.Application) -> Placement:
    config = app[CONFIG]
    node = NodeInfo(new_node_id(), (config.node_url or config.base_url).rstrip("/"), config.base_url)
    cluster = Cluster(config.redis_url, node)
    app[SIGNER].rekey(await cluster.start())  # one secret for the whole cluster: tokens work anywhere
    placement = Placement(cluster, app[ROOMS], app[EVENTS], app[SIGNER])
    app[PLACEMENT] = placement
    return placement


def reachable_addresses(config: Config) -> tuple[str, ...]:
    """Where other machines reach this server: its listening address, or for a wildcard the
    announced ICE addresses (say a NAT's public one) or else this machine's interfaces, of the
    wildcard's family (asyncio binds ``::`` for IPv6 only)."""
    if config.host not in WILDCARD_HOSTS:
        return (config.host,)
    ipv6 = config.host == "::"
    announced = tuple(a for a in config.ice_hosts if (":" in a) == ipv6)
    return announced or default_host_addresses(ipv6=ipv6)


def create_app(config: Config) -> web.Application:
    config = config.with_generated_secrets().with_reachable_url(reachable_addresses(config))
    app = web.Application(
        # forwarded first: everything after it, rate limits included, sees the real client.
        middlewares=[forwarded_middleware, webrtc.cors_middleware, count_rejections, error_middleware, at_origin],
        client_max_size=1 << 20,
    )
    app[CONFIG] = config
    setup_metrics(app)
    app[LIMITERS] = Limiters.from_config(config.join_limit, config.order_limit)
    app[EVENTS] = EventHub()
    app[SIGNER] = TokenSigner.from_data_dir(config.data_dir)
    app[LOAD] = LoadMonitor()
    ice_hosts = config.ice_hosts or default_host_addresses()
    app[ROOMS] = rooms.registry_from_app(app, ice_hosts)

    def observe_joins(room: Room) -> None:
        room.on_viewer_joined = app[TELEMETRY].join_seconds.observe

    app[ROOMS].on_created.append(observe_joins)
    # Stock first: cleanup runs in reverse, so rooms (and their overlays) close before the stock store.
    setup_stock(app, app[ROOMS].get, room_auth=rooms.require_room_staff)
    setup_overlay(app)
    setup_invitations(app)
    setup_pk(app)

    async def load_lifecycle(app: web.Application) -> AsyncIterator[None]:
        app[LOAD].start()
        yield
        await app[LOAD].close()

    async def rooms_lifecycle(app: web.Application) -> AsyncIterator[None]:
        # After the stock store is open: overlays attach to the rooms brought back.
        placement = await _join_cluster(app) if config.redis_url else None
        restored = await placement.start() if placement is not None else app[ROOMS].restore()
        if restored:
            log.info("restored %d rooms", restored)
        yield
        await app[ROOMS].close()
        if placement is not None:
            await placement.close()
            await placement.cluster.close()

    async def tell_pages(app: web.Application) -> None:
        app[ROOMS].shutting_down()  # before aiohttp closes the pages' sockets
        await asyncio.sleep(0.05)

    app.cleanup_ctx.append(load_lifecycle)
    app.cleanup_ctx.append(rooms_lifecycle)
    app.on_shutdown.append(tell_pages)
    rooms.add_routes(app)
    webrtc.add_routes(app)
    app.router.add_get("/api/rooms/{room}/events", room_events)
    setup_health(app)
    app.router.add_get("/api/nodes", list_nodes)
    app.router.add_post("/api/cluster/rooms/{room}/handover", handover)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/studio/{room}", _page("studio.html"))
    app.router.add_get("/watch/{room}", _page("watch.html"))
    app.router.add_get("/call/{room}", _page("call.html"))
    app.router.add_static("/static/", STATIC)
    return app
