"""Attaches a live overlay to every room, and the API to set what it shows."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from overlay.compositor import Compositor
from overlay.live import RoomOverlay
from overlay.scene import POSITIONS, OverlaySettings
from relay.room import Room

from .errors import ApiError, read_json, room_not_found
from .keys import CONFIG, EVENTS, OVERLAYS, ROOMS, STOCK
from .rooms import require_room_staff, room_of

log = logging.getLogger("shelfcast.overlay")


class SavedOverlays:
    """Each room's overlay settings (the featured product above all) in the data directory, so a
    restart brings back what the host chose; entries of rooms that ended go at the next save."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def _read(self) -> dict[str, Any]:
        try:
            saved = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("could not read %s; overlays start from their defaults", self._path)
            return {}
        return saved if isinstance(saved, dict) else {}

    def get(self, room_id: str) -> Any:
        return self._read().get(room_id)

    def put(self, room_id: str, settings: OverlaySettings, rooms: set[str]) -> None:
        """Save ``room_id``'s settings, keeping only the entries of ``rooms`` (those still open)."""
        saved = {k: v for k, v in self._read().items() if k in rooms}
        saved[room_id] = settings.to_json()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        tmp.replace(self._path)


SAVED_OVERLAYS = web.AppKey("saved_overlays", SavedOverlays)



def attach_overlay(app: web.Application, room: Room) -> RoomOverlay:
    stock = app[STOCK]
    stock.watch_room(room.id)
    compositor = Compositor()
    room.media.set_frame_filter(compositor)
    overlay = RoomOverlay(room.id, room.sku_ids, stock, compositor)
    overlays = app[OVERLAYS]
    overlays[room.id] = overlay
    saved = app[SAVED_OVERLAYS].get(room.id)
    if saved is not None:
        try:
            overlay.update_settings(parse_settings(saved, overlay.settings, room.sku_ids))
        except ApiError:  # the room's products changed since: its defaults, not an error
            log.warning("saved overlay settings of room %s no longer fit its products", room.id)

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
    request.app[SAVED_OVERLAYS].put(room.id, settings, {r.id for r in request.app[ROOMS] if not r.closed})
    request.app[EVENTS].publish(room.id, {"type": "overlay", **settings.to_json()})  # pages follow the host
    return web.json_response(settings.to_json())


def setup_overlay(app: web.Application) -> None:
    app[OVERLAYS] = {}
    app[SAVED_OVERLAYS] = SavedOverlays(app[CONFIG].data_dir / "overlays.json")
    app[ROOMS].on_created.append(lambda room: attach_overlay(app, room))
    app.router.add_get("/api/rooms/{room}/overlay", get_overlay)
    app.router.add_route("PATCH", "/api/rooms/{room}/overlay", put_overlay)
    app.router.add_put("/api/rooms/{room}/overlay", put_overlay)
