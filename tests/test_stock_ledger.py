"""Table tests of the ledger: region sums, feeds (dedupe, gaps, snapshots, anomalies), orders, flash sales."""

from __future__ import annotations

import itertools

import pytest

from overlay.stock.ledger import Ledger, LedgerError
from overlay.stock.model import RoomInfo, StockEvent
from overlay.stock.validation import FlashInput, OrderInput, SkuInput, SnapshotInput, WarehouseInput

ROOM = RoomInfo("r1", "US-West", ("a", "b"), ends_at=1000.0)


def ledger(levels: dict[tuple[str, str], int] | None = None) -> Ledger:
    counter = itertools.count(1)
    led = Ledger(hold_s=60.0, anomaly_min_drop=3, id_factory=lambda: f"o{next(counter)}")
    led.put_warehouse("W1", WarehouseInput("West", ("US-West",), None))
    led.put_warehouse("W2", WarehouseInput("Both", ("US-West", "US-East"), None))
    led.put_warehouse("W3", WarehouseInput("UK", ("UK",), None))
    for sku in ("a", "b"):
        led.put_sku(sku, SkuInput(sku, "1", "USD", "g", {}, None, None))
    for (wh, sku), qty in (levels or {}).items():
        led._level(wh, sku).on_hand = qty  # a starting level, without feed bookkeeping
    return led


def ev(eid: str, wh: str, sku: str, delta: int, seq: int) -> StockEvent:
    return StockEvent(eid, wh, sku, delta, seq)


def buy(key: str, qty: int, sku: str = "a", buyer: str | None = None) -> OrderInput:
    return OrderInput(sku, qty, None, key, buyer)


@pytest.mark.parametrize("levels, region, expected", [
    ({("W1", "a"): 5, ("W2", "a"): 7, ("W3", "a"): 9}, "US-West", 12),
    ({("W1", "a"): 5, ("W2", "a"): 7, ("W3", "a"): 9}, "US-East", 7),
    ({("W1", "a"): 5, ("W2", "a"): 7, ("W3", "a"): 9}, "UK", 9),
    ({("W1", "a"): 5}, "DE", 0),  # nobody serves DE
    ({("W1", "a"): 0, ("W2", "a"): 3}, "US-West", 3),
])
def test_region_sellable(levels: dict[tuple[str, str], int], region: str, expected: int) -> None:
    assert ledger(levels).sellable(region, "a") == expected


def test_over_reserved_warehouse_does_not_hide_another() -> None:
    led = ledger({("W1", "a"): 2, ("W2", "a"): 4})
    led._level("W1", "a").reserved = 5  # stock vanished under a reservation
    assert led.sellable("US-West", "a") == 4


@pytest.mark.parametrize("batches, on_hand, last_seq, missing, dupes, skipped, late", [
    ([[ev("e1", "W1", "a", 5, 1), ev("e2", "W1", "a", -2, 2)]], 3, 2, [], [], [], []),
    ([[ev("e1", "W1", "a", 5, 1)], [ev("e1", "W1", "a", 5, 1)]], 5, 1, [], ["e1"], [], []),
    ([[ev("e1", "W1", "a", 5, 1), ev("e4", "W1", "a", 1, 4)]], 6, 4, [2, 3], [], [], []),
    ([[ev("e1", "W1", "a", 5, 1), ev("e4", "W1", "a", 1, 4)], [ev("e3", "W1", "a", 2, 3)]], 8, 4, [2], [], [], ["e3"]),
    ([[ev("e2", "W1", "a", 5, 2)], [ev("x2", "W1", "a", 9, 2)]], 5, 2, [1], [], ["x2"], []),
    ([[ev("e2", "W1", "a", 1, 2), ev("e1", "W1", "a", 1, 1)]], 2, 2, [], [], [], []),  # sorted by seq
    ([[ev("e1", "W1", "a", -4, 1)]], 0, 1, [], [], [], []),  # clamped at zero
])
def test_event_feed(batches: list[list[StockEvent]], on_hand: int, last_seq: int, missing: list[int],
                    dupes: list[str], skipped: list[str], late: list[str]) -> None:
    led = ledger()
    results = [led.apply_events(batch, 10.0) for batch in batches]
    assert led.levels[("W1", "a")].on_hand == on_hand
    assert led.feeds["W1"].last_seq == last_seq
    assert sorted(led.feeds["W1"].missing) == missing
    assert [d for r in results for d in r.duplicates] == dupes
    assert [d for r in results for d in r.skipped] == skipped
    assert [d for r in results for d in r.late] == late
    assert led.is_stale("W1", 10.0, 5.0) == bool(missing)  # an open gap means "syncing"


def test_unknown_refs_reject_the_whole_batch() -> None:
    led = ledger()
    with pytest.raises(LedgerError) as exc:
        led.apply_events([ev("e1", "W1", "a", 5, 1), ev("e2", "W9", "a", 1, 2), ev("e3", "W1", "zz", 1, 3)], 0.0)
    assert [(d["index"], d["field"]) for d in exc.value.details] == [(1, "warehouse"), (2, "sku")]
    assert ("W1", "a") not in led.levels and led.feeds["W1"].last_seq == 0 and not led.event_ids


