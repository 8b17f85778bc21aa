"""The one error base of the project: a refusal meant for the caller.

Every layer raises its own subclass (a room that is full, a ledger that will not oversell, an offer
that cannot be answered); each carries the HTTP status, machine-readable code and message of the JSON
error contract, and signaling renders them all in one place (``signaling.errors``). It lives here, in
the lowest layer, so that relay and the stock domain need nothing from the layers above them.
"""

from __future__ import annotations

from typing import Any


class ShelfcastError(Exception):
    """``status``/``code``/``message`` follow the contract ``{"error": {"code", "message", "details"?}}``;
    ``headers`` are what the answer must carry besides (``Retry-After`` on a 503 or a 429)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}
