"""PK battles over HTTP: one show invites another, the other accepts, both pictures merge.

The rules live in ``signaling.pk`` (pure). This module owns the rounds, links the two rooms' media while
a round is on (composition and audio mix happen in the media pipeline), feeds the PK bar to both
overlays, re-scores on every order (stock change) and re-checks time and hosts four times a second.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from decimal import Decimal
from typing import Any, AsyncIterator

from aiohttp import web

from overlay.scene import OverlayScene, PkBar
from .pk import DURATIONS_S, METRICS, PkRound, bar_for
from relay.room import Room

from .errors import ApiError, read_json
from .keys import EVENTS, OVERLAYS, PK, PLACEMENT, ROOMS, STOCK
from .rooms import require_room_staff

TICK_S = 0.25


class PkBattles:
    def __init__(self, app: web.Application) -> None:
        self._app = app
        self.rounds: dict[str, PkRound] = {}

    # -- state
    def current(self, room_id: str) -> PkRound | None:
        """The round a room is in (invited or on air), if any."""
        for pk in self.rounds.values():
            if room_id in pk.rooms and pk.state != "over":
                return pk
        return None

    def _room(self, room_id: str) -> Room | None:
        return self._app[ROOMS].get(room_id)

    def _totals(self, pk: PkRound) -> dict[str, Decimal]:
        stock = self._app[STOCK]
        index = 0 if pk.metric == "units" else 1
        return {room: Decimal(stock.room_sales(room)[index]) for room in pk.rooms}

    def _titles(self, pk: PkRound) -> dict[str, str]:
        titles = {}
        for room_id in pk.rooms:
            room = self._room(room_id)
            titles[room_id] = (room.title if room is not None else room_id) or room_id
        return titles

    def store(self, before: PkRound, after: PkRound) -> None:
        """Record a round's new state and apply what changed: links, overlays, events."""
        self.rounds[after.id] = after
        if before.linked != after.linked:
            self._link(after, after.linked)
        if after.linked or before.linked:
            self._refresh_overlays(after)
        if (before.state, before.winner, before.scores) != (after.state, after.winner, after.scores):
            for room_id in after.rooms:
                self._app[EVENTS].publish(room_id, {"type": "pk", **self.describe(after)})

    def _link(self, pk: PkRound, on: bool) -> None:
        rooms = [self._room(r) for r in pk.rooms]
        for room, partner in ((rooms[0], rooms[1]), (rooms[1], rooms[0])):
            if room is None:
                continue
            room.media.link_pk(partner.media if on and partner is not None else None)
            overlay = self._app[OVERLAYS].get(room.id)
            if overlay is not None:
                overlay.pk = self._provider(pk.id, room.id) if on else None

    def _provider(self, pk_id: str, room_id: str):
        def battle(now: float) -> tuple[PkBar, OverlayScene | None] | None:
            pk = self.rounds.get(pk_id)
            if pk is None or not pk.linked:
                return None
            bar = bar_for(pk, room_id, self._titles(pk), now)
            partner = self._app[OVERLAYS].get(pk.other(room_id))
            return (bar, partner.own_scene if partner is not None else None) if bar is not None else None

        return battle

    def _refresh_overlays(self, pk: PkRound) -> None:
        for room_id in pk.rooms:
            overlay = self._app[OVERLAYS].get(room_id)
            if overlay is not None:
                overlay.refresh()

    def on_stock_change(self, _skus: set[str]) -> None:
        now = time.time()
        for pk in list(self.rounds.values()):
            if pk.state == "live":
                self.store(pk, pk.update(now, self._totals(pk)))

    def tick(self) -> None:
        now = time.time()
        for pk in list(self.rounds.values()):
            if pk.state == "over":
                continue
            updated = pk.update(now, self._totals(pk) if pk.state == "live" else None)
            if updated.linked and not all((room := self._room(r)) is not None and room.live for r in pk.rooms):
                updated = updated.end(now, "host_left")  # the other room reverts at once
            self.store(pk, updated)

    def describe(self, pk: PkRound) -> dict[str, Any]:
        return {
            "id": pk.id,
            "inviter": pk.inviter,
            "invitee": pk.invitee,
            "state": pk.state,
            "metric": pk.metric,
            "duration_s": pk.duration_s,
            "ends_at": pk.ends_at,
            "scores": {room: str(score) for room, score in pk.scores.items()},
            "winner": pk.winner,
            "reason": pk.reason,
        }




