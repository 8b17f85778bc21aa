"""A room's media pipeline: frames in, ONE encoder per stream, packets out to the fan-out.

Decoded frames arrive on the event loop (from ingest) and cross to a worker thread through a
newest-only hand-off; the thread encodes and posts packets back to the loop, where the fan-out
gives the same packet to every viewer. Nothing here grows with the number of viewers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

import av
import numpy as np

from .frames import FrameFilter, even as _even, to_i420

from .codecs import AUDIO_RATE, OPUS_FRAME_SAMPLES, OpusEncoder, Vp8Encoder, bitrate_for
from .fanout import FanOut
from .handoff import Handoff
from .keyframes import KeyframeRequests
from .slate import slate_frame

log = logging.getLogger("shelfcast.pipeline")

HOST_STALL_S = 1.5  # no frame from a live host for this long: show "reconnecting"


def output_size(source: tuple[int, int], max_height: int | None) -> tuple[int, int]:
    """The source scaled down (never up) to ``max_height``, keeping its aspect ratio; even sizes."""
    width, height = source
    if max_height is None or height <= max_height:
        return _even(width), _even(height)
    return _even(width * max_height / height), _even(max_height)


class _Worker:
    """A named daemon thread running ``loop_fn`` until the hand-off closes."""

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    async def join(self) -> None:
        await asyncio.to_thread(self._thread.join, 5.0)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: object) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # loop already closed during shutdown
        pass


class VideoPipeline:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fanout: FanOut,
        *,
        bitrate: int,
        max_height: int | None,
        epoch: float,
        keyframe_min_interval_s: float,
        slate_fps: float,
        slate_size: tuple[int, int],
        slate_title: str = "",
        frame_filter: FrameFilter | None = None,
        composer: Callable[[av.VideoFrame, int, int], av.VideoFrame | None] | None = None,
        name: str = "",
    ) -> None:
        self._loop = loop
        self.frame_filter = frame_filter
        self._composer = composer  # PK: builds the side-by-side picture at this rung's size
        self._fanout = fanout
        self._bitrate = bitrate  # at the rung's full size; scaled down with the pixel count
        self._max_height = max_height
        self._slate_interval = 1.0 / slate_fps
        self._size = output_size(slate_size, max_height)
        self.slate_title = slate_title
        self.name = name
        # (frame, capture time): every rung stamps a source frame with the same pts, so a viewer
        # moving between rungs keeps one timeline.
        self._input: Handoff[tuple[av.VideoFrame, float]] = Handoff(1)
        self._keyframes = KeyframeRequests(keyframe_min_interval_s)
        self._lock = threading.Lock()
        self._encoder: Vp8Encoder | None = None
        self._epoch = epoch
        self._last_pts = -1
        self._last_source_frame = 0.0
        self.source_live = False
        self.slate_headline: str | None = None  # what the slate says while it is on; None: the source is shown
        self.encoders_opened = 0
        self.encode_seconds = 0.0
        self.composite_seconds = 0.0
        self._worker: _Worker | None = None

    # -- event loop side
    def start(self) -> None:
        if self._worker is None:
            self._worker = _Worker(f"shelfcast-video-encoder-{self.name}", self._run)

    def submit(self, frame: av.VideoFrame, captured: float) -> None:
        self._input.put((frame, captured))

    def request_keyframe(self) -> None:
        with self._lock:
            self._keyframes.request()

    def _bitrate_for(self, width: int, height: int) -> int:
        """The rung's bitrate, scaled down when the source is smaller than the rung."""
        if self._max_height is None:
            return bitrate_for(width, height, self._bitrate)
        return max(100_000, int(self._bitrate * min(1.0, height / self._max_height) ** 2))

    @property
    def encoder_open(self) -> bool:
        return self._encoder is not None

    @property
    def frames_dropped(self) -> int:
        return self._input.dropped

    @property
    def keyframes_forced(self) -> int:
        return self._keyframes.forced_count

    async def close(self) -> None:
        self._input.close()
        if self._worker is not None:
            await self._worker.join()
            self._worker = None

    # -- worker thread side
    def _next_pts(self, captured: float) -> int:
        pts = max(int((captured - self._epoch) * 90000), self._last_pts + 1)
        self._last_pts = pts
        return pts

    def _run(self) -> None:
        try:
            while True:
                item = self._input.take(self._slate_interval)
                if self._input.closed:
                    return
                now = time.monotonic()
                owned = False
                if item is not None:
                    frame, captured = item
                    self._last_source_frame = now
                    self.slate_headline = None
                    self._size = output_size((frame.width, frame.height), self._max_height)
                elif self.source_live and now - self._last_source_frame < HOST_STALL_S:
                    continue  # a live host's next frame is simply late
                else:
                    headline = "Host reconnecting..." if self.source_live else "Waiting for the host"
                    self.slate_headline = headline
                    frame, owned = slate_frame(*self._size, headline, self.slate_title or "shelfcast"), True
                    captured = now
                self._encode(frame, now, captured, owned)
        except Exception:  # a codec failure must not take the process down silently
            log.exception("video encoder thread failed")
        finally:
            self._encoder = None

    def _encode(self, frame: av.VideoFrame, now: float, captured: float, owned: bool) -> None:
        width, height = self._size
        composed = self._composer(frame, width, height) if self._composer is not None else None
        if composed is not None:
            frame, owned = composed, True
        elif frame.format.name != "yuv420p" or (frame.width, frame.height) != (width, height):
            frame, owned = to_i420(frame, width, height), True
        if self.frame_filter is not None:
            started = time.perf_counter()
            frame = self.frame_filter.apply(frame, owned)
            self.composite_seconds += time.perf_counter() - started
        natural_keyframe = False
        if self._encoder is None or (self._encoder.width, self._encoder.height) != (width, height):
            if self._encoder is not None:
                self._encoder.close()
            self._encoder = Vp8Encoder(width, height, self._bitrate_for(width, height))
            self.encoders_opened += 1
            natural_keyframe = True
        with self._lock:
            force = self._keyframes.should_force(now) and not natural_keyframe
        started = time.perf_counter()
        packets = self._encoder.encode(frame, self._next_pts(captured), force)
        self.encode_seconds += time.perf_counter() - started
        for packet in packets:
            if packet.is_keyframe:
                with self._lock:
                    self._keyframes.saw_keyframe(now)
            _post(self._loop, self._fanout.publish, packet)


