"""Every typed application key of the server, in one place (feature modules read each other's
state through these, never by importing each other)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from relay.load import LoadMonitor

from .auth import TokenSigner
from .config import Config
from .events import EventHub

if TYPE_CHECKING:
    from overlay.live import RoomOverlay
    from overlay.stock.service import StockService

    from .invitations import Invitation
    from .limits import Limiters
    from .metrics import Telemetry
    from .pk_api import PkBattles
    from .placement import Placement
    from .rooms import RoomRegistry

CONFIG = web.AppKey("config", Config)
LOAD = web.AppKey("load", LoadMonitor)  # is this process short of CPU (relay.load)
EVENTS = web.AppKey("events", EventHub)
SIGNER = web.AppKey("signer", TokenSigner)
ROOMS: web.AppKey["RoomRegistry"] = web.AppKey("rooms")
TELEMETRY: web.AppKey["Telemetry"] = web.AppKey("telemetry")
LIMITERS: web.AppKey["Limiters"] = web.AppKey("limiters")
PLACEMENT: web.AppKey["Placement"] = web.AppKey("placement")  # only with --redis (several processes)
STOCK: web.AppKey["StockService"] = web.AppKey("stock")
OVERLAYS: web.AppKey["dict[str, RoomOverlay]"] = web.AppKey("overlays")  # room id -> its live overlay
INVITATIONS: web.AppKey["dict[str, Invitation]"] = web.AppKey("invitations")
PK: web.AppKey["PkBattles"] = web.AppKey("pk")
