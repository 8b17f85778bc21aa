"""Forwarding: a publisher's encoded frames go to a fan-out as they arrive, with no decode or encode.

What needs no overlay and no composition is forwarded the way an SFU forwards: the buyer's picture
and voice in a 1v1 call (the seller sees them as sent) and the raw host-to-host feed of a PK battle
(the other host's studio). aiortc's receiver still does ICE, DTLS, SRTP, NACKs and reassembly; its
reassembled frames are taken from its decoder input (instead of, or as well as, decoding them;
``relay.decodequeue.EncodedFrameQueue``) and published as ``av.Packet`` s into a fan-out, whose
viewers' egress sends them on with their own headers. The same path carries a cascade edge's pull
of a rung from its origin (``relay.cascade``).

Timestamps follow the publisher's RTP clock, so the sender's frame spacing survives the network's
jitter, anchored on the room's media clock (``epoch``) when a stream starts or its clock jumps: a
fan-out fed in turn by a slate encoder and a forwarded publisher, or several rungs pulled over
separate connections, keeps one timeline.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import av
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

from .aiortc_private import rtp_payload
from .decodequeue import is_keyframe
from .fanout import FanOut
from .keyframes import KEYFRAME_RETRY_S, KeyframeWait

CLOCK_RATES = {"video": 90000, "audio": 48000}
KEYFRAME_REQUEST_MIN_INTERVAL_S = 0.25
# A publisher's RTP clock further than this from where the media clock says it should be has jumped
# (a new stream, a restarted encoder): follow the media clock again.
RESYNC_S = 2.0
RTP_WRAP = 1 << 32


class EveryPacketIsAFrame(JitterBuffer):
    """Opus: one packet is one frame; hand it on at once (aiortc's audio buffer holds back 4, 80 ms,
    for its decoder; whoever receives the forwarded audio has a jitter buffer of its own)."""

    def __init__(self) -> None:
        super().__init__(capacity=16, prefetch=0)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        return False, JitterFrame(data=rtp_payload(packet), timestamp=packet.timestamp)


@dataclass
class ForwardStats:
    frames: int = 0
    frames_dropped: int = 0  # broken by a skipped hole, before the next keyframe
    keyframe_requests: int = 0


class Forwarder:
    """One kind of one publisher's media (or of one pull), forwarded into ``fanout``. Event loop only."""

    def __init__(self, kind: str, fanout: FanOut, epoch: float, clock: Callable[[], float] = time.monotonic,
                 stats: ForwardStats | None = None) -> None:
        self.kind = kind
        self._fanout = fanout
        self._epoch = epoch
        self._clock = clock
        self._rate = CLOCK_RATES[kind]
        self._time_base = Fraction(1, self._rate)
        self._decode_error: threading.Event | None = None  # the receiver's flag that makes aiortc send a PLI
        self._last_keyframe_request = -KEYFRAME_REQUEST_MIN_INTERVAL_S
        self._last_rtp: int | None = None
        self._last_pts = -1
        # After a skipped hole: deltas are broken until a keyframe, asked for again while none comes.
        self._keyframe = KeyframeWait(self.request_keyframe, KEYFRAME_RETRY_S, clock)
        self.stats = ForwardStats() if stats is None else stats

    def attach(self, decode_error: threading.Event | None) -> None:
        """A new receiver feeds us (``decode_error``: its PLI flag): its clock is new, anchor again."""
        self._decode_error = decode_error
        self._last_rtp = None
        self._keyframe.waiting = False

    def hole_skipped(self) -> None:
        """The jitter buffer gave up on a hole: deltas until the next keyframe are broken (its own
        PLI already asks the publisher for that keyframe)."""
        self._keyframe.start()

    def request_keyframe(self) -> None:
        """Ask the publisher for a keyframe (coalesced; aiortc sends the PLI with its next packet)."""
        now = self._clock()
        if self._decode_error is None or now - self._last_keyframe_request < KEYFRAME_REQUEST_MIN_INTERVAL_S:
            return
        self._last_keyframe_request = now
        self.stats.keyframe_requests += 1
        self._decode_error.set()

    def on_frame(self, codec_name: str, frame: JitterFrame) -> None:
        keyframe = self.kind == "video" and is_keyframe(codec_name, frame.data)
        if not self._keyframe.admit(keyframe):
            self.stats.frames_dropped += 1
            return
        packet = av.Packet(frame.data)
        packet.pts = self.pts_of(frame.timestamp)
        packet.time_base = self._time_base
        packet.is_keyframe = keyframe
        self.stats.frames += 1
        self._fanout.publish(packet)

    def pts_of(self, rtp_timestamp: int) -> int:
        """Where a frame with this RTP timestamp sits on the media clock."""
        now = round((self._clock() - self._epoch) * self._rate)
        if self._last_rtp is None:
            pts = now
        else:
            step = (rtp_timestamp - self._last_rtp) % RTP_WRAP
            if step >= RTP_WRAP // 2:
                step -= RTP_WRAP  # an older frame (audio out of order): before the last one
            pts = self._last_pts + step
            if abs(pts - now) > RESYNC_S * self._rate:
                pts = max(now, self._last_pts + 1)
        if self._last_rtp is None or pts > self._last_pts:
            self._last_rtp, self._last_pts = rtp_timestamp, pts
        return pts


@dataclass(frozen=True)
class Forwarding:
    """Where a publisher's media goes as it arrives, besides (or, ``decode`` False, instead of) its
    decoder: a source nobody draws on (a call's buyer) is never decoded when it can be forwarded."""

    video: Forwarder
    audio: Forwarder
    decode: bool = True
