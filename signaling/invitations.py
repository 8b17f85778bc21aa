"""Show -> private call invitations: the host picks one viewer, the viewer accepts or not in time.

The decision logic (``Invitation.answer``) is pure: a state, an action and ``now`` in, the next
state out. The HTTP side creates the call room, pushes the invitation to the invited viewer's own
watch page and the room's staff only, and hands the buyer's call link only to the invited viewer.

A viewer is named by its session's :func:`~signaling.events.public_id` (what the host console
lists); it proves it is that viewer with the session id itself, which only its own page holds (it is
the end of its WHEP Location). Nothing a stranger can see grants anything: the public event channel
never carries an invitation, and a public id can neither answer one nor end the session.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from relay.room import Room

from .auth import keys_match
from .errors import ApiError, read_json
from .events import FOR_VIEWER, Subscription, public_id
from .keys import CONFIG, EVENTS, INVITATIONS, PLACEMENT, ROOMS, SIGNER
from .rooms import STAFF_ROLES, require_room_staff

DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
RESEND = "_invitations_wanted"  # between nodes: "send this viewer's pending invitations again"
ASK_EVERY_S = 1.0


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

    def event(self) -> dict[str, Any]:
        """For the invited viewer's page and the staff's, never the room's other pages."""
        return {"type": "invitation", FOR_VIEWER: self.viewer, **self.public()}


def _publish(app: web.Application, invitation: Invitation) -> None:
    app[EVENTS].publish(invitation.show_room, invitation.event())


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
    if not isinstance(viewer, str) or not await _watching(request, show, viewer):
        problems.append({"field": "viewer", "problem": "must be the id of a viewer watching this show (from its viewer list)"})
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


async def _watching(request: web.Request, show: Room, viewer: str) -> bool:
    """Whether ``viewer`` (a public id) is a viewer of this show, here or (in a cluster) elsewhere."""
    if any(public_id(s.id) == viewer for s in show.viewers.values() if s.role is None):
        return True  # role None: a person watching, not another node's pull or a PK host feed
    placement = request.app.get(PLACEMENT)
    if placement is None:
        return False
    elsewhere = await placement.viewers_elsewhere(show, request.headers.get("Authorization", ""))
    return any(v.get("id") == viewer for v in elsewhere)


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
    """POST /api/invitations/{id}/accept|decline {"session"}: only the invited viewer may answer,
    proving it with its own WHEP session id (the last part of its Location)."""
    app = request.app
    invitation = app[INVITATIONS].get(request.match_info["id"])
    if invitation is None:
        raise ApiError(404, "invitation_not_found", "no such invitation")
    body = await read_json(request)
    session = body.get("session") if isinstance(body, dict) else None
    if not isinstance(session, str) or not session:
        raise ApiError(400, "bad_request", "send {\"session\": your WHEP session id, the end of your session's Location}")
    action = request.match_info["action"]
    answered = invitation.answer(action, public_id(session), time.time())
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


def identify_page(app: web.Application, subscription: Subscription, message: object) -> None:
    """A page's message on its event channel saying who it is: ``{"type": "auth", "token"}`` (staff
    of the room, or the admin key, see the room's invitations) or ``{"type": "viewer", "session"}``
    (a watch page, once its WHEP session exists: its own invitations reach it). Anything else, or a
    proof that does not hold, changes nothing."""
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except ValueError:
            return
    if not isinstance(message, dict):
        return
    if message.get("type") == "auth" and isinstance(message.get("token"), str):
        token = message["token"]
        claims = app[SIGNER].verify(token, time.time())
        if claims is not None and claims.room == subscription.room_id and claims.role in STAFF_ROLES:
            subscription.staff = True
        elif keys_match(token, app[CONFIG].admin_key):
            subscription.staff = True
    elif message.get("type") == "viewer" and isinstance(message.get("session"), str):
        subscription.viewer = public_id(message["session"])
        for invitation in _pending_for(app, subscription.viewer):  # one sent while this page was reconnecting
            subscription.offer(invitation.event())
        # In a cluster the invitation lives on the show's origin, maybe another node: it sends it again
        # (to this page and staff pages only). At most once a second per page: each ask is a message
        # to every node.
        now = time.monotonic()
        if now - subscription.asked_at >= ASK_EVERY_S:
            subscription.asked_at = now
            app[EVENTS].ask_others(subscription.room_id, {"type": RESEND, "viewer": subscription.viewer})


def _pending_for(app: web.Application, viewer: str) -> list[Invitation]:
    now = time.time()
    return [i for i in app[INVITATIONS].values() if i.viewer == viewer and i.current(now).state == "pending"]


def _resend(app: web.Application, event: dict[str, Any]) -> None:
    """Another node's page proved it is ``viewer``: the invitations for it that live here go out again."""
    viewer = event.get("viewer")
    if isinstance(viewer, str):
        for invitation in _pending_for(app, viewer):
            _publish(app, invitation)


def setup_invitations(app: web.Application) -> None:
    app[INVITATIONS] = {}
    app[EVENTS].handle(RESEND, lambda _room, event: _resend(app, event))
    app.router.add_post("/api/rooms/{room}/invitations", invite)
    app.router.add_post("/api/invitations/{id}/{action:accept|decline}", respond)

