"""The ABR policy with tables and a simulated link: fast down, careful up, no flapping."""

from __future__ import annotations

from dataclasses import replace

import pytest

from relay.abr import DEFAULT_LADDER, PAUSED, AbrConfig, Feedback, initial_state, step

CFG = AbrConfig()
NEED = [CFG.need(r) for r in DEFAULT_LADDER]  # 1_798_600, 648_600, 246_100 bits/s


def run(feedbacks: list[Feedback], start_rung: int = 0) -> list[tuple[float, int, str]]:
    """(time, rung, reason) after every feedback."""
    state = initial_state(start_rung, 0.0)
    out = []
    for fb in feedbacks:
        state = step(state, fb, DEFAULT_LADDER, CFG)
        out.append((fb.at, state.rung, state.reason))
    return out


def test_needs() -> None:
    assert [round(n) for n in NEED] == [1_798_600, 648_600, 246_100]


def test_steady_good_link_never_switches() -> None:
    trace = run([Feedback(t, remb_bps=2_600_000, fraction_lost=0.0) for t in range(1, 120)])
    assert {rung for _, rung, _ in trace} == {0}


def test_sudden_drop_goes_straight_to_the_fitting_rung() -> None:
    fbs = [Feedback(t, remb_bps=2_600_000, fraction_lost=0.0) for t in range(1, 10)]
    fbs.append(Feedback(10, remb_bps=400_000, fraction_lost=0.0))  # falling, far below 720p's need
    assert run(fbs)[-1] == (10, 2, "bandwidth")  # 720p -> 180p in one step, skipping 360p


def test_start_estimate_is_not_congestion_but_loss_is() -> None:
    # Receivers start their estimate low: a 300 kbit/s REMB in the first seconds moves nothing.
    assert run([Feedback(1, remb_bps=300_000), Feedback(2, remb_bps=350_000)]) == [(1, 0, "start"), (2, 0, "start")]
    # Heavy loss is believed at once.
    assert run([Feedback(1, fraction_lost=0.5)]) == [(1, 1, "loss")]
    # With a startup grace configured, estimates are ignored during it.
    grace = replace(CFG, startup_grace_s=4.0)
    state = initial_state(0, 0.0)
    for t, remb in ((1, 2_000_000), (2, 300_000)):
        state = step(state, Feedback(t, remb_bps=remb, rtt_s=0.02), DEFAULT_LADDER, grace)
    assert state.rung == 0


@pytest.mark.parametrize(
    "start, estimate, expected",
    [
        (0, 1_700_000, 1),  # just below 720p's need
        (0, 700_000, 1),
        (0, 640_000, 2),
        (1, 300_000, 2),
        (2, 150_000, 2),  # a low estimate alone never pauses video: only loss or a queue do
        (0, 100_000, 2),
    ],
)
def test_down_targets(start: int, estimate: float, expected: int) -> None:
    state = replace(initial_state(start, 0.0), estimate_bps=estimate, remb_falling=True)
    assert step(state, Feedback(10.0), DEFAULT_LADDER, CFG).rung == expected


def test_low_but_rising_estimate_is_not_congestion() -> None:
    # A new viewer's REMB starts near 300 kbit/s and ramps ~8 %/s: no reason to leave 720p.
    fbs = [Feedback(t, remb_bps=300_000 * 1.08**t, fraction_lost=0.0, rtt_s=0.02) for t in range(1, 40)]
    assert {rung for _, rung, _ in run(fbs)} == {0}


def test_queue_building_up_moves_down_one_rung() -> None:
    fbs = [Feedback(t, remb_bps=2_600_000, rtt_s=0.02) for t in range(1, 10)]
    fbs.append(Feedback(10, rtt_s=0.4))
    assert run(fbs)[-1] == (10, 1, "delay")


def test_slow_recovery_one_rung_at_a_time_after_holding() -> None:
    fbs = [Feedback(t, remb_bps=2_600_000) for t in range(1, 10)]
    fbs += [Feedback(t, remb_bps=300_000) for t in range(10, 20)]  # capped
    fbs += [Feedback(t, remb_bps=3_000_000) for t in range(20, 40)]  # released
    switches = [(t, rung, reason) for (t, rung, reason), prev in zip(run(fbs)[1:], run(fbs)) if rung != prev[1]]
    assert switches == [(10, 2, "bandwidth"), (24, 1, "probe_up"), (29, 0, "probe_up")]


def test_lossy_but_fast_link_stays_put() -> None:
    # 3 % loss on a fat link: not enough to go down, too much to probe up.
    fbs = [Feedback(t, remb_bps=5_000_000, fraction_lost=0.03) for t in range(1, 60)]
    assert {rung for _, rung, _ in run(fbs)} == {0}
    assert {rung for _, rung, _ in run(fbs, start_rung=1)} == {1}


def test_noisy_estimates_do_not_flap() -> None:
    noise = [2_100_000, 2_700_000, 2_300_000, 2_900_000, 2_050_000]
    fbs = [Feedback(t, remb_bps=noise[t % len(noise)], fraction_lost=0.005) for t in range(1, 300)]
    assert {rung for _, rung, _ in run(fbs)} == {0}


