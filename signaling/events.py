"""Per-room event hub: room state, viewer counts, stock changes and alerts pushed to pages.

Subscribers get a bounded queue; a subscriber that cannot keep up loses its oldest events rather
than growing memory (a slow page must never slow the server).

Most events are for every page of the room. An event naming a viewer in ``FOR_VIEWER`` (a private
call invitation) goes only to that viewer's own page and to the room's staff: a page proves it is
that viewer by its session id, the capability nobody else holds (see :func:`public_id`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import defaultdict
from typing import Any, Callable

Event = dict[str, Any]

FOR_VIEWER = "for_viewer"


def public_id(session_id: str) -> str:
    """The name a viewer session goes by where others can see it (the host's viewer list, its
    invitations). The session id itself is the capability over the session: its WHEP Location ends
    it, and it answers an invitation. So it never leaves its owner's page; this one-way name can be
    shown and still be matched against a page's proof of its session, on any node, with no lookup."""
    digest = hashlib.blake2b(session_id.encode(), digest_size=12, person=b"shelfcast-viewer").digest()
    return base64.urlsafe_b64encode(digest).decode()


class Subscription:
    def __init__(self, hub: "EventHub", room_id: str, maxsize: int) -> None:
        self._hub = hub
        self.room_id = room_id
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.closed = False
        self.viewer: str | None = None  # public_id of the session this page proved it owns
        self.asked_at = float("-inf")  # when this page last had the other nodes asked on its behalf
        self.staff = False  # the page proved a host/assistant token (or the admin key) of the room

    def receives(self, event: Event) -> bool:
        to = event.get(FOR_VIEWER)
        return to is None or self.staff or to == self.viewer

    def offer(self, event: Event) -> None:
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
        self._handlers: dict[str, Callable[[str, Event], None]] = {}

    def handle(self, event_type: str, callback: Callable[[str, Event], None]) -> None:
        """Events of this type are requests to this process's code (from another node, see
        ``ask_others``), never shown to pages."""
        self._handlers[event_type] = callback

    def ask_others(self, room_id: str, event: Event) -> None:
        """Send ``event`` to the room's other nodes only (their ``handle`` callback answers it)."""
        if self.forward is not None:
            self.forward(room_id, event)

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
        """Deliver to this process's subscribers only (a viewer's own event: to its page and staff)."""
        handler = self._handlers.get(str(event.get("type")))
        if handler is not None:
            handler(room_id, event)
            return
        for sub in tuple(self._subs.get(room_id, ())):
            if sub.receives(event):
                sub.offer(event)

    def subscriber_count(self, room_id: str) -> int:
        return len(self._subs.get(room_id, ()))
