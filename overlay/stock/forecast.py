"""Sales velocity, time to sell-out and the per-SKU status shown on air.

Velocity is an exponentially decayed count of units with time constant ``tau`` (minute scale):
v(t) = sum(units_i * exp(-(t - t_i) / tau)) / (tau * (1 - exp(-elapsed / tau))). At a steady rate
r it converges to r; the denominator corrects the start-up bias so the first minutes of a show are
not under-reported, and ``elapsed`` is floored at ``tau`` so one early sale cannot read as a storm.
State is two floats, updated in O(1) per sale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model import Status


@dataclass(frozen=True)
class Velocity:
    decayed: float  # decayed unit count as of last_t
    last_t: float
    start_t: float


def velocity_start(now: float) -> Velocity:
    return Velocity(0.0, now, now)


def velocity_add(v: Velocity, units: float, now: float, tau: float) -> Velocity:
    t = max(now, v.last_t)  # clocks may step back a little; never grow the count by it
    return Velocity(v.decayed * math.exp(-(t - v.last_t) / tau) + units, t, v.start_t)


def velocity_per_min(v: Velocity, now: float, tau: float) -> float:
    t = max(now, v.last_t)
    decayed = v.decayed * math.exp(-(t - v.last_t) / tau)
    elapsed = max(t - v.start_t, tau)
    return decayed / (tau * (1.0 - math.exp(-elapsed / tau))) * 60.0


def seconds_to_sellout(sellable: int, per_min: float) -> float | None:
    """None when nothing is selling (no prediction), 0 when already gone."""
    if sellable <= 0:
        return 0.0
    if per_min <= 1e-9:
        return None
    return sellable / per_min * 60.0


@dataclass(frozen=True)
class StatusRules:
    low_fraction: float = 0.30
    critical_fraction: float = 0.10
    low_sellout_s: float = 900.0
    critical_sellout_s: float = 300.0


def stock_status(sellable: int, baseline: int, tts: float | None, syncing: bool, rules: StatusRules) -> Status:
    """Status of one SKU in one room; ``baseline`` is the most that was sellable during the show."""
    if syncing:
        return "syncing"  # never show a number that may be wrong
    if sellable <= 0:
        return "sold_out"
    fraction = sellable / max(baseline, sellable)
    if fraction <= rules.critical_fraction or (tts is not None and tts <= rules.critical_sellout_s):
        return "critical"
    if fraction <= rules.low_fraction or (tts is not None and tts <= rules.low_sellout_s):
        return "low"
    return "plenty"


def remaining_fraction(sellable: int, baseline: int) -> float:
    if sellable <= 0:
        return 0.0
    return sellable / max(baseline, sellable)
