"""Room registry and the rooms API."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any, Callable

from aiohttp import web

from relay.abr import AbrConfig
from relay.room import MODES, RELAY_FEED, MediaSettings, Room

from .auth import TokenSigner, bearer_token, require_admin
from .config import Config
from .events import public_id
from .errors import ApiError, read_json, room_not_found
from .events import EventHub
from .keys import CONFIG, EVENTS, LOAD, PLACEMENT, ROOMS, SIGNER

log = logging.getLogger("shelfcast.rooms")

ROOM_ROLES = {
    "show": ("host", "assistant", "viewer"),
    "call": ("seller", "buyer"),
}
ACCESS = ("public", "token")
STAFF_ROLES = {"host", "seller", "assistant"}
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def media_settings(config: Config, ice_hosts: tuple[str, ...],
                   server_busy: Callable[[], bool] | None = None) -> MediaSettings:
    m = config.media
    return MediaSettings(
        ice_hosts=ice_hosts,
        ice_servers=config.ice,
        ladder=m.ladder,
        abr=AbrConfig(audio_bps=m.audio_bitrate) if m.abr else None,
        viewer_timeout_s=m.viewer_timeout_s,
        keyframe_min_interval_s=m.keyframe_min_interval_s,
        slate_fps=m.slate_fps,
        slate_size=m.slate_size,
        audio_bitrate=m.audio_bitrate,
        max_viewers=config.max_viewers_per_room,
        server_busy=server_busy,
        egress=m.egress,
        forward=m.forward,
    )


class RoomRegistry:
    def __init__(self, config: Config, signer: TokenSigner, events: EventHub, settings: MediaSettings) -> None:
        self._config = config
        self._signer = signer
        self._events = events
        self._settings = settings
        self._rooms: dict[str, Room] = {}
        self.on_created: list[Callable[[Room], object]] = []  # other layers attach to new rooms here
        self._store = config.data_dir / "rooms.json"  # rooms outlive a restart; sessions do not
        self.shared = False  # several processes: the directory lives in Redis (signaling.placement)

    def get(self, room_id: str) -> Room | None:
        room = self._rooms.get(room_id)
        return room if room is not None and not room.closed else None

    def require(self, room_id: str) -> Room:
        """The live room ``room_id``, or the 404 every endpoint answers for a room it does not know."""
        room = self.get(room_id)
        if room is None:
            raise room_not_found(room_id)
        return room

    def __iter__(self):
        return iter(list(self._rooms.values()))

    def create(
        self,
        mode: str,
        title: str,
        region: str = "",
        sku_ids: tuple[str, ...] = (),
        room_id: str | None = None,
        *,
        access: str = "public",
        created_at: float | None = None,
        persist: bool = True,
    ) -> Room:
        room_id = room_id or secrets.token_urlsafe(6).replace("_", "x").replace("-", "y")
        if room_id in self._rooms and not self._rooms[room_id].closed:
            raise ApiError(409, "room_exists", f"room {room_id!r} already exists")
        room = Room(room_id, mode, title, region, sku_ids, self._settings, access=access, on_change=self._announce)
        if created_at is not None:
            room.created_at = created_at
        self._rooms[room_id] = room
        for attach in self.on_created:
            attach(room)
        if persist:
            self._save()
        return room

    @staticmethod
    def record(room: Room) -> dict[str, Any]:
        """What survives a restart (and what other nodes learn) of a room."""
        return {
            "id": room.id,
            "mode": room.mode,
            "title": room.title,
            "region": room.region,
            "skus": list(room.sku_ids),
            "access": room.access,
            "created_at": room.created_at,
        }

    def add_record(self, r: dict[str, Any]) -> Room:
        return self.create(
            r["mode"], r["title"], r["region"], tuple(r["skus"]), r["id"],
            access=r.get("access", "public"), created_at=r["created_at"], persist=False,
        )

    def _save(self) -> None:
        if self.shared:
            return
        rooms = [self.record(r) for r in self._rooms.values() if not r.closed]
        self._store.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._store.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rooms": rooms}))
        tmp.replace(self._store)

    def restore(self) -> int:
        """Bring back the rooms of the last run (their links and tokens still work)."""
        if not self._store.exists():
            return 0
        try:
            saved = json.loads(self._store.read_text())["rooms"]
        except (ValueError, KeyError, TypeError):
            log.warning("could not read %s; starting without saved rooms", self._store)
            return 0
        for r in saved:
            self.add_record(r)
        return len(saved)

    def shutting_down(self) -> None:
        """Tell every page the server is restarting (they reconnect by themselves)."""
        for room in self._rooms.values():
            if not room.closed:
                self._events.publish(room.id, {"type": "shutdown", "message": "server restarting"})

    def _announce(self, room: Room) -> None:
        self._events.publish(room.id, {"type": "room", **room.describe()})

    def tokens(self, room: Room) -> dict[str, str]:
        expires = time.time() + self._config.token_ttl_s
        return {role: self._signer.issue(room.id, role, expires) for role in ROOM_ROLES[room.mode]}

    def links(self, room: Room, tokens: dict[str, str]) -> dict[str, str]:
        # Tokens travel in the URL fragment: browsers never send it, so it never reaches a log.
        base = self._config.base_url
        links = {"whip": f"{base}/whip/{room.id}", "whep": f"{base}/whep/{room.id}"}
        if room.mode == "call":  # private: one link per party, nothing to watch
            links["seller"] = f"{base}/call/{room.id}#token={tokens['seller']}"
            links["buyer"] = f"{base}/call/{room.id}#token={tokens['buyer']}"
        else:
            links["studio"] = f"{base}/studio/{room.id}#token={tokens['host']}"
            links["assistant"] = f"{base}/studio/{room.id}#token={tokens['assistant']}"
            links["watch"] = f"{base}/watch/{room.id}" + (f"#token={tokens['viewer']}" if room.private else "")
        return links

    async def end(self, room_id: str) -> bool:
        room = self._rooms.get(room_id)
        if room is None or room.closed:
            return False
        await room.close()
        self._save()
        return True

    async def close(self) -> None:
        for room in list(self._rooms.values()):
            await room.close()


def _validate_room_body(body: Any) -> tuple[str, str, str, tuple[str, ...], str | None, str]:
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    problems: list[dict[str, str]] = []
    mode = body.get("mode", "show")
    if mode == "pk":  # a battle is not a kind of room: two shows link for a round
        problems.append({"field": "mode", "problem": "a PK battle links two 'show' rooms: create shows, then "
                                                     "POST /api/rooms/{room}/pk"})
    elif mode not in MODES:
        problems.append({"field": "mode", "problem": f"must be one of {', '.join(MODES)}"})
    title = body.get("title", "")
    if not isinstance(title, str) or len(title) > 200:
        problems.append({"field": "title", "problem": "must be a string of at most 200 characters"})
    region = body.get("region", "")
    if not isinstance(region, str) or len(region) > 64:
        problems.append({"field": "region", "problem": "must be a string of at most 64 characters"})
    skus = body.get("skus", [])
    if not isinstance(skus, list) or not all(isinstance(s, str) and ID_PATTERN.match(s) for s in skus):
        problems.append({"field": "skus", "problem": "must be a list of SKU ids"})
    room_id = body.get("id")
    if room_id is not None and (not isinstance(room_id, str) or not ID_PATTERN.match(room_id)):
        problems.append({"field": "id", "problem": "must match [A-Za-z0-9_-]{1,64}"})
    access = body.get("access", "token" if mode == "call" else "public")
    if access not in ACCESS:
        problems.append({"field": "access", "problem": "must be 'public' (anyone with the link) or 'token' (a viewer token)"})
    elif mode == "call" and access != "token":
        problems.append({"field": "access", "problem": "a call is always private to its two parties"})
    if problems:
        raise ApiError(400, "invalid_room", "the room settings are invalid", details=problems)
    return mode, title, region, tuple(skus), room_id, access


async def create_room(request: web.Request) -> web.Response:
    app = request.app
    require_admin(request, app[CONFIG].admin_key)
    mode, title, region, skus, room_id, access = _validate_room_body(await read_json(request))
    registry = app[ROOMS]
    room = registry.create(mode, title, region, skus, room_id, access=access)
    placement = app.get(PLACEMENT)
    if placement is not None:
        await placement.share(room)
    tokens = registry.tokens(room)
    body = {**room.describe(), "tokens": tokens, "links": registry.links(room, tokens)}
    return web.json_response(body, status=201, headers={"Location": f"/api/rooms/{room.id}"})


def require_room_staff(request: web.Request, room_id: str) -> None:
    """The admin key, or a host/assistant token of this very room."""
    token = bearer_token(request)
    if token is not None:
        claims = request.app[SIGNER].verify(token, time.time())
        if claims is not None:
            if claims.room == room_id and claims.role in STAFF_ROLES:
                return
            raise ApiError(403, "forbidden", "this token may not manage this room")
    require_admin(request, request.app[CONFIG].admin_key)


def room_of(request: web.Request) -> Room:
    """The live room named in the request's path (``{room}``), or 404."""
    return request.app[ROOMS].require(request.match_info["room"])


