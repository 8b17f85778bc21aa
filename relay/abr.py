"""Adaptive bitrate: which rung of the room's encoder ladder a viewer should get (pure logic).

``step(state, feedback, ladder, config)`` takes the viewer's latest receiver feedback (REMB estimate,
RTCP fraction lost, RTT) and returns the next state, whose ``rung`` is the decision. No asyncio, no
aiortc: tested with tables.

Why it looks like this:
- Down fast, but only on evidence of congestion: loss, a queue building up (RTT well above the
  lowest seen), or a REMB estimate that is falling and already below what the rung needs. A low but
  rising estimate is not congestion: receivers start REMB low and ramp it up by ~8 %/s, capped at
  1.5x what they receive, so "estimate < need" alone would drop every new viewer to the bottom.
  With a usable estimate the move skips straight to the rung that fits; a short guard keeps one
  congestion episode from being acted on twice.
- Up slow and careful: since REMB never exceeds ~1.5x what it receives, it cannot prove a higher rung
  fits. Going up is therefore a probe, tried only after the link has been clean for a while; a probe
  that fails (we come back down soon after) doubles the wait before the next one, so a capped
  viewer settles instead of flapping. A probe that holds resets it.
- Below the lowest rung (heavy loss, or a queue with a starved estimate there) video pauses while
  audio goes on, and resumes by itself with a probe once loss and queueing are gone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

PAUSED = -1


@dataclass(frozen=True)
class Rung:
    name: str
    width: int
    height: int
    bitrate: int  # video bits/s the rung's encoder targets


AUDIO_BITRATE = 64_000  # the room's one Opus encoder; every rung's need counts it too

DEFAULT_LADDER = (
    Rung("720p", 1280, 720, 1_500_000),
    Rung("360p", 640, 360, 500_000),
    Rung("180p", 320, 180, 150_000),
)


@dataclass(frozen=True)
class AbrConfig:
    audio_bps: int = AUDIO_BITRATE
    overhead: float = 1.15  # RTP/SRTP headers on top of the encoder's target
    # Seconds during which only loss counts. Falling-REMB and queue signals are real from the first report
    # (a merely low, rising start estimate is never acted on), so none is needed by default.
    startup_grace_s: float = 0.0
    down_guard_s: float = 1.0  # after a switch, give the new rate time to show before moving down again
    pause_guard_s: float = 2.5  # receiver reports lag ~1 s: judge the lowest rung only after this long
    loss_down: float = 0.10  # smoothed fraction lost that forces a rung down
    loss_pause: float = 0.30  # ... and, on the lowest rung, pauses video
    loss_ok: float = 0.02  # at most this much loss to consider going up
    up_headroom: float = 1.3  # estimate must exceed the current rung's need by this factor
    up_hold_s: float = 4.0  # ... continuously, for this long, before a probe up
    probe_window_s: float = 6.0  # a down-switch this soon after a probe means the probe failed
    queue_rtt_s: float = 0.10  # (smoothed) RTT this far above the lowest seen: a queue is building
    remb_fall: float = 0.95  # a REMB below this share of the previous one is falling
    probe_fall: float = 0.85  # after going up, REMB this far below its peak means the probe overshot
    probe_guard_s: float = 0.5  # ... and we may go back down this soon
    probe_backoff_max_s: float = 128.0  # a capped viewer then probes about every 2 min: <= 1 switch/min
    pause_factor: float = 0.8  # pause when the estimate is below this share of the lowest rung's need
    resume_hold_s: float = 2.0

    def need(self, rung: Rung) -> float:
        return (rung.bitrate + self.audio_bps) * self.overhead


@dataclass(frozen=True)
class Feedback:
    at: float
    remb_bps: float | None = None
    fraction_lost: float | None = None  # 0..1, from an RTCP receiver report
    rtt_s: float | None = None
    sent_bps: float | None = None  # what we actually sent this viewer lately (encoders undershoot)
    server_busy: bool = False  # this server is short of CPU: late packets measure it, not the link


@dataclass(frozen=True)
class AbrState:
    rung: int
    started_at: float
    estimate_bps: float | None = None
    remb_falling: bool = False
    loss: float = 0.0
    rtt_s: float | None = None
    min_rtt_s: float | None = None
    sent_bps: float | None = None
    peak_since_switch: float | None = None  # highest raw REMB since the last switch
    last_switch_at: float = -math.inf
    headroom_since: float | None = None
    resume_since: float | None = None
    probe_at: float | None = None  # when the last up-switch (probe) happened
    probe_wait_s: float = 0.0  # extra wait before the next probe (backoff after failed probes)
    switches: int = 0
    reason: str = "start"


def initial_state(rung: int, now: float) -> AbrState:
    return AbrState(rung=rung, started_at=now)


def _smooth(state: AbrState, fb: Feedback, cfg: AbrConfig) -> AbrState:
    estimate, falling, peak = state.estimate_bps, state.remb_falling, state.peak_since_switch
    if fb.remb_bps is not None:
        falling = estimate is not None and fb.remb_bps < estimate * cfg.remb_fall
        peak = fb.remb_bps if peak is None else max(peak, fb.remb_bps)
        # Believe a drop at once; let rises in slowly so one optimistic report does not move us.
        estimate = fb.remb_bps if estimate is None or fb.remb_bps < estimate else 0.7 * estimate + 0.3 * fb.remb_bps
    loss = state.loss if fb.fraction_lost is None else 0.5 * state.loss + 0.5 * fb.fraction_lost
    rtt, min_rtt = state.rtt_s, state.min_rtt_s
    if fb.rtt_s is not None:
        rtt = fb.rtt_s
        min_rtt = fb.rtt_s if min_rtt is None else min(min_rtt, fb.rtt_s)
    sent = state.sent_bps if fb.sent_bps is None else fb.sent_bps
    return replace(
        state,
        estimate_bps=estimate,
        remb_falling=falling,
        peak_since_switch=peak,
        loss=loss,
        rtt_s=rtt,
        min_rtt_s=min_rtt,
        sent_bps=sent,
    )


def _queueing(state: AbrState, cfg: AbrConfig) -> bool:
    return state.rtt_s is not None and state.min_rtt_s is not None and state.rtt_s - state.min_rtt_s > cfg.queue_rtt_s


def _switch(state: AbrState, rung: int, now: float, reason: str, cfg: AbrConfig) -> AbrState:
    going_up = state.rung == PAUSED or (rung != PAUSED and rung < state.rung)
    probe_at, probe_wait = state.probe_at, state.probe_wait_s
    if going_up:
        probe_at = now
    elif probe_at is not None and now - probe_at <= cfg.probe_window_s:
        # Came back down right after going up: the probe failed, wait longer before the next one.
        probe_wait = min(cfg.probe_backoff_max_s, max(cfg.up_hold_s, probe_wait * 2))
        probe_at = None
    return replace(
        state,
        rung=rung,
        last_switch_at=now,
        peak_since_switch=None,
        # Loss measured at the old rate says nothing about the new one (and would cascade downs).
        loss=0.0 if not going_up else state.loss,
        headroom_since=None,
        resume_since=None,
        probe_at=probe_at,
        probe_wait_s=probe_wait,
        switches=state.switches + 1,
        reason=reason,
    )


def _fitting_rung(estimate: float, ladder: tuple[Rung, ...], cfg: AbrConfig) -> int:
    """The highest rung whose need fits the estimate (the lowest if none does)."""
    for index, rung in enumerate(ladder):
        if cfg.need(rung) <= estimate:
            return index
    return len(ladder) - 1


def _down_target(state: AbrState, estimate: float | None, ladder: tuple[Rung, ...], cfg: AbrConfig) -> int:
    """At least one rung down; further if the estimate says so."""
    one_down = min(state.rung + 1, len(ladder) - 1)
    if estimate is None:
        return one_down
    return max(one_down, _fitting_rung(estimate, ladder, cfg))


def step(state: AbrState, fb: Feedback, ladder: tuple[Rung, ...], cfg: AbrConfig = AbrConfig()) -> AbrState:
    """Fold in one feedback (or a bare tick with only ``at``) and decide the rung."""
    if fb.server_busy:
        # Everything measured now (delay, falling estimates, even loss from our own late sends) is
        # about this server: hold the rung, learn nothing, and do not probe up.
        return replace(state, headroom_since=None, resume_since=None, reason="server_busy")
    now = fb.at
    state = _smooth(state, fb, cfg)
    lowest = len(ladder) - 1
    in_grace = now - state.started_at < cfg.startup_grace_s
    estimate = None if in_grace else state.estimate_bps

    # A probe that held for its whole window succeeded: the next one needs no extra wait.
    if state.probe_at is not None and now - state.probe_at > cfg.probe_window_s:
        state = replace(state, probe_at=None, probe_wait_s=0.0)

    if state.rung == PAUSED:
        # Video sends nothing while paused, so the receiver's estimate cannot recover by itself:
        # resuming is a probe on the lowest rung once loss and queueing have gone.
        clean = state.loss < cfg.loss_ok and not _queueing(state, cfg)
        if not clean:
            return replace(state, resume_since=None)
        since = state.resume_since if state.resume_since is not None else now
        if now - since >= cfg.resume_hold_s + state.probe_wait_s:
            return _switch(state, lowest, now, "resume", cfg)
        return replace(state, resume_since=since)

    since_switch = now - state.last_switch_at
    can_move_down = since_switch >= cfg.down_guard_s
    # A probe that overshoots shows at once as REMB falling from its peak: go back before a queue
    # and losses build up (each costs the viewer a stall).
    probing = state.probe_at is not None and now - state.probe_at <= cfg.probe_window_s
    overshoot = (
        probing
        and since_switch >= cfg.probe_guard_s
        and state.peak_since_switch is not None
        and state.estimate_bps is not None
        and state.estimate_bps < state.peak_since_switch * cfg.probe_fall
    )
    if overshoot and state.rung < lowest:
        return _switch(state, state.rung + 1, now, "probe_failed", cfg)
    on_rung_for = now - max(state.last_switch_at, state.started_at)
    if on_rung_for >= cfg.pause_guard_s and state.rung == lowest:
        starved = (
            _queueing(state, cfg)
            and estimate is not None
            and estimate < cfg.need(ladder[lowest]) * cfg.pause_factor
        )
        if state.loss >= cfg.loss_pause or starved:
            return _switch(state, PAUSED, now, "loss" if state.loss >= cfg.loss_pause else "bandwidth", cfg)
    if can_move_down and state.loss >= cfg.loss_down and state.rung < lowest:
        return _switch(state, _down_target(state, estimate, ladder, cfg), now, "loss", cfg)
    below_need = estimate is not None and estimate < cfg.need(ladder[state.rung])
    if can_move_down and below_need and (state.remb_falling or _queueing(state, cfg)) and state.rung < lowest:
        return _switch(state, _down_target(state, estimate, ladder, cfg), now, "bandwidth", cfg)
    if can_move_down and _queueing(state, cfg) and state.rung < lowest:
        return _switch(state, state.rung + 1, now, "delay", cfg)

    # Up: only on a clean link (no loss, no queue, estimate not starved), held long enough, and past
    # any backoff from failed probes.
    # REMB tops out near 1.5x what arrives, so "headroom" is measured against what we really send.
    using = state.sent_bps if state.sent_bps is not None else cfg.need(ladder[state.rung])
    headroom = (
        state.rung > 0
        and estimate is not None
        and estimate >= using * cfg.up_headroom
        and state.loss < cfg.loss_ok
        and not state.remb_falling
        and not _queueing(state, cfg)
    )
    if not headroom:
        return replace(state, headroom_since=None)
    since = state.headroom_since if state.headroom_since is not None else now
    waited = now - since
    if waited >= cfg.up_hold_s + state.probe_wait_s and now - state.last_switch_at >= cfg.up_hold_s:
        return _switch(state, state.rung - 1, now, "probe_up", cfg)
    return replace(state, headroom_since=since)
