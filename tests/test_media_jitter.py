"""The ingest jitter buffer completes frames on the marker bit (exact tables, no I/O)."""

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
