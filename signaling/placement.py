"""Rooms across several processes: which node is a room's origin, edges that pull from it, a room
directory and room state shared through :class:`signaling.cluster.Cluster`.

- The first node that needs a room's pipeline (its host publishing there, or its first viewer)
  claims the origin lease; a host publishing through any other node is forwarded to the origin.
- A viewer joining through any other node is served there: that node becomes an edge of the room
  and pulls the origin's encoded rungs once (:mod:`relay.cascade`), whatever its viewer count.
- An edge whose origin died takes the origin over (encoders replace the pulls under its viewers;
  they see the slate until the host's studio publishes again, through any node).
- Each node announces its share of a room (host live here, audience here); every node merges the
  shares so pages anywhere show the whole room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from relay.cascade import Upstream
from relay.room import Room
from relay.sessions import Session

from .auth import TokenSigner, require_claims
from .cluster import CLUSTER_EVENTS, Cluster, NodeInfo
from .errors import ApiError
from .events import EventHub
from .keys import PK, PLACEMENT
from .rooms import RoomRegistry

log = logging.getLogger("shelfcast.placement")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RELAY_TOKEN_TTL_S = 60.0
WATCH_EVERY_S = 1.0
FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=2)
FORWARDED = "X-Shelfcast-Forwarded"  # set on a request one node passes to another: never passed on again


# Requests about a room's live state (its overlay, viewers, PK, invitations) are answered by the
# room's origin, which holds that state; other nodes pass them on. Invitation and PK ids start with
# the (inviting) show's room id ("{room}.{random}") so an answer can be routed too.
ORIGIN_ROUTES = frozenset({
    "/api/rooms/{room}/overlay",
    "/api/rooms/{room}/viewers",
    "/api/rooms/{room}/pk",
    "/api/rooms/{room}/invitations",
    "/api/invitations/{id}/{action}",
    "/api/pk/{id}/{action}",
    "/api/pk/{id}",
})


def _routed_room(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    if resource is None or resource.canonical not in ORIGIN_ROUTES:
        return None
    return request.match_info.get("room") or request.match_info.get("id", "").partition(".")[0]


@web.middleware
async def at_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    placement = request.app.get(PLACEMENT)
    room_id = _routed_room(request) if placement is not None else None
    room = placement.registry.get(room_id) if placement is not None and room_id else None
    if placement is not None and room is not None:
        forwarded = await placement.at_origin(request, room)
        if forwarded is not None:
            return forwarded
    return await handler(request)


class Placement:
    def __init__(self, cluster: Cluster, registry: RoomRegistry, events: EventHub, signer: TokenSigner) -> None:
        self.cluster = cluster
        self.registry = registry
        self._events = events
        self.signer = signer
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._announced: dict[str, tuple[bool, int]] = {}
        self._ending: set[asyncio.Future[bool]] = set()  # rooms other nodes ended, closing here

    @property
    def node(self) -> NodeInfo:
        return self.cluster.node

    async def start(self) -> int:
        """Join: take the shared directory, follow other nodes' changes; answers the rooms known."""
        registry, cluster = self.registry, self.cluster
        registry.shared = True
        cluster.on_room_saved = self._room_saved
        cluster.on_room_ended = self._room_ended
        cluster.on_event = self._cluster_event
        cluster.audience = lambda: sum(r.audience for r in registry if not r.closed)
        records = await cluster.rooms()
        for record in records:
            self._room_saved(record)
        self._events.forward = self._forward_event
        self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._watch(), name="placement-watch")
        return len(records)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    # -- directory
    async def share(self, room: Room) -> None:
        await self.cluster.save_room(self.registry.record(room))

    async def end(self, room_id: str) -> None:
        await self.cluster.end_room(room_id)
        await self.cluster.release_origin(room_id)

    def _room_saved(self, record: dict[str, Any]) -> None:
        if self.registry.get(record["id"]) is None:
            self.registry.add_record(record)

    def _room_ended(self, room_id: str) -> None:
        if self.registry.get(room_id) is not None:
            task = asyncio.ensure_future(self.registry.end(room_id))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    # -- events and merged room state
    def _forward_event(self, room_id: str, event: dict[str, Any]) -> None:
        """Local events other nodes' pages need too; our share of the room's state."""
        if event.get("type") in CLUSTER_EVENTS:
            self.cluster.publish(room_id, event)
        elif event.get("type") == "room":
            room = self.registry.get(room_id)
            if room is not None:
                share = (room.live, room.audience)
                if self._announced.get(room_id) != share:
                    self._announced[room_id] = share
                    self.cluster.publish(room_id, {"type": "_share", "live": share[0], "audience": share[1]})

    def _cluster_event(self, node: str, room_id: str, event: dict[str, Any]) -> None:
        room = self.registry.get(room_id)
        if room is None:
            return
        if event.get("type") == "_share":
            room.elsewhere[node] = (bool(event.get("live")), int(event.get("audience", 0)))
            self._events.deliver(room_id, {"type": "room", **room.describe()})
        else:
            self._events.deliver(room_id, event)

    # -- origin and edges
    async def ingest_origin(self, room: Room) -> NodeInfo | None:
        """Before a host publishes here: the origin (claimed by us if nobody holds it)."""
        origin = await self.cluster.claim_origin(room.id)
        if origin is not None and origin.id == self.node.id:
            await self._become_origin(room)
        return origin

    async def prepare_viewing(self, room: Room) -> None:
        """Before a viewer joins here: be the origin, or an edge pulling from it."""
        if room.mode != "show":
            return  # calls and PK links stay on their origin node (their requests are forwarded)
        if self.cluster.holds_origin(room.id) or room.primary.media.upstream is not None:
            return
        origin = await self.cluster.claim_origin(room.id)
        if origin is None or origin.id == self.node.id:
            return
        media = room.primary.media
        if not media.running:  # never both: a node that encodes the room is not also pulling it
            media.become_edge(self._upstream(room))
            log.info("edge of the room; origin is %s", origin.id, extra={"room": room.id})

    async def colocate(self, room: Room) -> None:
        """Make this node the origin of ``room`` (a PK battle composes two rooms in one process):
        claim it if nobody holds it, else ask its origin to hand it over. The room's host is
        disconnected there and its studio publishes again by itself, reaching us; its viewers on
        the old origin stay connected (that node becomes an edge)."""
        origin = await self.cluster.claim_origin(room.id)
        if origin is not None and origin.id != self.node.id:
            assert self._http is not None
            url = f"{origin.internal_url}/api/cluster/rooms/{room.id}/handover"
            headers = {"Authorization": f"Bearer {self._relay_token(room.id)}", FORWARDED: self.node.id}
            try:
                async with self._http.post(url, headers=headers, timeout=FORWARD_TIMEOUT) as resp:
                    if resp.status != 200:
                        body = await resp.json(content_type=None)
                        error = (body or {}).get("error", {})
                        raise ApiError(409, error.get("code", "handover_refused"), error.get("message", "the room's node refused"))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                raise ApiError(503, "origin_unavailable", "the room's origin node is not answering; retry shortly",
                               headers={"Retry-After": "2"}) from None
            origin = await self.cluster.claim_origin(room.id)
        if origin is None or origin.id != self.node.id:
            raise ApiError(409, "room_moving", "the room is moving between nodes; retry shortly", headers={"Retry-After": "2"})
        await self._become_origin(room)

    async def hand_over(self, room: Room) -> None:
        """Stop being the room's origin: our viewers pull from the next origin, its host and the
        other nodes' pulls reconnect there (they find it in the directory)."""
        if not self.cluster.holds_origin(room.id):
            raise ApiError(409, "not_origin", "this node is not the room's origin")
        media = room.primary.media
        media.become_edge(self._upstream(room))
        await self.cluster.release_origin(room.id)
        leaving: list[Session] = [s for s in room.viewers.values() if s.role is not None]  # other nodes' pulls, a PK host feed
        if room.primary.publisher is not None:
            leaving.append(room.primary.publisher)
        await asyncio.gather(*(s.close() for s in leaving), return_exceptions=True)
        log.info("handed the room over", extra={"room": room.id})

    def _upstream(self, room: Room) -> Upstream:
        """A pull of ``room`` from whichever node is its origin (looked up again at every connect)."""
        return Upstream(room.id, lambda: self._origin_whep(room.id), lambda: self._relay_token(room.id), room.settings.ice_servers,
                        epoch=room.media.epoch)

    async def _become_origin(self, room: Room) -> None:
        media = room.primary.media
        if media.upstream is not None:
            log.info("the origin is gone: taking the room over", extra={"room": room.id})
            await media.become_origin()

    async def _origin_whep(self, room_id: str) -> str | None:
        origin = await self.cluster.origin_of(room_id)
        if origin is None or origin.id == self.node.id:
            return None
        return f"{origin.internal_url}/whep/{room_id}"

    def _relay_token(self, room_id: str) -> str:
        return self.signer.issue(room_id, "relay", time.time() + RELAY_TOKEN_TTL_S)

    async def _watch(self) -> None:
        """Edges whose origin died take over; shares of dead nodes are forgotten."""
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                alive = {n.id for n in await self.cluster.nodes()}
                for room in self.registry:
                    if room.closed:
                        continue
                    gone = [node for node in room.elsewhere if node not in alive]
                    for node in gone:
                        del room.elsewhere[node]
                    if gone:
                        self._events.deliver(room.id, {"type": "room", **room.describe()})
                    if room.primary.media.upstream is not None and await self.cluster.origin_of(room.id) is None:
                        await self.ingest_origin(room)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("placement check failed", exc_info=True)

    async def viewers_elsewhere(self, room: Room, authorization: str) -> list[dict[str, Any]]:
        """The room's viewers on the other nodes that have some (their own ``?here=1`` lists)."""
        assert self._http is not None
        http = self._http

        async def ask(node_id: str) -> list[dict[str, Any]]:
            node = await self.cluster.node_info(node_id)
            if node is None:
                return []
            url = f"{node.internal_url}/api/rooms/{room.id}/viewers?here=1"
            try:
                async with http.get(url, headers={"Authorization": authorization, FORWARDED: self.node.id}, timeout=FORWARD_TIMEOUT) as resp:
                    return list((await resp.json())["viewers"]) if resp.status == 200 else []
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                return []  # a node going away: its viewers are moving anyway

        found = await asyncio.gather(*(ask(node) for node, (_, audience) in room.elsewhere.items() if audience))
        return [viewer for listed in found for viewer in listed]

    # -- forwarding to the origin
    async def at_origin(self, request: web.Request, room: Room) -> web.Response | None:
        """Requests that belong at the room's origin: None when that is us (claimed now if nobody
        held it), else the origin's answer. An origin whose port refuses connections is gone (a
        timeout is not proof: a partition looks the same): its leases are ended at once and we take
        the room, instead of making the caller wait for them to run out."""
        if FORWARDED in request.headers:
            return None
        origin = await self.ingest_origin(room)
        if origin is None or origin.id == self.node.id:
            return None
        try:
            return await self.forward(request, origin)
        except OriginGone:
            await self.cluster.evict(origin.id, room.id)
            log.info("origin %s refused connections: taking the room", origin.id, extra={"room": room.id})
            origin = await self.ingest_origin(room)
            if origin is None or origin.id == self.node.id:
                return None
            return await self.forward(request, origin)

    async def forward(self, request: web.Request, node: NodeInfo) -> web.Response:
        """Pass a request to another node as it is (WHIP to the origin, a session's DELETE...)."""
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Content-Type", "If-Match")}
        headers[FORWARDED] = self.node.id
        body = await request.read()
        try:
            async with self._http.request(
                request.method, node.internal_url + request.path_qs, data=body, headers=headers, timeout=FORWARD_TIMEOUT
            ) as resp:
                payload = await resp.read()
                keep = CIMultiDict((k, v) for k, v in resp.headers.items()
                                   if k in ("Location", "ETag", "Link", "Cache-Control", "Retry-After", "Allow", "WWW-Authenticate"))
                return web.Response(status=resp.status, body=payload, headers=keep, content_type=resp.content_type)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                raise OriginGone(node.id) from None
            raise _unavailable() from None
        except (aiohttp.ClientError, asyncio.TimeoutError):
            raise _unavailable() from None


class OriginGone(Exception):
    """The node's port refused the connection: its process is not there any more."""


def _unavailable() -> ApiError:
    # The origin is not answering: its leases run out within seconds and another node takes over.
    return ApiError(503, "origin_unavailable", "the room's origin node is not answering; retry shortly",
                    headers={"Retry-After": "2"})


async def handover(request: web.Request) -> web.Response:
    """POST /api/cluster/rooms/{room}/handover: another node (relay token) takes this room over."""
    placement = request.app.get(PLACEMENT)
    room = placement.registry.get(request.match_info["room"]) if placement is not None else None
    if placement is None or room is None:
        raise ApiError(404, "room_not_found", "no such room on this node")
    claims = require_claims(request, placement.signer, "a relay token is required")
    if claims.room != room.id or claims.role != "relay":
        raise ApiError(403, "forbidden", "only another node of this cluster may move this room")
    if request.app[PK].current(room.id) is not None:
        raise ApiError(409, "pk_busy", f"room {room.id!r} is already in a PK battle")
    await placement.hand_over(room)
    return web.json_response({"room": room.id, "handed_to": "next origin"})
