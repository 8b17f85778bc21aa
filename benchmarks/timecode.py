"""A machine-readable capture-time code burnt into the top-left corner of a video frame.

The code is a grid of 16x16 luma blocks (3 rows x 25 columns = 48 x 400 pixels at 1280x720, the area
the stock overlay stays out of), each either black (Y=16) or white (Y=235), with neutral chroma.
Blocks are aligned with the codec's 16x16 macroblocks, so they survive VP8 at ordinary bitrates; the
reader samples the inner half of each block and compares it with two reference blocks.

Layout (75 cells, row-major): cell 0 white reference, cell 1 black reference, cells 2..73 carry 72
bits, MSB first: 48 bits capture time in microseconds (CLOCK_MONOTONIC, same clock in every process
of this machine), 16 bits frame sequence number, 8 bits CRC-8 of the preceding 8 bytes; cell 74 is
black. For other frame sizes the grid scales with the frame width (same relative area).

Pure numpy; the av helpers only touch the Y (and U/V) planes of yuv420p frames.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

REF_WIDTH = 1280
BLOCK = 16  # pixels at REF_WIDTH
COLS = 25
ROWS = 3
CELLS = COLS * ROWS
DATA_BITS = 72
TIME_BITS = 48
SEQ_BITS = 16
BLACK = 16
WHITE = 235
TIME_MASK = (1 << TIME_BITS) - 1
SEQ_MASK = (1 << SEQ_BITS) - 1


class Timecode(NamedTuple):
    capture_us: int
    seq: int


def now_us() -> int:
    """CLOCK_MONOTONIC in microseconds (Python's time.monotonic clock on Linux), 48-bit wrapped."""
    return (time.monotonic_ns() // 1000) & TIME_MASK


def elapsed_ms(capture_us: int, at_us: int | None = None) -> float:
    """Milliseconds from ``capture_us`` to ``at_us`` (default: now), safe across the 48-bit wrap."""
    at = now_us() if at_us is None else at_us
    diff = (at - capture_us) & TIME_MASK
    if diff > TIME_MASK // 2:
        diff -= TIME_MASK + 1
    return diff / 1000.0


def crc8(data: bytes, poly: int = 0x07) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def encode_bits(capture_us: int, seq: int) -> np.ndarray:
    """The 75 cell values (1 = white) for one timecode."""
    capture_us &= TIME_MASK
    seq &= SEQ_MASK
    payload = capture_us.to_bytes(6, "big") + seq.to_bytes(2, "big")
    word = int.from_bytes(payload + bytes([crc8(payload)]), "big")
    bits = np.zeros(CELLS, np.uint8)
    bits[0] = 1
    bits[1] = 0
    for i in range(DATA_BITS):
        bits[2 + i] = (word >> (DATA_BITS - 1 - i)) & 1
    return bits


def decode_bits(bits: np.ndarray) -> Timecode | None:
    """Inverse of :func:`encode_bits`; None when the reference cells or the CRC do not match."""
    if len(bits) < CELLS or bits[0] != 1 or bits[1] != 0:
        return None
    word = 0
    for i in range(DATA_BITS):
        word = (word << 1) | int(bits[2 + i])
    raw = word.to_bytes(9, "big")
    if crc8(raw[:8]) != raw[8]:
        return None
    return Timecode(int.from_bytes(raw[:6], "big"), int.from_bytes(raw[6:8], "big"))


def block_size(width: int) -> float:
    return BLOCK * width / REF_WIDTH


def code_height(width: int) -> int:
    """Rows of the frame the code occupies (48 at 1280 wide)."""
    return int(np.ceil(ROWS * block_size(width)))


def stamp_luma(y: np.ndarray, capture_us: int, seq: int) -> None:
    """Write the code into a luma plane (2-D uint8 array, written in place)."""
    width = y.shape[1]
    size = block_size(width)
    bits = encode_bits(capture_us, seq)
    for cell in range(CELLS):
        row, col = divmod(cell, COLS)
        y0, y1 = int(round(row * size)), int(round((row + 1) * size))
        x0, x1 = int(round(col * size)), int(round((col + 1) * size))
        y[y0:y1, x0:x1] = WHITE if bits[cell] else BLACK


def stamp_chroma(plane: np.ndarray, luma_width: int) -> None:
    """Neutral chroma under the code (a 4:2:0 plane, written in place)."""
    size = block_size(luma_width)
    plane[: int(np.ceil(ROWS * size / 2)), : int(np.ceil(COLS * size / 2))] = 128


def read_luma(y: np.ndarray) -> Timecode | None:
    """Read the code from a luma plane (at least :func:`code_height` rows); None if unreadable."""
    width = y.shape[1]
    size = block_size(width)
    inner = max(1, int(size / 4))
    means = np.empty(CELLS, np.float32)
    for cell in range(CELLS):
        row, col = divmod(cell, COLS)
        cy, cx = int((row + 0.5) * size), int((col + 0.5) * size)
        means[cell] = y[cy - inner : cy + inner, cx - inner : cx + inner].mean()
    white, black = means[0], means[1]
    if white - black < 60:
        return None
    bits = (means > (white + black) / 2).astype(np.uint8)
    return decode_bits(bits)


# --- av.VideoFrame helpers (yuv420p) -------------------------------------------------------------


def luma_view(frame: "object", rows: int | None = None) -> np.ndarray:
    """The first ``rows`` rows of a yuv420p frame's Y plane, as a (rows, width) array (no full copy)."""
    plane = frame.planes[0]  # type: ignore[attr-defined]
    width, stride = frame.width, plane.line_size  # type: ignore[attr-defined]
    rows = frame.height if rows is None else min(rows, frame.height)  # type: ignore[attr-defined]
    buf = np.frombuffer(memoryview(plane), np.uint8, count=stride * rows)
    return buf.reshape(rows, stride)[:, :width]


def read_frame(frame: "object") -> Timecode | None:
    """Read the code from a decoded av.VideoFrame (yuv420p or any format PyAV can convert)."""
    if frame.format.name not in ("yuv420p", "yuvj420p"):  # type: ignore[attr-defined]
        frame = frame.reformat(format="yuv420p")  # type: ignore[attr-defined]
    return read_luma(luma_view(frame, code_height(frame.width) + 1))  # type: ignore[attr-defined]


def stamp_yuv420(arr: np.ndarray, width: int, height: int, capture_us: int, seq: int) -> None:
    """Stamp a (height*3/2, width) yuv420p ndarray as made by ``VideoFrame.to_ndarray()``."""
    y = arr[:height]
    stamp_luma(y, capture_us, seq)
    chroma = arr[height:].reshape(2, height // 2, width // 2)
    stamp_chroma(chroma[0], width)
    stamp_chroma(chroma[1], width)
