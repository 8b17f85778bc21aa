"""Fan-out of encoded packets to viewers: one small passthrough track per viewer.

Every viewer's RTCRtpSender gets the same av.Packet objects; aiortc only packetizes and encrypts
them (``encoder.pack``). A video track starts at a keyframe and, if its viewer falls behind by more
than its queue, drops to the next keyframe instead of buffering without bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_QUEUE = 30  # ~1 s at 30 fps
AUDIO_QUEUE = 25  # 0.5 s of 20 ms packets


class PacketTrack(MediaStreamTrack):
    """Yields pre-encoded packets; aiortc's sender packs them without re-encoding."""

    def __init__(self, kind: str, fanout: "FanOut", capacity: int) -> None:
        super().__init__()
        self.kind = kind
        self._fanout = fanout
        self._queue: deque[av.Packet] = deque()
        self._capacity = capacity
        self._wakeup = asyncio.Event()
        self.waiting_for_keyframe = kind == "video"
        self.packets_sent = 0
        self.packets_dropped = 0

    def push(self, packet: av.Packet) -> None:
        if self.readyState != "live":
            return
        if self.kind == "video":
            if self.waiting_for_keyframe:
                if not packet.is_keyframe:
                    return
                self.waiting_for_keyframe = False
            elif len(self._queue) >= self._capacity:
                # The viewer is not draining: skip to the next keyframe rather than grow.
                self.packets_dropped += len(self._queue) + 1
                self._queue.clear()
                self.waiting_for_keyframe = True
                self._fanout.request_keyframe()
                return
        elif len(self._queue) >= self._capacity:
            self._queue.popleft()
            self.packets_dropped += 1
        self._queue.append(packet)
        self._wakeup.set()

    async def recv(self) -> av.Packet:  # type: ignore[override]
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._wakeup.clear()
            await self._wakeup.wait()
        self.packets_sent += 1
        return self._queue.popleft()

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            self._queue.clear()
            self._wakeup.set()
            self._fanout._remove(self)


class FanOut:
    """All viewer tracks of one encoded stream (one kind, one rung)."""

    def __init__(self, kind: str, request_keyframe: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._tracks: set[PacketTrack] = set()
        self._request_keyframe = request_keyframe
        self.on_empty: Callable[[], None] | None = None
        self.packets_published = 0

    def add_track(self) -> PacketTrack:
        track = PacketTrack(self.kind, self, VIDEO_QUEUE if self.kind == "video" else AUDIO_QUEUE)
        self._tracks.add(track)
        if self.kind == "video":
            self.request_keyframe()
        return track

    def _remove(self, track: PacketTrack) -> None:
        self._tracks.discard(track)
        if not self._tracks and self.on_empty is not None:
            self.on_empty()

    def request_keyframe(self) -> None:
        if self._request_keyframe is not None:
            self._request_keyframe()

    def publish(self, packet: av.Packet) -> None:
        """Hand one packet to every track. Event loop only."""
        self.packets_published += 1
        for track in self._tracks:
            track.push(packet)

    def close(self) -> None:
        for track in list(self._tracks):
            track.stop()

    def __len__(self) -> int:
        return len(self._tracks)
