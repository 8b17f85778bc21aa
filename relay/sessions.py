"""WebRTC sessions: a publisher (WHIP ingest) and a viewer (WHEP egress).

Each session owns exactly one RTCPeerConnection and the tasks reading from it; ``close()`` is
idempotent and releases both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import replace
from typing import Awaitable, Callable, Iterable

import av
from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    unpack_remb_fci,
)

from .aiortc_private import (RtcpHandler, before_rtcp_send, decoded_frames, decoder_error, install_decoder_queue,
                             install_jitter_buffer, intercept_rtcp, keep_codecs, last_sender_report, negotiated_codecs,
                             retransmit, sender_rtt, sender_ssrc, set_dtls_server)
from .errors import ShelfcastError
from .abr import AbrConfig, Feedback, Rung, initial_state, step
from .rtcpfeedback import NackRepeats, SenderReports
from .sdp import OfferSummary, keep_offered_bundle, parse_offer, prepare_offer
from . import decodequeue, jitter
from . import egress
from .egress import EgressStream, report_to_sender
from .fanout import PacketTrack
from .forward import EveryPacketIsAFrame, Forwarder, Forwarding
from .ice import IceServer, announce_host_addresses, keep_consent_while_receiving, rtc_configuration

log = logging.getLogger("shelfcast.sessions")

ABR_TICK_S = 0.5
# The host's socket takes a 720p keyframe (~100 KB) in one burst, read by the event loop; with the
# loop 50-70 ms late under hundreds of viewers the default ~200 KB buffer can overflow, a lost
# keyframe packet costs the whole room its picture until the next keyframe, and the next one comes
# in the same kind of burst.
INGEST_RECEIVE_BUFFER = 4 << 20
CLOSE_TIMEOUT_S = 5.0
VIEWER_TIMEOUT_S = 15.0  # receivers send RTCP about every second
OnClosed = Callable[["Session"], Awaitable[None]]


class NegotiationError(ShelfcastError):
    """The offer was well-formed but aiortc could not answer it."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, "negotiation_failed", f"could not answer the offer: {reason}")


EGRESS_MIME = {"video": "video/vp8", "audio": "audio/opus"}


def _only_codec(transceiver: RTCRtpTransceiver, mime: str) -> None:
    """Answer with exactly the codec our packets are in (plus its RTX), whatever the offer's order."""
    codecs = negotiated_codecs(transceiver)
    keep = [c for c in codecs if c.mimeType.lower() == mime]
    payload_types = {c.payloadType for c in keep}
    rtx = [c for c in codecs if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") in payload_types]
    keep_codecs(transceiver, keep + rtx)


def _echo_h264_profiles(transceivers: Iterable[RTCRtpTransceiver], offered: dict[int, str]) -> None:
    """aiortc was shown these H.264 payload types as Constrained Baseline (see sdp.prepare_offer):
    the answer names the profile the offer gave them, which is what will arrive."""
    for transceiver in transceivers:
        for codec in negotiated_codecs(transceiver):
            if codec.mimeType.lower() == "video/h264" and codec.payloadType in offered:
                codec.parameters["profile-level-id"] = offered[codec.payloadType]


def _answer_actpass_as_server(transceivers: Iterable[RTCRtpTransceiver], offer: OfferSummary) -> None:
    """Be the DTLS server whenever the offer lets us (``actpass``): see aiortc_private.set_dtls_server.
    An ``active`` offer makes aiortc the server by itself, a ``passive`` one the client."""
    for transceiver in transceivers:
        section = offer.section(transceiver.mid)
        if section is not None and section.setup == "actpass":
            set_dtls_server(transceiver)


class Session:
    kind = "session"

    def __init__(self, room_id: str, ice_hosts: tuple[str, ...], ice_servers: tuple[IceServer, ...]) -> None:
        self.id = secrets.token_urlsafe(12)
        self.room_id = room_id
        self.created_at = time.monotonic()
        # This session's own STUN/TURN servers (TURN credentials minted for it): the server's peer
        # connection uses them, and the answer offers the same ones to the client (Link headers).
        self.ice_servers = ice_servers
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
    def log_ids(self) -> dict[str, str]:
        """``extra`` for log records about this session (structured room/session fields)."""
        return {"room": self.room_id, "session": self.id}

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
            summary = parse_offer(offer_sdp)
            prepared = prepare_offer(offer_sdp, ingest=self.kind == "publisher")
            await self.pc.setRemoteDescription(RTCSessionDescription(prepared.sdp, "offer"))
            _echo_h264_profiles(self.pc.getTransceivers(), prepared.h264_profiles)
            attach()
            _answer_actpass_as_server(self.pc.getTransceivers(), summary)
            announce_host_addresses(self.pc, self._ice_hosts)
            self._prepare_ice()
            answer = await self.pc.createAnswer()
            await self.pc.setLocalDescription(
                RTCSessionDescription(keep_offered_bundle(answer.sdp, summary.bundle), answer.type))
        except ShelfcastError:  # the offer's own refusal (an SdpError), as it is
            await self.close()
            raise
        except Exception as exc:  # aiortc's own errors (InvalidAccessError, OperationError...) included:
            # whatever fails while applying a caller's offer is the caller's offer's fault.
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
        try:
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT_S)
        except Exception:  # aiortc can trip over a half-negotiated connection; it is closed either way
            log.warning("closing the peer connection of a %s failed", self.kind, exc_info=True, extra=self.log_ids)
        if self._on_closed is not None:
            await self._on_closed(self)

    def _release(self) -> None:
        """Subclasses free what they hold besides the peer connection."""

    def _prepare_ice(self) -> None:
        """Subclasses adjust their ICE connections before the answer gathers."""


