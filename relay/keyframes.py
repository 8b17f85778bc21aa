"""Keyframe requests (pure logic): coalesced on the sending side, repeated on the receiving side.

Viewers joining together, and PLI/FIR storms after a loss burst, must cost one forced keyframe, not
one per request: a keyframe is several times the size of a delta frame. A receiver that cannot
decode until the next keyframe must not rely on one request reaching the sender.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable


KEYFRAME_MIN_INTERVAL_S = 0.5  # at most two forced keyframes a second per encoder
# A receiver waiting for a keyframe asks again this often. A request is one RTCP packet that the
# network (or a busy host) may lose, and a browser host sends a keyframe only when asked: one lost
# PLI would otherwise freeze the room until the host's encoder happens to send one.
KEYFRAME_RETRY_S = 1.0


@dataclass
class KeyframeRequests:
    min_interval_s: float = KEYFRAME_MIN_INTERVAL_S
    pending: bool = False
    last_keyframe_at: float = -math.inf
    forced_count: int = 0

    def request(self) -> None:
        self.pending = True

    def should_force(self, now: float) -> bool:
        """Called once per frame about to be encoded: force a keyframe now?"""
        if self.pending and now - self.last_keyframe_at >= self.min_interval_s:
            self.pending = False
            self.last_keyframe_at = now
            self.forced_count += 1
            return True
        return False

    def saw_keyframe(self, now: float) -> None:
        """The encoder produced a keyframe on its own (first frame, new size, periodic)."""
        self.last_keyframe_at = now
        self.pending = False


@dataclass
class KeyframeWait:
    """A receiver that drops frames until the next keyframe, asking the sender again (``request``)
    every ``retry_s`` while frames keep coming and none is a keyframe. Pure: the clock is given."""

    request: Callable[[], None]
    retry_s: float = KEYFRAME_RETRY_S
    clock: Callable[[], float] = field(default=time.monotonic)
    waiting: bool = False
    retries: int = 0
    _asked_at: float = -math.inf

    def start(self) -> None:
        """Frames until the next keyframe are broken; the caller has just asked for one."""
        self.waiting = True
        self._asked_at = self.clock()

    def admit(self, keyframe: bool) -> bool:
        """Called for each arriving frame: may it pass?"""
        if not self.waiting:
            return True
        if keyframe:
            self.waiting = False
            return True
        now = self.clock()
        if now - self._asked_at >= self.retry_s:
            self._asked_at = now
            self.retries += 1
            self.request()
        return False
