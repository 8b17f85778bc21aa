"""Show -> private call invitations: the host picks one viewer, the viewer accepts or not in time.

The decision logic (``Invitation.answer``) is pure: a state, an action and ``now`` in, the next
state out. The HTTP side creates the call room, pushes the invitation to the viewer's watch page
over the show's event channel, and hands the buyer's call link only to the invited viewer (proved by
its WHEP session id, which only that page and the host console know).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from .errors import ApiError, read_json
from .keys import EVENTS, INVITATIONS, PLACEMENT, ROOMS
from .rooms import require_room_staff

DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Invitation:
    id: str
    show_room: str
    viewer: str
    call_room: str
    created_at: float
    expires_at: float
    state: str = "pending"  # pending | accepted | declined | expired | cancelled

    def current(self, now: float) -> "Invitation":
        if self.state == "pending" and now >= self.expires_at:
            return replace(self, state="expired")
        return self

    def answer(self, action: str, viewer: str, now: float) -> "Invitation":
        """``action`` in accept/decline by ``viewer``; raises ApiError when it cannot apply."""
        current = self.current(now)
        if viewer != self.viewer:
            raise ApiError(403, "not_invited", "this invitation is for another viewer")
        if current.state == "expired":
            raise ApiError(410, "invitation_expired", "this invitation has expired")
        if current.state != "pending":
            if current.state == {"accept": "accepted", "decline": "declined"}[action]:
                return current  # repeated answer: same result
            raise ApiError(409, "invitation_closed", f"this invitation was already {current.state}")
        return replace(current, state="accepted" if action == "accept" else "declined")

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "show_room": self.show_room,
            "viewer": self.viewer,
            "state": self.state,
            "expires_at": self.expires_at,
        }




def _publish(app: web.Application, invitation: Invitation) -> None:
    app[EVENTS].publish(invitation.show_room, {"type": "invitation", **invitation.public()})


async def invite(request: web.Request) -> web.Response:
    """POST /api/rooms/{room}/invitations {"viewer", "timeout_s"?} (host or assistant token, admin)."""
    app = request.app
    show = app[ROOMS].require(request.match_info["room"])
    require_room_staff(request, show.id)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    viewer = body.get("viewer")
    timeout = body.get("timeout_s", DEFAULT_TIMEOUT_S)
    problems = []
    if not isinstance(viewer, str) or not await _watching(app, show.id, viewer, show.viewers):
        problems.append({"field": "viewer", "problem": "must be the id of a viewer watching this show"})
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 1 <= timeout <= MAX_TIMEOUT_S:
        problems.append({"field": "timeout_s", "problem": f"must be a number of seconds from 1 to {MAX_TIMEOUT_S:g}"})
    if problems:
        raise ApiError(400, "invalid_invitation", "the invitation is invalid", details=problems)
    pending = [i for i in app[INVITATIONS].values() if i.show_room == show.id and i.current(time.time()).state == "pending"]
    if any(i.viewer == viewer for i in pending):
        raise ApiError(409, "already_invited", "this viewer already has a pending invitation")

    call = app[ROOMS].create("call", f"{show.title} · private call", show.region, show.sku_ids)
    placement = app.get(PLACEMENT)
    if placement is not None:
        await placement.share(call)
    now = time.time()
    # The show's id first: in a cluster, the answer is routed to the show's origin by it.
    invitation = Invitation(f"{show.id}.{secrets.token_urlsafe(9)}", show.id, str(viewer), call.id, now, now + float(timeout))
    app[INVITATIONS][invitation.id] = invitation
    _publish(app, invitation)
    asyncio.get_running_loop().call_later(float(timeout), _expire, app, invitation.id)
    tokens = app[ROOMS].tokens(call)
    links = app[ROOMS].links(call, tokens)
    return web.json_response(
        {"invitation": invitation.public(), "call": {"id": call.id, "seller": links["seller"]}}, status=201
    )


async def _watching(app: web.Application, show_id: str, viewer: str, here: dict[str, Any]) -> bool:
    """Whether ``viewer`` is a session watching this show, here or (in a cluster) on another node."""
    if viewer in here:
        return True
    placement = app.get(PLACEMENT)
    if placement is None:
        return False
    found = await placement.cluster.session_room(viewer)
    return found is not None and found[1] == show_id


def _expire(app: web.Application, invitation_id: str) -> None:
    invitation = app[INVITATIONS].get(invitation_id)
    if invitation is None:
        return
    current = invitation.current(time.time())
    if current.state == "expired" and invitation.state == "pending":
        app[INVITATIONS][invitation_id] = current
        _publish(app, current)
        asyncio.ensure_future(app[ROOMS].end(current.call_room))  # nobody will come: free the room


async def respond(request: web.Request) -> web.Response:
    """POST /api/invitations/{id}/accept|decline {"viewer"}: only the invited viewer may answer."""
    app = request.app
    invitation = app[INVITATIONS].get(request.match_info["id"])
    if invitation is None:
        raise ApiError(404, "invitation_not_found", "no such invitation")
    body = await read_json(request)
    viewer = body.get("viewer") if isinstance(body, dict) else None
    if not isinstance(viewer, str):
        raise ApiError(400, "bad_request", "send {\"viewer\": your viewer session id}")
    action = request.match_info["action"]
    answered = invitation.answer(action, viewer, time.time())
    app[INVITATIONS][invitation.id] = answered
    if answered != invitation:
        _publish(app, answered)
    result: dict[str, Any] = {"invitation": answered.public()}
    call = app[ROOMS].get(answered.call_room)
    if answered.state == "accepted" and call is not None:
        tokens = app[ROOMS].tokens(call)
        result["call"] = {"id": call.id, "buyer": app[ROOMS].links(call, tokens)["buyer"]}
    elif answered.state == "declined":
        await app[ROOMS].end(answered.call_room)
    return web.json_response(result)


def setup_invitations(app: web.Application) -> None:
    app[INVITATIONS] = {}
    app.router.add_post("/api/rooms/{room}/invitations", invite)
    app.router.add_post("/api/invitations/{id}/{action:accept|decline}", respond)