class Publisher(Session):
    """Receives the host's tracks and hands every decoded frame to the room."""

    kind = "publisher"

    def __init__(
        self,
        room_id: str,
        ice_hosts: tuple[str, ...],
        ice_servers: tuple[IceServer, ...],
        on_video: Callable[[av.VideoFrame], None],
        on_audio: Callable[[av.AudioFrame], None],
        forwarding: Forwarding | None = None,
    ) -> None:
        super().__init__(room_id, ice_hosts, ice_servers)
        self._on_video = on_video
        self._on_audio = on_audio
        self._forwarding = forwarding
        self.forwarded: set[str] = set()  # kinds whose encoded frames are forwarded as they arrive
        self.frames_received = 0
        self.last_media_at = time.monotonic()  # of the last frame of either kind (or the offer)
        self.frames_skipped = 0  # decoded frames dropped because newer ones were already waiting
        self.decode_queue: decodequeue.BoundedDecodeQueue | None = None
        self.jitter: jitter.MarkerJitterBuffer | None = None
        self.video_codec: str | None = None

        @self.pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            self._spawn(self._read(track))

        @self.pc.on("connectionstatechange")
        def _on_connected() -> None:
            if self.pc.connectionState == "connected":
                widen_receive_buffer(self.pc, INGEST_RECEIVE_BUFFER)
            elif self.pc.connectionState == "failed" and dtls_failed(self.pc):
                # The one failure a publisher's operator can fix, and aiortc says only "error []".
                log.warning("publisher's DTLS handshake failed: its certificate may use a key OpenSSL refuses "
                            "(FFmpeg's whip muxer makes a P-224 key unless given -cert_file/-key_file with a "
                            "P-256 key; README: Publish from OBS or FFmpeg)", extra=self.log_ids)

    async def accept(self, offer_sdp: str) -> str:
        def attach() -> None:
            for transceiver in self.pc.getTransceivers():
                transceiver.direction = "recvonly"
                self._take_in(transceiver)

        answer = await self._negotiate(offer_sdp, attach)
        for transceiver in self.pc.getTransceivers():
            codecs = negotiated_codecs(transceiver)
            if transceiver.kind == "video" and codecs:
                self.video_codec = codecs[0].mimeType
        return answer

    def _take_in(self, transceiver: RTCRtpTransceiver) -> None:
        """Set up what the receiver does with each reassembled frame: forward it (when its codec is
        what viewers' egress carries), decode it (unless forwarding is its only use), or both."""
        kind, receiver = transceiver.kind, transceiver.receiver
        forwarder = self._forwarding_for(transceiver)
        decode = forwarder is None or self._forwarding is None or self._forwarding.decode
        tap: decodequeue.EncodedTap | None = None
        if forwarder is not None:
            self.forwarded.add(kind)
            forwarder.attach(decoder_error(receiver))
            tap = self._tap(kind, forwarder)
        if kind == "video":
            skipped: list[Callable[[], None]] = [] if forwarder is None else [forwarder.hole_skipped]
            if decode:
                self.decode_queue = decodequeue.install(receiver, tap)  # bounded
                skipped.append(self.decode_queue.wait_for_keyframe)
            else:
                install_decoder_queue(receiver, decodequeue.EncodedFrameQueue(tap, decode=False))
            def hole_skipped() -> None:
                for then in skipped:
                    then()

            # frames complete on the marker bit; a hole never filled is skipped
            self.jitter = jitter.install(receiver, hole_skipped)
        elif tap is not None:
            if not decode:
                install_jitter_buffer(receiver, EveryPacketIsAFrame())
            install_decoder_queue(receiver, decodequeue.EncodedFrameQueue(tap, decode=decode))

    def _forwarding_for(self, transceiver: RTCRtpTransceiver) -> Forwarder | None:
        """The forwarder of this kind, if the publisher will send what viewers' egress carries. A
        source that is only forwarded prefers that codec wherever the offer lists it; a decoded
        source keeps the publisher's first choice and is forwarded only if that is it."""
        forwarding = self._forwarding
        if forwarding is None:
            return None
        mime = EGRESS_MIME[transceiver.kind]
        codecs = negotiated_codecs(transceiver)
        offered = [c for c in codecs if not c.mimeType.lower().endswith("/rtx")]
        usable = any(c.mimeType.lower() == mime for c in offered) if not forwarding.decode else (
            bool(offered) and offered[0].mimeType.lower() == mime)
        if not usable:
            return None
        _only_codec(transceiver, mime)  # what arrives must be what is forwarded
        return forwarding.video if transceiver.kind == "video" else forwarding.audio

    def _tap(self, kind: str, forwarder: Forwarder) -> decodequeue.EncodedTap:
        def tap(codec_name: str, frame: JitterFrame) -> None:
            self.last_media_at = time.monotonic()  # forwarded media may never reach _read
            forwarder.on_frame(codec_name, frame)
        return tap

    async def _read(self, track: MediaStreamTrack) -> None:
        deliver = self._on_video if track.kind == "video" else self._on_audio
        try:
            while True:
                frame = await track.recv()
                self.last_media_at = time.monotonic()
                if track.kind == "video":
                    self.frames_received += 1
                    frame = self._newest(track, frame)  # type: ignore[assignment]
                deliver(frame)  # type: ignore[arg-type]
        except MediaStreamError:
            pass

    def silent_for(self, now: float) -> float:
        return now - self.last_media_at

    def _prepare_ice(self) -> None:
        keep_consent_while_receiving(self.pc, lambda: self.last_media_at)

    def _newest(self, track: MediaStreamTrack, frame: object) -> object:
        """aiortc queues decoded frames without bound; if the loop fell behind, keep only the newest."""
        pending = decoded_frames(track)
        while pending is not None and not pending.empty():
            newer = pending.get_nowait()
            if newer is None:  # end of track: put the sentinel back for the next recv()
                pending.put_nowait(None)
                break
            frame = newer
            self.frames_skipped += 1
            self.frames_received += 1
        return frame


