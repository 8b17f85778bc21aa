"""Small pure helpers on raw I420 frames, shared by the media path and the overlay, and the one
protocol through which the media path lets another layer draw into its pictures."""

from __future__ import annotations

from typing import Protocol

import av
import numpy as np


def even(value: float, minimum: int = 2) -> int:
    """``value`` rounded, then down to an even number (I420 halves sizes and offsets for chroma)."""
    n = int(round(value))
    return max(minimum, n - n % 2)


def to_i420(frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> av.VideoFrame:
    """``frame`` as I420, scaled to ``width`` x ``height`` if given, on the calling thread.

    Every rung's encoder thread scales its own frames, so swscale's own slice threads ("auto": one
    per CPU) would only add work: they cost ~18 % more CPU per 720p->360p scale here, and under a
    long show with rungs opening and closing they piled up in the server (16 -> 54 threads in a
    10-minute soak)."""
    return frame.reformat(width=width, height=height, format="yuv420p", threads=1)


def plane_view(frame: av.VideoFrame, index: int) -> np.ndarray:
    """Plane ``index`` of an I420 frame as a writable array (rows x line size, padding included)."""
    plane = frame.planes[index]
    rows = frame.height if index == 0 else (frame.height + 1) // 2
    return np.frombuffer(plane, np.uint8).reshape(rows, plane.line_size)  # type: ignore[call-overload]


def copy_frame(frame: av.VideoFrame) -> av.VideoFrame:
    """A frame of our own: a decoder's output may share buffers with its reference frames."""
    out = av.VideoFrame(frame.width, frame.height, "yuv420p")
    for i in range(3):
        src, dst = plane_view(frame, i), plane_view(out, i)
        cols = min(src.shape[1], dst.shape[1])
        dst[:, :cols] = src[:, :cols]
    out.pts = frame.pts
    if frame.time_base is not None:
        out.time_base = frame.time_base
    return out


class FrameFilter(Protocol):
    """Draws into a rung's frame just before it is encoded (the stock overlay does). Called in the
    encoder thread; ``owned`` says the frame is the caller's to write into, otherwise the filter
    copies it before drawing. Returns the frame to encode."""

    def apply(self, frame: av.VideoFrame, owned: bool = False) -> av.VideoFrame: ...
