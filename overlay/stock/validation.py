"""Shape validation of stock payloads: JSON values in, typed values out, or every problem listed.

A batch is judged as a whole: all problems are collected (per item, with index and field) so the
caller can fix them in one go, and nothing is applied unless the whole batch is clean. Checks that
need the ledger (unknown SKU or warehouse) live in the ledger; this module only knows shapes.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeGuard

from relay.errors import ShelfcastError

from .model import StockEvent

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
MAX_QTY = 1_000_000_000
MAX_TEXT = 200


class ValidationFailed(ShelfcastError):
    """The payload is wrong; ``details`` lists every problem found."""

    def __init__(self, message: str, details: list[dict[str, Any]], *, status: int = 422,
                 code: str = "invalid_payload") -> None:
        super().__init__(status, code, message, details)


class _Problems:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, field: str, message: str, index: int | None = None) -> None:
        item: dict[str, Any] = {"field": field, "message": message}
        if index is not None:
            item = {"index": index, **item}
        self.items.append(item)

    def raise_if_any(self, message: str) -> None:
        if self.items:
            raise ValidationFailed(message, self.items)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[int | float]:
    return (is_int(value) or isinstance(value, float)) and value == value and abs(value) != float("inf")


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and bool(ID_RE.match(value))


def check_id(value: Any, what: str) -> str:
    """A path parameter used as an id."""
    if not valid_id(value):
        raise ValidationFailed(f"invalid {what} id", [{"field": what, "message": "1-64 chars of A-Z a-z 0-9 . _ : -"}])
    return str(value)


def _text(p: _Problems, obj: dict[str, Any], key: str, *, required: bool = True, index: int | None = None,
          max_len: int = MAX_TEXT) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            p.add(key, "required", index)
        return None
    if not isinstance(value, str) or not value.strip():
        p.add(key, "must be a non-empty string", index)
        return None
    text = unicodedata.normalize("NFC", value.strip())  # any script; one canonical form
    if len(text) > max_len:
        p.add(key, f"longer than {max_len} characters", index)
        return None
    return text


def _id(p: _Problems, obj: dict[str, Any], key: str, index: int | None = None, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not valid_id(value):
        p.add(key, "required: 1-64 chars of A-Z a-z 0-9 . _ : -", index)
        return None
    return str(value)


def _int(p: _Problems, obj: dict[str, Any], key: str, *, lo: int, hi: int = MAX_QTY, index: int | None = None,
         required: bool = True) -> int | None:
    value = obj.get(key)
    if value is None:
        if required:
            p.add(key, "required", index)
        return None
    if not is_int(value):
        p.add(key, "must be an integer", index)
        return None
    if not lo <= value <= hi:
        p.add(key, f"must be between {lo} and {hi}", index)
        return None
    return int(value)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationFailed(f"{what} must be a JSON object", [{"field": "", "message": "expected an object"}])
    return value


def parse_time(value: Any) -> float | None:
    """Epoch seconds (number) or ISO 8601 with a timezone; None if neither."""
    if is_number(value) and value >= 0:
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None  # a naive time is ambiguous across warehouses in different zones
        return parsed.timestamp()
    return None


def _time(p: _Problems, obj: dict[str, Any], key: str, *, required: bool = True) -> float | None:
    value = obj.get(key)
    if value is None:
        if required:
            p.add(key, "required", None)
        return None
    parsed = parse_time(value)
    if parsed is None:
        p.add(key, "must be epoch seconds or ISO 8601 with a timezone", None)
    return parsed


@dataclass(frozen=True)
class WarehouseInput:
    name: str
    regions: tuple[str, ...]
    lead_time_days: float | None


def parse_warehouse(body: Any) -> WarehouseInput:
    obj = _object(body, "warehouse")
    p = _Problems()
    name = _text(p, obj, "name")
    regions = obj.get("regions")
    clean: list[str] = []
    if not isinstance(regions, list) or not regions:
        p.add("regions", "must be a non-empty list of region names")
    else:
        for i, region in enumerate(regions):
            if not isinstance(region, str) or not region.strip() or len(region) > 32:
                p.add(f"regions[{i}]", "must be a non-empty string of at most 32 characters")
            elif region.strip() in clean:
                p.add(f"regions[{i}]", "duplicate region")
            else:
                clean.append(region.strip())
    lead = obj.get("lead_time_days")
    if lead is not None and (not is_number(lead) or not 0 < lead <= 365):
        p.add("lead_time_days", "must be a number of days in (0, 365]")
    p.raise_if_any("invalid warehouse")
    assert name is not None
    return WarehouseInput(name, tuple(clean), float(lead) if lead is not None else None)


@dataclass(frozen=True)
class SkuInput:
    name: str
    price: str
    currency: str
    group: str | None
    attributes: dict[str, str]
    daily_mean: float | None
    daily_sigma: float | None


def parse_sku(body: Any) -> SkuInput:
    obj = _object(body, "sku")
    p = _Problems()
    name = _text(p, obj, "name")
    price_raw = obj.get("price")
    price: str | None = None
    if price_raw is None or isinstance(price_raw, bool) or not isinstance(price_raw, (int, float, str)):
        p.add("price", "required: a decimal number or string")
    else:
        try:
            dec = Decimal(str(price_raw))
            if not dec.is_finite() or dec < 0 or dec.as_tuple().exponent < -4:  # type: ignore[operator]
                raise InvalidOperation
            price = str(dec)
        except InvalidOperation:
            p.add("price", "must be a non-negative decimal with at most 4 decimals")
    currency = obj.get("currency")
    if not isinstance(currency, str) or not CURRENCY_RE.match(currency):
        p.add("currency", "must be an ISO 4217 code such as USD")
    group = _text(p, obj, "group", required=False, max_len=64)
    attrs_raw = obj.get("attributes", {})
    attributes: dict[str, str] = {}
    if not isinstance(attrs_raw, dict) or len(attrs_raw) > 32:
        p.add("attributes", "must be an object of at most 32 entries")
    else:
        for key, value in attrs_raw.items():
            if not key or len(key) > 64 or isinstance(value, bool) or not isinstance(value, (str, int, float)):
                p.add(f"attributes.{key}", "must map a short name to a string or number")
            elif len(str(value)) > MAX_TEXT:
                p.add(f"attributes.{key}", f"longer than {MAX_TEXT} characters")
            else:
                attributes[unicodedata.normalize("NFC", key)] = unicodedata.normalize("NFC", str(value))
    demand = obj.get("demand")
    mean = sigma = None
    if demand is not None:
        if not isinstance(demand, dict):
            p.add("demand", "must be an object {daily_mean, daily_sigma}")
        else:
            mean, sigma = demand.get("daily_mean"), demand.get("daily_sigma", 0)
            if not is_number(mean) or mean < 0:
                p.add("demand.daily_mean", "must be a non-negative number")
            if not is_number(sigma) or sigma < 0:
                p.add("demand.daily_sigma", "must be a non-negative number")
    p.raise_if_any("invalid sku")
    assert name is not None and price is not None
    return SkuInput(name, price, str(currency), group, attributes,
                    float(mean) if mean is not None else None, float(sigma) if sigma is not None else None)


def parse_events(body: Any, max_events: int) -> list[StockEvent]:
    """A feed batch; duplicates inside the batch are tolerated only when identical."""
    obj = _object(body, "batch")
    events = obj.get("events")
    if not isinstance(events, list):
        raise ValidationFailed("invalid batch", [{"field": "events", "message": "must be a list"}])
    if len(events) > max_events:
        raise ValidationFailed(f"batch of {len(events)} events exceeds the limit of {max_events}",
                               [{"field": "events", "message": f"at most {max_events} events per batch"}],
                               status=413, code="batch_too_large")
    p = _Problems()
    out: list[StockEvent] = []
    by_id: dict[str, StockEvent] = {}
    by_seq: dict[tuple[str, int], str] = {}
    for i, raw in enumerate(events):
        if not isinstance(raw, dict):
            p.add("", "must be an object", i)
            continue
        before = len(p.items)
        event_id = raw.get("id")
        if not isinstance(event_id, str) or not 0 < len(event_id) <= 128:
            p.add("id", "required: a string of 1-128 characters", i)
        wh = _id(p, raw, "warehouse", i)
        sku = _id(p, raw, "sku", i)
        delta = _int(p, raw, "delta", lo=-MAX_QTY, index=i)
        seq = _int(p, raw, "seq", lo=1, hi=2**62, index=i)
        if len(p.items) > before:
            continue
        assert wh is not None and sku is not None and delta is not None and seq is not None
        event = StockEvent(str(event_id), wh, sku, delta, seq)
        seen = by_id.get(event.id)
        if seen is not None:
            if seen != event:
                p.add("id", "same id as an earlier event of this batch with different content", i)
            continue  # an identical repeat is a harmless resend
        other = by_seq.get((wh, seq))
        if other is not None:
            p.add("seq", f"seq {seq} of warehouse {wh} already used by event {other} in this batch", i)
            continue
        by_id[event.id] = event
        by_seq[(wh, seq)] = event.id
        out.append(event)
    p.raise_if_any("invalid batch; nothing was applied")
    return out


@dataclass(frozen=True)
class SnapshotInput:
    as_of: float
    levels: dict[str, int]
    seq: int | None  # last feed seq the snapshot includes, if the feed knows it


def parse_snapshot(body: Any, max_levels: int) -> SnapshotInput:
    obj = _object(body, "snapshot")
    p = _Problems()
    as_of = _time(p, obj, "as_of")
    seq = _int(p, obj, "seq", lo=0, hi=2**62, required=False)
    raw_levels = obj.get("levels")
    levels: dict[str, int] = {}
    if not isinstance(raw_levels, list):
        p.add("levels", "must be a list of {sku, on_hand}")
    elif len(raw_levels) > max_levels:
        raise ValidationFailed(f"snapshot of {len(raw_levels)} levels exceeds the limit of {max_levels}",
                               [{"field": "levels", "message": f"at most {max_levels} levels"}],
                               status=413, code="batch_too_large")
    else:
        for i, raw in enumerate(raw_levels):
            if not isinstance(raw, dict):
                p.add("", "must be an object", i)
                continue
            sku = _id(p, raw, "sku", i)
            on_hand = _int(p, raw, "on_hand", lo=0, index=i)
            if sku is not None and sku in levels:
                p.add("sku", "listed twice", i)
            elif sku is not None and on_hand is not None:
                levels[sku] = on_hand
    p.raise_if_any("invalid snapshot; nothing was applied")
    assert as_of is not None
    return SnapshotInput(as_of, levels, seq)


@dataclass(frozen=True)
class OrderInput:
    sku: str
    quantity: int
    region: str | None
    idempotency_key: str
    buyer: str | None


def parse_order(body: Any, max_quantity: int) -> OrderInput:
    obj = _object(body, "order")
    p = _Problems()
    sku = _id(p, obj, "sku")
    quantity = _int(p, obj, "quantity", lo=1, hi=max_quantity)
    region = _text(p, obj, "region", required=False, max_len=32)
    key = _text(p, obj, "idempotency_key", max_len=128)
    buyer = _text(p, obj, "buyer", required=False, max_len=128)
    p.raise_if_any("invalid order")
    assert sku is not None and quantity is not None and key is not None
    return OrderInput(sku, quantity, region, key, buyer)


@dataclass(frozen=True)
class FlashInput:
    sku: str
    cap: int
    per_buyer: int | None
    ends_at: float
    price: str | None


def parse_flash(body: Any, now: float) -> FlashInput:
    obj = _object(body, "flash sale")
    p = _Problems()
    sku = _id(p, obj, "sku")
    cap = _int(p, obj, "cap", lo=1)
    per_buyer = _int(p, obj, "per_buyer", lo=1, required=False)
    ends_at: float | None
    if obj.get("duration_s") is not None:
        duration = obj["duration_s"]
        ends_at = now + float(duration) if is_number(duration) and 0 < duration <= 86400 else None
        if ends_at is None:
            p.add("duration_s", "must be a number of seconds in (0, 86400]")
    else:
        ends_at = _time(p, obj, "ends_at")
        if ends_at is not None and ends_at <= now:
            p.add("ends_at", "must be in the future")
    price = None
    if obj.get("price") is not None:
        try:
            dec = Decimal(str(obj["price"]))
            if isinstance(obj["price"], bool) or not dec.is_finite() or dec < 0:
                raise InvalidOperation
            price = str(dec)
        except InvalidOperation:
            p.add("price", "must be a non-negative decimal")
    p.raise_if_any("invalid flash sale")
    assert sku is not None and cap is not None and ends_at is not None
    return FlashInput(sku, cap, per_buyer, ends_at, price)


@dataclass(frozen=True)
class IncomingInput:
    quantity: int
    eta: float | None


def parse_incoming(body: Any) -> IncomingInput:
    obj = _object(body, "incoming")
    p = _Problems()
    quantity = _int(p, obj, "quantity", lo=0)
    eta = _time(p, obj, "eta", required=bool(quantity))
    p.raise_if_any("invalid incoming stock")
    assert quantity is not None
    return IncomingInput(quantity, eta if quantity else None)
