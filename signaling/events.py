"""Per-room event hub: room state, viewer counts, stock changes and alerts pushed to pages.

Subscribers get a bounded queue; a subscriber that cannot keep up loses its oldest events rather
than growing memory (a slow page must never slow the server).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Callable

Event = dict[str, Any]


class Subscription:
    def __init__(self, hub: "EventHub", room_id: str, maxsize: int) -> None:
        self._hub = hub
        self.room_id = room_id
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.closed = False

    def _offer(self, event: Event) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(event)

    async def get(self) -> Event:
        return await self._queue.get()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub._unsubscribe(self)


class EventHub:
    def __init__(self, queue_size: int = 256) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._queue_size = queue_size
        # Several processes: also hands each event to the cluster (signaling.placement decides
        # which ones other nodes need); what other nodes send comes back through deliver().
        self.forward: Callable[[str, Event], None] | None = None

    def subscribe(self, room_id: str) -> Subscription:
        sub = Subscription(self, room_id, self._queue_size)
        self._subs[room_id].add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.room_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.room_id]

    def publish(self, room_id: str, event: Event) -> None:
        """Deliver to every subscriber of the room (and the cluster). Event loop only."""
        self.deliver(room_id, event)
        if self.forward is not None:
            self.forward(room_id, event)

    def deliver(self, room_id: str, event: Event) -> None:
        """Deliver to this process's subscribers only."""
        for sub in tuple(self._subs.get(room_id, ())):
            sub._offer(event)

    def subscriber_count(self, room_id: str) -> int:
        return len(self._subs.get(room_id, ()))
