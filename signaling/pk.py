"""PK battles between two show rooms (pure logic: values and a ``now`` in, values out).

A round goes invited -> live -> result -> over. While live (and during the few seconds the result
is shown) both rooms' viewers see one composed picture; each room sees itself on the left. Scores
are what each room sold during the round (units or revenue), from totals sampled at the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal

from overlay.scene import PkBar

RESULT_S = 5.0  # the winner stays on screen this long
INVITE_TTL_S = 60.0
DURATIONS_S = (60.0, 180.0, 300.0)
METRICS = ("units", "revenue")


@dataclass(frozen=True)
class PkRound:
    id: str
    inviter: str
    invitee: str
    duration_s: float
    metric: str
    invited_at: float
    state: str = "invited"  # invited | live | result | over
    started_at: float | None = None
    baseline: dict[str, Decimal] = field(default_factory=dict)
    scores: dict[str, Decimal] = field(default_factory=dict)
    winner: str | None = None  # room id, or "tie"
    reason: str = ""  # why it ended: "time", "host_left", "cancelled", "declined", "expired"
    over_at: float | None = None

    @property
    def rooms(self) -> tuple[str, str]:
        return (self.inviter, self.invitee)

    def other(self, room: str) -> str:
        return self.invitee if room == self.inviter else self.inviter

    @property
    def ends_at(self) -> float | None:
        return None if self.started_at is None else self.started_at + self.duration_s

    def accept(self, now: float, totals: dict[str, Decimal]) -> "PkRound":
        if self.state != "invited":
            raise ValueError(f"round is {self.state}")
        if now - self.invited_at > INVITE_TTL_S:
            return replace(self, state="over", reason="expired", over_at=now)
        return replace(
            self,
            state="live",
            started_at=now,
            baseline={r: totals.get(r, Decimal(0)) for r in self.rooms},
            scores={r: Decimal(0) for r in self.rooms},
        )

    def decline(self, now: float) -> "PkRound":
        return replace(self, state="over", reason="declined", over_at=now)

    def update(self, now: float, totals: dict[str, Decimal] | None = None) -> "PkRound":
        """New sales totals and/or the passing of time."""
        state = self
        if state.state == "invited" and now - state.invited_at > INVITE_TTL_S:
            return replace(state, state="over", reason="expired", over_at=now)
        if state.state == "live" and totals is not None:
            scores = {r: max(Decimal(0), totals.get(r, Decimal(0)) - state.baseline.get(r, Decimal(0))) for r in state.rooms}
            state = replace(state, scores=scores)
        if state.state == "live" and state.ends_at is not None and now >= state.ends_at:
            a, b = (state.scores.get(r, Decimal(0)) for r in state.rooms)
            winner = state.inviter if a > b else state.invitee if b > a else "tie"
            state = replace(state, state="result", winner=winner, reason="time")
        if state.state == "result" and state.ends_at is not None and now >= state.ends_at + RESULT_S:
            state = replace(state, state="over", over_at=now)
        return state

    def end(self, now: float, reason: str) -> "PkRound":
        """A host left or someone cancelled: both rooms revert at once, no winner."""
        if self.state == "over":
            return self
        return replace(self, state="over", reason=reason, over_at=now)

    @property
    def linked(self) -> bool:
        """Whether the two rooms show the composed picture right now."""
        return self.state in ("live", "result")


def format_score(value: Decimal, metric: str) -> str:
    return f"{value:.2f}" if metric == "revenue" else str(int(value))


def bar_for(pk: PkRound, room: str, titles: dict[str, str], now: float) -> PkBar | None:
    if not pk.linked:
        return None
    other = pk.other(room)
    timer = None
    banner = None
    if pk.state == "live" and pk.ends_at is not None:
        left = max(0, int(pk.ends_at - now + 0.999))
        timer = f"{left // 60:02d}:{left % 60:02d}"
    elif pk.state == "result":
        banner = "It's a tie" if pk.winner == "tie" else ("You win!" if pk.winner == room else f"{titles.get(other, 'They')} win")
    return PkBar(
        left_label=titles.get(room, room)[:24],
        right_label=titles.get(other, other)[:24],
        left_score=format_score(pk.scores.get(room, Decimal(0)), pk.metric),
        right_score=format_score(pk.scores.get(other, Decimal(0)), pk.metric),
        timer=timer,
        banner=banner,
    )
