"""relay.frames.to_i420: swscale on the calling thread, the same pixels as its default."""

from __future__ import annotations

import av
import numpy as np

from relay.frames import to_i420


def test_to_i420_scales_exactly_like_swscales_default() -> None:
    rng = np.random.default_rng(5)
    src = av.VideoFrame.from_ndarray(rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8), format="bgr24")
    for size in ((640, 360), (320, 180), (1280, 720)):
        ours = to_i420(src, *size)
        assert (ours.width, ours.height, ours.format.name) == (*size, "yuv420p")
        assert np.array_equal(ours.to_ndarray(), src.reformat(width=size[0], height=size[1], format="yuv420p").to_ndarray())
