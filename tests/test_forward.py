"""The forwarder turns a publisher's encoded frames into fan-out packets as they arrive: exact
timestamps on the media clock, broken deltas held back after a skipped hole, coalesced keyframe
requests (no I/O: a fake clock, a list for a fan-out)."""

from __future__ import annotations

import threading

import av
from aiortc.jitterbuffer import JitterFrame

from relay.fanout import FanOut
from relay.forward import KEYFRAME_REQUEST_MIN_INTERVAL_S, Forwarder

KEY, DELTA = b"\x10\x02\x00", b"\x31\x02\x00"  # VP8 frame tags: P bit 0 on key frames


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def forwarder(kind: str, clock: Clock, epoch: float = 100.0) -> tuple[Forwarder, list[av.Packet]]:
    fanout = FanOut(kind)
    published: list[av.Packet] = []
    fanout.publish = published.append  # type: ignore[method-assign]
    return Forwarder(kind, fanout, epoch, clock=clock), published


def test_video_is_anchored_on_the_media_clock_then_follows_the_publishers_rtp_clock() -> None:
    clock = Clock(101.0)  # one second after the room's epoch
    fwd, out = forwarder("video", clock)
    fwd.on_frame("VP8", JitterFrame(KEY, 4_000_000))
    clock.now = 101.050  # arrives 17 ms late: its time comes from its RTP timestamp, not arrival
    fwd.on_frame("VP8", JitterFrame(DELTA, 4_003_000))
    clock.now = 101.060
    fwd.on_frame("VP8", JitterFrame(DELTA, 4_006_000))
    assert [(p.pts, p.is_keyframe) for p in out] == [(90_000, True), (93_000, False), (96_000, False)]
    assert out[0].time_base == out[1].time_base and float(out[0].time_base) == 1 / 90000
    assert bytes(out[1]) == DELTA and fwd.stats.frames == 3


def test_the_rtp_clock_wraps_without_a_jump() -> None:
    clock = Clock(100.0)
    fwd, out = forwarder("video", clock)
    fwd.on_frame("VP8", JitterFrame(KEY, 2**32 - 1500))
    fwd.on_frame("VP8", JitterFrame(DELTA, 1500))
    assert [p.pts for p in out] == [0, 3000]


def test_a_jump_in_the_publishers_clock_is_followed_on_the_media_clock() -> None:
    clock = Clock(100.0)
    fwd, out = forwarder("video", clock)
    fwd.on_frame("VP8", JitterFrame(KEY, 1000))
    clock.now = 100.1
    fwd.on_frame("VP8", JitterFrame(KEY, 1000 + 90_000 * 3600))  # an hour ahead: a restarted encoder
    clock.now = 100.133
    fwd.on_frame("VP8", JitterFrame(DELTA, 1000 + 90_000 * 3600 + 3000))
    assert [p.pts for p in out] == [0, 9000, 12000]


def test_a_new_receiver_is_anchored_again() -> None:
    clock = Clock(100.0)
    fwd, out = forwarder("video", clock)
    fwd.on_frame("VP8", JitterFrame(KEY, 555))
    clock.now = 100.5
    fwd.attach(threading.Event())  # the publisher reconnected: a random new RTP origin
    fwd.on_frame("VP8", JitterFrame(KEY, 7))
    assert [p.pts for p in out] == [0, 45_000]


def test_audio_out_of_order_keeps_its_place() -> None:
    clock = Clock(100.02)
    fwd, out = forwarder("audio", clock)
    for ts in (960, 2880, 1920, 3840):
        fwd.on_frame("opus", JitterFrame(b"\xfc", ts))
    assert [p.pts for p in out] == [960, 2880, 1920, 3840]
    assert not any(p.is_keyframe for p in out) and float(out[0].time_base) == 1 / 48000


def test_after_a_skipped_hole_deltas_wait_for_the_keyframe() -> None:
    fwd, out = forwarder("video", Clock(100.0))
    fwd.on_frame("VP8", JitterFrame(DELTA, 0))
    fwd.hole_skipped()
    fwd.on_frame("VP8", JitterFrame(DELTA, 3000))
    fwd.on_frame("VP8", JitterFrame(DELTA, 6000))
    assert len(out) == 1 and fwd.stats.frames_dropped == 2
    fwd.on_frame("VP8", JitterFrame(KEY, 9000))
    fwd.on_frame("VP8", JitterFrame(DELTA, 12000))
    assert len(out) == 3 and fwd.stats.frames_dropped == 2


def test_keyframe_requests_reach_the_receiver_coalesced() -> None:
    clock = Clock(100.0)
    fwd, _ = forwarder("video", clock)
    fwd.request_keyframe()  # no receiver yet: nothing to ask
    assert fwd.stats.keyframe_requests == 0
    pli = threading.Event()
    fwd.attach(pli)
    fwd.request_keyframe()
    assert pli.is_set() and fwd.stats.keyframe_requests == 1
    pli.clear()
    clock.now += KEYFRAME_REQUEST_MIN_INTERVAL_S / 2
    fwd.request_keyframe()
    assert not pli.is_set() and fwd.stats.keyframe_requests == 1
    clock.now += KEYFRAME_REQUEST_MIN_INTERVAL_S
    fwd.request_keyframe()
    assert pli.is_set() and fwd.stats.keyframe_requests == 2


def test_a_keyframe_that_does_not_come_is_asked_for_again() -> None:
    """One PLI can be lost; while deltas keep coming and no keyframe does, ask every KEYFRAME_RETRY_S."""
    clock = Clock(100.0)
    fwd, out = forwarder("video", clock)
    pli = threading.Event()
    fwd.attach(pli)
    fwd.hole_skipped()  # the jitter buffer's own PLI asked for the keyframe at 100.0
    asked = []
    for step in range(1, 31):  # 3 s of deltas at 100 ms
        clock.now = 100.0 + step * 0.1
        fwd.on_frame("VP8", JitterFrame(DELTA, step * 9000))
        if pli.is_set():
            asked.append(round(clock.now, 1))
            pli.clear()
    assert asked == [101.0, 102.0, 103.0] and fwd.stats.keyframe_requests == 3
    assert out == [] and fwd.stats.frames_dropped == 30
    fwd.on_frame("VP8", JitterFrame(KEY, 31 * 9000))
    clock.now += 5
    fwd.on_frame("VP8", JitterFrame(DELTA, 32 * 9000))
    assert len(out) == 2 and fwd.stats.keyframe_requests == 3  # flowing again: no more asking
