"""Table tests: velocity, time to sell-out, status, alert debouncing, reorder point and plans."""

from __future__ import annotations

import math

import pytest

from overlay.stock.alerts import AlertRules, SkuSignal, Trigger, evaluate_alerts
from overlay.stock.forecast import (StatusRules, seconds_to_sellout, stock_status, velocity_add, velocity_per_min,
                              velocity_start)
from overlay.stock.replenish import (learned_surge, lines_to_csv, live_surge, plan_line, preshow_line, reorder_point,
                               split_demand)

TAU = 60.0
E1 = 1 - math.exp(-1)


@pytest.mark.parametrize("sales, now, expected", [
    ([], 10.0, 0.0),
    ([(0.0, 6)], 0.0, 6 / (60 * E1) * 60),  # one early sale is not read as 360/min: window floored at tau
    ([(0.0, 6)], 60.0, 6 / (60 * E1) * 60 * math.exp(-1)),  # decays with tau
    ([(float(t), 1) for t in range(600)], 600.0, 59.50138888),  # steady 1/s converges to ~60/min
    ([(float(t), 2) for t in range(0, 120, 10)], 120.0, 11.02776493),  # 12/min, start-up corrected
    ([(10.0, 3), (5.0, 3)], 10.0, (3 + 3) / (60 * E1) * 60),  # a clock step back is not a decay
])
def test_velocity(sales: list[tuple[float, int]], now: float, expected: float) -> None:
    v = velocity_start(0.0)
    for t, units in sales:
        v = velocity_add(v, units, t, TAU)
    assert velocity_per_min(v, now, TAU) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("sellable, per_min, expected", [(10, 5.0, 120.0), (0, 3.0, 0.0), (10, 0.0, None), (1, 60.0, 1.0)])
def test_seconds_to_sellout(sellable: int, per_min: float, expected: float | None) -> None:
    assert seconds_to_sellout(sellable, per_min) == expected


@pytest.mark.parametrize("sellable, baseline, tts, syncing, status", [
    (5, 100, None, True, "syncing"),
    (0, 100, None, True, "syncing"),  # not even "sold out" while unsure
    (0, 100, None, False, "sold_out"),
    (10, 100, None, False, "critical"),
    (11, 100, None, False, "low"),
    (30, 100, None, False, "low"),
    (31, 100, None, False, "plenty"),
    (80, 100, 300.0, False, "critical"),
    (80, 100, 301.0, False, "low"),
    (80, 100, 900.0, False, "low"),
    (80, 100, 901.0, False, "plenty"),
    (50, 20, None, False, "plenty"),  # restocked above the opening level
])
def test_status(sellable: int, baseline: int, tts: float | None, syncing: bool, status: str) -> None:
    assert stock_status(sellable, baseline, tts, syncing, StatusRules()) == status


def sig(sku: str = "a", status: str = "plenty", fraction: float | None = 0.5, sellable: int | None = 50,
        tts: float | None = None, group: str = "g", stale: tuple[str, ...] = (),
        anomaly: tuple[str, ...] = ()) -> SkuSignal:
    return SkuSignal(sku, sku.upper(), group, status, sellable, fraction, tts, stale, anomaly)  # type: ignore[arg-type]


def run(steps: list[tuple[float, list[SkuSignal], float | None]]) -> list[tuple[float, str]]:
    memory: dict[tuple[str, str], Trigger] = {}
    fired = []
    for now, signals, ends_at in steps:
        memory, alerts = evaluate_alerts(memory, signals, ends_at, now, AlertRules())
        fired += [(now, a.kind) for a in alerts]
    return fired


def test_low_stock_alert_is_debounced() -> None:
    fractions = [(0, 0.5), (10, 0.29), (20, 0.31), (30, 0.29), (40, 0.36), (50, 0.28), (75, 0.28), (90, 0.2)]
    steps = [(float(t), [sig(status="low", fraction=f)], None) for t, f in fractions]
    steps.insert(3, (25.0, [sig(status="syncing", fraction=None, sellable=None)], None))  # holds state
    assert run(steps) == [(10.0, "low_stock"), (75.0, "low_stock")]  # 50: re-armed but cooling down


def test_sellout_before_end_stale_and_anomaly_alerts() -> None:
    steps = [
        (0.0, [sig(tts=500.0)], 1000.0),  # sells out at 500, show ends at 1000
        (10.0, [sig(tts=480.0)], 1000.0),
        (100.0, [sig(tts=1500.0)], 1000.0),  # now past the end: re-arms
        (200.0, [sig(tts=300.0)], 1000.0),
        (210.0, [sig(status="syncing", stale=("W1",), anomaly=("W1",), fraction=None, sellable=None)], 1000.0),
        (220.0, [sig(status="syncing", stale=("W1",), fraction=None, sellable=None)], 1000.0),
        (230.0, [sig()], 1000.0),
        (300.0, [sig(status="syncing", stale=("W1",), fraction=None, sellable=None)], 1000.0),
        (305.0, [sig(tts=100.0)], None),  # no known end: no prediction alert
    ]
    assert run(steps) == [(0.0, "sellout_before_end"), (200.0, "sellout_before_end"), (210.0, "stale_feed"),
                          (210.0, "anomaly"), (300.0, "stale_feed")]


