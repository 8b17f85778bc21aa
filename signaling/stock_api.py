"""HTTP surface of the stock side: catalog, feeds, stock queries, orders, flash sales, planning.

``setup_stock(app, room_lookup)`` registers the routes and a cleanup context that opens the SQLite
store in the data dir and runs the stock service (expiry, staleness and alert timers). With a Redis
URL (``redis_url=`` or ``Config.redis_url``) the node instead shares one stock ledger with every other
node on that Redis through a replicated command log (``overlay.stock.log.RedisLog``; no SQLite then).
Domain errors from the ledger and validation become the JSON error contract here and nowhere else.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from overlay.stock.model import Order, RoomView
from overlay.stock.replenish import lines_to_csv
from overlay.stock.log import RedisLog
from overlay.stock.service import RoomLookup, StockService
from overlay.stock.store import SqliteStockStore
from overlay.stock.validation import (check_id, parse_events, parse_flash, parse_incoming,
                                parse_order, parse_sku, parse_snapshot, parse_warehouse)

from .auth import require_admin, require_feed
from .errors import ApiError, read_json, room_not_found
from .keys import CONFIG, EVENTS, LIMITERS, STOCK
from .limits import enforce


# Checks a caller may act on a room (confirm orders, run flash sales, read alerts and plans).
# Raise ApiError to refuse; may be async. Default: the admin key. The room registry can pass one
# that also accepts the room's host token.
RoomAuth = Callable[[web.Request, str], "Awaitable[None] | None"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _order_response(order: Order) -> web.Response:
    if order.status in ("reserved", "confirmed", "expired"):
        return web.json_response({"order": order.to_json()}, status=201)
    messages = {
        "insufficient_stock": "not enough stock in this region",
        "flash_sale_cap": "the flash sale has no units left",
        "per_buyer_limit": "this buyer reached the flash sale limit",
    }
    reason = order.reason or "rejected"
    raise ApiError(409, reason, messages.get(reason, "order rejected"), details={"order": order.to_json()})


def setup_stock(app: web.Application, room_lookup: RoomLookup, *, room_auth: RoomAuth | None = None,
                redis_url: str | None = None) -> None:
    """Register the stock routes and the service's lifecycle on ``app``.

    ``redis_url`` (default: ``app[CONFIG].redis_url`` when the config has one) switches the stock side
    to the shared ledger of a cluster of nodes; without it the node owns its stock in SQLite.
    """

    def config_key() -> tuple[str, str]:
        cfg = app[CONFIG]
        return cfg.admin_key, cfg.feed_key

    def admin(request: web.Request) -> None:
        require_admin(request, config_key()[0])

    def feed(request: web.Request) -> None:
        require_feed(request, *config_key())

    async def room_admin(request: web.Request, room_id: str) -> None:
        check = room_auth or (lambda req, _room: admin(req))
        result = check(request, room_id)
        if inspect.isawaitable(result):
            await result

    def room_of(request: web.Request) -> RoomView:
        room_id = request.match_info["room"]
        room = room_lookup(room_id)
        if room is None:
            raise room_not_found(room_id)
        return room

    def svc(request: web.Request) -> StockService:
        return request.app[STOCK]

    async def put_warehouse(request: web.Request) -> web.Response:
        admin(request)
        wh_id = check_id(request.match_info["wh"], "warehouse")
        wh = await svc(request).put_warehouse(wh_id, parse_warehouse(await read_json(request)))
        return web.json_response({"id": wh.id, "name": wh.name, "regions": list(wh.regions),
                                  "lead_time_days": wh.lead_time_days})

    async def put_sku(request: web.Request) -> web.Response:
        admin(request)
        sku_id = check_id(request.match_info["sku"], "sku")
        sku = await svc(request).put_sku(sku_id, parse_sku(await read_json(request)))
        return web.json_response({"id": sku.id, "name": sku.name, "price": sku.price, "currency": sku.currency,
                                  "group": sku.group, "attributes": sku.attributes})

    async def post_events(request: web.Request) -> web.Response:
        feed(request)
        cfg = app[CONFIG].stock
        events = parse_events(await read_json(request, max_bytes=max(1 << 20, cfg.max_batch_events * 512)),
                              cfg.max_batch_events)
        result = await svc(request).apply_events(events)
        return web.json_response(result.to_json())

    async def put_snapshot(request: web.Request) -> web.Response:
        feed(request)
        wh_id = check_id(request.match_info["wh"], "warehouse")
        cfg = app[CONFIG].stock
        snap = parse_snapshot(await read_json(request, max_bytes=max(1 << 20, cfg.max_snapshot_levels * 128)),
                              cfg.max_snapshot_levels)
        result = await svc(request).apply_snapshot(wh_id, snap)
        return web.json_response({"warehouse": wh_id, "drift": result.drift,
                                  "corrected": len(result.drift),
                                  "anomalies": [{"warehouse": w, "sku": s} for w, s in result.anomalies]})

    async def post_heartbeat(request: web.Request) -> web.Response:
        feed(request)
        await svc(request).heartbeat(check_id(request.match_info["wh"], "warehouse"))
        return web.json_response({"ok": True})

    async def put_incoming(request: web.Request) -> web.Response:
        feed(request)
        wh_id = check_id(request.match_info["wh"], "warehouse")
        sku_id = check_id(request.match_info["sku"], "sku")
        inp = parse_incoming(await read_json(request))
        await svc(request).set_incoming(wh_id, sku_id, inp)
        return web.json_response({"warehouse": wh_id, "sku": sku_id, "quantity": inp.quantity, "eta": inp.eta})

    async def ack_anomaly(request: web.Request) -> web.Response:
        admin(request)
        wh_id = check_id(request.match_info["wh"], "warehouse")
        sku_id = check_id(request.match_info["sku"], "sku")
        await svc(request).ack_anomaly(wh_id, sku_id)
        return web.json_response({"ok": True})

    async def get_stock(request: web.Request) -> web.Response:
        body = svc(request).sku_stock(request.match_info["sku"])
        if body is None:
            raise ApiError(404, "unknown_sku", "no such sku")
        return web.json_response(body)

    async def post_order(request: web.Request) -> web.Response:
        limiters = app.get(LIMITERS)  # stock-only apps (tests, the stock benchmark) run without limits
        if limiters is not None:
            enforce(limiters.order, request, "orders")
        room = room_of(request)
        inp = parse_order(await read_json(request, max_bytes=16 * 1024), app[CONFIG].stock.max_order_quantity)
        return _order_response(await svc(request).reserve(room, inp))

    async def get_order(request: web.Request) -> web.Response:
        room = room_of(request)
        order = svc(request).ledger.get_order(room.id, request.match_info["order"])
        return web.json_response({"order": order.to_json()})

    async def confirm_order(request: web.Request) -> web.Response:
        room = room_of(request)
        await room_admin(request, room.id)
        order = await svc(request).confirm(room.id, request.match_info["order"])
        return web.json_response({"order": order.to_json()})

    async def start_flash(request: web.Request) -> web.Response:
        room = room_of(request)
        await room_admin(request, room.id)
        service = svc(request)
        sale = await service.start_flash(room, parse_flash(await read_json(request), service.clock()))
        return web.json_response({"flash_sale": {
            "id": sale.id, "sku": sale.sku, "cap": sale.cap, "per_buyer": sale.per_buyer,
            "ends_at": sale.ends_at, "price": sale.price}}, status=201)

    async def stop_flash(request: web.Request) -> web.Response:
        room = room_of(request)
        await room_admin(request, room.id)
        sale = await svc(request).stop_flash(room.id, check_id(request.match_info["sku"], "sku"))
        return web.json_response({"flash_sale": {"id": sale.id, "sku": sale.sku, "stopped_at": sale.stopped_at}})

    async def room_stock(request: web.Request) -> web.Response:
        room = room_of(request)
        service = svc(request)
        service.watch_room(room.id)
        views = service.snapshot_for_room(room.id) or []
        return web.json_response({"room": room.id, "region": room.region, "skus": [v.to_json() for v in views]})

    async def room_alerts(request: web.Request) -> web.Response:
        room = room_of(request)
        await room_admin(request, room.id)
        svc(request).watch_room(room.id)
        return web.json_response({"room": room.id, "alerts": svc(request).room_alerts(room.id)})

    async def preshow(request: web.Request) -> web.Response:
        room = room_of(request)
        await room_admin(request, room.id)
        expected: dict[str, float] = {}
        problems = []
        for key, value in request.query.items():
            if key.startswith("expected."):
                try:
                    expected[key[len("expected."):]] = float(value)
                    if expected[key[len("expected."):]] < 0:
                        raise ValueError
                except ValueError:
                    problems.append({"field": key, "message": "must be a non-negative number"})
        if problems:
            raise ApiError(400, "invalid_query", "invalid expected demand", details=problems)
        lines = svc(request).preshow(room, expected)
        return web.json_response({
            "room": room.id, "region": room.region,
            "skus": [line.__dict__ for line in lines],
            "move_to_presale": [line.sku for line in lines if line.move_to_presale],
            "ok": all(line.verdict == "covered" for line in lines)})

    def _plan(request: web.Request, room: RoomView | None) -> web.Response:
        lines = svc(request).replenishment(room)
        if request.path.endswith(".csv"):
            name = f"replenishment-{room.id if room else 'all'}.csv"
            return web.Response(text=lines_to_csv(lines), content_type="text/csv",
                                headers={"Content-Disposition": f'attachment; filename="{name}"'})
        return web.json_response({"room": room.id if room else None, "generated_at": time.time(),
                                  "lines": [line.__dict__ for line in lines]})

    async def room_replenishment(request: web.Request) -> web.Response:
        room = room_of(request)
        await room_admin(request, room.id)
        return _plan(request, room)

    async def replenishment(request: web.Request) -> web.Response:
        admin(request)
        return _plan(request, None)

    routes: list[tuple[str, str, Handler]] = [
        ("PUT", "/api/warehouses/{wh}", put_warehouse),
        ("PUT", "/api/skus/{sku}", put_sku),
        ("POST", "/api/stock/events", post_events),
        ("PUT", "/api/warehouses/{wh}/snapshot", put_snapshot),
        ("POST", "/api/warehouses/{wh}/heartbeat", post_heartbeat),
        ("PUT", "/api/warehouses/{wh}/incoming/{sku}", put_incoming),
        ("POST", "/api/warehouses/{wh}/anomalies/{sku}/ack", ack_anomaly),
        ("GET", "/api/stock/{sku}", get_stock),
        ("POST", "/api/rooms/{room}/orders", post_order),
        ("GET", "/api/rooms/{room}/orders/{order}", get_order),
        ("POST", "/api/rooms/{room}/orders/{order}/confirm", confirm_order),
        ("POST", "/api/rooms/{room}/flash-sales", start_flash),
        ("DELETE", "/api/rooms/{room}/flash-sales/{sku}", stop_flash),
        ("GET", "/api/rooms/{room}/stock", room_stock),
        ("GET", "/api/rooms/{room}/alerts", room_alerts),
        ("GET", "/api/rooms/{room}/preshow", preshow),
        ("GET", "/api/rooms/{room}/replenishment", room_replenishment),
        ("GET", "/api/rooms/{room}/replenishment.csv", room_replenishment),
        ("GET", "/api/replenishment", replenishment),
        ("GET", "/api/replenishment.csv", replenishment),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        cfg = app[CONFIG]
        events = app[EVENTS]
        url = redis_url if redis_url is not None else getattr(cfg, "redis_url", "")
        if url:  # cluster: the Redis stream is the durable log, replayed on start
            service = StockService(cfg.stock, None, room_lookup, events.publish, log=RedisLog(
                url, snapshot_every=cfg.stock.snapshot_every, snapshot_every_s=cfg.stock.snapshot_every_s))
        else:
            loop = asyncio.get_running_loop()
            path = cfg.data_dir / "stock.sqlite3"
            store = await loop.run_in_executor(
                None, lambda: SqliteStockStore(path, durable=cfg.stock.durable_commits))
            service = StockService(cfg.stock, store, room_lookup, events.publish)
        await service.start()
        app[STOCK] = service
        try:
            yield
        finally:
            await service.close()

    app.cleanup_ctx.append(lifecycle)


__all__ = ["STOCK", "RoomAuth", "setup_stock"]
