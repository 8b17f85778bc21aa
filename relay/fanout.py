"""Fan-out of encoded packets to viewers: one small passthrough track per viewer.

The lean egress (the default): a rung's packet is packetized ONCE into RTP payloads
(``relay.egress.NativeFrame``) and one native call sends it to every viewer that takes it (its own
header, SRTP and one ``sendmmsg`` each). The track only decides whether its viewer takes a packet
(keyframe waits, rung cut-overs); until its viewer's DTLS is up it holds a short backlog, sent the
moment the stream opens. The aiortc egress (``egress="aiortc"``, the baseline): every viewer's
RTCRtpSender reads the same av.Packet objects from its track's queue and packetizes and encrypts
them itself (``encoder.pack``). Either way a video track starts at a keyframe and, if its viewer
falls behind by more than its queue, drops to the next keyframe instead of buffering without bound.

A video track can move between rungs (fan-outs of different encoders): it keeps taking the current
rung until the target rung delivers a keyframe, and cuts over exactly there. RTP timestamps stay
monotonic across the cut (all rungs share one clock; a keyframe that is not newer than what was
already sent is nudged one tick later), and aiortc keeps sequence numbers and picture ids running.
"""

from __future__ import annotations

import asyncio
from collections import deque
from fractions import Fraction
from typing import Callable

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .egress import EgressStream, NativeFrame, send_frame_soon

VIDEO_QUEUE = 30  # ~1 s at 30 fps
AUDIO_QUEUE = 25  # 0.5 s of 20 ms packets


class RetimedPacket:
    """A shared packet with a per-viewer timestamp (aiortc's pack only reads bytes, pts, time_base)."""

    __slots__ = ("_packet", "pts", "time_base", "is_keyframe", "size")

    def __init__(self, packet: av.Packet, pts: int) -> None:
        self._packet = packet
        self.pts = pts
        self.time_base: Fraction | None = packet.time_base
        self.is_keyframe = packet.is_keyframe
        self.size = packet.size

    def __bytes__(self) -> bytes:
        return bytes(self._packet)


def native_frame(packet: av.Packet | RetimedPacket, kind: str) -> NativeFrame:
    """A rung's packet as RTP payloads, shared by every viewer it is sent to."""
    if kind == "video":
        return NativeFrame.from_vp8(bytes(packet), keyframe=bool(packet.is_keyframe))
    return NativeFrame.from_opus(bytes(packet))


def rtp_timestamp(packet: av.Packet | RetimedPacket, clock_rate: int) -> int:
    """The packet's time on the RTP clock (each stream adds its own random origin)."""
    if packet.pts is None or packet.time_base is None:
        return 0
    return int(packet.pts * packet.time_base * clock_rate)


