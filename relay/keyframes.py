"""Coalescing of keyframe requests (pure logic).

Viewers joining together, and PLI/FIR storms after a loss burst, must cost one forced keyframe, not
one per request: a keyframe is several times the size of a delta frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


KEYFRAME_MIN_INTERVAL_S = 0.5  # at most two forced keyframes a second per encoder


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
