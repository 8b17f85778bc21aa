"""Calling back into other layers safely: a listener's bug is logged where it happened and never
breaks the caller's own work (a stock write, a room's state change, a cluster event loop)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("shelfcast.listeners")


def emit(listener: Callable[..., Any] | None, *args: Any, what: str) -> None:
    """Call ``listener(*args)`` if there is one; log (with ``what`` happened) instead of raising."""
    if listener is None:
        return
    try:
        listener(*args)
    except Exception:
        log.exception("a listener of %s failed", what)


def emit_all(listeners: Iterable[Callable[..., Any]], *args: Any, what: str) -> None:
    """``emit`` to each of ``listeners`` (a snapshot: a listener may unsubscribe while called)."""
    for listener in tuple(listeners):
        emit(listener, *args, what=what)