def mix(a: av.AudioFrame, b: av.AudioFrame) -> av.AudioFrame:
    """Sum two hosts' audio (48 kHz stereo s16 from aiortc's Opus decoder), clipped; ``a`` sets the length."""
    left = a.to_ndarray().astype(np.int32)
    right = b.to_ndarray().astype(np.int32)
    n = min(left.shape[1], right.shape[1])
    left[:, :n] += right[:, :n]
    out = av.AudioFrame.from_ndarray(np.clip(left, -32768, 32767).astype(np.int16), format=a.format.name, layout=a.layout.name)
    out.sample_rate = a.sample_rate
    return out


class AudioPipeline:
    """Decoded host audio -> one Opus encoder -> fan-out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fanout: FanOut, *, bitrate: int, name: str = "audio") -> None:
        self._loop = loop
        self._fanout = fanout
        self._bitrate = bitrate
        self._name = name
        self._input: Handoff[av.AudioFrame] = Handoff(10)
        self._mix: Handoff[av.AudioFrame] = Handoff(10)  # PK: the other host's audio, mixed in
        self._epoch = time.monotonic()
        self._next_pts = 0
        self._worker: _Worker | None = None
        self.encoder_open = False

    def start(self) -> None:
        if self._worker is None:
            self._worker = _Worker(f"shelfcast-{self._name}-encoder", self._run)

    def submit(self, frame: av.AudioFrame) -> None:
        self._input.put(frame)

    def submit_mix(self, frame: av.AudioFrame) -> None:
        self._mix.put(frame)

    async def close(self) -> None:
        self._input.close()
        if self._worker is not None:
            await self._worker.join()
            self._worker = None

    def _run(self) -> None:
        encoder = OpusEncoder(self._bitrate)
        self.encoder_open = True
        try:
            while True:
                frame = self._input.take(1.0)
                if self._input.closed:
                    return
                if frame is None:
                    continue
                other = self._mix.take(0)
                if other is not None:
                    frame = mix(frame, other)
                # After a gap (host away), jump the timeline to wall clock so the viewer's jitter
                # buffer sees the pause as time passing rather than a burst of late audio.
                wall_pts = int((time.monotonic() - self._epoch) * AUDIO_RATE)
                if wall_pts - self._next_pts > AUDIO_RATE // 10:
                    self._next_pts = wall_pts
                for packet in encoder.encode(frame, self._next_pts):
                    self._next_pts += OPUS_FRAME_SAMPLES
                    _post(self._loop, self._fanout.publish, packet)
        except Exception:
            log.exception("audio encoder thread failed")
        finally:
            encoder.close()
            self.encoder_open = False
