"""A bounded input queue for aiortc's ingest video decoder.

aiortc hands every reassembled frame to its decoder thread through an unbounded ``queue.Queue``:
when the CPU falls behind, frames pile up and the whole show drifts seconds behind live. The relay
owns its ingest, so it bounds that queue: past a few frames it drops everything queued, asks the host
for a keyframe (aiortc sends a PLI when its decode-error flag is set), and decodes again from that
keyframe on. Being late by a handful of frames is recoverable; being late forever is not.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from aiortc.jitterbuffer import JitterFrame

from .aiortc_private import decoder_error, install_decoder_queue
from .keyframes import KEYFRAME_RETRY_S, KeyframeWait

MAX_QUEUED_FRAMES = 6  # ~200 ms at 30 fps


def is_keyframe(codec_name: str, data: bytes) -> bool:
    """Whether an encoded frame can start decoding (VP8 key frame, H.264 IDR)."""
    if not data:
        return False
    name = codec_name.lower()
    if name == "vp8":
        return data[0] & 0x01 == 0  # the P bit of the VP8 frame tag is 0 on key frames
    if name == "h264":
        # Annex B: look at every NAL unit header after a start code.
        index = data.find(b"\x00\x00\x01")
        while index != -1 and index + 3 < len(data):
            if data[index + 3] & 0x1F == 5:
                return True
            index = data.find(b"\x00\x00\x01", index + 3)
        return False
    return True  # unknown codec: never hold frames back


# Sees an encoded frame (codec name, reassembled frame) on the event loop, where aiortc's receiver
# puts it: what forwards a publisher's media as it arrives (relay.forward).
EncodedTap = Callable[[str, JitterFrame], None]


class EncodedFrameQueue(queue.Queue):
    """Takes the place of aiortc's decoder input queue for one receiver: each encoded frame is first
    shown to ``tap``, then queued for aiortc's decoder thread unless ``decode`` is False (media that
    is only forwarded is never decoded)."""

    def __init__(self, tap: EncodedTap | None = None, decode: bool = True) -> None:
        super().__init__()
        self._tap = tap
        self._decode = decode

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:  # aiortc's shutdown sentinel always goes through: its thread must end
            super().put(item, block, timeout)
            return
        codec, frame = item
        if self._tap is not None:
            self._tap(codec.name, frame)
        if self._decode:
            self._admit(item)

    def _admit(self, item: tuple[Any, JitterFrame]) -> None:
        super().put(item)


class BoundedDecodeQueue(EncodedFrameQueue):
    def __init__(self, decode_error: threading.Event, max_frames: int = MAX_QUEUED_FRAMES, tap: EncodedTap | None = None,
                 *, retry_s: float = KEYFRAME_RETRY_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(tap)
        self._decode_error = decode_error
        self._max_frames = max_frames
        # Setting the flag makes aiortc send a PLI to the host with its next packet.
        self._keyframe = KeyframeWait(decode_error.set, retry_s, clock)
        self.frames_dropped = 0

    @property
    def waiting_for_keyframe(self) -> bool:
        return self._keyframe.waiting

    @property
    def keyframe_retries(self) -> int:
        return self._keyframe.retries

    def wait_for_keyframe(self) -> None:
        """Frames until the next keyframe cannot decode cleanly (the ingest skipped a hole and its
        jitter buffer has asked for a keyframe)."""
        self._keyframe.start()

    def _admit(self, item: tuple[Any, JitterFrame]) -> None:
        codec, frame = item
        if self._keyframe.waiting:
            if not self._keyframe.admit(is_keyframe(codec.name, frame.data)):
                self.frames_dropped += 1
                return
        elif self.qsize() >= self._max_frames:
            self._drop_all()
            self.frames_dropped += 1
            self._decode_error.set()
            self._keyframe.start()
            return
        super()._admit(item)

    def _drop_all(self) -> None:
        with self.mutex:
            self.frames_dropped += len(self.queue)
            self.queue.clear()


def install(receiver: object, tap: EncodedTap | None = None) -> BoundedDecodeQueue:
    """Bound an aiortc video RTCRtpReceiver's decoder input (before its decoder thread starts)."""
    bounded = BoundedDecodeQueue(decoder_error(receiver), tap=tap)  # type: ignore[arg-type]
    install_decoder_queue(receiver, bounded)  # type: ignore[arg-type]
    return bounded
