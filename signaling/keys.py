"""Typed application keys shared by the signaling modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .auth import TokenSigner
from .config import Config
from .events import EventHub

if TYPE_CHECKING:
    from .limits import Limiters
    from .metrics import Telemetry
    from .placement import Placement
    from .rooms import RoomRegistry

CONFIG = web.AppKey("config", Config)
EVENTS = web.AppKey("events", EventHub)
SIGNER = web.AppKey("signer", TokenSigner)
ROOMS: web.AppKey["RoomRegistry"] = web.AppKey("rooms")
TELEMETRY: web.AppKey["Telemetry"] = web.AppKey("telemetry")
LIMITERS: web.AppKey["Limiters"] = web.AppKey("limiters")
PLACEMENT: web.AppKey["Placement"] = web.AppKey("placement")  # only with --redis (several processes)
