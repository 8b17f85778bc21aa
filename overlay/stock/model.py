"""Value types of the stock domain: catalog, levels, orders, flash sales, the room view.

Plain dataclasses with no I/O so the ledger, the store and the API can share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Protocol

Status = Literal["plenty", "low", "critical", "sold_out", "syncing"]
STATUSES: tuple[Status, ...] = ("plenty", "low", "critical", "sold_out", "syncing")

OrderStatus = Literal["reserved", "confirmed", "expired", "rejected", "failed"]


class RoomView(Protocol):
    """What the stock side needs to know about a room (the room registry owns rooms)."""

    @property
    def id(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def sku_ids(self) -> tuple[str, ...]: ...
    @property
    def ends_at(self) -> float | None: ...


@dataclass(frozen=True)
class RoomInfo:
    """A concrete RoomView (tests, CLI, or a registry that has nothing better)."""

    id: str
    region: str
    sku_ids: tuple[str, ...]
    ends_at: float | None = None


@dataclass(frozen=True)
class Sku:
    id: str
    name: str
    price: str  # decimal as text: money is never a float
    currency: str
    group: str
    attributes: dict[str, str] = field(default_factory=dict)
    daily_mean: float | None = None  # baseline (non-show) demand, units/day
    daily_sigma: float | None = None


@dataclass(frozen=True)
class Warehouse:
    id: str
    name: str
    regions: tuple[str, ...]
    lead_time_days: float | None = None


@dataclass
class Level:
    """Stock of one SKU in one warehouse."""

    on_hand: int = 0
    reserved: int = 0
    incoming_qty: int = 0
    incoming_eta: float | None = None
    anomaly: bool = False  # unexplained drop to zero, not yet confirmed

    @property
    def available(self) -> int:
        return max(0, self.on_hand - self.reserved)


@dataclass
class FeedState:
    """Freshness and sequence tracking of one warehouse's feed."""

    last_seq: int = 0
    missing: set[int] = field(default_factory=set)  # seqs skipped over; numbers unsure until filled
    last_update: float | None = None
    snapshot_as_of: float | None = None
    snapshot_seq: int = 0  # feed seqs at or below this are included in the last snapshot


@dataclass(frozen=True)
class StockEvent:
    id: str
    warehouse: str
    sku: str
    delta: int
    seq: int


@dataclass(frozen=True)
class FlashSale:
    id: str
    room_id: str
    sku: str
    cap: int
    per_buyer: int | None
    ends_at: float
    price: str | None
    started_at: float
    stopped_at: float | None = None

    def active(self, now: float) -> bool:
        return self.stopped_at is None and now < self.ends_at


@dataclass
class Order:
    id: str
    room_id: str
    idempotency_key: str
    sku: str
    quantity: int
    region: str
    buyer: str | None
    status: OrderStatus
    created_at: float
    allocations: tuple[tuple[str, int], ...] = ()  # (warehouse, units)
    expires_at: float | None = None
    confirmed_at: float | None = None
    flash_id: str | None = None
    reason: str | None = None  # why rejected / failed

    def same_request(self, sku: str, quantity: int, region: str, buyer: str | None) -> bool:
        return (self.sku, self.quantity, self.region, self.buyer) == (sku, quantity, region, buyer)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "room": self.room_id,
            "idempotency_key": self.idempotency_key,
            "sku": self.sku,
            "quantity": self.quantity,
            "region": self.region,
            "buyer": self.buyer,
            "status": self.status,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "confirmed_at": self.confirmed_at,
            "flash_sale": self.flash_id,
            "allocations": [{"warehouse": w, "quantity": q} for w, q in self.allocations],
            **({"reason": self.reason} if self.reason else {}),
        }


VARIANT_KEYS = ("size", "colour", "color", "variant", "style")


def variant_of(attributes: Mapping[str, str]) -> str | None:
    """What tells a product's variants apart (its size, colour...), None for a product with one."""
    return next((str(attributes[k]) for k in VARIANT_KEYS if attributes.get(k)), None)


def variant_name(name: str, attributes: Mapping[str, str]) -> str:
    """The product with its variant, as the card and the host's alerts name it ("Hoodie · M"):
    "Only 20 left" must say of which size, and a pivot must not name the same product twice."""
    variant = variant_of(attributes)
    return f"{name} · {variant}" if variant else name
