"""WHIP ingest and WHEP playback (RFC 9725 shapes): SDP offer in, 201 + answer + Location out."""

from __future__ import annotations

import logging

from aiohttp import web
from multidict import CIMultiDict

from relay.ice import IceServer
from relay.room import PK_HOST_FEED, RELAY_FEED, Room
from relay.sdp import check_ingest_offer, check_playback_offer, parse_offer
from relay.sessions import Session

from .auth import TokenSigner, bearer_token, require_claims, verify_token
from .errors import ApiError
from .keys import CONFIG, LIMITERS, PK, PLACEMENT, SIGNER
from .limits import enforce
from .proxy import client_address
from .logs import ids
from .placement import FORWARDED
from .rooms import room_of

log = logging.getLogger("shelfcast.webrtc")

PUBLISHER_ROLES = {"show": {"host"}, "call": {"seller", "buyer"}}


async def _read_offer(request: web.Request) -> str:
    if request.content_type != "application/sdp":
        raise ApiError(415, "unsupported_media_type", "send the SDP offer with Content-Type: application/sdp")
    limit = request.app[CONFIG].max_sdp_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"SDP offer larger than {limit} bytes")
    # read(), not the stream: a request this node first tried to pass to another one was read then
    # (read() keeps the body; a chunked body is bounded by the app's client_max_size).
    raw = await request.read()
    if len(raw) > limit:
        raise ApiError(413, "payload_too_large", f"SDP offer larger than {limit} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_sdp", "the SDP offer is not valid UTF-8") from None


def _check_publisher_token(request: web.Request, room: Room) -> str:
    claims = require_claims(request, request.app[SIGNER], "a host token is required to publish")
    if claims.room != room.id or claims.role not in PUBLISHER_ROLES[room.mode]:
        raise ApiError(403, "forbidden", "this token may not publish into this room")
    return claims.role


def _answer(answer_sdp: str, location: str, ice_servers: tuple[IceServer, ...]) -> web.Response:
    # No ETag: RFC 9725 needs one only for ICE restarts, which a session does not take (its PATCH
    # always answers 405), and an entity-tag no request can be conditional on would promise more.
    headers = CIMultiDict({"Location": location})
    # The session's own STUN/TURN servers (RFC 9725 section 4.6): for a client that can use them
    # (an ICE restart, a later session); with the REST scheme the credentials expire by themselves.
    for server in ice_servers:
        for link in server.link_headers():
            headers.add("Link", link)
    if ice_servers:
        headers["Cache-Control"] = "no-store"
    return web.Response(status=201, body=answer_sdp.encode(), content_type="application/sdp", headers=headers)


async def _at_origin(request: web.Request, room: Room) -> web.Response | None:
    """Several processes: ingest (and a call, a PK feed) happens at the room's origin. Claims the
    origin for this node when nobody holds it; otherwise answers the origin's answer to the request."""
    placement = request.app.get(PLACEMENT)
    return None if placement is None else await placement.at_origin(request, room)


async def whip_publish(request: web.Request) -> web.Response:
    enforce(request.app[LIMITERS].join, request, "joins")
    room = room_of(request)
    role = _check_publisher_token(request, room)
    forwarded = await _at_origin(request, room)
    if forwarded is not None:
        return forwarded
    offer = await _read_offer(request)
    check_ingest_offer(parse_offer(offer))
    publisher, answer = await room.add_publisher(offer, role)
    await _register(request, room.id, publisher.id)
    log.info("publisher joined", extra=ids(room.id, publisher.id, role=role, client=client_address(request)))
    return _answer(answer, f"/whip/{room.id}/{publisher.id}", publisher.ice_servers)


def _check_viewer_token(request: web.Request, room: Room) -> str | None:
    """The raw host feed (?feed=host) is only for the host this show is in a PK battle with;
    everything else is :func:`watcher_role`."""
    if request.query.get("feed") == "host":
        return _check_pk_host(request, room)
    return watcher_role(room, bearer_token(request), request.app[SIGNER])


def watcher_role(room: Room, token: str | None, signer: TokenSigner) -> str | None:
    """Who may watch a room (WHEP, its event channel): anyone for a public show; a token of this
    room for a token-only show; one of the two parties for a call (whose role picks what they see)."""
    if not room.private:
        return None
    if room.mode == "call":
        claims = verify_token(token, signer, "this call is private: a party's token is required")
        if claims.room != room.id or claims.role not in PUBLISHER_ROLES["call"]:
            raise ApiError(403, "forbidden", "this token may not join this call")
        return claims.role
    claims = verify_token(token, signer, "this show is for invited viewers: a viewer token is required")
    if claims.room != room.id:
        raise ApiError(403, "forbidden", "this token is for another room")
    return None


def _check_pk_host(request: web.Request, room: Room) -> str:
    claims = require_claims(request, request.app[SIGNER], "the host feed needs the other PK host's token")
    battle = request.app[PK].current(room.id)
    if battle is None or not battle.linked or claims.room != battle.other(room.id) or claims.role != "host":
        raise ApiError(403, "forbidden", "only the host you are in a PK battle with may see this feed")
    return PK_HOST_FEED


def _check_relay(request: web.Request, room: Room, wanted: str) -> int:
    """Another node pulling one rung (``?relay=1``) or the audio (``?relay=audio``) of this room."""
    claims = require_claims(request, request.app[SIGNER], "a relay token is required")
    if claims.room != room.id or claims.role != RELAY_FEED:
        raise ApiError(403, "forbidden", "only another node of this cluster may relay this room")
    if wanted == "audio":
        return 0
    if not wanted.isdigit() or int(wanted) >= len(room.settings.ladder):
        raise ApiError(400, "bad_relay", f"relay must be 'audio' or a rung index below {len(room.settings.ladder)}")
    return int(wanted)


