"""Several shelfcast processes (workers of one machine, or nodes of several) sharing state in Redis.

What lives in Redis (nothing else is shared; every process keeps working state in memory):

- ``sc:secret``: the token-signing secret, so a token issued by any node works on every node;
- ``sc:node:{id}``: each node's internal URL, public URL and load, on a lease it renews (a node that
  dies disappears from the directory within ``NODE_LEASE_S``);
- ``sc:rooms``: the room directory (mode, title, region, SKUs, access), a hash by room id;
- ``sc:origin:{room}``: which node is the room's origin (its ingest, overlay and encoder ladder),
  on a lease the origin renews while it holds the room. Claimed with ``SET NX``: the first node that
  needs the room's pipeline becomes its origin; another node serves the room's viewers by pulling
  the origin's encoded rungs (:mod:`relay.cascade`);
- pub/sub channel ``sc:events``: room events that pages on every node must see (invitations, PK,
  overlay changes) and each node's share of a room's state (live, audience), merged by every node;
- the stock ledger's command log (see :mod:`overlay.stock.log`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis.asyncio as aioredis

from relay.listeners import emit

log = logging.getLogger("shelfcast.cluster")

NODE_LEASE_S = 4.0
ORIGIN_LEASE_S = 4.0
RENEW_EVERY_S = 1.0
SESSION_TTL_S = 12 * 3600
EVENTS_CHANNEL = "sc:events"
# Room events every node's pages must see; the rest (stock, room state) each node derives itself.
CLUSTER_EVENTS = frozenset({"invitation", "_invitations_wanted", "pk", "overlay"})

# Compare-and-delete / compare-and-renew: only the holder of a lease may end or extend it.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"


@dataclass(frozen=True)
class NodeInfo:
    id: str
    internal_url: str  # how other nodes reach this one (cascade, forwarded requests)
    public_url: str  # what browsers use (pages reconnect through another node's)
    audience: int = 0


def new_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Cluster:
    def __init__(self, redis_url: str, node: NodeInfo) -> None:
        self.node = node
        self._redis = aioredis.from_url(redis_url, decode_responses=True)
        self._pubsub_conn = aioredis.from_url(redis_url, decode_responses=True)
        self._held_origins: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.on_event: Callable[[str, str, dict[str, Any]], None] | None = None  # (node, room, event)
        self.on_room_saved: Callable[[dict[str, Any]], None] | None = None
        self.on_room_ended: Callable[[str], None] | None = None
        self.audience: Callable[[], int] = lambda: 0
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._last_heartbeat = float("-inf")

    # -- lifecycle
    async def start(self) -> bytes:
        """Join the cluster; answers the shared token secret."""
        await self._redis.set("sc:secret", secrets.token_hex(32), nx=True)
        secret = str(await self._redis.get("sc:secret"))  # a str: the client decodes responses
        await self._heartbeat()
        pubsub = self._pubsub_conn.pubsub()
        await pubsub.subscribe(EVENTS_CHANNEL)
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name="cluster-renew"),
            asyncio.create_task(self._listen(pubsub), name="cluster-events"),
            asyncio.create_task(self._send_loop(), name="cluster-send"),
        ]
        log.info("joined the cluster as %s (%s)", self.node.id, self.node.internal_url)
        return bytes.fromhex(secret)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            for room_id in list(self._held_origins):
                await self.release_origin(room_id)
            await self._redis.delete(f"sc:node:{self.node.id}")
        except Exception:  # Redis gone: our leases expire by themselves
            log.warning("could not leave the cluster cleanly", exc_info=True)
        await self._redis.aclose()
        await self._pubsub_conn.aclose()

    async def _heartbeat(self) -> None:
        info = {"internal_url": self.node.internal_url, "public_url": self.node.public_url, "audience": self.audience()}
        await self._redis.set(f"sc:node:{self.node.id}", json.dumps(info), px=int(NODE_LEASE_S * 1000))
        self._last_heartbeat = time.monotonic()

    @property
    def healthy(self) -> bool:
        """Our heartbeat reached Redis lately (else the other nodes already count us as gone)."""
        return time.monotonic() - self._last_heartbeat < NODE_LEASE_S

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await self._heartbeat()
                for room_id in list(self._held_origins):
                    renewed = await self._redis.eval(_RENEW, 1, f"sc:origin:{room_id}", self.node.id, int(ORIGIN_LEASE_S * 1000))
                    if not renewed:  # lost it (Redis restarted, or we were partitioned away too long)
                        self._held_origins.discard(room_id)
                        log.warning("lost the origin lease", extra={"room": room_id})
            except Exception:
                log.warning("cluster heartbeat failed", exc_info=True)

    # -- nodes
    async def nodes(self) -> list[NodeInfo]:
        keys = [k async for k in self._redis.scan_iter(match="sc:node:*", count=100)]
        values = await self._redis.mget(keys) if keys else []
        found = []
        for key, value in zip(keys, values):
            if value is not None:
                data = json.loads(value)
                found.append(NodeInfo(key.removeprefix("sc:node:"), data["internal_url"], data["public_url"], data.get("audience", 0)))
        return sorted(found, key=lambda n: n.id)

    async def node_info(self, node_id: str) -> NodeInfo | None:
        value = await self._redis.get(f"sc:node:{node_id}")
        if value is None:
            return None
        data = json.loads(value)
        return NodeInfo(node_id, data["internal_url"], data["public_url"], data.get("audience", 0))

    # -- origins
    async def origin_of(self, room_id: str) -> NodeInfo | None:
        """The room's origin node if it is alive (its own lease and its node lease both current)."""
        node_id = await self._redis.get(f"sc:origin:{room_id}")
        if node_id is None:
            return None
        if node_id == self.node.id:
            return self.node
        return await self.node_info(str(node_id))

    async def claim_origin(self, room_id: str) -> NodeInfo | None:
        """Become the room's origin unless a live node already is; answers the origin."""
        key = f"sc:origin:{room_id}"
        for _ in range(3):
            if await self._redis.set(key, self.node.id, nx=True, px=int(ORIGIN_LEASE_S * 1000)):
                self._held_origins.add(room_id)
                log.info("origin of the room now", extra={"room": room_id})
                return self.node
            origin = await self.origin_of(room_id)
            if origin is not None:
                if origin.id == self.node.id:
                    self._held_origins.add(room_id)
                return origin
            # The holder's node lease is gone but its origin lease is not yet: take it over.
            holder = await self._redis.get(key)
            if holder is not None:
                await self._redis.eval(_RELEASE, 1, key, holder)
        return None

    async def evict(self, node_id: str, room_id: str) -> None:
        """A node found gone: end its lease on this room and its node lease (compare-and-delete:
        nothing happens if it renewed them meanwhile)."""
        await self._redis.eval(_RELEASE, 1, f"sc:origin:{room_id}", node_id)
        node = await self._redis.get(f"sc:node:{node_id}")
        if node is not None:
            await self._redis.eval(_RELEASE, 1, f"sc:node:{node_id}", node)

    def holds_origin(self, room_id: str) -> bool:
        return room_id in self._held_origins

    async def release_origin(self, room_id: str) -> None:
        self._held_origins.discard(room_id)
        await self._redis.eval(_RELEASE, 1, f"sc:origin:{room_id}", self.node.id)

    # -- sessions (a DELETE may reach another worker than the one holding the session)
    async def register_session(self, room_id: str, session_id: str) -> None:
        await self._redis.set(f"sc:session:{session_id}", f"{self.node.id} {room_id}", ex=SESSION_TTL_S)

    async def forget_session(self, session_id: str) -> None:
        await self._redis.delete(f"sc:session:{session_id}")

    async def session_room(self, session_id: str) -> tuple[str, str] | None:
        """(node id, room id) of a live session anywhere in the cluster."""
        value = await self._redis.get(f"sc:session:{session_id}")
        if value is None:
            return None
        node_id, _, room_id = str(value).partition(" ")
        return node_id, room_id

    async def session_node(self, session_id: str) -> NodeInfo | None:
        found = await self.session_room(session_id)
        return None if found is None or found[0] == self.node.id else await self.node_info(found[0])

    # -- room directory
    async def save_room(self, record: dict[str, Any]) -> None:
        await self._redis.hset("sc:rooms", record["id"], json.dumps(record))
        await self._broadcast("", {"type": "_room_saved", "record": record})

    async def end_room(self, room_id: str) -> None:
        await self._redis.hdel("sc:rooms", room_id)
        await self._broadcast(room_id, {"type": "_room_ended"})

    async def rooms(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in (await self._redis.hgetall("sc:rooms")).values()]

    # -- events
    def publish(self, room_id: str, event: dict[str, Any]) -> None:
        """Send a room event to every other node, in order (one sender: a later share of a room's
        state must never overtake an earlier one)."""
        self._outbox.put_nowait((room_id, event))

    async def _send_loop(self) -> None:
        while True:
            room_id, event = await self._outbox.get()
            try:
                await self._broadcast(room_id, event)
            except Exception:  # Redis hiccup: pages tolerate a lost event; the next share corrects it
                log.warning("cluster publish failed", exc_info=True)

    async def _broadcast(self, room_id: str, event: dict[str, Any]) -> None:
        await self._redis.publish(EVENTS_CHANNEL, json.dumps({"node": self.node.id, "room": room_id, "event": event}))

    async def _listen(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message.get("type") != "message":
                continue
            try:
                envelope = json.loads(message["data"])
                node, room_id, event = envelope["node"], envelope["room"], envelope["event"]
            except (ValueError, KeyError, TypeError):
                continue
            if node == self.node.id or not isinstance(event, dict):
                continue
            if event.get("type") == "_room_saved":
                emit(self.on_room_saved, event.get("record"), what="a cluster event")
            elif event.get("type") == "_room_ended":
                emit(self.on_room_ended, room_id, what="a cluster event")
            else:
                emit(self.on_event, node, room_id, event, what="a cluster event")