def test_alert_suggests_pivot_to_same_group_with_stock() -> None:
    signals = [sig("a", "critical", 0.05, 2, group="tee"), sig("b", "plenty", 0.9, 90, group="mug"),
               sig("c", "low", 0.25, 5, group="tee"), sig("d", "sold_out", 0.0, 0, group="tee")]
    _, alerts = evaluate_alerts({}, signals, None, 0.0, AlertRules())
    low = [a for a in alerts if a.sku == "a"][0]
    assert low.kind == "low_stock" and low.severity == "critical"
    assert [a["action"] for a in low.actions] == ["cap_per_buyer", "pivot", "presale"]
    assert low.actions[0]["limit"] == 1 and low.actions[1]["sku"] == "c"


@pytest.mark.parametrize("d, sigma, lead, z, expected", [
    (10.0, 3.0, 4.0, 1.65, 49.9), (0.0, 0.0, 7.0, 1.65, 0.0), (2.5, 1.0, 9.0, 2.0, 28.5), (1.0, 0.0, 0.5, 3.0, 0.5)])
def test_reorder_point(d: float, sigma: float, lead: float, z: float, expected: float) -> None:
    assert reorder_point(d, sigma, lead, z) == pytest.approx(expected)


@pytest.mark.parametrize("shows, mean, default, expected", [
    ([20.0, 40.0, 10.0], 10.0, 1.0, 3.0), ([], 10.0, 1.5, 1.5), ([5.0], None, 1.0, 1.0), ([0.0], 4.0, 2.0, 1.0)])
def test_learned_surge(shows: list[float], mean: float | None, default: float, expected: float) -> None:
    assert learned_surge(shows, mean, default) == pytest.approx(expected)


@pytest.mark.parametrize("mean, so_far, per_min, minutes_left, learned, expected", [
    (10.0, 5.0, 1.0, 15.0, 3.0, 3.0), (10.0, 0.0, 0.0, 30.0, 2.0, 2.0), (None, 5.0, 1.0, 5.0, 1.7, 1.7),
    (4.0, 8.0, 0.5, 16.0, 9.0, 5.0)])
def test_live_surge(mean: float | None, so_far: float, per_min: float, minutes_left: float, learned: float,
                    expected: float) -> None:
    assert live_surge(mean, so_far, per_min, minutes_left, learned) == pytest.approx(expected)


@pytest.mark.parametrize("eta, demand, tiers, order_qty", [
    (500.0, 30.0, (15, 10, 5), 31),  # rop 11.3; position after show 25-30=-5 -> 11.3+14+5
    (1500.0, 30.0, (15, 0, 15), 31),  # arrives after the show: cannot sell it on air
    (500.0, 10.0, (10, 0, 0), 0),  # position after show 25-10=15 stays above rop 11.3: no order
])
def test_three_tier_plan(eta: float, demand: float, tiers: tuple[int, int, int], order_qty: int) -> None:
    line = plan_line("a", "W1", on_hand=20, reserved=5, incoming_qty=10, incoming_eta=eta, daily_mean=2.0,
                     daily_sigma=1.0, lead_time_days=4.0, z=1.65, surge=1.0, show_demand=demand, show_ends_at=1000.0)
    assert (line.in_stock_now, line.in_transit_before_end, line.order_after_show) == tiers
    assert line.reorder_point == pytest.approx(11.3)
    assert line.suggested_order_qty == order_qty
    assert line.needs_reorder is (order_qty > 0)


def test_plan_scales_with_surge_and_exports_csv() -> None:
    base = plan_line("a", "W1", on_hand=0, reserved=0, incoming_qty=0, incoming_eta=None, daily_mean=2.0,
                     daily_sigma=1.0, lead_time_days=4.0, z=1.65, surge=1.0, show_demand=0.0, show_ends_at=None)
    surged = plan_line("a", "W1", on_hand=0, reserved=0, incoming_qty=0, incoming_eta=None, daily_mean=2.0,
                       daily_sigma=1.0, lead_time_days=4.0, z=1.65, surge=3.0, show_demand=0.0, show_ends_at=None)
    assert surged.reorder_point == pytest.approx(3 * base.reorder_point)
    assert (base.suggested_order_qty, surged.suggested_order_qty) == (26, 76)  # ceil(11.3+14), ceil(33.9+42)
    rows = lines_to_csv([base, surged]).splitlines()
    assert len(rows) == 3 and rows[0].split(",")[:3] == ["sku", "warehouse", "on_hand"]
    assert rows[2].split(",")[rows[0].split(",").index("surge")] == "3.0"


@pytest.mark.parametrize("total, available, expected", [
    (30.0, {"A": 10, "B": 20}, {"A": 10.0, "B": 20.0}), (30.0, {"A": 0, "B": 0}, {"A": 15.0, "B": 15.0}),
    (5.0, {}, {})])
def test_split_demand(total: float, available: dict[str, int], expected: dict[str, float]) -> None:
    assert split_demand(total, available) == expected


@pytest.mark.parametrize("sellable, incoming, expected, verdict, presale, shortfall, ratio", [
    (10, 5, 20.0, "short", True, 5, 0.75), (10, 0, 8.0, "covered", False, 0, 1.25),
    (None, 0, 8.0, "syncing", False, 0, None), (10, 0, None, "unknown_demand", False, 0, None),
    (0, 0, 0.0, "covered", False, 0, None)])
def test_preshow(sellable: int | None, incoming: int, expected: float | None, verdict: str, presale: bool,
                 shortfall: int, ratio: float | None) -> None:
    line = preshow_line("a", sellable, incoming, expected)
    assert (line.verdict, line.move_to_presale, line.shortfall, line.cover_ratio) == (verdict, presale, shortfall, ratio)
