"""I/O glue of the stock side: owns the ledger, the store, the writer thread and the timers.

Decisions happen synchronously in the ledger on the event loop (one owner, so a reservation is
atomic); the resulting change set is then committed by a single writer thread with group commit,
in order, and a caller is answered only after its change is durable. Changes fan out to listeners
(the overlay) and to the rooms' pages once per loop iteration, coalesced.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
import logging
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from signaling.config import StockConfig

from .alerts import AlertKey, AlertRules, SkuSignal, Trigger, evaluate_alerts
from .forecast import (StatusRules, Velocity, remaining_fraction, seconds_to_sellout, stock_status,
                       velocity_add, velocity_per_min, velocity_start)
from .ledger import Changes, EventsResult, Ledger, LedgerError, SnapshotResult
from .model import FlashSale, Order, RoomView, Sku, Status, StockEvent, Warehouse
from .replenish import (PlanLine, PreshowLine, learned_surge, live_surge, plan_line, preshow_line,
                        split_demand)
from .store import StockStore
from .validation import FlashInput, IncomingInput, OrderInput, SkuInput, SnapshotInput, WarehouseInput

log = logging.getLogger("shelfcast.stock")

RoomLookup = Callable[[str], "RoomView | None"]
Publish = Callable[[str, dict[str, Any]], None]
Listener = Callable[[set[str]], None]


@dataclass(frozen=True)
class FlashView:
    id: str
    cap: int
    sold: int
    remaining: int
    per_buyer: int | None
    ends_at: float
    price: str | None


@dataclass(frozen=True)
class SkuView:
    """One SKU of a room as the overlay and the pages show it."""

    sku: str
    name: str
    price: str
    currency: str
    attributes: dict[str, str]
    group: str
    sellable: int | None  # None while syncing: never a possibly wrong number
    status: Status
    velocity_per_min: float
    seconds_to_sellout: float | None
    flash_sale: FlashView | None
    anomaly: bool = False

    def to_json(self) -> dict[str, Any]:
        flash = self.flash_sale
        return {
            "sku": self.sku, "name": self.name, "price": self.price, "currency": self.currency,
            "attributes": self.attributes, "group": self.group, "sellable": self.sellable, "status": self.status,
            "velocity_per_min": round(self.velocity_per_min, 3),
            "seconds_to_sellout": None if self.seconds_to_sellout is None else round(self.seconds_to_sellout, 1),
            "flash_sale": None if flash is None else {
                "id": flash.id, "cap": flash.cap, "sold": flash.sold, "remaining": flash.remaining,
                "per_buyer": flash.per_buyer, "ends_at": flash.ends_at, "price": flash.price},
            "anomaly": self.anomaly,
        }


@dataclass
class _RoomState:
    baseline: dict[str, int] = field(default_factory=dict)  # most sellable seen per SKU
    last_status: dict[str, Status] = field(default_factory=dict)
    alert_memory: dict[AlertKey, Trigger] = field(default_factory=dict)
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))


class StockService:
    def __init__(self, cfg: StockConfig, store: StockStore, room_lookup: RoomLookup, publish: Publish,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.ledger = Ledger(hold_s=cfg.reservation_hold_s, anomaly_min_drop=cfg.anomaly_min_drop)
        self._store = store
        self._lookup = room_lookup
        self._publish = publish
        self.clock = clock
        self._status_rules = StatusRules(cfg.low_fraction, cfg.critical_fraction, cfg.low_sellout_s,
                                         cfg.critical_sellout_s)
        self._alert_rules = AlertRules(cfg.low_fraction, cfg.alert_hysteresis, cfg.alert_cooldown_s)
        self._listeners: list[Listener] = []
        self._rooms: dict[str, _RoomState] = {}
        self._room_velocity: dict[tuple[str, str], Velocity] = {}
        self._region_velocity: dict[tuple[str, str], Velocity] = {}
        self._room_units: dict[tuple[str, str], int] = defaultdict(int)  # reserved + confirmed units
        self._changed: set[str] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._pending: list[tuple[Changes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stock-writer")
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(self._executor, self._store.load)
        self.ledger.load(state.warehouses, state.skus, state.levels, state.event_ids, state.recent_events,
                         state.orders, state.flash)
        for order in state.orders:
            if order.status in ("reserved", "confirmed"):
                self._room_units[(order.room_id, order.sku)] += order.quantity
        self._tasks = [asyncio.create_task(self._writer_loop(), name="stock-writer"),
                       asyncio.create_task(self._tick_loop(), name="stock-tick")]
        await self._expire()  # reservations that lapsed while we were down

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        ticker = self._tasks[1] if len(self._tasks) > 1 else None
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        while self._pending:  # let the writer drain what callers are waiting for
            self._wake.set()
            await asyncio.sleep(0.005)
        for task in self._tasks[:1]:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=True)

    async def _writer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await loop.run_in_executor(self._executor, self._store.write, [c for c, _ in batch])
                except Exception as exc:  # disk full, I/O error: callers get a 503, not a silent loss
                    log.exception("stock store write failed")
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(StoreUnavailable(str(exc)))
                    continue
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def _commit(self) -> None:
        """Persist what the ledger changed, publish it, and return once it is durable."""
        if self._closed:
            raise StoreUnavailable("stock service is shutting down")
        changes = self.ledger.take_changes()
        if changes.skus_touched:
            self._notify(changes.skus_touched)
        if changes.empty():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((changes, fut))
        self._wake.set()
        await fut

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick_s)
            try:
                await self._expire()
                self._refresh_rooms(set(), force_alerts=True)
            except Exception:  # a bad tick must not stop expiry for good
                log.exception("stock tick failed")

    async def _expire(self) -> None:
        for order in self.ledger.expire(self.clock()):
            self._room_units[(order.room_id, order.sku)] -= order.quantity
        await self._commit()

    # ------------------------------------------------------------------ change fan-out
    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """``callback(sku_ids)`` runs on the loop after any stock change; returns an unsubscribe."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def watch_room(self, room_id: str) -> None:
        """Push this room's stock changes and alerts to its pages (done on first use otherwise)."""
        if room_id not in self._rooms:
            self._rooms[room_id] = _RoomState()
            room = self._lookup(room_id)
            if room is not None:
                self._room_views(room, self.clock())  # fixes the baseline before sales start

    def unwatch_room(self, room_id: str) -> None:
        self._rooms.pop(room_id, None)

    def _notify(self, skus: set[str]) -> None:
        self._changed |= skus
        if self._flush_handle is None and not self._closed:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        skus, self._changed = self._changed, set()
        self._refresh_rooms(skus, force_alerts=False)
        for listener in tuple(self._listeners):
            try:
                listener(set(skus))
            except Exception:
                log.exception("stock listener failed")

    def _refresh_rooms(self, skus: set[str], *, force_alerts: bool) -> None:
        """Publish changed SKUs (or changed statuses) to every watched room; evaluate its alerts."""
        now = self.clock()
        status_changed: set[str] = set()
        for room_id, state in list(self._rooms.items()):
            room = self._lookup(room_id)
            if room is None:
                del self._rooms[room_id]
                continue
            if not force_alerts and skus.isdisjoint(room.sku_ids):
                continue  # nothing of this room changed; the timer still catches staleness flips
            views = self._room_views(room, now)
            send = [v for v in views if v.sku in skus or state.last_status.get(v.sku) != v.status]
            for v in views:
                if state.last_status.get(v.sku) != v.status:
                    status_changed.add(v.sku)
                state.last_status[v.sku] = v.status
            if send:
                self._publish(room_id, {"type": "stock", "room": room_id, "at": now,
                                        "skus": [v.to_json() for v in send]})
            if send or force_alerts:
                self._run_alerts(room, state, views, now)
        extra = status_changed - skus
        if extra and force_alerts:  # staleness flips seen only by the timer reach the overlay too
            for listener in tuple(self._listeners):
                try:
                    listener(set(extra))
                except Exception:
                    log.exception("stock listener failed")

    def _run_alerts(self, room: RoomView, state: _RoomState, views: list[SkuView], now: float) -> None:
        signals = []
        for v in views:
            stale = tuple(self.ledger.stale_warehouses(room.region, now, self.cfg.stale_after_s))
            signals.append(SkuSignal(
                v.sku, v.name, v.group, v.status, v.sellable,
                None if v.sellable is None else remaining_fraction(v.sellable, state.baseline.get(v.sku, 0)),
                v.seconds_to_sellout, stale, tuple(self.ledger.anomalies(room.region, v.sku))))
        state.alert_memory, alerts = evaluate_alerts(state.alert_memory, signals, room.ends_at, now,
                                                     self._alert_rules)
        for alert in alerts:
            body = {"type": "alert", "room": room.id, **alert.to_json()}
            state.alerts.append(body)
            self._publish(room.id, body)

    # ------------------------------------------------------------------ views
    def _sold_units(self, room_id: str, sku: str) -> int:
        return self._room_units.get((room_id, sku), 0)

    def room_sales(self, room_id: str) -> tuple[int, Decimal]:
        """Units and revenue a room has sold (reserved or confirmed, not expired), all its SKUs."""
        units, revenue = 0, Decimal(0)
        for (room, sku_id), count in self._room_units.items():
            if room == room_id and count:
                units += count
                sku = self.ledger.skus.get(sku_id)
                if sku is not None:
                    revenue += Decimal(sku.price) * count
        return units, revenue

    def _room_views(self, room: RoomView, now: float) -> list[SkuView]:
        state = self._rooms.get(room.id)
        views = []
        for sku_id in room.sku_ids:
            sku = self.ledger.skus.get(sku_id)
            if sku is None:
                continue
            views.append(self._sku_view(room, sku, now, state))
        return views

    def _sku_view(self, room: RoomView, sku: Sku, now: float, state: _RoomState | None) -> SkuView:
        ledger = self.ledger
        tau = self.cfg.velocity_tau_s
        serving = ledger.serving(room.region)
        anomaly = bool(ledger.anomalies(room.region, sku.id))
        syncing = (not serving or anomaly or
                   any(ledger.is_stale(w, now, self.cfg.stale_after_s) for w in serving))
        sellable = ledger.sellable(room.region, sku.id)
        room_v = self._room_velocity.get((room.id, sku.id))
        per_min = velocity_per_min(room_v, now, tau) if room_v else 0.0
        region_v = self._region_velocity.get((room.region, sku.id))
        region_per_min = velocity_per_min(region_v, now, tau) if region_v else 0.0
        tts = seconds_to_sellout(sellable, region_per_min)  # all rooms of the region drain the same stock
        baseline = max(sellable + self._sold_units(room.id, sku.id), 1)
        if state is not None and not syncing:
            baseline = max(baseline, state.baseline.get(sku.id, 0))
            state.baseline[sku.id] = baseline
        status = stock_status(sellable, baseline, tts, syncing, self._status_rules)
        sale = ledger.flash.get((room.id, sku.id))
        flash = None
        if sale is not None and sale.active(now):
            sold = ledger.flash_sold(sale)
            flash = FlashView(sale.id, sale.cap, sold, max(0, sale.cap - sold), sale.per_buyer, sale.ends_at,
                              sale.price)
        return SkuView(sku.id, sku.name, sku.price, sku.currency, dict(sku.attributes), sku.group,
                       None if syncing else sellable, status, per_min, None if syncing else tts, flash, anomaly)

    def snapshot_for_room(self, room_id: str, now: float | None = None) -> list[SkuView] | None:
        """Per-SKU view of a room's stock (None for an unknown room)."""
        room = self._lookup(room_id)
        if room is None:
            return None
        return self._room_views(room, self.clock() if now is None else now)

    def room_alerts(self, room_id: str) -> list[dict[str, Any]]:
        state = self._rooms.get(room_id)
        return list(state.alerts) if state else []

    def sku_stock(self, sku_id: str, now: float | None = None) -> dict[str, Any] | None:
        ledger = self.ledger
        sku = ledger.skus.get(sku_id)
        if sku is None:
            return None
        now = self.clock() if now is None else now
        stale_s = self.cfg.stale_after_s
        warehouses = []
        for wh_id in sorted(ledger.warehouses):
            level = ledger.levels.get((wh_id, sku_id))
            if level is None:
                continue
            feed = ledger.feeds[wh_id]
            warehouses.append({
                "warehouse": wh_id, "on_hand": level.on_hand, "reserved": level.reserved,
                "sellable": level.available,
                "incoming": {"quantity": level.incoming_qty, "eta": level.incoming_eta},
                "stale": ledger.is_stale(wh_id, now, stale_s), "anomaly": level.anomaly,
                "last_update": feed.last_update, "missing_seqs": sorted(feed.missing)[:100]})
        regions = []
        for region in ledger.regions():
            serving = [w for w in ledger.serving(region) if (w, sku_id) in ledger.levels]
            syncing = (not serving or bool(ledger.anomalies(region, sku_id)) or
                       any(ledger.is_stale(w, now, stale_s) for w in ledger.serving(region)))
            on_hand = sum(ledger.levels[(w, sku_id)].on_hand for w in serving)
            reserved = sum(ledger.levels[(w, sku_id)].reserved for w in serving)
            regions.append({"region": region, "warehouses": list(ledger.serving(region)),
                            "on_hand": None if syncing else on_hand,
                            "reserved": None if syncing else reserved,
                            "sellable": None if syncing else ledger.sellable(region, sku_id),
                            "status": "syncing" if syncing else ("sold_out" if not ledger.sellable(region, sku_id)
                                                                 else "available")})
        return {"sku": sku_id, "name": sku.name, "warehouses": warehouses, "regions": regions}

    # ------------------------------------------------------------------ catalog and feeds
    async def put_warehouse(self, wh_id: str, inp: WarehouseInput) -> Warehouse:
        wh = self.ledger.put_warehouse(wh_id, inp)
        await self._commit()
        return wh

    async def put_sku(self, sku_id: str, inp: SkuInput) -> Sku:
        sku = self.ledger.put_sku(sku_id, inp)
        await self._commit()
        return sku

    async def apply_events(self, events: list[StockEvent]) -> EventsResult:
        result = self.ledger.apply_events(events, self.clock())
        await self._commit()
        return result

    async def apply_snapshot(self, wh_id: str, snap: SnapshotInput) -> SnapshotResult:
        result = self.ledger.apply_snapshot(wh_id, snap, self.clock())
        await self._commit()
        if result.drift:
            log.info("snapshot of %s corrected %d levels", wh_id, len(result.drift))
        return result

    async def heartbeat(self, wh_id: str) -> None:
        self.ledger.heartbeat(wh_id, self.clock())
        await self._commit()

    async def set_incoming(self, wh_id: str, sku: str, inp: IncomingInput) -> None:
        self.ledger.set_incoming(wh_id, sku, inp.quantity, inp.eta)
        await self._commit()

    async def ack_anomaly(self, wh_id: str, sku: str) -> None:
        self.ledger.ack_anomaly(wh_id, sku)
        await self._commit()

    # ------------------------------------------------------------------ orders and flash sales
    async def reserve(self, room: RoomView, inp: OrderInput) -> Order:
        self.watch_room(room.id)
        now = self.clock()
        known = (room.id, inp.idempotency_key) in self.ledger.by_key
        if not known and self._region_syncing(room.region, inp.sku, now):
            # The numbers may be wrong right now: selling against them could oversell.
            raise LedgerError(409, "stock_syncing", "stock for this product is being re-synced with the "
                              "warehouse; try again in a moment")
        order = self.ledger.reserve(room, inp, now)
        if order.status == "reserved" and not known:
            tau = self.cfg.velocity_tau_s
            self._room_units[(room.id, order.sku)] += order.quantity
            for table, key in ((self._room_velocity, (room.id, order.sku)),
                               (self._region_velocity, (room.region, order.sku))):
                table[key] = velocity_add(table.get(key) or velocity_start(now), order.quantity, now, tau)
        await self._commit()
        return order

    def _region_syncing(self, region: str, sku: str, now: float) -> bool:
        serving = self.ledger.serving(region)
        return bool(self.ledger.anomalies(region, sku)) or any(
            self.ledger.is_stale(w, now, self.cfg.stale_after_s) for w in serving if (w, sku) in self.ledger.levels)

    async def confirm(self, room_id: str, order_id: str) -> Order:
        order = self.ledger.orders.get(order_id)
        was_reserved = order is not None and order.status == "reserved"
        try:
            return self.ledger.confirm(room_id, order_id, self.clock())
        finally:
            if order is not None and was_reserved and order.status in ("failed", "expired"):
                self._room_units[(order.room_id, order.sku)] -= order.quantity
            await self._commit()

    async def start_flash(self, room: RoomView, inp: FlashInput) -> FlashSale:
        self.watch_room(room.id)
        sale = self.ledger.start_flash(room, inp, self.clock())
        await self._commit()
        return sale

    async def stop_flash(self, room_id: str, sku: str) -> FlashSale:
        sale = self.ledger.stop_flash(room_id, sku, self.clock())
        await self._commit()
        return sale

    # ------------------------------------------------------------------ planning
    def _past_show_units(self, sku: str, exclude_room: str | None) -> list[float]:
        per_room: dict[str, int] = defaultdict(int)
        for order in self.ledger.orders.values():
            if order.sku == sku and order.room_id != exclude_room and order.status in ("reserved", "confirmed"):
                per_room[order.room_id] += order.quantity
        return [float(u) for u in per_room.values()]

    def preshow(self, room: RoomView, expected: dict[str, float], now: float | None = None) -> list[PreshowLine]:
        """Does the room's sellable stock (plus what arrives before the show ends) cover demand?"""
        now = self.clock() if now is None else now
        lines = []
        for view in self._room_views(room, now):
            incoming = 0
            for w in self.ledger.serving(room.region):
                level = self.ledger.levels.get((w, view.sku))
                if level and level.incoming_qty and level.incoming_eta is not None and \
                        room.ends_at is not None and level.incoming_eta <= room.ends_at:
                    incoming += level.incoming_qty
            demand = expected.get(view.sku)
            if demand is None:
                past = self._past_show_units(view.sku, room.id)
                demand = sorted(past)[len(past) // 2] if past else None
            lines.append(preshow_line(view.sku, view.sellable, incoming, demand))
        return lines

    def replenishment(self, room: RoomView | None, now: float | None = None) -> list[PlanLine]:
        """Per SKU and warehouse; with a room, plans the rest of its show too."""
        now = self.clock() if now is None else now
        ledger, cfg = self.ledger, self.cfg
        if room is not None:
            sku_ids = [s for s in room.sku_ids if s in ledger.skus]
            wh_ids = list(ledger.serving(room.region))
        else:
            sku_ids, wh_ids = sorted(ledger.skus), sorted(ledger.warehouses)
        lines: list[PlanLine] = []
        for sku_id in sku_ids:
            sku = ledger.skus[sku_id]
            mean, sigma = sku.daily_mean or 0.0, sku.daily_sigma or 0.0
            surge = learned_surge(self._past_show_units(sku_id, room.id if room else None), sku.daily_mean,
                                  cfg.default_show_surge)
            show_demand = 0.0
            if room is not None and room.ends_at is not None and room.ends_at > now:
                minutes_left = (room.ends_at - now) / 60.0
                v = self._room_velocity.get((room.id, sku_id))
                per_min = velocity_per_min(v, now, cfg.velocity_tau_s) if v else 0.0
                show_demand = per_min * minutes_left
                surge = live_surge(sku.daily_mean, self._sold_units(room.id, sku_id), per_min, minutes_left, surge)
            holders = {w: ledger.levels[(w, sku_id)].available for w in wh_ids if (w, sku_id) in ledger.levels}
            shares = split_demand(show_demand, holders)
            for wh_id in holders:
                level = ledger.levels[(wh_id, sku_id)]
                lead = ledger.warehouses[wh_id].lead_time_days or cfg.default_lead_time_days
                lines.append(plan_line(
                    sku_id, wh_id, on_hand=level.on_hand, reserved=level.reserved, incoming_qty=level.incoming_qty,
                    incoming_eta=level.incoming_eta, daily_mean=mean, daily_sigma=sigma, lead_time_days=lead,
                    z=cfg.service_level_z, surge=surge, show_demand=shares[wh_id],
                    show_ends_at=room.ends_at if room else None))
        return lines


class StoreUnavailable(Exception):
    """The store could not record a change; the caller must not assume it happened."""
