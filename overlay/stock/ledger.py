"""The stock ledger: the single in-memory owner of levels, feeds, reservations and orders.

Every decision (apply a feed batch, adopt a snapshot, reserve, confirm, expire) is made here,
synchronously, by one owner, so a reservation can never see a half-applied state: the service calls
it from the event loop and persists what changed afterwards (``take_changes``). No I/O, no clock:
callers pass ``now``.

Accounting rules (why the numbers are what they are):
- sellable(region, sku) = sum over warehouses serving the region of max(0, on_hand - reserved);
  clamped per warehouse so one over-reserved warehouse cannot hide another's stock.
- A reservation holds units (reserved += q); confirming ships them from our side
  (on_hand -= q, reserved -= q). Feeds report every other movement (receipts, adjustments, other
  channels). A snapshot's numbers are as of ``as_of``: our orders confirmed after that instant are
  deducted again, and feed events with a seq after the snapshot's ``seq`` are re-applied.
- Feed events are deduplicated by id forever. Per warehouse, a seq beyond last_seq + 1 leaves a gap;
  until it is filled (late event) or a snapshot covers it, the warehouse's numbers are unsure
  ("syncing"). An event whose seq is already covered (applied, or older than a snapshot) is skipped.
- Deterministic: the same calls with the same arguments, in the same order, give the same state and the
  same answers (ids come from ``new_id`` unless the caller passes them, times only from ``now``). The
  replicated mode relies on it: every node applies the same command log and so agrees on every order.
- Since our own orders are deducted here before any feed sees them, a feed update that takes a pair
  to zero from ``anomaly_min_drop`` units or more is not explained by orders: it is flagged as an
  anomaly (shown as syncing, alerted) until the next update of that pair confirms the level.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from relay.errors import ShelfcastError

from .model import FeedState, FlashSale, Level, Order, RoomView, Sku, StockEvent, Warehouse
from .validation import FlashInput, OrderInput, SkuInput, SnapshotInput, WarehouseInput

Pair = tuple[str, str]  # (warehouse, sku)


class LedgerError(ShelfcastError):
    """A request the ledger refuses (it would oversell, the SKU is unknown, the numbers are stale)."""


@dataclass
class EventsResult:
    applied: int = 0
    duplicates: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # seq already covered
    late: list[str] = field(default_factory=list)  # filled a gap (out-of-order delivery)
    clamped: list[str] = field(default_factory=list)  # would have gone below zero
    anomalies: list[Pair] = field(default_factory=list)
    gaps: dict[str, list[int]] = field(default_factory=dict)  # warehouse -> still-missing seqs

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "out_of_order": self.late,
            "clamped": self.clamped,
            "anomalies": [{"warehouse": w, "sku": s} for w, s in self.anomalies],
            "gaps": self.gaps,
        }


@dataclass
class SnapshotResult:
    drift: list[dict[str, Any]]  # {"sku", "before", "after", "drift"} for every corrected level
    anomalies: list[Pair]


@dataclass
class Changes:
    """Copies of everything that changed since the last take, for the store and the listeners."""

    warehouses: list[tuple[Warehouse, FeedState]] = field(default_factory=list)
    skus: list[Sku] = field(default_factory=list)
    levels: list[tuple[str, str, Level]] = field(default_factory=list)
    events: list[tuple[StockEvent, float, bool]] = field(default_factory=list)  # event, received, applied
    orders: list[Order] = field(default_factory=list)
    flash: list[FlashSale] = field(default_factory=list)
    skus_touched: set[str] = field(default_factory=set)

    def empty(self) -> bool:
        return not (self.warehouses or self.skus or self.levels or self.events or self.orders or self.flash)


def _new_id() -> str:
    return secrets.token_hex(8)


class Ledger:
    def __init__(self, *, hold_s: float, anomaly_min_drop: int = 3,
                 id_factory: Callable[[], str] = _new_id) -> None:
        self.hold_s = hold_s
        self.anomaly_min_drop = anomaly_min_drop
        self._new_id = id_factory
        self.warehouses: dict[str, Warehouse] = {}
        self.skus: dict[str, Sku] = {}
        self.levels: dict[Pair, Level] = {}
        self.feeds: dict[str, FeedState] = {}
        self.event_ids: set[str] = set()
        self.recent: dict[str, list[tuple[int, str, int]]] = defaultdict(list)  # wh -> (seq, sku, delta)
        self.orders: dict[str, Order] = {}
        self.by_key: dict[tuple[str, str], str] = {}
        self.active: dict[str, Order] = {}  # reserved, not yet confirmed or expired
        self.flash: dict[tuple[str, str], FlashSale] = {}
        self._flash_used: dict[str, int] = defaultdict(int)
        self._flash_buyer: dict[tuple[str, str], int] = defaultdict(int)
        self._by_region: dict[str, tuple[str, ...]] = {}
        self._dirty_wh: set[str] = set()
        self._dirty_sku: set[str] = set()
        self._dirty_levels: set[Pair] = set()
        self._dirty_orders: dict[str, None] = {}
        self._dirty_flash: set[tuple[str, str]] = set()
        self._new_events: list[tuple[StockEvent, float, bool]] = []
        self._touched: set[str] = set()

    def new_id(self) -> str:
        """A fresh order / flash sale id (pass it back to ``reserve`` / ``start_flash`` to fix it in advance)."""
        return self._new_id()

    # ------------------------------------------------------------------ loading
    def load(self, warehouses: Iterable[tuple[Warehouse, FeedState]], skus: Iterable[Sku],
             levels: Iterable[tuple[str, str, Level]], event_ids: Iterable[str],
             recent_events: Iterable[StockEvent], orders: Iterable[Order],
             flash: Iterable[FlashSale]) -> None:
        """Rebuild from persisted rows. Reserved counts are derived from live reservations."""
        for wh, feed in warehouses:
            self.warehouses[wh.id] = wh
            self.feeds[wh.id] = feed
        self._reindex_regions()
        self.skus.update((s.id, s) for s in skus)
        for wh_id, sku, level in levels:
            self.levels[(wh_id, sku)] = replace(level, reserved=0)
        self.event_ids.update(event_ids)
        for ev in sorted(recent_events, key=lambda e: e.seq):
            self.recent[ev.warehouse].append((ev.seq, ev.sku, ev.delta))
        for order in orders:
            self.orders[order.id] = order
            self.by_key[(order.room_id, order.idempotency_key)] = order.id
            if order.status == "reserved":
                self.active[order.id] = order
                for wh_id, qty in order.allocations:
                    self._level(wh_id, order.sku).reserved += qty
            self._count_flash(order, +1)
        for sale in flash:
            self.flash[(sale.room_id, sale.sku)] = sale
        self.take_changes()

    def _reindex_regions(self) -> None:
        by_region: dict[str, list[str]] = defaultdict(list)
        for wh in sorted(self.warehouses.values(), key=lambda w: w.id):
            for region in wh.regions:
                by_region[region].append(wh.id)
        self._by_region = {r: tuple(ids) for r, ids in by_region.items()}

    # ------------------------------------------------------------------ catalog
    def put_warehouse(self, wh_id: str, inp: WarehouseInput) -> Warehouse:
        wh = Warehouse(wh_id, inp.name, inp.regions, inp.lead_time_days)
        self.warehouses[wh_id] = wh
        self.feeds.setdefault(wh_id, FeedState())
        self._reindex_regions()
        self._dirty_wh.add(wh_id)
        self._touched.update(s for w, s in self.levels if w == wh_id)
        return wh

    def put_sku(self, sku_id: str, inp: SkuInput) -> Sku:
        sku = Sku(sku_id, inp.name, inp.price, inp.currency, inp.group or sku_id, dict(inp.attributes),
                  inp.daily_mean, inp.daily_sigma)
        self.skus[sku_id] = sku
        self._dirty_sku.add(sku_id)
        self._touched.add(sku_id)
        return sku

    def set_incoming(self, wh_id: str, sku: str, quantity: int, eta: float | None) -> Level:
        self._require(wh_id, sku)
        level = self._level(wh_id, sku)
        level.incoming_qty, level.incoming_eta = quantity, eta
        self._mark(wh_id, sku)
        return level

    def _require(self, wh_id: str, sku: str | None = None) -> None:
        if wh_id not in self.warehouses:
            raise LedgerError(404, "unknown_warehouse", f"warehouse {wh_id!r} is not registered")
        if sku is not None and sku not in self.skus:
            raise LedgerError(404, "unknown_sku", f"sku {sku!r} is not registered")

    def _level(self, wh_id: str, sku: str) -> Level:
        level = self.levels.get((wh_id, sku))
        if level is None:
            level = self.levels[(wh_id, sku)] = Level()
        return level

    def _mark(self, wh_id: str, sku: str) -> None:
        self._dirty_levels.add((wh_id, sku))
        self._touched.add(sku)

    # ------------------------------------------------------------------ queries
    def serving(self, region: str) -> tuple[str, ...]:
        return self._by_region.get(region, ())

    def regions(self) -> list[str]:
        return sorted(self._by_region)

    def sellable(self, region: str, sku: str) -> int:
        return sum(self.levels[(w, sku)].available for w in self.serving(region) if (w, sku) in self.levels)

    def is_stale(self, wh_id: str, now: float, stale_after_s: float) -> bool:
        """Numbers of this warehouse may be wrong: not heard from lately, or a seq gap is open."""
        feed = self.feeds.get(wh_id)
        if feed is None or feed.last_update is None or feed.missing:
            return True
        return now - feed.last_update > stale_after_s

    def stale_warehouses(self, region: str, now: float, stale_after_s: float) -> list[str]:
        return [w for w in self.serving(region) if self.is_stale(w, now, stale_after_s)]

    def anomalies(self, region: str, sku: str) -> list[str]:
        return [w for w in self.serving(region) if (lvl := self.levels.get((w, sku))) and lvl.anomaly]

    # ------------------------------------------------------------------ feeds
    def apply_events(self, events: list[StockEvent], now: float, *,
                     anomaly_min_drop: int | None = None) -> EventsResult:
        problems: list[dict[str, Any]] = []
        for i, ev in enumerate(events):
            if ev.warehouse not in self.warehouses:
                problems.append({"index": i, "field": "warehouse", "message": f"unknown warehouse {ev.warehouse!r}"})
            if ev.sku not in self.skus:
                problems.append({"index": i, "field": "sku", "message": f"unknown sku {ev.sku!r}"})
        if problems:
            raise LedgerError(422, "invalid_payload", "invalid batch; nothing was applied", problems)
        result = EventsResult()
        # Deltas commute, so applying a warehouse's events in seq order only affects gap bookkeeping.
        for ev in sorted(events, key=lambda e: (e.warehouse, e.seq)):
            if ev.id in self.event_ids:
                result.duplicates.append(ev.id)
                continue
            feed = self.feeds[ev.warehouse]
            if ev.seq > feed.last_seq:
                feed.missing.update(range(feed.last_seq + 1, ev.seq))
                feed.last_seq = ev.seq
            elif ev.seq in feed.missing:
                feed.missing.discard(ev.seq)
                result.late.append(ev.id)
            else:
                self.event_ids.add(ev.id)  # remembered, so a resend stays a duplicate
                self._new_events.append((ev, now, False))
                result.skipped.append(ev.id)
                continue
            self.event_ids.add(ev.id)
            self._new_events.append((ev, now, True))
            self.recent[ev.warehouse].append((ev.seq, ev.sku, ev.delta))
            level = self._level(ev.warehouse, ev.sku)
            target = level.on_hand + ev.delta
            if target < 0:
                result.clamped.append(ev.id)
                target = 0
            if self._set_on_hand(ev.warehouse, ev.sku, target, anomaly_min_drop):
                result.anomalies.append((ev.warehouse, ev.sku))
            result.applied += 1
        for wh_id in {ev.warehouse for ev in events}:
            self.feeds[wh_id].last_update = now
            self._dirty_wh.add(wh_id)
            if self.feeds[wh_id].missing:
                result.gaps[wh_id] = sorted(self.feeds[wh_id].missing)
        return result

    def _set_on_hand(self, wh_id: str, sku: str, on_hand: int, min_drop: int | None = None) -> bool:
        """Feed-driven level change; returns True if it is an unexplained drop to zero."""
        level = self._level(wh_id, sku)
        anomalous = on_hand == 0 and level.on_hand >= (self.anomaly_min_drop if min_drop is None else min_drop)
        level.on_hand = on_hand
        level.anomaly = anomalous  # any later update of the pair confirms (clears) the level
        self._mark(wh_id, sku)
        return anomalous

    def apply_snapshot(self, wh_id: str, snap: SnapshotInput, now: float, *,
                       anomaly_min_drop: int | None = None) -> SnapshotResult:
        self._require(wh_id)
        unknown = [{"field": "levels", "sku": s, "message": f"unknown sku {s!r}"}
                   for s in snap.levels if s not in self.skus]
        if unknown:
            raise LedgerError(422, "invalid_payload", "invalid snapshot; nothing was applied", unknown)
        feed = self.feeds[wh_id]
        if feed.snapshot_as_of is not None and snap.as_of < feed.snapshot_as_of:
            raise LedgerError(409, "stale_snapshot", "snapshot is older than the last one adopted",
                              {"last_as_of": feed.snapshot_as_of})
        if snap.seq is not None and snap.seq < feed.snapshot_seq:
            raise LedgerError(409, "stale_snapshot", "snapshot seq is older than the last one adopted",
                              {"last_seq": feed.snapshot_seq})
        covered = snap.seq if snap.seq is not None else feed.last_seq
        replay: dict[str, int] = defaultdict(int)
        keep: list[tuple[int, str, int]] = []
        for seq, sku, delta in self.recent.get(wh_id, []):
            if seq > covered:
                replay[sku] += delta
                keep.append((seq, sku, delta))
        self.recent[wh_id] = keep
        shipped: dict[str, int] = defaultdict(int)
        for order in self.orders.values():
            if order.status == "confirmed" and order.confirmed_at is not None and order.confirmed_at > snap.as_of:
                for w, qty in order.allocations:
                    if w == wh_id:
                        shipped[order.sku] += qty
        drift: list[dict[str, Any]] = []
        anomalies: list[Pair] = []
        skus = set(snap.levels) | {s for (w, s) in self.levels if w == wh_id}  # full snapshot: absent = 0
        for sku in sorted(skus):
            before = self.levels[(wh_id, sku)].on_hand if (wh_id, sku) in self.levels else 0
            after = max(0, snap.levels.get(sku, 0) + replay[sku] - shipped[sku])
            if after != before:
                drift.append({"sku": sku, "before": before, "after": after, "drift": after - before})
            if self._set_on_hand(wh_id, sku, after, anomaly_min_drop):
                anomalies.append((wh_id, sku))
        feed.last_seq = max(feed.last_seq, covered)
        feed.missing = {m for m in feed.missing if m > covered}
        feed.snapshot_as_of = snap.as_of
        feed.last_update = now
        feed.snapshot_seq = max(feed.snapshot_seq, covered)
        self._dirty_wh.add(wh_id)
        return SnapshotResult(drift, anomalies)

    def heartbeat(self, wh_id: str, now: float) -> None:
        """The feed is alive and has nothing to report."""
        self._require(wh_id)
        self.feeds[wh_id].last_update = now
        self._dirty_wh.add(wh_id)
        self._touched.update(s for w, s in self.levels if w == wh_id)

    def ack_anomaly(self, wh_id: str, sku: str) -> None:
        self._require(wh_id, sku)
        level = self.levels.get((wh_id, sku))
        if level is not None and level.anomaly:
            level.anomaly = False
            self._mark(wh_id, sku)

    # ------------------------------------------------------------------ orders
    def reserve(self, room: RoomView, inp: OrderInput, now: float, *, order_id: str | None = None,
                hold_s: float | None = None) -> Order:
        """Reserve against the room's region, or record a rejection; both are idempotent by key.

        ``order_id`` (used only for a new key) and ``hold_s`` let a replicated caller fix them in the command.
        """
        region = inp.region or room.region
        existing_id = self.by_key.get((room.id, inp.idempotency_key))
        if existing_id is not None:
            existing = self.orders[existing_id]
            if not existing.same_request(inp.sku, inp.quantity, region, inp.buyer):
                raise LedgerError(422, "idempotency_key_reused",
                                  "this idempotency key was used for a different order")
            return existing
        if inp.sku not in room.sku_ids or inp.sku not in self.skus:
            raise LedgerError(404, "unknown_sku", f"sku {inp.sku!r} is not sold in this room")
        if region != room.region:
            raise LedgerError(422, "wrong_region", f"this room sells into {room.region}, not {region}")
        order = Order(order_id or self._new_id(), room.id, inp.idempotency_key, inp.sku, inp.quantity, region, inp.buyer,
                      "rejected", now)
        sale = self.flash.get((room.id, inp.sku))
        if sale is not None and sale.active(now):
            if sale.per_buyer is not None and inp.buyer is None:
                raise LedgerError(422, "buyer_required", "this flash sale limits units per buyer; send buyer")
            order.flash_id = sale.id
            left = sale.cap - self._flash_used[sale.id]
            if inp.quantity > left:
                order.reason = "flash_sale_cap"
            elif sale.per_buyer is not None and inp.buyer is not None and \
                    self._flash_buyer[(sale.id, inp.buyer)] + inp.quantity > sale.per_buyer:
                order.reason = "per_buyer_limit"
        if order.reason is None:
            serving = [w for w in self.serving(region) if (w, inp.sku) in self.levels]
            serving.sort(key=lambda w: (-self.levels[(w, inp.sku)].available, w))
            if sum(self.levels[(w, inp.sku)].available for w in serving) < inp.quantity:
                order.reason = "insufficient_stock"
            else:
                need, allocations = inp.quantity, []
                for w in serving:
                    take = min(need, self.levels[(w, inp.sku)].available)
                    if take:
                        self.levels[(w, inp.sku)].reserved += take
                        self._mark(w, inp.sku)
                        allocations.append((w, take))
                        need -= take
                    if not need:
                        break
                order.allocations = tuple(allocations)
                order.status = "reserved"
                order.expires_at = now + (self.hold_s if hold_s is None else hold_s)
                self.active[order.id] = order
                self._count_flash(order, +1)
        self._store_order(order)
        return order

    def _store_order(self, order: Order) -> None:
        self.orders[order.id] = order
        self.by_key[(order.room_id, order.idempotency_key)] = order.id
        self._dirty_orders[order.id] = None
        self._touched.add(order.sku)

    def _count_flash(self, order: Order, sign: int) -> None:
        if order.flash_id is None or order.status not in ("reserved", "confirmed"):
            return
        self._flash_used[order.flash_id] += sign * order.quantity
        if order.buyer is not None:
            self._flash_buyer[(order.flash_id, order.buyer)] += sign * order.quantity

    def _release(self, order: Order) -> None:
        for w, qty in order.allocations:
            self.levels[(w, order.sku)].reserved -= qty
            self._mark(w, order.sku)
        self.active.pop(order.id, None)

    def get_order(self, room_id: str, order_id: str) -> Order:
        order = self.orders.get(order_id)
        if order is None or order.room_id != room_id:
            raise LedgerError(404, "unknown_order", f"no order {order_id!r} in this room")
        return order

    def confirm(self, room_id: str, order_id: str, now: float) -> Order:
        order = self.get_order(room_id, order_id)
        if order.status == "confirmed":
            return order  # confirming twice is harmless
        if order.status == "reserved" and order.expires_at is not None and order.expires_at <= now:
            self._expire(order)
        if order.status != "reserved":
            raise LedgerError(409, f"order_{order.status}", f"order is {order.status} and cannot be confirmed")
        # Stock can vanish under a reservation (a feed reported a loss): never ship what is gone.
        if any(self.levels[(w, order.sku)].on_hand < qty for w, qty in order.allocations):
            self._count_flash(order, -1)
            self._release(order)
            order.status, order.reason = "failed", "stock_lost"
            self._dirty_orders[order.id] = None
            raise LedgerError(409, "stock_lost", "the reserved units are no longer on hand")
        for w, qty in order.allocations:
            level = self.levels[(w, order.sku)]
            level.on_hand -= qty
            level.reserved -= qty
            self._mark(w, order.sku)
        self.active.pop(order.id, None)
        order.status, order.confirmed_at = "confirmed", now
        self._dirty_orders[order.id] = None
        return order

    def _expire(self, order: Order) -> None:
        self._count_flash(order, -1)
        self._release(order)
        order.status = "expired"
        self._dirty_orders[order.id] = None

    def expire(self, now: float) -> list[Order]:
        due = [o for o in self.active.values() if o.expires_at is not None and o.expires_at <= now]
        for order in due:
            self._expire(order)
        return due

    def next_expiry(self) -> float | None:
        return min((o.expires_at for o in self.active.values() if o.expires_at is not None), default=None)

    # ------------------------------------------------------------------ flash sales
    def start_flash(self, room: RoomView, inp: FlashInput, now: float, *, sale_id: str | None = None) -> FlashSale:
        if inp.sku not in room.sku_ids or inp.sku not in self.skus:
            raise LedgerError(404, "unknown_sku", f"sku {inp.sku!r} is not sold in this room")
        current = self.flash.get((room.id, inp.sku))
        if current is not None and current.active(now):
            raise LedgerError(409, "flash_sale_running", "a flash sale for this sku is already running")
        sale = FlashSale(sale_id or self._new_id(), room.id, inp.sku, inp.cap, inp.per_buyer, inp.ends_at, inp.price, now)
        self.flash[(room.id, inp.sku)] = sale
        self._dirty_flash.add((room.id, inp.sku))
        self._touched.add(inp.sku)
        return sale

    def stop_flash(self, room_id: str, sku: str, now: float) -> FlashSale:
        sale = self.flash.get((room_id, sku))
        if sale is None or not sale.active(now):
            raise LedgerError(404, "no_flash_sale", "no flash sale is running for this sku")
        sale = replace(sale, stopped_at=now)
        self.flash[(room_id, sku)] = sale
        self._dirty_flash.add((room_id, sku))
        self._touched.add(sku)
        return sale

    def flash_sold(self, sale: FlashSale) -> int:
        return self._flash_used[sale.id]

    # ------------------------------------------------------------------ change tracking
    def take_changes(self) -> Changes:
        changes = Changes(
            warehouses=[(self.warehouses[w], replace(self.feeds[w], missing=set(self.feeds[w].missing)))
                        for w in sorted(self._dirty_wh)],
            skus=[self.skus[s] for s in sorted(self._dirty_sku)],
            levels=[(w, s, replace(self.levels[(w, s)])) for (w, s) in sorted(self._dirty_levels)],
            events=self._new_events,
            orders=[replace(self.orders[o]) for o in self._dirty_orders],
            flash=[self.flash[k] for k in sorted(self._dirty_flash)],
            skus_touched=self._touched,
        )
        self._dirty_wh, self._dirty_sku, self._dirty_levels = set(), set(), set()
        self._dirty_orders, self._dirty_flash, self._new_events, self._touched = {}, set(), [], set()
        return changes
