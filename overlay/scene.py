"""What the on-air overlay shows, as plain values (pure logic).

A scene is rebuilt from stock views whenever anything may have changed, and compared by value: only
a different scene (a new number, colour, or timer second) is rasterised again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from .stock.model import variant_name, variant_of

POSITIONS = ("bottom-left", "bottom-right", "top-right")
STATUSES = ("plenty", "low", "critical", "sold_out", "syncing")
MAX_TILES = 12


class FlashLike(Protocol):
    @property
    def remaining(self) -> int: ...
    @property
    def ends_at(self) -> float: ...
    @property
    def price(self) -> str | None: ...


class SkuLike(Protocol):
    """The fields of ``overlay.stock.service.SkuView`` the overlay uses."""

    @property
    def sku(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def price(self) -> str: ...
    @property
    def currency(self) -> str: ...
    @property
    def attributes(self) -> Mapping[str, str]: ...
    @property
    def sellable(self) -> int | None: ...
    @property
    def status(self) -> str: ...
    @property
    def flash_sale(self) -> FlashLike | None: ...


@dataclass(frozen=True)
class OverlaySettings:
    """Room settings: what appears on air, and where."""

    enabled: bool = True
    featured_sku: str | None = None  # None: the room's first SKU
    badge_skus: tuple[str, ...] | None = None  # None: all of the room's SKUs
    position: str = "bottom-left"
    scale: float = 1.0  # 0.5 .. 1.5 of the default size

    def to_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "featured_sku": self.featured_sku,
            "badge_skus": None if self.badge_skus is None else list(self.badge_skus),
            "position": self.position,
            "scale": self.scale,
        }


@dataclass(frozen=True)
class Card:
    name: str
    price: str  # "$19.99" (the sale price during a flash sale)
    was_price: str | None  # the regular price, struck through during a flash sale
    headline: str  # "Only 87 left", "42 in stock", "Sold out", "Syncing stock..."
    status: str
    timer: str | None  # "mm:ss" to the end of a flash sale


@dataclass(frozen=True)
class Tile:
    label: str
    status: str


@dataclass(frozen=True)
class OverlayScene:
    card: Card | None
    tiles: tuple[Tile, ...] = field(default_factory=tuple)
    position: str = "bottom-left"
    scale: float = 1.0


@dataclass(frozen=True)
class PkBar:
    """The bar across the top of a composed PK picture, as seen from one room (it is on the left)."""

    left_label: str
    right_label: str
    left_score: str
    right_score: str
    timer: str | None
    banner: str | None  # "You win!", "Bo's deals win", "It's a tie"


@dataclass(frozen=True)
class PkScene:
    """A PK battle on air: the bar, and each side's featured product card."""

    bar: PkBar
    left: OverlayScene | None
    right: OverlayScene | None


CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "CNY": "¥", "KRW": "₩", "THB": "฿", "INR": "₹"}


def format_price(amount: str, currency: str) -> str:
    symbol = CURRENCY_SYMBOLS.get(currency.upper())
    return f"{symbol}{amount}" if symbol else f"{amount} {currency}".strip()


def format_timer(seconds: float) -> str:
    whole = max(0, int(seconds + 0.999))  # show 00:01 until the last second is really over
    return f"{whole // 60:02d}:{whole % 60:02d}"


def headline(status: str, sellable: int | None) -> str:
    if status == "syncing" or sellable is None:
        return "Syncing stock..."
    if status == "sold_out" or sellable <= 0:
        return "Sold out"
    if status in ("low", "critical"):
        return f"Only {sellable} left"
    return f"{sellable} in stock"


def tile_label(view: SkuLike) -> str:
    variant = variant_of(view.attributes)
    return variant[:6] if variant else view.name[:6] or view.sku[:6]


def _card(view: SkuLike, now: float) -> Card:
    flash = view.flash_sale
    price = format_price(view.price, view.currency)
    if flash is not None and flash.ends_at > now:
        sellable = None if view.sellable is None else min(view.sellable, flash.remaining)
        status = view.status if sellable is None or sellable > 0 or view.status == "syncing" else "sold_out"
        return Card(
            name=variant_name(view.name, view.attributes),
            price=format_price(flash.price, view.currency) if flash.price else price,
            was_price=price if flash.price else None,
            headline=headline(status, sellable),
            status=status,
            timer=format_timer(flash.ends_at - now),
        )
    return Card(variant_name(view.name, view.attributes), price, None, headline(view.status, view.sellable),
                view.status, None)


def build_scene(views: Sequence[SkuLike], settings: OverlaySettings, now: float) -> OverlayScene | None:
    """The scene for a room's stock ``views`` (in room order), or None when nothing is shown."""
    if not settings.enabled or not views:
        return None
    by_id = {v.sku: v for v in views}
    featured = by_id.get(settings.featured_sku) if settings.featured_sku else views[0]
    if settings.badge_skus is None:
        badge = list(views)
    else:
        badge = [by_id[s] for s in settings.badge_skus if s in by_id]
    tiles = tuple(Tile(tile_label(v), v.status if v.status in STATUSES else "syncing") for v in badge[:MAX_TILES])
    card = _card(featured, now) if featured is not None else None
    if card is None and not tiles:
        return None
    return OverlayScene(card, tiles, settings.position, settings.scale)


def next_change_in(views: Sequence[SkuLike], now: float) -> float | None:
    """Seconds until a timer on screen ticks over by itself (None: nothing counts down)."""
    ends = [v.flash_sale.ends_at for v in views if v.flash_sale is not None and v.flash_sale.ends_at > now]
    if not ends:
        return None
    remaining = min(ends) - now
    return remaining - int(remaining) or 1.0