def test_snapshot_drift_replays_later_events_and_our_shipments() -> None:
    led = ledger()
    led.apply_events([ev("e1", "W1", "a", 10, 1), ev("e2", "W1", "b", 4, 2)], 1.0)
    order = led.reserve(ROOM, buy("k", 3), 2.0)
    led.confirm("r1", order.id, 3.0)  # shipped 3 of "a" from W1 at t=3 (W1 has the most)
    assert order.allocations == (("W1", 3),)
    led.apply_events([ev("e3", "W1", "a", 2, 3)], 4.0)  # a receipt after the snapshot's seq
    # The WMS counted a=12, b=4 at t=2.5 up to seq 2: before our shipment, before e3.
    result = led.apply_snapshot("W1", SnapshotInput(2.5, {"a": 12}, 2), 5.0)
    assert led.levels[("W1", "a")].on_hand == 12 - 3 + 2
    assert led.levels[("W1", "b")].on_hand == 0  # absent from a full snapshot
    assert result.drift == [{"sku": "a", "before": 9, "after": 11, "drift": 2},
                            {"sku": "b", "before": 4, "after": 0, "drift": -4}]
    assert result.anomalies == [("W1", "b")]  # 4 units gone, no order explains it
    with pytest.raises(LedgerError) as exc:
        led.apply_snapshot("W1", SnapshotInput(2.0, {"a": 1}, None), 6.0)
    assert exc.value.code == "stale_snapshot"


def test_snapshot_closes_gaps_and_late_events_are_then_covered() -> None:
    led = ledger()
    led.apply_events([ev("e1", "W1", "a", 5, 1), ev("e5", "W1", "a", 1, 5)], 1.0)
    assert led.is_stale("W1", 1.0, 10.0)
    led.apply_snapshot("W1", SnapshotInput(2.0, {"a": 20}, None), 2.0)
    assert not led.is_stale("W1", 2.0, 10.0)
    result = led.apply_events([ev("e3", "W1", "a", 7, 3)], 3.0)
    assert result.skipped == ["e3"] and led.levels[("W1", "a")].on_hand == 20


@pytest.mark.parametrize("before, delta, anomaly", [(10, -10, True), (3, -3, True), (2, -2, False), (10, -9, False)])
def test_unexplained_drop_to_zero_is_an_anomaly(before: int, delta: int, anomaly: bool) -> None:
    led = ledger({("W1", "a"): before})
    result = led.apply_events([ev("e1", "W1", "a", delta, 1)], 0.0)
    assert led.levels[("W1", "a")].anomaly is anomaly
    assert (led.anomalies("US-West", "a") == ["W1"]) is anomaly
    assert bool(result.anomalies) is anomaly
    led.apply_events([ev("e2", "W1", "a", 0, 2)], 1.0)  # the next update confirms the level
    assert not led.levels[("W1", "a")].anomaly


def test_orders_sold_out_by_our_orders_are_not_anomalies() -> None:
    led = ledger({("W1", "a"): 5})
    order = led.reserve(ROOM, buy("k", 5), 0.0)
    led.confirm("r1", order.id, 1.0)
    assert led.levels[("W1", "a")].on_hand == 0 and not led.levels[("W1", "a")].anomaly


def test_reservation_splits_expires_and_confirm_rules() -> None:
    led = ledger({("W1", "a"): 3, ("W2", "a"): 4})
    o1 = led.reserve(ROOM, buy("k1", 6), 0.0)
    assert o1.status == "reserved" and o1.allocations == (("W2", 4), ("W1", 2)) and o1.expires_at == 60.0
    o2 = led.reserve(ROOM, buy("k2", 2), 1.0)
    assert (o2.status, o2.reason) == ("rejected", "insufficient_stock")
    assert led.reserve(ROOM, buy("k2", 2), 500.0) is o2  # same answer for a repeated key
    assert [o.id for o in led.expire(59.9)] == []
    assert [o.id for o in led.expire(60.0)] == [o1.id]
    assert led.sellable("US-West", "a") == 7
    with pytest.raises(LedgerError) as exc:
        led.confirm("r1", o1.id, 61.0)
    assert exc.value.code == "order_expired"
    o3 = led.reserve(ROOM, buy("k3", 3), 70.0)
    led.apply_events([ev("e1", "W2", "a", -4, 1)], 71.0)  # the warehouse lost the units we held
    with pytest.raises(LedgerError) as exc:
        led.confirm("r1", o3.id, 72.0)
    assert exc.value.code == "stock_lost" and led.orders[o3.id].status == "failed"
    assert led.levels[("W2", "a")].reserved == 0
    with pytest.raises(LedgerError):
        led.reserve(ROOM, buy("k4", 1, sku="zz"), 0.0)


def test_flash_sale_cap_and_per_buyer() -> None:
    led = ledger({("W1", "a"): 100})
    sale = led.start_flash(ROOM, FlashInput("a", 5, 2, 100.0, "1.00"), 0.0)
    outcomes = [led.reserve(ROOM, buy(f"k{i}", q, buyer=b), 1.0)
                for i, (q, b) in enumerate([(2, "x"), (1, "x"), (2, "y"), (2, "z"), (1, "z")])]
    assert [(o.status, o.reason) for o in outcomes] == [
        ("reserved", None), ("rejected", "per_buyer_limit"), ("reserved", None),
        ("rejected", "flash_sale_cap"), ("reserved", None)]
    assert led.flash_sold(sale) == 5
    led.expire(61.0 + 1.0)  # expired holds give the cap back
    assert led.flash_sold(sale) == 0
    assert led.reserve(ROOM, buy("late", 1, buyer="q"), 150.0).flash_id is None  # sale ended
    led.start_flash(ROOM, FlashInput("b", 1, 1, 200.0, None), 10.0)
    with pytest.raises(LedgerError) as exc:
        led.reserve(ROOM, buy("anon", 1, sku="b"), 10.0)
    assert exc.value.code == "buyer_required"
