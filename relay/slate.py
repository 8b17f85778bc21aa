"""The still picture viewers see while the host is offline or reconnecting."""

from __future__ import annotations

from functools import lru_cache

import av
import cv2
import numpy as np

from .frames import to_i420


@lru_cache(maxsize=16)
def _slate_pixels(width: int, height: int, headline: str, subline: str) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = (48, 32, 24)  # dark blue-grey, BGR
    scale = max(0.4, height / 360)
    for text, y, size, colour in (
        (headline, 0.45, 1.1, (255, 255, 255)),
        (subline, 0.62, 0.7, (200, 200, 200)),
    ):
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, size * scale, max(1, int(2 * scale)))
        cv2.putText(
            img,
            text,
            ((width - tw) // 2, int(height * y) + th // 2),
            cv2.FONT_HERSHEY_SIMPLEX,
            size * scale,
            colour,
            max(1, int(2 * scale)),
            cv2.LINE_AA,
        )
    img.setflags(write=False)
    return img


def slate_frame(width: int, height: int, headline: str, subline: str = "shelfcast") -> av.VideoFrame:
    """A fresh yuv420p frame (pts is set by the encoder) from a cached rendering."""
    pixels = _slate_pixels(width, height, headline, subline)
    return to_i420(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="bgr24"))
