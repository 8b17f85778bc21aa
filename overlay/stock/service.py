"""I/O glue of the stock side: owns the ledger, the command log and the timers.

Every write is a ``Command`` (see ``overlay.stock.log``) handed to the command log; ``apply`` is the
one state transition: it decides synchronously in the ledger on the event loop (one owner, so a
reservation is atomic) and updates what the service derives from the decisions (units sold per room,
sales velocity). Embedded (``LocalLog``) a command is applied at once; its change set is shown and
the caller answered once it is durable in SQLite (one writer thread, group commit), and a failed write
rolls the service back to the store (``checkpoint`` / ``rollback``). Clustered
(``RedisLog``) every node applies every node's commands in the order of one Redis Stream, and the
caller is answered with the outcome of its command in that order; a node starts from the newest
snapshot of the replicated state (``snapshot_state`` / ``restore_snapshot``) and the entries after
it. Either way changes fan out to listeners (the overlay) and to the rooms' pages of the node once per
loop iteration, coalesced.

A command carries everything its outcome depends on: ids the ledger would draw at random (order and
flash sale ids), the requester's ``now``, and the settings that shape a decision (hold time, staleness
limit of the "syncing" rule, anomaly threshold), so nodes agree even if their settings differ and a
replay years later decides the same.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from relay.listeners import emit_all

from .config import StockConfig

from .alerts import AlertKey, AlertRules, SkuSignal, Trigger, evaluate_alerts
from .forecast import (StatusRules, Velocity, remaining_fraction, seconds_to_sellout, stock_status,
                       velocity_add, velocity_per_min, velocity_start)
from .ledger import Changes, EventsResult, Ledger, LedgerError, SnapshotResult
from .model import FlashSale, Order, RoomInfo, RoomView, Sku, Status, StockEvent, Warehouse, variant_name
from .replenish import (PlanLine, PreshowLine, learned_surge, live_surge, plan_line, preshow_line,
                        split_demand)
from .log import Applied, Command, CommandLog, LocalLog, StoreUnavailable
from .store import StockStore, StoredState, state_from_json, state_to_json, stored_state_of
from .validation import FlashInput, IncomingInput, OrderInput, SkuInput, SnapshotInput, WarehouseInput

log = logging.getLogger("shelfcast.stock")

SNAPSHOT_VERSION = 1  # of ``StockService.snapshot_state``

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


@dataclass(frozen=True)
class _Derived:
    """The service's own state that commands change (the rest is the ledger's, in the store)."""

    room_units: dict[tuple[str, str], int]
    room_velocity: dict[tuple[str, str], Velocity]
    region_velocity: dict[tuple[str, str], Velocity]


@dataclass
class _RoomState:
    baseline: dict[str, int] = field(default_factory=dict)  # most sellable seen per SKU
    last_status: dict[str, Status] = field(default_factory=dict)
    alert_memory: dict[AlertKey, Trigger] = field(default_factory=dict)
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))


class StockService:
    def __init__(self, cfg: StockConfig, store: StockStore | None, room_lookup: RoomLookup, publish: Publish,
                 clock: Callable[[], float] = time.time, *, log: CommandLog | None = None) -> None:
        """Embedded with a ``store`` (SQLite, ``LocalLog``), or clustered with a shared ``log`` (``RedisLog``)."""
        if log is None:
            if store is None:
                raise ValueError("StockService needs a store or a command log")
            log = LocalLog(store)
        self.cfg = cfg
        self.ledger = Ledger(hold_s=cfg.reservation_hold_s, anomaly_min_drop=cfg.anomaly_min_drop)
        self.log = log
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
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.log.open(self)  # load the store, or replay the shared log
        self._tasks = [asyncio.create_task(self._tick_loop(), name="stock-tick")]
        await self._expire()  # reservations that lapsed while we were down

    def restore(self, state: StoredState) -> None:
        """Embedded start: rebuild from the SQLite store."""
        self.ledger.load(state.warehouses, state.skus, state.levels, state.event_ids, state.recent_events,
                         state.orders, state.flash)
        for order in state.orders:
            if order.status in ("reserved", "confirmed"):
                self._room_units[(order.room_id, order.sku)] += order.quantity

    def checkpoint(self) -> _Derived:
        """What commands change besides the ledger (cheap: values are immutable, one entry per SKU)."""
        return _Derived(dict(self._room_units), dict(self._room_velocity), dict(self._region_velocity))

    def rollback(self, state: StoredState, checkpoint: _Derived) -> None:
        """Embedded, after a failed write: back to the store's ledger and the derived values of then.
        The log then announces what was undone, so pages and overlays read the restored numbers."""
        self.ledger = self._fresh_ledger(state)
        self._room_units = defaultdict(int, checkpoint.room_units)
        self._room_velocity = dict(checkpoint.room_velocity)
        self._region_velocity = dict(checkpoint.region_velocity)

    def _fresh_ledger(self, state: StoredState) -> Ledger:
        old = self.ledger
        ledger = Ledger(hold_s=old.hold_s, anomaly_min_drop=old.anomaly_min_drop, id_factory=old._new_id)
        ledger.load(state.warehouses, state.skus, state.levels, state.event_ids, state.recent_events,
                    state.orders, state.flash)
        return ledger

    def snapshot_state(self) -> dict[str, Any]:
        """Everything ``apply`` depends on, as fresh JSON values (clustered mode's snapshot).

        The ledger in the store's form (``StoredState``; ``Ledger.load`` derives the rest) plus what the
        service derives from decisions and cannot rebuild from the ledger: units per room and sales
        velocities (exact floats; JSON round-trips them). Taken synchronously between two commands, so it
        is the state right after the last one applied. What a node only shows (watched rooms, baselines,
        alerts) is not part of it.
        """
        return {
            "v": SNAPSHOT_VERSION,
            "ledger": state_to_json(stored_state_of(self.ledger)),
            "room_units": [[room, sku, n] for (room, sku), n in self._room_units.items()],
            "room_velocity": [[a, b, v.decayed, v.last_t, v.start_t] for (a, b), v in self._room_velocity.items()],
            "region_velocity": [[a, b, v.decayed, v.last_t, v.start_t]
                                for (a, b), v in self._region_velocity.items()],
        }

    def restore_snapshot(self, snap: dict[str, Any]) -> None:
        """Replace the replicated state with a snapshot's (at start, or when this node fell behind a trim)."""
        if snap.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"unknown stock snapshot version {snap.get('v')!r}")
        old = self.ledger
        ledger = self.ledger = self._fresh_ledger(state_from_json(snap["ledger"]))
        self._room_units = defaultdict(int, {(room, sku): int(n) for room, sku, n in snap["room_units"]})
        self._room_velocity = {(a, b): Velocity(d, t, s) for a, b, d, t, s in snap["room_velocity"]}
        self._region_velocity = {(a, b): Velocity(d, t, s) for a, b, d, t, s in snap["region_velocity"]}
        self._notify(set(ledger.skus) | set(old.skus))  # pages and overlays show the new numbers

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.log.close()  # in-flight commands finish (or fail) first
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    async def _submit(self, op: str, args: dict[str, Any], now: float | None = None) -> Any:
        """Append a command to the log; return its result (or raise its error) once applied here."""
        if self._closed:
            raise StoreUnavailable("stock service is shutting down")
        cmd = Command.new(op, args, self.clock() if now is None else now)
        return (await self.log.submit(cmd)).unwrap()

    def apply(self, cmd: Command, *, announce: bool = True) -> Applied:
        """The one state transition of both modes: run ``cmd`` on the ledger, collect its changes and
        (``announce``) show them; embedded, the log shows them once they are durable instead.

        Deterministic: every decision depends only on the ledger's state and the command (never on this
        node's clock, settings, rooms or randomness), so every node that applies the same log agrees on
        every outcome, on units sold and on velocity (given the same ``velocity_tau_s``; what a node
        only shows, such as a watched room's baseline, stays its own). Never raises: a refusal is the
        command's outcome (the submitter raises it; other nodes ignore it).
        """
        handler = _OPS.get(cmd.op)
        value: Any = None
        error: BaseException | None = None
        try:
            if handler is None:
                raise LedgerError(400, "unknown_command", f"unknown stock command {cmd.op!r}")
            value = handler(self, cmd.args, cmd.now)
        except LedgerError as exc:
            error = exc
        except Exception as exc:  # a bug or a command from an incompatible version: loud, not fatal
            log.exception("stock command %s (%s) failed", cmd.op, cmd.id)
            error = exc
        changes = self.ledger.take_changes()
        if announce:
            self.announce(changes)
        return Applied(value, error, changes)

    def announce(self, changes: Changes) -> None:
        if changes.skus_touched:
            self._notify(changes.skus_touched)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick_s)
            try:
                await self._expire()
                self._refresh_rooms(set(), force_alerts=True)
            except Exception:  # a bad tick must not stop expiry for good
                log.exception("stock tick failed")

    async def _expire(self) -> None:
        """Log an expiry only when a hold has lapsed in this node's ledger (idle ticks log nothing).
        Clustered, several nodes may log one for the same lapse: harmless, the first applied expires
        what is due as of its ``now`` and the others find nothing left."""
        now = self.clock()
        due = self.ledger.next_expiry()
        if due is not None and due <= now:
            await self._submit("expire", {}, now)

    def _do_expire(self, args: dict[str, Any], now: float) -> int:
        expired = self.ledger.expire(now)
        for order in expired:
            self._room_units[(order.room_id, order.sku)] -= order.quantity
        return len(expired)

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
        emit_all(self._listeners, set(skus), what="a stock change")

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
            emit_all(self._listeners, set(extra), what="a stock change")

    def _run_alerts(self, room: RoomView, state: _RoomState, views: list[SkuView], now: float) -> None:
        signals = []
        for v in views:
            stale = tuple(self.ledger.stale_warehouses(room.region, now, self.cfg.stale_after_s))
            signals.append(SkuSignal(
                v.sku, variant_name(v.name, v.attributes), v.group, v.status, v.sellable,
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
    # Each write: a public coroutine that encodes the request as a command (state-independent checks
    # happen before, in validation), and its ``_do_*`` twin that decodes and applies it.
    async def put_warehouse(self, wh_id: str, inp: WarehouseInput) -> Warehouse:
        return await self._submit("put_warehouse", {"wh": wh_id, "name": inp.name, "regions": list(inp.regions),
                                                     "lead_time_days": inp.lead_time_days})

    def _do_put_warehouse(self, a: dict[str, Any], now: float) -> Warehouse:
        return self.ledger.put_warehouse(a["wh"], WarehouseInput(a["name"], tuple(a["regions"]), a["lead_time_days"]))

    async def put_sku(self, sku_id: str, inp: SkuInput) -> Sku:
        return await self._submit("put_sku", {
            "sku": sku_id, "name": inp.name, "price": inp.price, "currency": inp.currency, "group": inp.group,
            "attributes": dict(inp.attributes), "daily_mean": inp.daily_mean, "daily_sigma": inp.daily_sigma})

    def _do_put_sku(self, a: dict[str, Any], now: float) -> Sku:
        return self.ledger.put_sku(a["sku"], SkuInput(a["name"], a["price"], a["currency"], a["group"],
                                                      dict(a["attributes"]), a["daily_mean"], a["daily_sigma"]))

    async def apply_events(self, events: list[StockEvent]) -> EventsResult:
        result: EventsResult = await self._submit("apply_events", {
            "events": [[e.id, e.warehouse, e.sku, e.delta, e.seq] for e in events],
            "anomaly_min_drop": self.cfg.anomaly_min_drop})
        return result

    def _do_apply_events(self, a: dict[str, Any], now: float) -> EventsResult:
        events = [StockEvent(str(i), str(w), str(s), int(d), int(q)) for i, w, s, d, q in a["events"]]
        return self.ledger.apply_events(events, now, anomaly_min_drop=a["anomaly_min_drop"])

    async def apply_snapshot(self, wh_id: str, snap: SnapshotInput) -> SnapshotResult:
        result: SnapshotResult = await self._submit("apply_snapshot", {
            "wh": wh_id, "as_of": snap.as_of, "levels": dict(snap.levels), "seq": snap.seq,
            "anomaly_min_drop": self.cfg.anomaly_min_drop})
        if result.drift:
            log.info("snapshot of %s corrected %d levels", wh_id, len(result.drift))
        return result

    def _do_apply_snapshot(self, a: dict[str, Any], now: float) -> SnapshotResult:
        snap = SnapshotInput(a["as_of"], {str(k): int(v) for k, v in a["levels"].items()}, a["seq"])
        return self.ledger.apply_snapshot(a["wh"], snap, now, anomaly_min_drop=a["anomaly_min_drop"])

    async def heartbeat(self, wh_id: str) -> None:
        await self._submit("heartbeat", {"wh": wh_id})

    def _do_heartbeat(self, a: dict[str, Any], now: float) -> None:
        self.ledger.heartbeat(a["wh"], now)

    async def set_incoming(self, wh_id: str, sku: str, inp: IncomingInput) -> None:
        await self._submit("set_incoming", {"wh": wh_id, "sku": sku, "quantity": inp.quantity, "eta": inp.eta})

    def _do_set_incoming(self, a: dict[str, Any], now: float) -> None:
        self.ledger.set_incoming(a["wh"], a["sku"], a["quantity"], a["eta"])

    async def ack_anomaly(self, wh_id: str, sku: str) -> None:
        await self._submit("ack_anomaly", {"wh": wh_id, "sku": sku})

    def _do_ack_anomaly(self, a: dict[str, Any], now: float) -> None:
        self.ledger.ack_anomaly(a["wh"], a["sku"])

    # ------------------------------------------------------------------ orders and flash sales
    async def reserve(self, room: RoomView, inp: OrderInput) -> Order:
        self.watch_room(room.id)
        now = self.clock()
        # Cheap early refusal (no log entry) while this node sees the numbers as unsure; the same rule is
        # decided again, authoritatively, when the command is applied (``_do_reserve``).
        self._refuse_if_syncing(room, inp, now, self.cfg.stale_after_s)
        order: Order = await self._submit("reserve", {
            "room": _room_args(room), "sku": inp.sku, "quantity": inp.quantity, "region": inp.region,
            "idempotency_key": inp.idempotency_key, "buyer": inp.buyer,
            "order_id": self.ledger.new_id(),  # used only if the key is new
            "hold_s": self.cfg.reservation_hold_s, "stale_after_s": self.cfg.stale_after_s}, now)
        return order

    def _do_reserve(self, a: dict[str, Any], now: float) -> Order:
        room = _room_from(a["room"])
        inp = OrderInput(a["sku"], a["quantity"], a["region"], a["idempotency_key"], a["buyer"])
        self.watch_room(room.id)
        known = self._refuse_if_syncing(room, inp, now, a["stale_after_s"])
        order = self.ledger.reserve(room, inp, now, order_id=a["order_id"], hold_s=a["hold_s"])
        if order.status == "reserved" and not known:
            tau = self.cfg.velocity_tau_s
            self._room_units[(room.id, order.sku)] += order.quantity
            for table, key in ((self._room_velocity, (room.id, order.sku)),
                               (self._region_velocity, (room.region, order.sku))):
                table[key] = velocity_add(table.get(key) or velocity_start(now), order.quantity, now, tau)
        return order

    def _refuse_if_syncing(self, room: RoomView, inp: OrderInput, now: float, stale_after_s: float) -> bool:
        """Refuse a new order while its region's numbers may be wrong; returns whether the key is known
        (a known key always gets its original answer)."""
        known = (room.id, inp.idempotency_key) in self.ledger.by_key
        if not known and self._region_syncing(room.region, inp.sku, now, stale_after_s):
            # The numbers may be wrong right now: selling against them could oversell.
            raise LedgerError(409, "stock_syncing", "stock for this product is being re-synced with the "
                              "warehouse; try again in a moment")
        return known

    def _region_syncing(self, region: str, sku: str, now: float, stale_after_s: float) -> bool:
        serving = self.ledger.serving(region)
        return bool(self.ledger.anomalies(region, sku)) or any(
            self.ledger.is_stale(w, now, stale_after_s) for w in serving if (w, sku) in self.ledger.levels)

    async def confirm(self, room_id: str, order_id: str) -> Order:
        order: Order = await self._submit("confirm", {"room_id": room_id, "order_id": order_id})
        return order

    def _do_confirm(self, a: dict[str, Any], now: float) -> Order:
        order = self.ledger.orders.get(a["order_id"])
        was_reserved = order is not None and order.status == "reserved"
        try:
            return self.ledger.confirm(a["room_id"], a["order_id"], now)
        finally:
            if order is not None and was_reserved and order.status in ("failed", "expired"):
                self._room_units[(order.room_id, order.sku)] -= order.quantity

    async def start_flash(self, room: RoomView, inp: FlashInput) -> FlashSale:
        sale: FlashSale = await self._submit("start_flash", {
            "room": _room_args(room), "sku": inp.sku, "cap": inp.cap, "per_buyer": inp.per_buyer,
            "ends_at": inp.ends_at, "price": inp.price, "sale_id": self.ledger.new_id()})
        return sale

    def _do_start_flash(self, a: dict[str, Any], now: float) -> FlashSale:
        room = _room_from(a["room"])
        self.watch_room(room.id)
        inp = FlashInput(a["sku"], a["cap"], a["per_buyer"], a["ends_at"], a["price"])
        return self.ledger.start_flash(room, inp, now, sale_id=a["sale_id"])

    async def stop_flash(self, room_id: str, sku: str) -> FlashSale:
        sale: FlashSale = await self._submit("stop_flash", {"room_id": room_id, "sku": sku})
        return sale

    def _do_stop_flash(self, a: dict[str, Any], now: float) -> FlashSale:
        return self.ledger.stop_flash(a["room_id"], a["sku"], now)

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


def _room_args(room: RoomView) -> dict[str, Any]:
    """The room as the requester sees it travels with the command: other nodes may not know it."""
    return {"id": room.id, "region": room.region, "sku_ids": list(room.sku_ids), "ends_at": room.ends_at}


def _room_from(a: dict[str, Any]) -> RoomInfo:
    return RoomInfo(a["id"], a["region"], tuple(a["sku_ids"]), a["ends_at"])


_Op = Callable[[StockService, dict[str, Any], float], Any]
# Every command a log may carry. Changing what one of them decides changes how an existing log replays.
_OPS: dict[str, _Op] = {
    "put_warehouse": StockService._do_put_warehouse,
    "put_sku": StockService._do_put_sku,
    "apply_events": StockService._do_apply_events,
    "apply_snapshot": StockService._do_apply_snapshot,
    "heartbeat": StockService._do_heartbeat,
    "set_incoming": StockService._do_set_incoming,
    "ack_anomaly": StockService._do_ack_anomaly,
    "reserve": StockService._do_reserve,
    "confirm": StockService._do_confirm,
    "start_flash": StockService._do_start_flash,
    "stop_flash": StockService._do_stop_flash,
    "expire": StockService._do_expire,
}
