"""Per-client rate limits on the expensive or abusable requests: joins (WHIP/WHEP) and orders.

A token bucket per client address and action. The bucket logic is pure (the clock is passed in) so
it is tested with exact values; the request-side helper turns a refusal into 429 + Retry-After
before any body is read or any peer connection exists, so a flood costs almost nothing and viewers
already watching never notice it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from aiohttp import web

from .config import RateLimit
from .errors import ApiError
from .proxy import client_address


class RateLimiter:
    """Token buckets keyed by client. ``acquire`` answers 0.0 (allowed, one token taken) or the
    seconds until the next token (refused, nothing taken)."""

    def __init__(self, limit: RateLimit, max_clients: int = 50_000) -> None:
        self.limit = limit
        self._rate = limit.per_minute / 60.0
        self._max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.limit.burst), now))
        return min(float(self.limit.burst), tokens + (now - at) * self._rate)

    def acquire(self, client: str, now: float) -> float:
        if not self.limit.enabled:
            return 0.0
        tokens = self._tokens(client, now)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self._rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > self._max_clients:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        """A refilled bucket is the same as no bucket: dropping those bounds memory under a flood
        of distinct addresses without forgetting anyone who is actually limited."""
        full = float(self.limit.burst)
        for client in [c for c in self._buckets if self._tokens(c, now) >= full]:
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class Limiters:
    join: RateLimiter
    order: RateLimiter

    @classmethod
    def from_config(cls, join: RateLimit, order: RateLimit) -> "Limiters":
        return cls(RateLimiter(join), RateLimiter(order))


def enforce(limiter: RateLimiter, request: web.Request, what: str) -> None:
    """Refuse with 429 and a whole-second Retry-After when this client is over its limit (keyed by
    the real client behind a trusted proxy: see signaling.proxy)."""
    wait_s = limiter.acquire(client_address(request), time.monotonic())
    if wait_s > 0:
        retry_after = max(1, math.ceil(wait_s))
        raise ApiError(
            429,
            "rate_limited",
            f"too many {what} from your address; try again in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
