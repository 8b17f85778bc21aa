"""The benchmarks' capture-time code: stamp then read back exact values (no timing assertions)."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from benchmarks import timecode as tc

VALUES = [
    (0, 0),
    (1, 1),
    (tc.TIME_MASK, tc.SEQ_MASK),
    (123_456_789_012, 4242),
    (0xA5A5A5A5A5A5, 0x5A5A),
    (2**47, 2**15),
]


@pytest.mark.parametrize(("capture_us", "seq"), VALUES)
def test_bits_round_trip(capture_us: int, seq: int) -> None:
    assert tc.decode_bits(tc.encode_bits(capture_us, seq)) == (capture_us, seq)


def test_values_wrap_to_field_width() -> None:
    assert tc.decode_bits(tc.encode_bits(tc.TIME_MASK + 5, 65536 + 7)) == (4, 7)


def test_corrupted_bits_are_rejected_not_misread() -> None:
    bits = tc.encode_bits(987_654_321, 77)
    for cell in range(2, 2 + tc.DATA_BITS):
        flipped = bits.copy()
        flipped[cell] ^= 1
        assert tc.decode_bits(flipped) is None
    no_reference = bits.copy()
    no_reference[0] = 0
    assert tc.decode_bits(no_reference) is None


@pytest.mark.parametrize(("capture_us", "seq"), VALUES)
def test_luma_round_trip_stays_in_top_left_corner(capture_us: int, seq: int) -> None:
    y = np.full((720, 1280), 77, np.uint8)
    tc.stamp_luma(y, capture_us, seq)
    assert tc.read_luma(y) == (capture_us, seq)
    # Nothing written outside the first 48 rows and 400 columns.
    assert (y[48:] == 77).all() and (y[:, 400:] == 77).all()


def test_blank_or_flat_picture_reads_as_none() -> None:
    assert tc.read_luma(np.zeros((720, 1280), np.uint8)) is None
    assert tc.read_luma(np.random.default_rng(1).integers(0, 256, (720, 1280), dtype=np.uint8)) is None


@pytest.mark.parametrize(("width", "height"), [(1280, 720), (640, 360), (854, 480)])
def test_av_frame_round_trip_at_several_sizes(width: int, height: int) -> None:
    arr = np.full((height * 3 // 2, width), 128, np.uint8)
    tc.stamp_yuv420(arr, width, height, 55_555_555, 321)
    frame = av.VideoFrame.from_ndarray(arr, format="yuv420p")
    assert tc.read_frame(frame) == (55_555_555, 321)


def test_elapsed_ms_is_wrap_safe() -> None:
    assert tc.elapsed_ms(1_000, 3_500) == 2.5
    assert tc.elapsed_ms(tc.TIME_MASK - 999, 1_000) == 2.0
    assert tc.elapsed_ms(3_500, 1_000) == -2.5


def _moving_picture(index: int, width: int = 1280, height: int = 720) -> np.ndarray:
    """Busy content (noise + a moving box) so the encoder spends bits everywhere."""
    rng = np.random.default_rng(index)
    arr = np.empty((height * 3 // 2, width), np.uint8)
    arr[:height] = rng.integers(40, 200, (height, width), dtype=np.uint8)
    arr[height:] = 128
    x = (index * 37) % (width - 200)
    arr[100:300, x : x + 200] = 250
    return arr


def test_survives_a_real_vp8_round_trip_at_720p() -> None:
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 1280, 720, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.framerate = Fraction(30, 1)
    encoder.bit_rate = 1_500_000
    encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    decoder = av.CodecContext.create("vp8", "r")
    sent: list[tuple[int, int]] = []
    read: list[tc.Timecode | None] = []
    for index in range(20):
        arr = _moving_picture(index)
        value = (1_700_000_000_000 + index * 33_333 + index * index) & tc.TIME_MASK
        seq = (65_530 + index) & tc.SEQ_MASK  # crosses the 16-bit wrap
        tc.stamp_yuv420(arr, 1280, 720, value, seq)
        sent.append((value, seq))
        frame = av.VideoFrame.from_ndarray(arr, format="yuv420p")
        frame.pts = index
        for packet in encoder.encode(frame):
            for decoded in decoder.decode(packet):
                read.append(tc.read_frame(decoded))
    for packet in encoder.encode(None):
        for decoded in decoder.decode(packet):
            read.append(tc.read_frame(decoded))
    assert read == sent
