"""An ingest jitter buffer that completes a video frame on its marker bit.

aiortc's JitterBuffer only knows a frame is complete when the first packet of the NEXT frame
arrives (a new RTP timestamp), which holds every frame for one frame interval (33 ms at 30 fps)
before it is even decoded. The relay owns its ingest, so it completes a frame as soon as its last
packet (RTP marker bit, set by VP8 and H.264 packetizers) is in and every packet before it is too.
A frame whose marker packet was lost still completes the old way, on the next timestamp.

A hole that is never filled (its retransmission lost too: aiortc's receiver NACKs again only when a
new gap appears) would hold every later frame until 512 packets have queued behind it, seconds of
frozen room. After ``give_up_s`` the buffer skips the hole and the frame it broke, asks for a
keyframe (the receiver sends a PLI) and tells ``on_skip`` so the decoder waits for that keyframe.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

from .aiortc_private import install_jitter_buffer, rtp_payload

GAP_GIVE_UP_S = 0.5  # a NACK round trip or two, even for a far-away host


class MarkerJitterBuffer(JitterBuffer):
    def __init__(self, capacity: int = 512, *, give_up_s: float = GAP_GIVE_UP_S,
                 clock: Callable[[], float] = time.monotonic, on_skip: Callable[[], None] | None = None) -> None:
        super().__init__(capacity=capacity, prefetch=0, is_video=True)
        self._give_up_s = give_up_s
        self._clock = clock
        self._on_skip = on_skip
        self._hole_since: float | None = None
        self._gap_offset: int | None = None  # where the last frame scan met a missing packet
        self.gaps_skipped = 0

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self._gap_offset = None
        pli, frame = super().add(packet)
        if frame is not None or not self._hole_before(packet.sequence_number):
            self._hole_since = None  # progress, or nothing missing before what is here
            return pli, frame
        now = self._clock()
        if self._hole_since is None:
            self._hole_since = now
            return pli, None
        if now - self._hole_since < self._give_up_s:
            return pli, None
        self._hole_since = None
        self._skip_hole()
        self.gaps_skipped += 1
        if self._on_skip is not None:
            self._on_skip()
        return True, self._remove_frame(packet.sequence_number)

    def _hole_before(self, sequence_number: int) -> bool:
        """Whether a packet between the origin and ``sequence_number`` is missing: where the frame
        scan this ``add`` just ran stopped, no second scan."""
        if self._origin is None or self._gap_offset is None:
            return False
        return self._gap_offset < uint16_add(sequence_number, -self._origin)

    def _skip_hole(self) -> None:
        """Drop everything up to and through the first hole, and the frame right after it: its start
        may have been in the hole, so it could neither decode nor be told apart from a keyframe."""
        assert self._origin is not None
        crossed = False
        for _ in range(self._capacity):
            missing = self._packets[self._origin % self._capacity] is None
            if crossed and not missing:
                break
            crossed = crossed or missing
            self.remove(1)
        first = self._packets[self._origin % self._capacity]
        while first is not None:
            packet = self._packets[self._origin % self._capacity]
            if packet is None or packet.timestamp != first.timestamp:
                break
            self.remove(1)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        assert self._origin is not None
        packets: list[RtpPacket] = []
        timestamp: int | None = None
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                self._gap_offset = count
                return None  # a gap: wait for it (or for NACK, or for the buffer to give up)
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                return self._take(packets, timestamp, count)  # marker lost: the next frame began
            packets.append(packet)
            if packet.marker:
                return self._take(packets, timestamp, count + 1)
        return None

    def _take(self, packets: list[RtpPacket], timestamp: int, count: int) -> JitterFrame:
        self.remove(count)
        return JitterFrame(data=b"".join(rtp_payload(p) for p in packets), timestamp=timestamp)


def install(receiver: object, on_skip: Callable[[], None] | None = None) -> MarkerJitterBuffer:
    """Give an aiortc video RTCRtpReceiver our jitter buffer (before any packet arrives)."""
    buffer = MarkerJitterBuffer(on_skip=on_skip)
    install_jitter_buffer(receiver, buffer)  # type: ignore[arg-type]
    return buffer
