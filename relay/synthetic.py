"""Synthetic host media: a moving test pattern and a tone (the demo host, tests, benchmarks)."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import av
import cv2
import numpy as np
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from .codecs import AUDIO_RATE, OPUS_FRAME_SAMPLES


def colour_bars(width: int, height: int) -> np.ndarray:
    bars = np.array(
        [(192, 192, 192), (0, 192, 192), (192, 192, 0), (0, 192, 0), (192, 0, 192), (0, 0, 192), (192, 0, 0)],
        np.uint8,
    )
    index = (np.arange(width) * len(bars) // width).astype(np.intp)
    return np.ascontiguousarray(np.broadcast_to(bars[index], (height, width, 3)))


class PatternTrack(VideoStreamTrack):
    """Colour bars with a box that moves and a clock, at ``fps``; pacing from aiortc."""

    def __init__(self, width: int = 640, height: int = 360, label: str = "shelfcast demo", *, grain: bool = False) -> None:
        super().__init__()
        self.width = width
        self.height = height
        self.label = label
        self._bars = colour_bars(width, height)
        # Film grain makes every frame costly to encode, like a real camera: encoders then spend their
        # whole bitrate budget, which is what bandwidth tests need.
        rng = np.random.default_rng(1)
        self._grain = [rng.integers(-24, 24, (height, width, 1), dtype=np.int16) for _ in range(8)] if grain else None
        self.frames_sent = 0

    def render(self, index: int) -> np.ndarray:
        img = self._bars.copy()
        if self._grain is not None:
            img = np.clip(img.astype(np.int16) + self._grain[index % len(self._grain)], 0, 255).astype(np.uint8)
        size = self.height // 4
        x = int((math.sin(index / 30.0) * 0.5 + 0.5) * (self.width - size))
        y = (self.height - size) // 2
        img[y : y + size, x : x + size] = 255
        scale = self.height / 360
        cv2.putText(img, self.label, (int(16 * scale), int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.9 * scale, (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
        cv2.putText(img, time.strftime("%H:%M:%S"), (int(16 * scale), self.height - int(20 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
        return img

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.render(self.frames_sent), format="bgr24")
        frame.pts = pts
        frame.time_base = time_base
        self.frames_sent += 1
        return frame


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone, beeping once a second, in 20 ms stereo frames."""

    def __init__(self, frequency: float = 440.0) -> None:
        super().__init__()
        self._frequency = frequency
        self._sample = 0

    async def recv(self) -> av.AudioFrame:
        await super().recv()  # paces to real time and keeps aiortc's timestamp bookkeeping
        t = (np.arange(OPUS_FRAME_SAMPLES) + self._sample) / AUDIO_RATE
        envelope = ((t % 1.0) < 0.2).astype(np.float32)
        wave = (np.sin(2 * np.pi * self._frequency * t) * envelope * 8000).astype(np.int16)
        stereo = np.repeat(wave, 2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._sample
        frame.time_base = Fraction(1, AUDIO_RATE)
        self._sample += OPUS_FRAME_SAMPLES
        return frame
