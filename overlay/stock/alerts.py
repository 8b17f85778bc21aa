"""Host-console alerts: when to raise them (debounced, no flapping) and what to suggest.

Each alert kind has an "on" condition and a stricter re-arm condition (hysteresis): once fired it
stays quiet until the condition has clearly gone away, and never fires more often than the cooldown.
While a SKU is syncing its stock alerts neither fire nor re-arm: a possibly wrong number decides
nothing. Pure: takes the previous memory and signals, returns the new memory and the alerts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .model import Status


@dataclass(frozen=True)
class AlertRules:
    low_fraction: float = 0.30
    hysteresis: float = 0.05  # low-stock re-arms above low_fraction + hysteresis
    cooldown_s: float = 60.0
    sellout_margin_s: float = 120.0  # sell-out re-arms when predicted this far past the end


@dataclass(frozen=True)
class SkuSignal:
    sku: str
    name: str
    group: str
    status: Status
    sellable: int | None  # None while syncing
    fraction: float | None
    tts: float | None  # predicted seconds to sell-out
    stale_warehouses: tuple[str, ...] = ()
    anomaly_warehouses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trigger:
    armed: bool = True
    last_fired: float | None = None


AlertKey = tuple[str, str]  # (kind, subject)


@dataclass(frozen=True)
class Alert:
    kind: str  # low_stock | sellout_before_end | stale_feed | anomaly
    sku: str
    severity: str  # warning | critical
    message: str
    actions: tuple[dict[str, Any], ...]
    at: float
    warehouse: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sku": self.sku, "warehouse": self.warehouse, "severity": self.severity,
                "message": self.message, "actions": list(self.actions), "at": self.at}


def alternatives(signal: SkuSignal, signals: list[SkuSignal]) -> list[SkuSignal]:
    """SKUs worth pivoting to: in stock, not syncing; same product group first, then most stock."""
    pool = [s for s in signals if s.sku != signal.sku and s.status in ("plenty", "low") and (s.sellable or 0) > 0]
    return sorted(pool, key=lambda s: (s.group != signal.group, -(s.fraction or 0.0), s.sku))


def suggest_actions(kind: str, signal: SkuSignal, signals: list[SkuSignal]) -> tuple[dict[str, Any], ...]:
    actions: list[dict[str, Any]] = []
    if kind in ("low_stock", "sellout_before_end"):
        cap = 1 if signal.status in ("critical", "sold_out") else 2
        actions.append({"action": "cap_per_buyer", "limit": cap,
                        "label": f"Cap at {cap} per buyer so more viewers get one"})
    if kind == "stale_feed":
        actions.append({"action": "check_feed", "label": "Stock feed is silent: check the warehouse connection"})
    if kind == "anomaly":
        actions.append({"action": "verify_count", "label": "Ask the warehouse to confirm the count"})
    alts = alternatives(signal, signals)
    if alts:
        alt = alts[0]
        actions.append({"action": "pivot", "sku": alt.sku, "name": alt.name,
                        "label": f"Pivot to {alt.name}, which has stock"})
    actions.append({"action": "presale", "label": "Switch to presale (ship when restocked)"})
    return tuple(actions)


def _step(memory: dict[AlertKey, Trigger], key: AlertKey, on: bool, rearm: bool, now: float,
          rules: AlertRules) -> bool:
    trig = memory.get(key, Trigger())
    fire = on and trig.armed and (trig.last_fired is None or now - trig.last_fired >= rules.cooldown_s)
    if fire:
        memory[key] = Trigger(False, now)
    elif not trig.armed and rearm:
        memory[key] = replace(trig, armed=True)
    return fire


def evaluate_alerts(memory: dict[AlertKey, Trigger], signals: list[SkuSignal], ends_at: float | None,
                    now: float, rules: AlertRules) -> tuple[dict[AlertKey, Trigger], list[Alert]]:
    memory = dict(memory)
    alerts: list[Alert] = []
    stale_seen: set[str] = set()
    for sig in signals:
        syncing = sig.status == "syncing"
        if not syncing and sig.fraction is not None:
            low = sig.fraction <= rules.low_fraction
            clear = sig.fraction >= rules.low_fraction + rules.hysteresis
            if _step(memory, ("low_stock", sig.sku), low, clear, now, rules):
                sev = "critical" if sig.status in ("critical", "sold_out") else "warning"
                text = "sold out" if sig.status == "sold_out" else f"{sig.sellable} left ({sig.fraction:.0%})"
                alerts.append(Alert("low_stock", sig.sku, sev, f"{sig.name}: {text}",
                                    suggest_actions("low_stock", sig, signals), now))
        if not syncing:
            predicted = now + sig.tts if sig.tts is not None and sig.tts > 0 else None
            before_end = ends_at is not None and predicted is not None and predicted < ends_at
            clear = ends_at is None or predicted is None or predicted >= ends_at + rules.sellout_margin_s
            if _step(memory, ("sellout_before_end", sig.sku), before_end, clear, now, rules):
                assert sig.tts is not None and ends_at is not None
                alerts.append(Alert("sellout_before_end", sig.sku, "warning",
                                    f"{sig.name}: sells out in ~{sig.tts / 60:.0f} min, "
                                    f"{(ends_at - now - sig.tts) / 60:.0f} min before the show ends",
                                    suggest_actions("sellout_before_end", sig, signals), now))
        for wh in sig.stale_warehouses:
            if wh not in stale_seen:
                stale_seen.add(wh)
                if _step(memory, ("stale_feed", wh), True, False, now, rules):
                    alerts.append(Alert("stale_feed", sig.sku, "warning",
                                        f"Warehouse {wh} feed is stale: stock shows as syncing",
                                        suggest_actions("stale_feed", sig, signals), now, wh))
        for wh in sig.anomaly_warehouses:
            if _step(memory, ("anomaly", f"{wh}/{sig.sku}"), True, False, now, rules):
                alerts.append(Alert("anomaly", sig.sku, "critical",
                                    f"{sig.name}: warehouse {wh} dropped to zero with no orders to explain it",
                                    suggest_actions("anomaly", sig, signals), now, wh))
    # Conditions that are gone re-arm their triggers (stale feeds back, anomalies resolved).
    anomalies_now = {f"{wh}/{s.sku}" for s in signals for wh in s.anomaly_warehouses}
    for key, trig in list(memory.items()):
        kind, subject = key
        gone = (kind == "stale_feed" and subject not in stale_seen) or \
               (kind == "anomaly" and subject not in anomalies_now)
        if gone and not trig.armed:
            memory[key] = replace(trig, armed=True)
    return memory, alerts
