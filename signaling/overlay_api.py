"""Attaches a live overlay to every room, and the API to set what it shows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aiohttp import web

from overlay.compositor import Compositor
from overlay.live import RoomOverlay
from overlay.scene import POSITIONS, OverlaySettings
from relay.room import Room

from .errors import ApiError, read_json, room_not_found
from .keys import EVENTS, OVERLAYS, ROOMS, STOCK
from .rooms import require_room_staff, room_of



def attach_overlay(app: web.Application, room: Room) -> RoomOverlay:
    stock = app[STOCK]
    stock.watch_room(room.id)
    compositor = Compositor()
    room.media.set_frame_filter(compositor)
    overlay = RoomOverlay(room.id, room.sku_ids, stock, compositor)
    overlays = app[OVERLAYS]
    overlays[room.id] = overlay

    async def detach() -> None:
        overlays.pop(room.id, None)
        stock.unwatch_room(room.id)
        await overlay.close()

    room.attach(detach)
    return overlay


def parse_settings(body: Any, current: OverlaySettings, sku_ids: tuple[str, ...]) -> OverlaySettings:
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    problems: list[dict[str, str]] = []
    changes: dict[str, Any] = {}
    unknown = set(body) - {"enabled", "featured_sku", "badge_skus", "position", "scale"}
    for key in sorted(unknown):
        problems.append({"field": key, "problem": "unknown setting"})
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            problems.append({"field": "enabled", "problem": "must be true or false"})
        changes["enabled"] = body["enabled"]
    if "featured_sku" in body:
        sku = body["featured_sku"]
        if sku is not None and sku not in sku_ids:
            problems.append({"field": "featured_sku", "problem": "must be one of the room's SKUs (or null)"})
        changes["featured_sku"] = sku
    if "badge_skus" in body:
        skus = body["badge_skus"]
        if skus is not None and (not isinstance(skus, list) or any(s not in sku_ids for s in skus)):
            problems.append({"field": "badge_skus", "problem": "must be a list of the room's SKUs (or null)"})
        changes["badge_skus"] = None if skus is None else tuple(skus)
    if "position" in body:
        if body["position"] not in POSITIONS:
            problems.append({"field": "position", "problem": f"must be one of {', '.join(POSITIONS)}"})
        changes["position"] = body["position"]
    if "scale" in body:
        scale = body["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.5 <= scale <= 1.5:
            problems.append({"field": "scale", "problem": "must be a number from 0.5 to 1.5"})
        changes["scale"] = scale
    if problems:
        raise ApiError(400, "invalid_overlay", "the overlay settings are invalid", details=problems)
    return replace(current, **changes)


def _overlay_of(request: web.Request) -> tuple[Room, RoomOverlay]:
    room = room_of(request)
    overlay = request.app[OVERLAYS].get(room.id)
    if overlay is None:
        raise room_not_found(room.id)
    return room, overlay


async def get_overlay(request: web.Request) -> web.Response:
    _, overlay = _overlay_of(request)
    return web.json_response(overlay.settings.to_json())


async def put_overlay(request: web.Request) -> web.Response:
    room, overlay = _overlay_of(request)
    require_room_staff(request, room.id)
    settings = parse_settings(await read_json(request), overlay.settings, room.sku_ids)
    overlay.update_settings(settings)
    request.app[EVENTS].publish(room.id, {"type": "overlay", **settings.to_json()})  # pages follow the host
    return web.json_response(settings.to_json())


def setup_overlay(app: web.Application) -> None:
    app[OVERLAYS] = {}
    app[ROOMS].on_created.append(lambda room: attach_overlay(app, room))
    app.router.add_get("/api/rooms/{room}/overlay", get_overlay)
    app.router.add_route("PATCH", "/api/rooms/{room}/overlay", put_overlay)
    app.router.add_put("/api/rooms/{room}/overlay", put_overlay)