def _show(request: web.Request, room_id: str) -> Room:
    room = request.app[ROOMS].require(room_id)
    if room.mode != "show":
        raise ApiError(400, "not_a_show", "PK battles link two show rooms")
    return room


async def invite(request: web.Request) -> web.Response:
    """POST /api/rooms/{room}/pk {"room": other, "duration_s": 180, "metric": "units"}."""
    battles = request.app[PK]
    room = _show(request, request.match_info["room"])
    require_room_staff(request, room.id)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    problems = []
    other_id = body.get("room")
    duration = body.get("duration_s", 180)
    metric = body.get("metric", "units")
    if not isinstance(other_id, str) or other_id == room.id:
        problems.append({"field": "room", "problem": "must be the id of another show room"})
    if duration not in DURATIONS_S:
        problems.append({"field": "duration_s", "problem": f"must be one of {', '.join(f'{d:g}' for d in DURATIONS_S)}"})
    if metric not in METRICS:
        problems.append({"field": "metric", "problem": f"must be one of {', '.join(METRICS)}"})
    if problems:
        raise ApiError(400, "invalid_pk", "the PK invitation is invalid", details=problems)
    other = _show(request, str(other_id))
    for busy in (room, other):
        if battles.current(busy.id) is not None:
            raise ApiError(409, "pk_busy", f"room {busy.id!r} is already in a PK battle")
    placement = request.app.get(PLACEMENT)
    if placement is not None:  # both pictures are composed in one process: bring the other room here
        await placement.colocate(other)
    # The inviting room's id first: in a cluster, answers are routed to its origin by it.
    pk = PkRound(f"{room.id}.{secrets.token_urlsafe(9)}", room.id, other.id, float(duration), str(metric), time.time())
    battles.rounds[pk.id] = pk
    for room_id in pk.rooms:
        request.app[EVENTS].publish(room_id, {"type": "pk", **battles.describe(pk)})
    return web.json_response(battles.describe(pk), status=201)


def _round(request: web.Request) -> PkRound:
    pk = request.app[PK].rounds.get(request.match_info["id"])
    if pk is None:
        raise ApiError(404, "pk_not_found", "no such PK battle")
    return pk


async def answer(request: web.Request) -> web.Response:
    """POST /api/pk/{id}/accept|decline by the invited room's host."""
    battles = request.app[PK]
    pk = _round(request)
    require_room_staff(request, pk.invitee)
    if pk.state != "invited":
        raise ApiError(409, "pk_not_pending", f"this battle is {pk.state}")
    now = time.time()
    if request.match_info["action"] == "decline":
        battles.store(pk, pk.decline(now))
    else:
        for room_id in pk.rooms:
            room = request.app[ROOMS].get(room_id)
            if room is None or not room.live:
                raise ApiError(409, "host_not_live", "both hosts must be live to start a battle")
        battles.store(pk, pk.accept(now, battles._totals(pk)))
    return web.json_response(battles.describe(battles.rounds[pk.id]))


async def cancel(request: web.Request) -> web.Response:
    """DELETE /api/pk/{id}: either host ends the battle; both rooms revert."""
    battles = request.app[PK]
    pk = _round(request)
    if not any(_is_staff(request, r) for r in pk.rooms):
        require_room_staff(request, pk.inviter)  # raises the right 401/403
    battles.store(pk, pk.end(time.time(), "cancelled"))
    return web.json_response(battles.describe(battles.rounds[pk.id]))


def _is_staff(request: web.Request, room_id: str) -> bool:
    try:
        require_room_staff(request, room_id)
    except ApiError:
        return False
    return True


async def current(request: web.Request) -> web.Response:
    room = _show(request, request.match_info["room"])
    pk = request.app[PK].current(room.id)
    return web.json_response({"pk": None if pk is None else request.app[PK].describe(pk)})


def setup_pk(app: web.Application) -> None:
    app[PK] = PkBattles(app)
    app.router.add_post("/api/rooms/{room}/pk", invite)
    app.router.add_get("/api/rooms/{room}/pk", current)
    app.router.add_post("/api/pk/{id}/{action:accept|decline}", answer)
    app.router.add_delete("/api/pk/{id}", cancel)

    async def run(app: web.Application) -> AsyncIterator[None]:
        battles = app[PK]
        unsubscribe = app[STOCK].add_listener(battles.on_stock_change)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(TICK_S)
                battles.tick()

        task = asyncio.create_task(ticker())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        unsubscribe()

    app.cleanup_ctx.append(run)
