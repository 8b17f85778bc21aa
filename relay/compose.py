"""Side-by-side composition for PK battles, in I420, for one output size (runs in encoder threads).

Each host fills one half of the picture: the source is cropped to the half's aspect ratio around its
centre (a portrait slice of a landscape camera, as PK layouts do) and scaled into place plane by
plane, so nothing goes through RGB.
"""

from __future__ import annotations

import av
import cv2

from .frames import even as _even, plane_view, to_i420

BLACK = (16, 128, 128)  # Y, U, V


def crop_box(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the centred crop of a src frame with the aspect ratio of dst (even values)."""
    if src_w * dst_h > dst_w * src_h:  # source wider than the slot: crop the sides
        w, h = _even(src_h * dst_w / dst_h), _even(src_h)
    else:
        w, h = _even(src_w), _even(src_w * dst_h / dst_w)
    return _even((src_w - w) / 2) if src_w > w else 0, _even((src_h - h) / 2) if src_h > h else 0, w, h


def _paste(dst: av.VideoFrame, src: av.VideoFrame, x: int, w: int) -> None:
    """Scale the centred crop of ``src`` into the column [x, x+w) of ``dst`` (all three planes)."""
    if src.format.name != "yuv420p":
        src = to_i420(src)
    cx, cy, cw, ch = crop_box(src.width, src.height, w, dst.height)
    for i in range(3):
        div = 1 if i == 0 else 2
        src_plane = plane_view(src, i)[cy // div : (cy + ch) // div, cx // div : (cx + cw) // div]
        out = plane_view(dst, i)[: dst.height // div, x // div : (x + w) // div]
        out[...] = cv2.resize(src_plane, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_LINEAR)


def side_by_side(left: av.VideoFrame, right: av.VideoFrame | None, width: int, height: int) -> av.VideoFrame:
    """A new frame: ``left`` in the left half, ``right`` (or black, while it has no frame) in the right."""
    out = av.VideoFrame(width, height, "yuv420p")
    half = _even(width / 2)
    for i, value in enumerate(BLACK):
        plane_view(out, i)[...] = value
    _paste(out, left, 0, half)
    if right is not None:
        _paste(out, right, half, width - half)
    return out