async def whep_play(request: web.Request) -> web.Response:
    relay = request.query.get("relay")
    if relay is None:  # nodes of the cluster are not clients: no per-address limit between them
        enforce(request.app[LIMITERS].join, request, "joins")
    room = room_of(request)
    role: str | None
    if relay is not None:
        role, rung = RELAY_FEED, _check_relay(request, room, relay)
    else:
        role, rung = _check_viewer_token(request, room), 0
        placement = request.app.get(PLACEMENT)
        if placement is not None:
            if room.mode == "show" and role is None:
                await placement.prepare_viewing(room)  # origin here, or an edge pulling from it
            else:
                forwarded = await _at_origin(request, room)
                if forwarded is not None:
                    return forwarded
    offer = await _read_offer(request)
    usable = check_playback_offer(parse_offer(offer))
    viewer, answer = await room.add_viewer(offer, usable.kinds(), role, rung)
    await _register(request, room.id, viewer.id)
    log.info("viewer joined", extra=ids(room.id, viewer.id, role=role or "viewer", client=client_address(request)))
    return _answer(answer, f"/whep/{room.id}/{viewer.id}", viewer.ice_servers)


async def _register(request: web.Request, room_id: str, session_id: str) -> None:
    placement = request.app.get(PLACEMENT)
    if placement is not None:  # its DELETE may reach another worker behind the same port
        await placement.cluster.register_session(room_id, session_id)


async def _session_elsewhere(request: web.Request) -> web.Response | None:
    placement = request.app.get(PLACEMENT)
    if placement is None or FORWARDED in request.headers:
        return None
    node = await placement.cluster.session_node(request.match_info["session"])
    return None if node is None else await placement.forward(request, node)


async def _session_of(request: web.Request) -> Session | web.Response:
    """The session resource a DELETE or PATCH names, or the answer of the node that has it; 404 in
    the error contract for any other (unknown, or a viewer's id under /whip/ and the reverse)."""
    room = room_of(request)
    session = room.session(request.match_info["session"])
    expected_kind = "publisher" if request.path.startswith("/whip/") else "viewer"
    if session is None:
        forwarded = await _session_elsewhere(request)
        if forwarded is not None:
            return forwarded
    if session is None or session.kind != expected_kind:
        raise ApiError(404, "session_not_found", "no such session in this room")
    return session


async def end_session(request: web.Request) -> web.Response:
    room = room_of(request)
    session = await _session_of(request)
    if isinstance(session, web.Response):
        return session
    await session.close()
    placement = request.app.get(PLACEMENT)
    if placement is not None:
        await placement.cluster.forget_session(session.id)
    log.info("%s left", session.kind, extra=ids(room.id, session.id))
    return web.Response(status=200)


TRICKLE_ICE_SDPFRAG = "application/trickle-ice-sdpfrag"


async def session_patch(request: web.Request) -> web.Response:
    """Trickle ICE and ICE restarts (RFC 9725 §4.3) are optional, and we take neither: the answer
    carries every candidate already. The resource must exist and the fragment be one, though."""
    session = await _session_of(request)
    if isinstance(session, web.Response):
        return session
    if request.content_type != TRICKLE_ICE_SDPFRAG:
        raise ApiError(415, "unsupported_media_type", f"a PATCH carries an ICE fragment as {TRICKLE_ICE_SDPFRAG}")
    raise ApiError(
        405, "trickle_not_supported", "send a complete offer; trickle ICE is not supported", headers={"Allow": "DELETE"}
    )


async def ice_servers(request: web.Request) -> web.Response:
    """GET /api/rooms/{room}/ice-servers: the STUN/TURN servers a page gives its RTCPeerConnection
    before it makes an offer (too late to use the ones in the answer's Link headers). Only for a
    client that could open a session in this room anyway (:func:`watcher_role`: anyone for a public
    show, a token of the room otherwise); TURN credentials are fresh for each request."""
    room = room_of(request)
    watcher_role(room, bearer_token(request), request.app[SIGNER])
    servers = room.settings.ice_servers.mint()
    return web.json_response({"iceServers": [server.to_json() for server in servers]},
                             headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/rooms/{room}/ice-servers", ice_servers)
    for prefix, handler in (("/whip", whip_publish), ("/whep", whep_play)):
        app.router.add_post(prefix + "/{room}", handler)
        app.router.add_delete(prefix + "/{room}/{session}", end_session)
        app.router.add_patch(prefix + "/{room}/{session}", session_patch)


@web.middleware
async def cors_middleware(request: web.Request, handler):
    """Let WHIP/WHEP players on other origins talk to us (as RFC 9725 clients in browsers do)."""
    cross_origin = request.path.startswith(("/whip/", "/whep/")) or request.path.endswith("/ice-servers")
    if cross_origin and request.method == "OPTIONS":
        response: web.StreamResponse = web.Response(status=204)
        if request.path.count("/") == 2:  # /whip/{room}, the endpoint (RFC 9725 §4.2); not a session
            response.headers["Accept-Post"] = "application/sdp"
    else:
        response = await handler(request)
    if cross_origin:
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, PATCH, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Expose-Headers"] = "Location, Link"
    return response
