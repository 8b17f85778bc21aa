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

from overlay.compositor import Compositor

from .codecs import AUDIO_RATE, OPUS_FRAME_SAMPLES, OpusEncoder, Vp8Encoder, bitrate_for
from .fanout import FanOut
from .handoff import Handoff
from .keyframes import KeyframeRequests
from .slate import slate_frame

log = logging.getLogger("shelfcast.pipeline")

HOST_STALL_S = 1.5  # no frame from a live host for this long: show "reconnecting"


def _even(n: int) -> int:
    return max(2, n - n % 2)


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
        bitrate_at_720p: int,
        keyframe_min_interval_s: float,
        slate_fps: float,
        slate_size: tuple[int, int],
        slate_title: str = "",
        compositor: Compositor | None = None,
    ) -> None:
        self._loop = loop
        self._compositor = compositor
        self._fanout = fanout
        self._bitrate_at_720p = bitrate_at_720p
        self._slate_interval = 1.0 / slate_fps
        self._size = slate_size
        self.slate_title = slate_title
        self._input: Handoff[av.VideoFrame] = Handoff(1)
        self._keyframes = KeyframeRequests(keyframe_min_interval_s)
        self._lock = threading.Lock()
        self._encoder: Vp8Encoder | None = None
        self._epoch = time.monotonic()
        self._last_pts = -1
        self._last_source_frame = 0.0
        self.source_live = False
        self.encoders_opened = 0
        self.encode_seconds = 0.0
        self.composite_seconds = 0.0
        self._worker: _Worker | None = None

    # -- event loop side
    def start(self) -> None:
        if self._worker is None:
            self._worker = _Worker("shelfcast-video-encoder", self._run)

    def submit(self, frame: av.VideoFrame) -> None:
        self._input.put(frame)

    def request_keyframe(self) -> None:
        with self._lock:
            self._keyframes.request()

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
    def _next_pts(self, now: float) -> int:
        pts = max(int((now - self._epoch) * 90000), self._last_pts + 1)
        self._last_pts = pts
        return pts

    def _run(self) -> None:
        try:
            while True:
                frame = self._input.take(self._slate_interval)
                if self._input.closed:
                    return
                now = time.monotonic()
                owned = False
                if frame is not None:
                    self._last_source_frame = now
                    self._size = (_even(frame.width), _even(frame.height))
                elif self.source_live and now - self._last_source_frame < HOST_STALL_S:
                    continue  # a live host's next frame is simply late
                else:
                    headline = "Host reconnecting..." if self.source_live else "Waiting for the host"
                    frame, owned = slate_frame(*self._size, headline, self.slate_title or "shelfcast"), True
                self._encode(frame, now, owned)
        except Exception:  # a codec failure must not take the process down silently
            log.exception("video encoder thread failed")
        finally:
            self._encoder = None

    def _encode(self, frame: av.VideoFrame, now: float, owned: bool) -> None:
        width, height = self._size
        if frame.format.name != "yuv420p" or (frame.width, frame.height) != (width, height):
            frame, owned = frame.reformat(width=width, height=height, format="yuv420p"), True
        if self._compositor is not None:
            started = time.perf_counter()
            frame = self._compositor.apply(frame, owned)
            self.composite_seconds += time.perf_counter() - started
        natural_keyframe = False
        if self._encoder is None or (self._encoder.width, self._encoder.height) != (width, height):
            if self._encoder is not None:
                self._encoder.close()
            self._encoder = Vp8Encoder(width, height, bitrate_for(width, height, self._bitrate_at_720p))
            self.encoders_opened += 1
            natural_keyframe = True
        with self._lock:
            force = self._keyframes.should_force(now) and not natural_keyframe
        started = time.perf_counter()
        packets = self._encoder.encode(frame, self._next_pts(now), force)
        self.encode_seconds += time.perf_counter() - started
        for packet in packets:
            if packet.is_keyframe:
                with self._lock:
                    self._keyframes.saw_keyframe(now)
            _post(self._loop, self._fanout.publish, packet)


class AudioPipeline:
    """Decoded host audio -> one Opus encoder -> fan-out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fanout: FanOut, *, bitrate: int) -> None:
        self._loop = loop
        self._fanout = fanout
        self._bitrate = bitrate
        self._input: Handoff[av.AudioFrame] = Handoff(10)
        self._epoch = time.monotonic()
        self._next_pts = 0
        self._worker: _Worker | None = None
        self.encoder_open = False

    def start(self) -> None:
        if self._worker is None:
            self._worker = _Worker("shelfcast-audio-encoder", self._run)

    def submit(self, frame: av.AudioFrame) -> None:
        self._input.put(frame)

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
