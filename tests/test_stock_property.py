"""Property tests: any interleaving of feed events, snapshots, orders, confirms and expiry keeps the books.

Invariants: on hand and reserved never negative; reserved equals what live reservations hold;
sellable is the region sum; and no SKU in any warehouse ever ships more units than the feeds ever
put there.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from overlay.stock.ledger import Ledger, LedgerError
from overlay.stock.model import RoomInfo, StockEvent
from overlay.stock.validation import FlashInput, OrderInput, SkuInput, SnapshotInput, WarehouseInput

WAREHOUSES = ("W1", "W2")
SKUS = ("a", "b")
ROOM = RoomInfo("r", "R", SKUS, None)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        ids = itertools.count()
        self.led = Ledger(hold_s=30.0, anomaly_min_drop=3, id_factory=lambda: f"o{next(ids)}")
        self.led.put_warehouse("W1", WarehouseInput("1", ("R",), None))
        self.led.put_warehouse("W2", WarehouseInput("2", ("R", "S"), None))
        for sku in SKUS:
            self.led.put_sku(sku, SkuInput(sku, "1", "USD", "g", {}, None, None))
        self.now = 0.0
        self.seq = defaultdict(int)
        self.sent: list[StockEvent] = []
        self.supply: dict[tuple[str, str], int] = defaultdict(int)  # units the feeds ever added
        self.keys: dict[str, tuple[str, int]] = {}

    def _feed(self, fn: object) -> None:
        before = {p: lv.on_hand for p, lv in self.led.levels.items()}
        fn()  # type: ignore[operator]
        for pair, level in self.led.levels.items():
            self.supply[pair] += max(0, level.on_hand - before.get(pair, 0))

    @rule(wh=st.sampled_from(WAREHOUSES), sku=st.sampled_from(SKUS), delta=st.integers(-6, 9),
          jump=st.sampled_from([1, 1, 1, 2, 3, 0, -1]))
    def event(self, wh: str, sku: str, delta: int, jump: int) -> None:
        seq = max(1, self.seq[wh] + jump)
        self.seq[wh] = max(self.seq[wh], seq)
        ev = StockEvent(f"e{len(self.sent)}", wh, sku, delta, seq)
        self.sent.append(ev)
        self._feed(lambda: self.led.apply_events([ev], self.now))

    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        if self.sent:
            ev = data.draw(st.sampled_from(self.sent))
            before = {p: (lv.on_hand, lv.reserved) for p, lv in self.led.levels.items()}
            result = self.led.apply_events([ev], self.now)
            assert result.duplicates == [ev.id] and result.applied == 0
            assert {p: (lv.on_hand, lv.reserved) for p, lv in self.led.levels.items()} == before

    @rule(wh=st.sampled_from(WAREHOUSES), a=st.integers(0, 12), b=st.integers(0, 12), lag=st.floats(0, 20))
    def snapshot(self, wh: str, a: int, b: int, lag: float) -> None:
        as_of = max(self.now - lag, self.led.feeds[wh].snapshot_as_of or 0.0)
        self._feed(lambda: self.led.apply_snapshot(wh, SnapshotInput(as_of, {"a": a, "b": b}, None), self.now))

    @rule(sku=st.sampled_from(SKUS), qty=st.integers(1, 6), key=st.integers(0, 30), buyer=st.sampled_from(["x", "y"]))
    def order(self, sku: str, qty: int, key: int, buyer: str) -> None:
        k = f"k{key}"
        sellable = self.led.sellable("R", sku)
        try:
            order = self.led.reserve(ROOM, OrderInput(sku, qty, None, k, buyer), self.now)
        except LedgerError as exc:
            assert exc.code in ("idempotency_key_reused", "buyer_required")
            return
        if k in self.keys:
            assert self.keys[k] == (order.sku, order.quantity)
            return
        self.keys[k] = (sku, qty)
        if order.status == "rejected" and order.reason == "insufficient_stock":
            assert qty > sellable
        elif order.status == "reserved":
            assert qty <= sellable and sum(q for _, q in order.allocations) == qty

    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        if self.led.orders:
            oid = data.draw(st.sampled_from(sorted(self.led.orders)))
            try:
                self.led.confirm("r", oid, self.now)
            except LedgerError as exc:
                assert exc.code in ("order_expired", "order_rejected", "order_failed", "stock_lost")

    @rule(cap=st.integers(1, 5), per_buyer=st.none() | st.integers(1, 3))
    def flash(self, cap: int, per_buyer: int | None) -> None:
        try:
            self.led.start_flash(ROOM, FlashInput("a", cap, per_buyer, self.now + 20.0, None), self.now)
        except LedgerError as exc:
            assert exc.code == "flash_sale_running"

    @rule(dt=st.floats(0.5, 40))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.led.expire(self.now)

    @invariant()
    def books_balance(self) -> None:
        held: dict[tuple[str, str], int] = defaultdict(int)
        shipped: dict[tuple[str, str], int] = defaultdict(int)
        for order in self.led.orders.values():
            for wh, qty in order.allocations:
                if order.status == "reserved":
                    held[(wh, order.sku)] += qty
                elif order.status == "confirmed":
                    shipped[(wh, order.sku)] += qty
        for pair, level in self.led.levels.items():
            assert level.on_hand >= 0 and level.reserved >= 0
            assert level.reserved == held[pair]
            assert shipped[pair] <= self.supply[pair]  # never sold more than ever existed
        for sku in SKUS:
            assert self.led.sellable("R", sku) == sum(
                max(0, self.led.levels[(w, sku)].on_hand - self.led.levels[(w, sku)].reserved)
                for w in WAREHOUSES if (w, sku) in self.led.levels)
        for sale in self.led.flash.values():
            sold = sum(o.quantity for o in self.led.orders.values()
                       if o.flash_id == sale.id and o.status in ("reserved", "confirmed"))
            assert sold == self.led.flash_sold(sale) <= sale.cap


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestLedgerProperties = LedgerMachine.TestCase
