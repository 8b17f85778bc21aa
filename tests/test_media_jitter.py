"""The ingest jitter buffer completes frames on the marker bit and skips holes never filled (exact
tables, no I/O). What a forwarder does after a skip: tests/test_forward.py."""

from __future__ import annotations

from aiortc.rtp import RtpPacket

from relay.jitter import MarkerJitterBuffer


def packet(seq: int, ts: int, marker: bool, data: bytes) -> RtpPacket:
    p = RtpPacket(sequence_number=seq, timestamp=ts, marker=int(marker))
    p._data = data  # type: ignore[attr-defined]  # what aiortc's receiver stores after depayloading
    return p


def feed(buffer: MarkerJitterBuffer, packets: list[RtpPacket]) -> list[tuple[int, bytes] | None]:
    out = []
    for p in packets:
        _, frame = buffer.add(p)
        out.append(None if frame is None else (frame.timestamp, frame.data))
    return out


def test_frame_completes_on_its_marker_not_on_the_next_frame() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(1, 3000, False, b"a"), packet(2, 3000, False, b"b"), packet(3, 3000, True, b"c")]) == [
        None,
        None,
        (3000, b"abc"),
    ]
    assert feed(buffer, [packet(4, 6000, True, b"d")]) == [(6000, b"d")]


def test_reordered_packets_complete_when_the_gap_fills() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(10, 0, False, b"a"), packet(12, 0, True, b"c"), packet(11, 0, False, b"b")]) == [
        None,
        None,
        (0, b"abc"),
    ]


def test_frame_without_marker_falls_back_to_the_timestamp_boundary() -> None:
    buffer = MarkerJitterBuffer()
    # A sender that does not set the marker bit still works: the next frame's first packet closes
    # the frame, as in aiortc's own buffer.
    assert feed(buffer, [packet(20, 0, False, b"a"), packet(21, 3000, False, b"x")]) == [None, (0, b"a")]
    assert feed(buffer, [packet(22, 3000, True, b"y")]) == [(3000, b"xy")]


def test_gap_before_the_marker_waits() -> None:
    buffer = MarkerJitterBuffer()
    assert feed(buffer, [packet(30, 0, False, b"a"), packet(32, 0, True, b"c")]) == [None, None]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed_at(buffer: MarkerJitterBuffer, clock: Clock, timed: list[tuple[float, RtpPacket]]) -> list[tuple[bool, tuple[int, bytes] | None]]:
    out = []
    for at, p in timed:
        clock.now = at
        pli, frame = buffer.add(p)
        out.append((pli, None if frame is None else (frame.timestamp, frame.data)))
    return out


def test_a_hole_never_filled_is_skipped_with_its_frame_after_give_up() -> None:
    clock, skipped = Clock(), []
    buffer = MarkerJitterBuffer(give_up_s=0.5, clock=clock, on_skip=lambda: skipped.append(clock.now))
    assert feed_at(buffer, clock, [(0.0, packet(1, 100, True, b"A"))]) == [(False, (100, b"A"))]
    # 2 (the start of frame 200) is lost for good; frames 200 and 300 queue behind the hole.
    assert feed_at(buffer, clock, [
        (0.00, packet(3, 200, True, b"b")),
        (0.30, packet(4, 300, False, b"c")),
        (0.49, packet(5, 300, True, b"C")),
        (0.50, packet(6, 400, True, b"D")),  # 0.5 s since the hole was seen: give up
    ]) == [(False, None), (False, None), (False, None), (True, (300, b"cC"))]
    # Frame 200 is dropped with the hole (its start was missing); 300 comes out at once (the
    # decoder waits for a keyframe anyway), then 400 with the next packet, as any queued frame.
    assert skipped == [0.5] and buffer.gaps_skipped == 1
    assert feed_at(buffer, clock, [(0.51, packet(7, 500, True, b"E"))]) == [(False, (400, b"D"))]


def test_a_hole_inside_a_frame_is_skipped_too_and_a_late_fill_is_not() -> None:
    clock = Clock()
    buffer = MarkerJitterBuffer(give_up_s=0.5, clock=clock)
    # 11 (the middle of frame 100) is missing; it arrives 0.4 s later: no skip, everything comes out.
    assert feed_at(buffer, clock, [
        (0.0, packet(10, 100, False, b"a")),
        (0.0, packet(12, 100, True, b"c")),
        (0.2, packet(13, 200, True, b"d")),
        (0.4, packet(11, 100, False, b"b")),
        (0.45, packet(14, 300, True, b"e")),
    ]) == [(False, None), (False, None), (False, None), (False, (100, b"abc")), (False, (200, b"d"))]
    assert buffer.gaps_skipped == 0
    # Now 16 (the middle of frame 400) is lost for good: frame 400 goes, frame 500 follows.
    assert feed_at(buffer, clock, [
        (1.0, packet(15, 400, False, b"f")),
        (1.0, packet(17, 400, True, b"g")),
        (1.2, packet(18, 500, True, b"h")),
        (1.6, packet(19, 600, True, b"i")),
    ]) == [(False, (300, b"e")), (False, None), (False, None), (True, (500, b"h"))]
    assert buffer.gaps_skipped == 1