class PacketTrack(MediaStreamTrack):
    """Yields pre-encoded packets; aiortc's sender packs them without re-encoding."""

    def __init__(self, kind: str, capacity: int) -> None:
        super().__init__()
        self.kind = kind
        self._queue: deque[av.Packet | RetimedPacket] = deque()
        self._capacity = capacity
        self._wakeup = asyncio.Event()
        self.source: FanOut | None = None
        self.pending: FanOut | None = None  # the rung we are switching to, until its keyframe
        self.waiting_for_keyframe = kind == "video"
        self.last_pts = -1
        self.packets_sent = 0
        self.bytes_sent = 0
        self.packets_dropped = 0
        self.switches = 0
        self.on_stop: Callable[["PacketTrack"], None] | None = None
        # Lean egress: packets go out natively, aiortc's sender reads nothing from this track. Set
        # before negotiation; ``egress`` is the viewer's native stream once its DTLS is up.
        self.lean = False
        self.egress: EgressStream | None = None

    # -- rung changes (video)
    def switch_to(self, target: "FanOut | None") -> None:
        """Move to ``target`` at its next keyframe; None pauses video (nothing more is sent)."""
        if target is self.source:
            if self.pending is not None:
                self.pending._detach(self)
                self.pending = None
            return
        if self.pending is not None and self.pending is not target:
            self.pending._detach(self)
            self.pending = None
        if target is None:
            if self.source is not None:
                self.source._detach(self)
                self.source = None
            return
        if self.source is None:
            self.source = target
            self.waiting_for_keyframe = True
            target._attach(self)
        elif self.pending is not target:
            self.pending = target
            target._attach(self)

    def push(self, packet: av.Packet, origin: "FanOut") -> EgressStream | None:
        """Take ``packet`` from ``origin`` if this viewer should get it. Returns the native stream it
        is to be sent on right away (the caller sends the whole rung's at once), else None."""
        if self.readyState != "live":
            return None
        if origin is self.pending:
            if not packet.is_keyframe:
                return None
            # The target rung has a keyframe: cut over here.
            old = self.source
            self.source, self.pending = origin, None
            self.waiting_for_keyframe = False
            self.switches += 1
            if old is not None:
                old._detach(self)
        elif origin is not self.source:
            return None
        if self.kind == "video":
            if self.waiting_for_keyframe:
                if not packet.is_keyframe:
                    return None
                self.waiting_for_keyframe = False
            elif self.egress is None and len(self._queue) >= self._capacity:
                # The viewer is not draining: skip to the next keyframe rather than grow.
                self.packets_dropped += len(self._queue) + 1
                self._queue.clear()
                self.waiting_for_keyframe = True
                origin.request_keyframe()
                return None
            if self.egress is not None:
                return self._sent(packet)
            if packet.pts is not None and packet.pts <= self.last_pts:
                packet = RetimedPacket(packet, self.last_pts + 1)  # type: ignore[assignment]
        elif self.egress is not None:
            return self._sent(packet)
        elif len(self._queue) >= self._capacity:
            self._queue.popleft()
            self.packets_dropped += 1
        if packet.pts is not None:
            self.last_pts = packet.pts
        self._queue.append(packet)
        self._wakeup.set()
        return None

    def _sent(self, packet: av.Packet | RetimedPacket) -> EgressStream:
        assert self.egress is not None
        self.packets_sent += 1
        self.bytes_sent += packet.size
        return self.egress

    def start_egress(self, stream: EgressStream) -> None:
        """The viewer's native stream is up: send the backlog held until now, then send directly."""
        # The track decides about keyframes; the stream must not wait for one on its own.
        stream.waiting_for_keyframe = False
        self.egress = stream
        backlog, self._queue = list(self._queue), deque()
        for packet in backlog:
            send_frame_soon([stream], native_frame(packet, self.kind), rtp_timestamp(packet, stream.params.clock_rate))
            self._sent(packet)
        if self.kind == "video" and self.waiting_for_keyframe and self.source is not None:
            self.source.request_keyframe()

    def fall_back_to_aiortc(self) -> None:
        """No native stream for this viewer (a codec it cannot carry): aiortc's sender reads us."""
        self.lean = False
        self._wakeup.set()

    async def recv(self) -> av.Packet:
        while not self._queue or self.lean:  # lean: aiortc's sender waits here for good
            if self.readyState != "live":
                raise MediaStreamError
            self._wakeup.clear()
            await self._wakeup.wait()
        packet = self._queue.popleft()
        self.packets_sent += 1
        self.bytes_sent += packet.size
        return packet  # type: ignore[return-value]

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            self._queue.clear()
            self._wakeup.set()
            if self.egress is not None:
                self.egress.close()
            for fanout in (self.source, self.pending):
                if fanout is not None:
                    fanout._detach(self)
            self.source = self.pending = None
            if self.on_stop is not None:
                self.on_stop(self)


class FanOut:
    """All viewer tracks of one encoded stream (one kind, one rung)."""

    def __init__(self, kind: str, request_keyframe: Callable[[], None] | None = None, name: str = "") -> None:
        self.kind = kind
        self.name = name
        self._tracks: set[PacketTrack] = set()
        self._request_keyframe = request_keyframe
        self.on_first: Callable[[], None] | None = None
        self.on_empty: Callable[[], None] | None = None
        self.packets_published = 0

    def add_track(self) -> PacketTrack:
        track = PacketTrack(self.kind, VIDEO_QUEUE if self.kind == "video" else AUDIO_QUEUE)
        track.switch_to(self)
        return track

    def _attach(self, track: PacketTrack) -> None:
        first = not self._tracks
        self._tracks.add(track)
        if first and self.on_first is not None:
            self.on_first()
        if self.kind == "video":
            self.request_keyframe()

    def _detach(self, track: PacketTrack) -> None:
        if track in self._tracks:
            self._tracks.discard(track)
            if not self._tracks and self.on_empty is not None:
                self.on_empty()

    def request_keyframe(self) -> None:
        if self._request_keyframe is not None:
            self._request_keyframe()

    def restart(self) -> None:
        """What feeds this fan-out changed (another encoder, a forwarded publisher): a delta of the
        new stream cannot follow the old one, so every video track waits for its first keyframe."""
        if self.kind != "video":
            return
        for track in self._tracks:
            if track.source is self:
                track.waiting_for_keyframe = True
        self.request_keyframe()

    def publish(self, packet: av.Packet) -> None:
        """Hand one packet to every track; packetize it once for every lean viewer that takes it and
        send it to all of them in one native call. Event loop only."""
        self.packets_published += 1
        streams = [s for s in (track.push(packet, self) for track in tuple(self._tracks)) if s is not None]
        if streams:
            send_frame_soon(streams, native_frame(packet, self.kind), rtp_timestamp(packet, streams[0].params.clock_rate))

    def close(self) -> None:
        for track in list(self._tracks):
            track.stop()

    def __len__(self) -> int:
        return len(self._tracks)