def dtls_failed(pc: RTCPeerConnection) -> bool:
    return any(t.receiver.transport is not None and t.receiver.transport.state == "failed"
               for t in pc.getTransceivers())


def widen_receive_buffer(pc: RTCPeerConnection, size: int) -> int:
    """Give the socket ``pc``'s media arrives on a receive buffer of ``size`` bytes (past the
    system's cap when the process may, as root can); returns what the kernel reports, 0 if the
    connection has no socket yet."""
    found = egress.transport_of(pc)
    if found is None:
        return 0
    sock = socket.socket(fileno=os.dup(found[0]))  # a duplicate: closing it leaves aioice's open
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        reported: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        return reported
    finally:
        sock.close()


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux


class Viewer(Session):
    """Sends the room's encoded packets on the rung its link can carry; routes its keyframe requests
    to that rung's encoder (aiortc drops them for pre-encoded tracks)."""

    kind = "viewer"

    def __init__(
        self,
        room_id: str,
        ice_hosts: tuple[str, ...],
        ice_servers: tuple[IceServer, ...],
        video: PacketTrack | None,
        audio: PacketTrack | None,
        *,
        switch: Callable[[PacketTrack, int], None] | None,
        ladder: tuple[Rung, ...],
        abr: AbrConfig | None,
        timeout_s: float = VIEWER_TIMEOUT_S,
        rung: int = 0,
        server_busy: Callable[[], bool] | None = None,
        egress: str = "native",
    ) -> None:
        super().__init__(room_id, ice_hosts, ice_servers)
        self.role: str | None = None  # who is watching: a viewer (None), a call party, another node...
        self.video = video
        self.audio = audio
        self._timeout_s = timeout_s
        self.last_heard = time.monotonic()  # any RTCP from the viewer: it is still there
        # Until its first RTCP, a viewer gets as long again as its set-up took: on a far-away link
        # that report is a round trip away (as DTLS server we connect before the viewer does).
        self._first_report_grace_s: float | None = None
        self._switch = switch
        self._ladder = ladder
        self._abr_config = abr
        self._server_busy = server_busy
        self._lean = egress == "native"  # else "aiortc": every sender packetizes for itself (baseline)
        self._senders: list[tuple[PacketTrack, RTCRtpSender]] = []
        self.abr = initial_state(rung, time.monotonic())
        self.keyframe_requests = 0
        self.nacks = 0
        self.nack_repeats = 0  # retransmissions sent again unasked (see rtcpfeedback.NackRepeats)
        self.rtt_s: float | None = None
        self._sender_reports = SenderReports()
        self._repeats = NackRepeats()
        self._repeats_wake = asyncio.Event()
        if video is not None and abr is not None:
            self._spawn(self._tick())
        self._spawn(self._watchdog())

        @self.pc.on("connectionstatechange")
        def _connected() -> None:
            if self.pc.connectionState == "connected":
                # Silence is counted from here: a slow set-up must not look like a vanished viewer.
                now = time.monotonic()
                self._first_report_grace_s, self.last_heard = now - self.last_heard, now
                if self._lean:
                    self._start_egress()

    async def accept(self, offer_sdp: str) -> str:
        def attach() -> None:
            for track in (self.video, self.audio):
                if track is None:
                    continue
                if any(t.kind == track.kind for t in self.pc.getTransceivers()):
                    track.lean = self._lean
                    sender = self.pc.addTrack(track)
                    _only_codec(self._transceiver_of(sender), EGRESS_MIME[track.kind])
                    self._intercept_rtcp(sender, track.kind)
                    self._senders.append((track, sender))
                else:
                    track.stop()
            for transceiver in self.pc.getTransceivers():
                if transceiver.sender.track is None:
                    transceiver.direction = "inactive"

        return await self._negotiate(offer_sdp, attach)

    def _start_egress(self) -> None:
        """DTLS is up: each track's packets go out natively from now on (aiortc keeps ICE, DTLS, RTCP)."""
        for track, sender in self._senders:
            if track.egress is not None or track.readyState != "live":
                continue
            try:
                stream = EgressStream.open(self._transceiver_of(sender))
            except ValueError as exc:  # nothing this viewer can take natively: aiortc sends instead
                log.warning("native egress unavailable (%s): aiortc sends", exc, extra=self.log_ids)
                stream = None
            if stream is None:
                track.fall_back_to_aiortc()
            else:
                track.start_egress(stream)

    def _egress_of(self, kind: str) -> EgressStream | None:
        track = self.video if kind == "video" else self.audio
        return None if track is None else track.egress

    def _transceiver_of(self, sender: object) -> RTCRtpTransceiver:
        return next(t for t in self.pc.getTransceivers() if t.sender is sender)

    def _intercept_rtcp(self, sender: RTCRtpSender, kind: str) -> None:
        # aiortc keeps receiver feedback for its own encoder, which a passthrough track never uses:
        # look at every RTCP packet for this sender first (keyframe requests, REMB, loss, NACKs).
        intercept_rtcp(sender, lambda original: self._rtcp_handler(sender, kind, original))

        def before_sender_report() -> None:
            stream = self._egress_of(kind)
            if stream is not None:  # what went out natively is what this SR reports
                report_to_sender(stream, sender)
            report = last_sender_report(sender) if kind == "video" else None
            if report is not None:
                self._sender_reports.note(*report)

        before_rtcp_send(sender, before_sender_report)
        if kind == "video":
            self._spawn(self._repeat_retransmissions(sender))

    def _rtcp_handler(self, sender: RTCRtpSender, kind: str, original: RtcpHandler) -> RtcpHandler:
        async def handle(packet: object) -> None:
            self.last_heard, self._first_report_grace_s = time.monotonic(), None
            if kind != "video":
                await original(packet)
                return
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                self.keyframe_requests += 1
                if self.video is not None and self.video.source is not None:
                    self.video.source.request_keyframe()
            elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                try:
                    bitrate, _ = unpack_remb_fci(packet.fci)
                except ValueError:
                    pass
                else:
                    self._feedback(Feedback(time.monotonic(), remb_bps=float(bitrate)))
            elif isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
                for report in packet.reports:
                    if report.ssrc == sender_ssrc(sender):
                        self._measure_rtt(report.lsr, report.dlsr)
                        rtt = self.rtt_s if self.rtt_s is not None else sender_rtt(sender)
                        self._feedback(Feedback(time.monotonic(), fraction_lost=report.fraction_lost / 256, rtt_s=rtt))
            elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
                self.nacks += len(packet.lost)
                await self._retransmit(sender, packet.lost)
                self._repeats.on_nack(time.monotonic(), packet.lost, self.rtt_s)
                self._repeats_wake.set()
                return
            await original(packet)

        return handle

    def _measure_rtt(self, lsr: int, dlsr: int) -> None:
        raw = self._sender_reports.rtt(lsr, dlsr, time.time())
        if raw is not None:  # smoothed lightly: one report is noisy, but a queue must show within two
            self.rtt_s = raw if self.rtt_s is None else 0.5 * self.rtt_s + 0.5 * raw

    async def _repeat_retransmissions(self, sender: RTCRtpSender) -> None:
        while True:
            self._repeats_wake.clear()
            due_at = self._repeats.next_due()
            if due_at is None:
                await self._repeats_wake.wait()
                continue
            delay = due_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._repeats_wake.wait(), delay)
                except TimeoutError:
                    pass
                continue
            due = self._repeats.due(time.monotonic(), self.rtt_s)
            self.nack_repeats += len(due)
            await self._retransmit(sender, due)

    async def _retransmit(self, sender: RTCRtpSender, sequence_numbers: Iterable[int]) -> None:
        """Send lost packets again from the native stream's history (or aiortc's, on its path);
        one no longer there is simply not sent (the viewer's PLI then gets a keyframe)."""
        stream = self._egress_of("video")
        for seq in sequence_numbers:
            if stream is not None:
                egress.retransmit(stream, seq)
            else:
                await retransmit(sender, seq)

    def _feedback(self, feedback: Feedback) -> None:
        if self._abr_config is None or self.video is None:
            return
        if self._server_busy is not None and self._server_busy():
            feedback = replace(feedback, server_busy=True)
        before = self.abr.rung
        self.abr = step(self.abr, feedback, self._ladder, self._abr_config)
        if self.abr.rung != before:
            log.info("rung %s -> %s (%s)", before, self.abr.rung, self.abr.reason, extra=self.log_ids)
            if self._switch is not None:
                self._switch(self.video, self.abr.rung)

    def reapply_rung(self) -> None:
        if self._switch is not None and self.video is not None and self.video.readyState == "live":
            self._switch(self.video, self.abr.rung)

    async def _watchdog(self) -> None:
        """Release a viewer that vanished without a goodbye (no RTCP for a while), or never connected,
        long before ICE consent freshness (30 s) would."""
        while True:
            await asyncio.sleep(1.0)
            silent = time.monotonic() - self.last_heard
            state = self.pc.connectionState
            allowed = self._timeout_s + (self._first_report_grace_s or 0.0)
            if (state == "connected" and silent > allowed) or (state != "connected" and silent > 2 * self._timeout_s):
                log.info("viewer silent for %.0f s (%s): closing", silent, state, extra=self.log_ids)
                # Not one of our own tasks: close() cancels those, and must not cancel itself.
                self._closing = asyncio.ensure_future(self.close())
                return

    async def _tick(self) -> None:
        # Hold timers (probe up, resume) advance even when no RTCP arrives; the rate we actually
        # send is measured here (payload plus ~5 % RTP/SRTP overhead).
        assert self.video is not None
        sent_bytes, sent_bps, last = self.video.bytes_sent, None, time.monotonic()
        while True:
            await asyncio.sleep(ABR_TICK_S)
            now = time.monotonic()
            rate = (self.video.bytes_sent - sent_bytes) * 8 * 1.05 / max(now - last, 1e-3)
            sent_bps = rate if sent_bps is None else 0.7 * sent_bps + 0.3 * rate
            sent_bytes, last = self.video.bytes_sent, now
            self._feedback(Feedback(now, sent_bps=sent_bps))

    def describe(self) -> dict[str, object]:
        video = self.video
        source = video.source.name if video is not None and video.source is not None else None
        return {
            "id": self.id,
            "state": self.connection_state,
            "rung": source if video is None or video.source is not None else "paused",
            "switching_to": video.pending.name if video is not None and video.pending is not None else None,
            "estimate_bps": None if self.abr.estimate_bps is None else round(self.abr.estimate_bps),
            "loss": round(self.abr.loss, 4),
            "rtt_ms": None if self.abr.rtt_s is None else round(self.abr.rtt_s * 1000, 1),
            "switches": video.switches if video is not None else 0,
            "abr_reason": self.abr.reason,
            "keyframe_requests": self.keyframe_requests,
            "nacks": self.nacks,
            "nack_repeats": self.nack_repeats,
        }

    def _release(self) -> None:
        for track in (self.video, self.audio):
            if track is not None:
                track.stop()