def test_loss_on_lowest_rung_pauses_video_then_resumes() -> None:
    state = initial_state(2, 0.0)
    state = step(state, Feedback(1, fraction_lost=0.8), DEFAULT_LADDER, CFG)
    assert state.rung == 2  # too soon after joining to judge the lowest rung (reports lag)
    state = step(state, Feedback(10, remb_bps=90_000, fraction_lost=0.8), DEFAULT_LADDER, CFG)
    assert (state.rung, state.reason) == (PAUSED, "loss")
    # No video flows while paused, so REMB stays stale and low: resuming must not wait for it.
    trace = []
    for t in range(11, 20):
        state = step(state, Feedback(t, fraction_lost=0.0), DEFAULT_LADDER, CFG)
        trace.append(state.rung)
    assert trace == [PAUSED] * 2 + [2] * 7  # loss of the old rate is forgotten; clean for 2 s: resume
    assert state.reason == "resume"


def test_queue_with_starved_estimate_on_lowest_rung_pauses() -> None:
    state = replace(initial_state(2, 0.0), estimate_bps=100_000, min_rtt_s=0.02)
    state = step(state, Feedback(10, rtt_s=0.5), DEFAULT_LADDER, CFG)
    assert (state.rung, state.reason) == (PAUSED, "bandwidth")


def simulate(capacity: float, seconds: float, start_rung: int = 0, dt: float = 0.5) -> list[tuple[float, int]]:
    """A bottleneck of ``capacity`` seen through a receiver like Chrome's or aiortc's: REMB starts at
    300 kbit/s, ramps 8 %/s up to 1.5x what arrives, and backs off to 0.85x on overuse; overload also
    shows as loss and a queue (RTT)."""
    state = initial_state(start_rung, 0.0)
    trace = []
    t, remb = 0.0, 300_000.0
    while t < seconds:
        t += dt
        sent = 60_000.0 if state.rung == PAUSED else NEED[state.rung]
        if sent > capacity:
            remb = 0.85 * min(remb, capacity)
            lost, rtt = (sent - capacity) / sent, 0.02 + min(1.0, (sent - capacity) / capacity)
        else:
            remb = min(remb * 1.08**dt, 1.5 * sent + 10_000)
            lost, rtt = 0.0, 0.02
        state = step(state, Feedback(t, remb_bps=remb, fraction_lost=lost, rtt_s=rtt), DEFAULT_LADDER, CFG)
        trace.append((t, state.rung))
    return trace


def switch_times(trace: list[tuple[float, int]]) -> list[float]:
    return [t for (t, rung), (_, prev) in zip(trace[1:], trace) if rung != prev]


def test_capped_viewer_settles_with_growing_probe_intervals() -> None:
    trace = simulate(capacity=400_000, seconds=900)
    assert trace[2][1] == 2  # down to 180p within 1.5 s
    times = switch_times(trace)
    probes = [t for t in times if dict(trace)[t] == 1]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= 120  # each failed probe waits longer, up to the cap
    # Steady state (after the first 4 minutes): at most one switch a minute.
    late = [t for t in times if t > 240]
    assert len(late) / ((900 - 240) / 60) <= 1.0
    assert all(rung in (1, 2) for t, rung in trace if t > 10)  # never paused, never the top rung


def test_unconstrained_viewer_stays_on_top() -> None:
    assert {rung for _, rung in simulate(capacity=10_000_000, seconds=300)} == {0}


def test_very_thin_link_pauses_video_instead_of_freezing_everything() -> None:
    trace = simulate(capacity=120_000, seconds=60, start_rung=2)
    assert trace[-1][1] == PAUSED


def test_overshooting_probe_goes_back_at_once() -> None:
    state = replace(initial_state(2, 0.0), estimate_bps=380_000, sent_bps=250_000)
    for t in range(10, 15):  # clean and with headroom: probe up after the hold
        state = step(state, Feedback(t, remb_bps=380_000, fraction_lost=0.0, rtt_s=0.02), DEFAULT_LADDER, CFG)
    assert (state.rung, state.reason) == (1, "probe_up")
    state = step(state, Feedback(14.3, remb_bps=390_000), DEFAULT_LADDER, CFG)
    state = step(state, Feedback(14.6, remb_bps=240_000), DEFAULT_LADDER, CFG)  # REMB falls from its peak
    assert (state.rung, state.reason, state.probe_wait_s) == (2, "probe_failed", CFG.up_hold_s)


def test_repeated_pauses_back_off() -> None:
    state = initial_state(2, 0.0)
    pauses = []
    t = 10.0
    while t < 120:
        lost = 0.9 if state.rung == 2 else 0.0  # video cannot get through at all
        before = state.rung
        state = step(state, Feedback(t, fraction_lost=lost), DEFAULT_LADDER, CFG)
        if state.rung == PAUSED and before != PAUSED:
            pauses.append(t)
        t += 0.5
    gaps = [b - a for a, b in zip(pauses, pauses[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0] * 4
