"""An ingest jitter buffer that completes a video frame on its marker bit.

aiortc's JitterBuffer only knows a frame is complete when the first packet of the NEXT frame
arrives (a new RTP timestamp), which holds every frame for one frame interval (33 ms at 30 fps)
before it is even decoded. The relay owns its ingest, so it completes a frame as soon as its last
packet (RTP marker bit, set by VP8 and H.264 packetizers) is in and every packet before it is too.
A frame whose marker packet was lost still completes the old way, on the next timestamp.
"""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket


class MarkerJitterBuffer(JitterBuffer):
    def __init__(self, capacity: int = 512) -> None:
        super().__init__(capacity=capacity, prefetch=0, is_video=True)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        assert self._origin is not None
        packets: list[RtpPacket] = []
        timestamp: int | None = None
        for count in range(self._capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
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
        return JitterFrame(data=b"".join(p._data for p in packets), timestamp=timestamp)  # type: ignore[attr-defined]


def install(receiver: object) -> None:
    """Give an aiortc video RTCRtpReceiver our jitter buffer (before any packet arrives)."""
    setattr(receiver, "_RTCRtpReceiver__jitter_buffer", MarkerJitterBuffer())
