"""RTT from any recent sender report, and repeated retransmissions (relay/rtcpfeedback.py), with exact values."""

from __future__ import annotations

import pytest

from relay.rtcpfeedback import NackRepeats, SenderReports


def test_rtt_answers_any_recent_sender_report_not_only_the_latest() -> None:
    srs = SenderReports(keep=3)
    for i, lsr in enumerate((1000, 2000, 3000, 4000)):
        srs.note(lsr, 10.0 + i)  # one SR a second
    srs.note(4000, 99.0)  # the same SR seen again changes nothing
    # A report answering the SR sent at 12.0, which waited 0.25 s at the receiver, arriving at 13.5:
    # the link held it ~1.25 s (a queue), although two newer SRs have gone out since.
    assert srs.rtt(3000, dlsr=int(0.25 * 65536), now=13.5) == pytest.approx(1.25)
    assert srs.rtt(4000, dlsr=65536 // 2, now=13.6) == pytest.approx(0.1)
    assert srs.rtt(1000, dlsr=100, now=14.0) is None  # forgotten (keep=3)
    assert srs.rtt(0, dlsr=100, now=14.0) is None  # the receiver has seen no SR yet
    assert srs.rtt(3000, dlsr=0, now=14.0) is None
    assert srs.rtt(4000, dlsr=int(5 * 65536), now=13.5) == 0.0  # clock skew never makes it negative


def test_nack_repeats_until_a_later_nack_says_what_is_missing() -> None:
    rep = NackRepeats(repeats=2, min_interval_s=0.05)
    rep.on_nack(0.0, [10, 11], rtt_s=0.5)  # retransmitted at once; copies due 1.5 RTT later
    assert rep.next_due() == 0.75
    assert rep.due(0.7, rtt_s=0.5) == []
    assert rep.due(0.75, rtt_s=0.5) == [10, 11]
    assert rep.next_due() == 2.25  # the second copy twice as far
    # A new NACK lists 11 (still missing) and 20, not 10 (it arrived): 10 is forgotten, 11 starts over.
    rep.on_nack(1.0, [11, 20], rtt_s=0.5)
    assert len(rep) == 2
    assert rep.due(1.75, rtt_s=0.5) == [11, 20]
    assert rep.due(3.2, rtt_s=0.5) == []
    assert rep.due(3.25, rtt_s=0.5) == [11, 20]  # last copies
    assert rep.due(10.0, rtt_s=0.5) == [] and rep.next_due() is None


@pytest.mark.parametrize("rtt, interval", [(None, 0.15), (0.0, 0.05), (0.02, 0.05), (0.4, 0.6)])
def test_repeat_interval_follows_the_rtt(rtt: float | None, interval: float) -> None:
    assert NackRepeats().interval(rtt) == pytest.approx(interval)


def test_pending_repeats_are_bounded() -> None:
    rep = NackRepeats(max_pending=4)
    rep.on_nack(0.0, range(10), rtt_s=0.1)
    assert len(rep) == 4
    assert rep.due(1.0, rtt_s=0.1) == [6, 7, 8, 9]  # the newest kept
