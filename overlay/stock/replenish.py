"""Replenishment and pre-show maths: reorder point, surge, three-tier plan, demand coverage.

reorder point = lead-time demand + safety stock = d*L + z*sigma_d*sqrt(L), with daily demand d and
its standard deviation sigma_d scaled by a surge factor: how much a show day outsells a normal day.
The surge is learned from past shows (median over them of (d + units sold in the show) / d); while a
show is live, its own projection (units so far + velocity * time left) replaces the learned one.

Three-tier plan for the demand left in the current show, per warehouse:
in stock now -> in transit arriving before the show ends -> order after the show (presale).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import asdict, dataclass


def safety_stock(daily_sigma: float, lead_time_days: float, z: float) -> float:
    return z * daily_sigma * math.sqrt(lead_time_days)


def reorder_point(daily_mean: float, daily_sigma: float, lead_time_days: float, z: float) -> float:
    return daily_mean * lead_time_days + safety_stock(daily_sigma, lead_time_days, z)


def learned_surge(show_units: list[float], daily_mean: float | None, default: float) -> float:
    """Median show-day / normal-day demand over past shows; ``default`` without history."""
    if not show_units or not daily_mean:
        return default
    return statistics.median((daily_mean + units) / daily_mean for units in show_units)


def live_surge(daily_mean: float | None, units_so_far: float, per_min: float, minutes_left: float,
               learned: float) -> float:
    """The current show's projected surge; the learned one until the show has sales to go by."""
    if not daily_mean or (units_so_far <= 0 and per_min <= 0):
        return learned
    projected = units_so_far + per_min * max(minutes_left, 0.0)
    return (daily_mean + projected) / daily_mean


@dataclass(frozen=True)
class PlanLine:
    sku: str
    warehouse: str
    on_hand: int
    reserved: int
    available: int
    incoming_qty: int
    incoming_eta: float | None
    daily_demand: float  # baseline, before surge
    surge: float
    lead_time_days: float
    safety_stock: float
    reorder_point: float
    position: int  # available + incoming
    show_demand: float  # expected demand left in the show for this warehouse
    in_stock_now: int
    in_transit_before_end: int
    order_after_show: int  # show demand nothing covers: sell as presale, order after the show
    suggested_order_qty: int
    needs_reorder: bool


def plan_line(sku: str, warehouse: str, *, on_hand: int, reserved: int, incoming_qty: int,
              incoming_eta: float | None, daily_mean: float, daily_sigma: float, lead_time_days: float,
              z: float, surge: float, show_demand: float, show_ends_at: float | None, review_days: float = 7.0
              ) -> PlanLine:
    available = max(0, on_hand - reserved)
    demand = math.ceil(show_demand - 1e-9)
    in_stock = min(demand, available)
    arrives_in_time = incoming_eta is not None and show_ends_at is not None and incoming_eta <= show_ends_at
    in_transit = min(demand - in_stock, incoming_qty) if arrives_in_time else 0
    uncovered = demand - in_stock - in_transit
    d, sigma = daily_mean * surge, daily_sigma * surge
    ss = safety_stock(sigma, lead_time_days, z)
    rop = d * lead_time_days + ss
    position = available + incoming_qty
    after_show = position - demand  # may go negative: uncovered demand becomes backorders
    needs = after_show <= rop and (d > 0 or uncovered > 0)
    # Order up to ROP + one review period of demand, which also refills the backorders.
    order_qty = max(0, math.ceil(rop + d * review_days - after_show - 1e-9)) if needs else 0
    return PlanLine(sku, warehouse, on_hand, reserved, available, incoming_qty, incoming_eta, daily_mean,
                    round(surge, 4), lead_time_days, round(ss, 3), round(rop, 3), position, round(show_demand, 3),
                    in_stock, in_transit, uncovered, order_qty, needs)


def split_demand(total: float, available: dict[str, int]) -> dict[str, float]:
    """Share a SKU's show demand among warehouses in proportion to what each can ship (equal if none)."""
    if not available:
        return {}
    stock = sum(available.values())
    if stock <= 0:
        return {w: total / len(available) for w in available}
    return {w: total * a / stock for w, a in available.items()}


def lines_to_csv(lines: list[PlanLine]) -> str:
    out = io.StringIO()
    names = list(PlanLine.__dataclass_fields__)
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for line in lines:
        row = asdict(line)
        row["incoming_eta"] = "" if line.incoming_eta is None else line.incoming_eta
        writer.writerow(row)
    return out.getvalue()


@dataclass(frozen=True)
class PreshowLine:
    sku: str
    sellable: int | None
    incoming_before_end: int
    expected_demand: float | None
    cover_ratio: float | None
    verdict: str  # covered | short | unknown_demand | syncing
    move_to_presale: bool
    shortfall: int


def preshow_line(sku: str, sellable: int | None, incoming_before_end: int, expected: float | None) -> PreshowLine:
    if sellable is None:
        return PreshowLine(sku, None, incoming_before_end, expected, None, "syncing", False, 0)
    if expected is None:
        return PreshowLine(sku, sellable, incoming_before_end, None, None, "unknown_demand", False, 0)
    supply = sellable + incoming_before_end
    need = math.ceil(expected - 1e-9)
    ratio = supply / need if need > 0 else math.inf
    short = max(0, need - supply)
    return PreshowLine(sku, sellable, incoming_before_end, expected, None if math.isinf(ratio) else round(ratio, 3),
                       "short" if short else "covered", short > 0, short)
