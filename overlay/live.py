"""Keeps one room's on-air overlay in step with its stock (the I/O glue around ``scene``).

Push-based: every stock change of the room's SKUs rebuilds the scene at once and hands it to the
compositor, which the encoder thread picks up on its next frame. A one-second tick covers what
changes by itself: flash-sale timers and feeds going stale.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol, Sequence

from .compositor import Compositor
from dataclasses import replace

from .scene import OverlayScene, OverlaySettings, PkBar, PkScene, SkuLike, build_scene, next_change_in

# What a PK battle adds to a room's picture right now: the bar and the other side's scene.
PkProvider = Callable[[float], "tuple[PkBar, OverlayScene | None] | None"]

TICK_S = 1.0


class StockSource(Protocol):
    def snapshot_for_room(self, room_id: str, now: float | None = None) -> Sequence[SkuLike] | None: ...

    def add_listener(self, callback: Callable[[set[str]], None]) -> Callable[[], None]: ...


class RoomOverlay:
    def __init__(
        self,
        room_id: str,
        sku_ids: tuple[str, ...],
        stock: StockSource,
        compositor: Compositor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.room_id = room_id
        self.sku_ids = set(sku_ids)
        self.settings = OverlaySettings()
        self._stock = stock
        self._compositor = compositor
        self._clock = clock
        self._unsubscribe = stock.add_listener(self._on_stock_change)
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        self.updates = 0
        self.last_change_at: float | None = None  # monotonic time the picture last changed
        self.own_scene: OverlayScene | None = None  # this room's scene outside any PK layout
        self.pk: PkProvider | None = None
        self._next_tick = TICK_S
        self.refresh()

    def _on_stock_change(self, skus: set[str]) -> None:
        if skus & self.sku_ids:
            self.refresh()

    def update_settings(self, settings: OverlaySettings) -> None:
        self.settings = settings
        self.refresh()

    def refresh(self) -> OverlayScene | PkScene | None:
        now = self._clock()
        views = self._stock.snapshot_for_room(self.room_id, now) or []
        own = build_scene(views, self.settings, now)
        self.own_scene = own
        scene: OverlayScene | PkScene | None = own
        battle = self.pk(now) if self.pk is not None else None
        if battle is not None:
            bar, theirs = battle
            # In the split picture each side keeps only its product card, under its own host.
            left = replace(own, tiles=(), position="bottom-left") if own and own.card else None
            right = replace(theirs, tiles=(), position="bottom-right") if theirs and theirs.card else None
            scene = PkScene(bar, left, right)
        # Wake right when a timer's second turns over, so "00:09" never lingers.
        self._next_tick = min(TICK_S, next_change_in(views, now) or TICK_S) + 0.005
        if self._compositor.set_scene(scene):
            self.updates += 1
            self.last_change_at = time.monotonic()
        return scene

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._next_tick)
            self.refresh()

    async def close(self) -> None:
        self._unsubscribe()
        self._ticker.cancel()
        await asyncio.gather(self._ticker, return_exceptions=True)