async def get_room(request: web.Request) -> web.Response:
    """Public state; with the admin key also the room's tokens and links."""
    room = room_of(request)
    body = room.describe()
    if request.headers.get("Authorization"):
        require_admin(request, request.app[CONFIG].admin_key)
        registry = request.app[ROOMS]
        tokens = registry.tokens(room)
        body.update(tokens=tokens, links=registry.links(room, tokens))
    return web.json_response(body)


async def list_rooms(request: web.Request) -> web.Response:
    require_admin(request, request.app[CONFIG].admin_key)
    return web.json_response({"rooms": [r.describe() for r in request.app[ROOMS] if not r.closed]})


async def end_room(request: web.Request) -> web.Response:
    require_admin(request, request.app[CONFIG].admin_key)
    room = room_of(request)
    await request.app[ROOMS].end(room.id)
    placement = request.app.get(PLACEMENT)
    if placement is not None:
        await placement.end(room.id)
    return web.Response(status=204)


async def list_viewers(request: web.Request) -> web.Response:
    """Each viewer's rung, estimate, loss and switches (host console, operators). In a cluster the
    origin asks every node with viewers of the room for theirs (``?here=1``: only this node's)."""
    room = room_of(request)
    require_room_staff(request, room.id)
    # Listed by public id: the session id would let the console end a viewer's session.
    viewers = [{**v.describe(), "id": public_id(v.id)} for v in room.viewers.values() if v.role != RELAY_FEED]
    placement = request.app.get(PLACEMENT)
    if placement is not None and not request.query.get("here"):
        viewers += await placement.viewers_elsewhere(room, request.headers.get("Authorization", ""))
    rungs = {rung.rung.name: 0 for rung in room.media.rungs}
    for viewer in viewers:
        if viewer["rung"] in rungs:
            rungs[str(viewer["rung"])] += 1
    return web.json_response({"room": room.id, "rungs": rungs, "viewers": viewers})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/rooms/{room}/viewers", list_viewers)
    app.router.add_post("/api/rooms", create_room)
    app.router.add_get("/api/rooms", list_rooms)
    app.router.add_get("/api/rooms/{room}", get_room)
    app.router.add_delete("/api/rooms/{room}", end_room)


def registry_from_app(app: web.Application, ice_hosts: tuple[str, ...]) -> RoomRegistry:
    config = app[CONFIG]
    load = app[LOAD]
    busy = (lambda: load.busy) if config.media.shed_load else None
    return RoomRegistry(config, app[SIGNER], app[EVENTS], media_settings(config, ice_hosts, busy))
