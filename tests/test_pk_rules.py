"""PK round rules (pure): accept, scores from sales since the start, winner, early ends."""

from __future__ import annotations

from decimal import Decimal

import pytest

from overlay.scene import PkBar
from signaling.pk import RESULT_S, PkRound, bar_for

D = Decimal
ROUND = PkRound("pk1", inviter="A", invitee="B", duration_s=60.0, metric="units", invited_at=0.0)
TITLES = {"A": "Anna's shop", "B": "Bo's deals"}


def test_full_round_with_winner() -> None:
    live = ROUND.accept(now=5.0, totals={"A": D(10), "B": D(3)})  # earlier sales do not count
    assert (live.state, live.scores) == ("live", {"A": D(0), "B": D(0)})
    live = live.update(20.0, {"A": D(12), "B": D(7)})
    assert live.scores == {"A": D(2), "B": D(4)}
    assert bar_for(live, "A", TITLES, 20.0) == PkBar("Anna's shop", "Bo's deals", "2", "4", "00:45", None)
    assert bar_for(live, "B", TITLES, 20.0) == PkBar("Bo's deals", "Anna's shop", "4", "2", "00:45", None)
    done = live.update(65.0)
    assert (done.state, done.winner, done.reason) == ("result", "B", "time")
    assert bar_for(done, "B", TITLES, 65.0).banner == "You win!"  # type: ignore[union-attr]
    assert bar_for(done, "A", TITLES, 65.0).banner == "Bo's deals win"  # type: ignore[union-attr]
    assert done.linked
    over = done.update(65.0 + RESULT_S)
    assert over.state == "over" and not over.linked and bar_for(over, "A", TITLES, 71.0) is None


@pytest.mark.parametrize(
    "step, expected_state, expected_reason",
    [
        (lambda r: r.accept(70.0, {}), "over", "expired"),  # answered after the invitation lapsed
        (lambda r: r.decline(3.0), "over", "declined"),
        (lambda r: r.accept(3.0, {}).end(10.0, "host_left"), "over", "host_left"),
        (lambda r: r.update(61.0), "over", "expired"),
    ],
)
def test_rounds_that_end_early(step, expected_state: str, expected_reason: str) -> None:  # type: ignore[no-untyped-def]
    ended = step(ROUND)
    assert (ended.state, ended.reason, ended.winner) == (expected_state, expected_reason, None)
    assert not ended.linked


def test_tie_and_revenue_scores() -> None:
    revenue = PkRound("pk2", "A", "B", 60.0, "revenue", 0.0).accept(1.0, {"A": D("100.00"), "B": D("0")})
    revenue = revenue.update(30.0, {"A": D("139.00"), "B": D("39.00")})
    assert bar_for(revenue, "A", TITLES, 30.0).left_score == "39.00"  # type: ignore[union-attr]
    tie = revenue.update(61.0)
    assert tie.winner == "tie" and bar_for(tie, "A", TITLES, 61.0).banner == "It's a tie"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        tie.accept(62.0, {})
