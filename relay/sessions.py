"""WebRTC sessions: a publisher (WHIP ingest) and a viewer (WHEP egress).

Each session owns exactly one RTCPeerConnection and the tasks reading from it; ``close()`` is
idempotent and releases both.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Awaitable, Callable

import av
from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket

from .fanout import PacketTrack
from .ice import announce_host_addresses, rtc_configuration

log = logging.getLogger("shelfcast.sessions")

OnClosed = Callable[["Session"], Awaitable[None]]


class NegotiationError(Exception):
    """The offer was well-formed but aiortc could not answer it."""


EGRESS_MIME = {"video": "video/vp8", "audio": "audio/opus"}


def _only_codec(transceiver: RTCRtpTransceiver, mime: str) -> None:
    """Answer with exactly the codec our packets are in (plus its RTX), whatever the offer's order."""
    keep = [c for c in transceiver._codecs if c.mimeType.lower() == mime]
    payload_types = {c.payloadType for c in keep}
    rtx = [
        c
        for c in transceiver._codecs
        if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") in payload_types
    ]
    transceiver._codecs = keep + rtx


class Session:
    kind = "session"

    def __init__(self, room_id: str, ice_hosts: tuple[str, ...], ice_servers: tuple[str, ...]) -> None:
        self.id = secrets.token_urlsafe(12)
        self.room_id = room_id
        self.created_at = time.monotonic()
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers))
        self._ice_hosts = ice_hosts
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._on_closed: OnClosed | None = None

        @self.pc.on("connectionstatechange")
        async def _on_state() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                await self.close()

    @property
    def connection_state(self) -> str:
        return self.pc.connectionState

    @property
    def closed(self) -> bool:
        return self._closed

    def on_closed(self, callback: OnClosed) -> None:
        self._on_closed = callback

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _negotiate(self, offer_sdp: str, attach: Callable[[], None]) -> str:
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            attach()
            announce_host_addresses(self.pc, self._ice_hosts)
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            await self.close()
            raise NegotiationError(str(exc) or type(exc).__name__) from exc
        return self.pc.localDescription.sdp

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._release()
        await self.pc.close()
        if self._on_closed is not None:
            await self._on_closed(self)

    def _release(self) -> None:
        """Subclasses free what they hold besides the peer connection."""


class Publisher(Session):
    """Receives the host's tracks and hands every decoded frame to the room."""

    kind = "publisher"

    def __init__(
        self,
        room_id: str,
        ice_hosts: tuple[str, ...],
        ice_servers: tuple[str, ...],
        on_video: Callable[[av.VideoFrame], None],
        on_audio: Callable[[av.AudioFrame], None],
    ) -> None:
        super().__init__(room_id, ice_hosts, ice_servers)
        self._on_video = on_video
        self._on_audio = on_audio
        self.frames_received = 0
        self.video_codec: str | None = None

        @self.pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            self._spawn(self._read(track))

    async def accept(self, offer_sdp: str) -> str:
        def attach() -> None:
            for transceiver in self.pc.getTransceivers():
                transceiver.direction = "recvonly"

        answer = await self._negotiate(offer_sdp, attach)
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "video" and transceiver._codecs:
                self.video_codec = transceiver._codecs[0].mimeType
        return answer

    async def _read(self, track: MediaStreamTrack) -> None:
        deliver = self._on_video if track.kind == "video" else self._on_audio
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    self.frames_received += 1
                deliver(frame)  # type: ignore[arg-type]
        except MediaStreamError:
            pass


class Viewer(Session):
    """Sends the room's encoded packets; routes the viewer's keyframe requests to the encoder."""

    kind = "viewer"

    def __init__(
        self,
        room_id: str,
        ice_hosts: tuple[str, ...],
        ice_servers: tuple[str, ...],
        video: PacketTrack | None,
        audio: PacketTrack | None,
        request_keyframe: Callable[[], None],
    ) -> None:
        super().__init__(room_id, ice_hosts, ice_servers)
        self.video = video
        self.audio = audio
        self._request_keyframe = request_keyframe
        self.keyframe_requests = 0

    async def accept(self, offer_sdp: str) -> str:
        def attach() -> None:
            for track in (self.video, self.audio):
                if track is None:
                    continue
                if any(t.kind == track.kind for t in self.pc.getTransceivers()):
                    sender = self.pc.addTrack(track)
                    _only_codec(self._transceiver_of(sender), EGRESS_MIME[track.kind])
                    self._intercept_rtcp(sender)
                else:
                    track.stop()
            for transceiver in self.pc.getTransceivers():
                if transceiver.sender.track is None:
                    transceiver.direction = "inactive"

        return await self._negotiate(offer_sdp, attach)

    def _transceiver_of(self, sender: object) -> RTCRtpTransceiver:
        return next(t for t in self.pc.getTransceivers() if t.sender is sender)

    def _intercept_rtcp(self, sender: object) -> None:
        # aiortc turns PLI/FIR into a flag for its own encoder, which a passthrough track never
        # uses; catch them first and send them to the room's encoder (coalesced there).
        original = sender._handle_rtcp_packet  # type: ignore[attr-defined]

        async def handle(packet: object) -> None:
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                self.keyframe_requests += 1
                self._request_keyframe()
            await original(packet)

        sender._handle_rtcp_packet = handle  # type: ignore[attr-defined]

    def _release(self) -> None:
        for track in (self.video, self.audio):
            if track is not None:
                track.stop()
