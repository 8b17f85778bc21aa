"""Egress: a rung's encoded frame is packetized ONCE; per viewer only its RTP header, SRTP, one send.

Today every WHEP viewer's aiortc RTCRtpSender packetizes each frame itself and pays tens of
microseconds of Python per packet (RtpPacket, serialize, pylibsrtp, aioice, asyncio). Here the
rung's frame becomes a :class:`NativeFrame` (its RTP payloads, copied once into a refcounted native
buffer) and one :func:`send_frame` call per rung frame walks every viewer of that rung in C with the
GIL released: per viewer it writes the 12-byte header and header extensions, patches the VP8
picture id, SRTP-protects with that viewer's own libsrtp session and sends the viewer's whole frame
with one ``sendmmsg`` (equal-size packets as UDP GSO runs). aiortc keeps ICE, DTLS (the SRTP keys)
and RTCP.

API
---
    packetize_vp8(frame: bytes) -> list[bytes]
        RTP payloads for one VP8 frame; the descriptor always has the 15-bit picture id (M bit) at
        bytes 2-3, so each viewer's id is patched in place. Sizes as aiortc (PACKET_MAX).
    NativeFrame(payloads, *, keyframe=False, vp8=False, audio_level=None)
    NativeFrame.from_vp8(frame: bytes, *, keyframe: bool) -> NativeFrame
    NativeFrame.from_opus(packet: bytes, *, audio_level: int | None = None) -> NativeFrame
        One per rung frame, shared by all viewers. ValueError for a payload above MAX_PAYLOAD.
    StreamParams(...)                          one viewer's stream of one kind (frozen)
    StreamParams.create(kind, *, ssrc, payload_type, clock_rate, ...)   random seq/origin/picture id
    StreamParams.from_transceiver(transceiver) -> StreamParams          after negotiation
    transport_of(pc_or_dtls_transport) -> (fd, (host, port), pylibsrtp.Session) | None
    EgressStream(params, fd, remote_addr, srtp, *, clear_rtp=False, gso=True)
    EgressStream.open(transceiver, params=None) -> EgressStream | None  the two above together
        Counters: packets_sent, octets_sent (payload bytes, as an RTCP SR counts them),
        frames_sent, frames_skipped (waiting for a keyframe), packets_dropped (EAGAIN/ENOBUFS),
        send_errors (other socket errors; last_errno), srtp_errors, retransmissions,
        last_timestamp, last_ntp_time, next_sequence_number, next_picture_id, gso.
        waiting_for_keyframe (settable; True at the start of a video stream). close() is
        idempotent and releases the socket duplicate, the history and the SRTP session.
    send_frame_soon(streams, frame, timestamp)   the same on the process's send thread (SENDER)
    SENDER.flush(timeout) / SENDER.stats()       wait for it; its queue, counters and delay
    send_frame(streams, frame, timestamp, ntp_time=None) -> int     packets the kernel took
        ``timestamp`` is the frame's RTP timestamp on the rung's clock (any int; low 32 bits are
        used); each stream adds its own origin and never goes backwards: a frame not newer than
        the stream's last one is sent at last + 1 (rungs share a clock, viewers switch rungs).
        ``ntp_time`` (64-bit NTP) gives abs-send-time, once per call; None = now. Closed streams
        are skipped; a full socket buffer counts drops, a broken socket counts errors: neither
        raises. ValueError if a stream's kind does not match the frame (VP8 picture ids or not).
    retransmit(stream, sequence_number) -> bool
        The packet with that sequence number again, byte for byte (same seq, same header), from the
        stream's history (``params.history_size``, 1024 for video = aiortc's SRTP replay window).
    report_to_sender(stream, sender)   copy the counters into aiortc's next sender report
    current_ntp_time() -> int
    clear_packets(stream, frame, timestamp, ntp_time) -> list[bytes]   tests: advance, don't send
    clear_retransmission(stream, sequence_number) -> bytes | None      tests
    live_frame_buffers() -> int                                        tests: leak checks

Python reference (the same semantics in plain Python, which the tests hold the native code to
byte for byte, and a fallback path): ``build_rtp_reference``, ``header_extensions_reference``,
``ReferenceFrame``, ``ReferenceStream`` (pylibsrtp ``Session.protect`` + ``socket.sendto``),
``send_frame_reference``.

Threading: the rooms hand frames to ``send_frame_soon`` (``SENDER``, one native thread per process
that sends them in order without ever taking the GIL, so the event loop is not held while hundreds
of viewers are served). ``send_frame`` itself may be called from any thread; it releases the GIL
while it works (when the call has 32 packets or more). A libsrtp session is not thread-safe, so one
native lock guards every stream's state and tx session: the send thread takes it per stream, and
``retransmit`` and ``close`` take it per call (``sender_report`` reads a copy under its own small
lock). aiortc's own RTCP (SR, SDES) is handed to the send thread (``RtcpRoute``), which protects
and sends it between frames; what aiortc still protects itself (a BYE once the streams are closed)
goes through ``LockedSrtpSession``, which ``EgressStream.open`` puts in place of the tx session. Two send_frame
calls on one stream at once, or a stream listed twice, raise RuntimeError.

Cost (benchmarks/egress_micro.py, this 2-core machine, loopback, AES128_CM_SHA1_80): about 4.5-6
µs of CPU per video packet per viewer in total, kernel included (aiortc's per-packet Python alone:
~30 µs). A direct send_frame call takes ~3.4 ms per 100 viewers per 720p video frame, which is
why the rooms leave it to the send thread.

Integration notes (relay/sessions.py, relay/fanout.py)
-------------------------------------------------------
* When: after the viewer's ``pc.connectionState == "connected"`` (DTLS done, so
  ``RTCDtlsTransport._tx_srtp`` exists, and aioice has its nominated pair). aiortc has then also
  called ``sender.send()``, so the transceiver's ``_codecs`` / ``_headerExtensions`` / ``mid`` are
  final. ``EgressStream.open(transceiver)`` returns None before that.
* Keep aiortc's RTCRtpSender (it sends SR/SDES and routes RTCP to us) but give it no track
  (``replaceTrack(None)`` / no ``addTrack``; a sendonly transceiver): its ``_run_rtp`` then idles.
  The stream uses the sender's SSRC (``sender._ssrc``), the one the SDP announces.
* NACK: aiortc's sender looks in its own (empty) history; in the intercepted RTCP handler call
  ``retransmit(stream, seq)`` for each lost seq. Retransmissions go out on the media SSRC with
  the original sequence number (plain RFC 4585 retransmission, no RTX wrapping even when RTX was
  negotiated; a receiver takes it as a late packet).
* Sender reports: aiortc fills its SR from four private fields that only its own RTP loop updates;
  ``report_to_sender(stream, sender)`` sets them. aiortc reads them before its ``_send_rtcp``
  (where ``before_rtcp_send`` hooks in), so calling it there puts our figures in the *next* SR
  (self-consistent, up to ~1.5 s old); a ~100 ms timer keeps them fresher.
* Close the streams on ``connectionstatechange`` to failed/closed: a stream holds its own
  duplicate of the socket and would keep sending after aioice closed its own.
* Video streams start waiting for a keyframe; on a rung switch move the stream to the new rung's
  list when that rung's keyframe is sent (the timestamp rule keeps RTP time monotonic). Send one
  rung's frames in order from one task, and move streams between rung lists only between calls.
* ``_egress`` is built by setup.py (``pip install .`` / ``pip install -e .``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import socket
import weakref
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pylibsrtp
from aiortc.codecs.vpx import PACKET_MAX
from pylibsrtp._binding import ffi as _srtp_ffi
from pylibsrtp._binding import lib as _srtp_lib

from .aiortc_private import (header_extension_ids, negotiated_codecs, nominated_route, sender_ssrc,
                             route_rtcp, set_sender_report, set_tx_srtp_session, srtp_context_pointer,
                             tx_srtp_session)

try:
    from . import _egress  # type: ignore[attr-defined]  # a C extension: no stub for mypy to read
except ImportError as exc:  # pragma: no cover - only on a checkout that was never installed
    raise ImportError(
        "relay._egress (the native egress loop) is not built: run `python3 -m pip install -e .` "
        "in the repository (needs gcc and the Python headers)"
    ) from exc

Kind = Literal["audio", "video"]

MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"

VP8_DESCRIPTOR_SIZE = 4  # X|S|PID, I, M|picture id high, picture id low
MAX_PICTURE_ID = 0x7FFF
MAX_PAYLOAD: int = _egress.MAX_PAYLOAD  # 1500 - 16 (SRTP tag) - 12 (header) - 64 (extensions)
MAX_PAYLOADS: int = _egress.MAX_PAYLOADS
MAX_MID: int = _egress.MAX_MID
# aiortc's tx SRTP policy has window_size=1024 and allow_repeat_tx: libsrtp refuses to protect a
# repeat older than that, so a longer history could not be sent anyway.
HISTORY_SIZE = 1024

_VP8_FIRST = bytes((0x90, 0x80, 0x80, 0x00))  # X=1 S=1 PID=0 | I=1 | M=1, picture id 0 (patched)
_VP8_NEXT = bytes((0x80, 0x80, 0x80, 0x00))   # same, S=0


def packetize_vp8(frame: bytes | bytearray | memoryview) -> list[bytes]:
    """The RTP payloads of one VP8 frame, with picture id 0 for every viewer to overwrite.

    Exactly aiortc's ``Vp8Encoder._packetize(frame, picture_id)`` with the id zeroed: aiortc 1.16
    also always writes the 15-bit form, so sizes and descriptors match (PACKET_MAX per payload).
    """
    view = memoryview(frame).cast("B")
    chunk = PACKET_MAX - VP8_DESCRIPTOR_SIZE
    return [(_VP8_FIRST if pos == 0 else _VP8_NEXT) + view[pos:pos + chunk] for pos in range(0, len(view), chunk)]


def with_picture_id(payload: bytes, picture_id: int) -> bytes:
    """``payload`` (from packetize_vp8) carrying ``picture_id``: what each viewer's packet holds."""
    return payload[:2] + struct.pack("!H", 0x8000 | (picture_id & MAX_PICTURE_ID)) + payload[4:]


def depacketize_vp8(payloads: Sequence[bytes]) -> bytes:
    """The frame back from packetize_vp8's payloads (tests, debugging)."""
    return b"".join(p[VP8_DESCRIPTOR_SIZE:] for p in payloads)


# -- per-viewer stream parameters ------------------------------------------------------------------

def _random_sequence_number() -> int:
    # aiortc's choice: the lower half of the range, so SRTP's rollover estimate never sees an
    # early wrap (libwebrtc does the same).
    return secrets.randbelow(0x8000)


@dataclass(frozen=True, slots=True)
class StreamParams:
    """Everything one viewer's outgoing stream of one kind needs besides its transport.

    ``first_picture_id`` is set exactly for VP8 (the stream then patches picture ids and accepts
    only VP8 frames). Extension ids are None when not negotiated. ``history_size`` is how many
    packets can be retransmitted (0 when the codec has no NACK feedback).
    """

    kind: Kind
    ssrc: int
    payload_type: int
    clock_rate: int
    first_sequence_number: int
    timestamp_origin: int
    first_picture_id: int | None = None
    mid: str | None = None
    mid_id: int | None = None
    abs_send_time_id: int | None = None
    audio_level_id: int | None = None
    history_size: int = HISTORY_SIZE

    def __post_init__(self) -> None:
        checks = (
            ("ssrc", self.ssrc, 0, 0xFFFFFFFF), ("payload_type", self.payload_type, 0, 127),
            ("clock_rate", self.clock_rate, 1, 1 << 31),
            ("first_sequence_number", self.first_sequence_number, 0, 0xFFFF),
            ("timestamp_origin", self.timestamp_origin, 0, 0xFFFFFFFF),
            ("history_size", self.history_size, 0, _egress.MAX_HISTORY),
        )
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"{name} must be in {low}..{high}, not {value}")
        if self.history_size & (self.history_size - 1):
            raise ValueError("history_size must be 0 or a power of two")
        if self.first_picture_id is not None and not 0 <= self.first_picture_id <= MAX_PICTURE_ID:
            raise ValueError("first_picture_id is a 15-bit VP8 picture id")
        for name, ext_id in (("mid_id", self.mid_id), ("abs_send_time_id", self.abs_send_time_id),
                             ("audio_level_id", self.audio_level_id)):
            if ext_id is not None and not 1 <= ext_id <= 255:
                raise ValueError(f"{name} must be 1..255 or None")
        if self.mid is not None and len(self.mid.encode("utf8")) > MAX_MID:
            raise ValueError(f"mid is longer than {MAX_MID} bytes")

    @property
    def vp8(self) -> bool:
        return self.first_picture_id is not None

    @classmethod
    def create(
        cls,
        kind: Kind,
        *,
        ssrc: int,
        payload_type: int,
        clock_rate: int,
        vp8: bool | None = None,
        mid: str | None = None,
        mid_id: int | None = None,
        abs_send_time_id: int | None = None,
        audio_level_id: int | None = None,
        history_size: int = HISTORY_SIZE,
    ) -> StreamParams:
        """Parameters with a random first sequence number, timestamp origin and picture id, as
        aiortc picks them per sender (RFC 3550: unpredictable, against known-plaintext attacks).
        ``vp8`` defaults to ``kind == "video"``."""
        is_vp8 = kind == "video" if vp8 is None else vp8
        return cls(
            kind=kind, ssrc=ssrc, payload_type=payload_type, clock_rate=clock_rate,
            first_sequence_number=_random_sequence_number(), timestamp_origin=secrets.randbits(32),
            first_picture_id=secrets.randbelow(MAX_PICTURE_ID + 1) if is_vp8 else None,
            mid=mid, mid_id=mid_id, abs_send_time_id=abs_send_time_id, audio_level_id=audio_level_id,
            history_size=history_size,
        )

    @classmethod
    def from_transceiver(cls, transceiver: Any) -> StreamParams:
        """What aiortc's own sender on ``transceiver`` would send with, read after negotiation.

        aiortc's RTCRtpSender.send() gets exactly these: codecs[0] (payload type), the negotiated
        header extensions, muxId = transceiver.mid, and sends with ``sender._ssrc``. They are
        underscore attributes of aiortc 1.16 (kept here together; see relay/aiortc_private.py).
        """
        codecs = negotiated_codecs(transceiver)  # preferred first: aiortc sends codecs[0]
        extensions = header_extension_ids(transceiver)
        ssrc = sender_ssrc(transceiver.sender)
        if not codecs:
            raise ValueError("the transceiver has no negotiated codec")
        codec = codecs[0]
        kind: Kind = "video" if transceiver.kind == "video" else "audio"
        if kind == "video" and codec.mimeType.lower() != "video/vp8":
            raise ValueError(f"native egress sends VP8 video, not {codec.mimeType}")
        # Generic NACK is ("nack", no parameter); ("nack", "pli") is only a keyframe request.
        nack = any(fb.type == "nack" and not fb.parameter for fb in codec.rtcpFeedback or [])
        if codec.payloadType is None:
            raise ValueError("the negotiated codec has no payload type")
        return cls.create(
            kind, ssrc=ssrc, payload_type=codec.payloadType, clock_rate=codec.clockRate,
            mid=transceiver.mid, mid_id=extensions.get(MID_URI),
            abs_send_time_id=extensions.get(ABS_SEND_TIME_URI),
            audio_level_id=extensions.get(AUDIO_LEVEL_URI) if kind == "audio" else None,
            history_size=HISTORY_SIZE if nack else 0,
        )


# -- aiortc / aioice glue --------------------------------------------------------------------------

TransportInfo = tuple[int, tuple[str, int], pylibsrtp.Session]


def transport_of(target: Any) -> TransportInfo | None:
    """``(socket fd, (remote host, port), tx SRTP session)`` of a connected peer connection (its
    first transport: with BUNDLE every m-line shares it) or RTCDtlsTransport; None until DTLS has
    completed and ICE has a nominated pair, or once either is closed.

    Private attributes of aiortc 1.16 / aioice 0.13, read in one place: the DTLS transport's
    ``_tx_srtp`` (the Session it protects our RTP/RTCP with) and ``transport._connection`` (aioice),
    whose ``_nominated[1]`` (component 1, RTP) pair has the asyncio ``protocol.transport`` and
    ``remote_addr``.
    """
    dtls = target
    if hasattr(target, "getTransceivers"):  # an RTCPeerConnection
        transports = [t.sender.transport for t in target.getTransceivers() if t.sender.transport is not None]
        if not transports and target.sctp is not None:
            transports = [target.sctp.transport]
        if not transports:
            return None
        dtls = transports[0]
    session = tx_srtp_session(dtls)
    if getattr(dtls, "state", None) != "connected" or session is None:
        return None
    route = nominated_route(dtls)
    if route is None:
        return None
    transport, remote = route
    # A pair relayed by the server's own TURN allocation (aioice's TurnTransport) has no socket of
    # its own to send from: its packets need TURN framing, so aiortc keeps sending for that viewer.
    if not isinstance(transport, asyncio.BaseTransport) or transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return None
    return sock.fileno(), remote, _unlocked(session)


def report_to_sender(stream: EgressStream | ReferenceStream, sender: Any) -> None:
    """Make aiortc's next RTCP sender report (and getStats) describe what ``stream`` sent.

    aiortc builds its SR from four private fields that only its own RTP loop updates (after every
    packet: NTP time of the send, that packet's RTP timestamp, packet and payload-octet counts);
    with no track they stay 0 and the viewer cannot map our RTP time to wall clock (A/V sync).
    """
    report = stream.sender_report()  # one reading: the send thread may be mid-frame
    if report is None:
        return
    sent_ntp, sent_timestamp, packets, octets = report
    # The report describes now, with the RTP timestamp carried forward on the stream's clock (as
    # libwebrtc does). The time of the last frame would repeat while no frame goes out (a stalled
    # encoder, an idle audio track): two reports with one NTP time make their receiver reports
    # ambiguous, and the RTT read from them grew by whole report intervals (seconds) at 250 viewers.
    now = current_ntp_time()
    elapsed_s = max(0, now - sent_ntp) / (1 << 32)
    timestamp = (sent_timestamp + round(elapsed_s * stream.params.clock_rate)) & 0xFFFFFFFF
    set_sender_report(sender, now, timestamp, packets, octets)


_SRTP_PROTECT = int(_srtp_ffi.cast("uintptr_t", _srtp_ffi.addressof(_srtp_lib, "srtp_protect")))
_SRTP_PROTECT_RTCP = int(_srtp_ffi.cast("uintptr_t", _srtp_ffi.addressof(_srtp_lib, "srtp_protect_rtcp")))


class LockedSrtpSession:
    """A viewer's tx SRTP session as aiortc sees it once native streams send on it: aiortc's own
    protect (its sender reports, SDES, BYE) takes the native senders' lock, so the send thread and
    the event loop never run libsrtp on one session at the same time."""

    def __init__(self, session: pylibsrtp.Session) -> None:
        self.session = session
        self._pointer = srtp_context_pointer(session)

    def protect(self, packet: bytes) -> bytes:
        protected: bytes = _egress.protect_locked(_SRTP_PROTECT, self._pointer, packet)
        return protected

    def protect_rtcp(self, packet: bytes) -> bytes:
        protected: bytes = _egress.protect_locked(_SRTP_PROTECT_RTCP, self._pointer, packet)
        return protected

    def __getattr__(self, name: str) -> Any:  # unprotect, remove_stream...: the session's own
        return getattr(self.session, name)


class RtcpRoute:
    """aiortc's RTCP for one viewer's transport, protected and sent by the send thread on one of
    the viewer's open streams (they share the session): the event loop never waits for the lock
    the thread holds while it sends, and the reports leave in order with the frames."""

    def __init__(self) -> None:
        self.streams: list[EgressStream] = []

    def add(self, stream: EgressStream) -> None:
        self.streams = [s for s in self.streams if not s.closed] + [stream]

    def send(self, packet: bytes) -> bool:
        """False when no stream is open (aiortc then sends it itself, e.g. a BYE after close)."""
        for stream in self.streams:
            if not stream.closed:
                send_rtcp_soon(stream, packet)
                return True
        return False


_RTCP_ROUTES: weakref.WeakKeyDictionary[Any, RtcpRoute] = weakref.WeakKeyDictionary()


def _unlocked(session: Any) -> pylibsrtp.Session:
    return session.session if isinstance(session, LockedSrtpSession) else session


def _check_stream_args(fd: int | None, remote_addr: Any, srtp: pylibsrtp.Session | None, clear_rtp: bool) -> None:
    if srtp is None and not clear_rtp:
        raise ValueError("no SRTP session: pass clear_rtp=True to send clear RTP (tests only)")
    if (fd is None) != (remote_addr is None):
        raise ValueError("fd and remote_addr go together")


def _srtp_pointer(session: pylibsrtp.Session) -> int:
    """The srtp_t inside a pylibsrtp Session (the native stream keeps the Session alive)."""
    return srtp_context_pointer(session)


Destination = tuple[int, str | None, int, int, int]  # family, numeric host or path, port, flowinfo, scope


def _destination(fd: int, remote_addr: tuple[Any, ...] | str) -> Destination:
    """The socket address to send to from ``fd``, in the socket's own family (an IPv4 peer on an
    IPv6 socket becomes ::ffff:a.b.c.d). A str is an AF_UNIX datagram path (tests)."""
    if isinstance(remote_addr, str):
        return socket.AF_UNIX, remote_addr, 0, 0, 0
    probe = socket.socket(fileno=fd)  # reads the family of the caller's socket; detached below
    try:
        family = probe.family
    finally:
        probe.detach()
    flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    if family == socket.AF_INET6:
        flags |= socket.AI_V4MAPPED
    host, port = str(remote_addr[0]), int(remote_addr[1])
    sockaddr: tuple[Any, ...] = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM, 0, flags)[0][4]
    if family == socket.AF_INET:
        return socket.AF_INET, str(sockaddr[0]), int(sockaddr[1]), 0, 0
    if family == socket.AF_INET6:
        numeric = str(sockaddr[0]).split("%", 1)[0]  # the zone travels as scope_id
        return socket.AF_INET6, numeric, int(sockaddr[1]), int(sockaddr[2]), int(sockaddr[3])
    raise ValueError(f"egress sends over UDP/IP sockets, not family {family!r}")


def _sockaddr(destination: Destination) -> tuple[Any, ...] | str:
    family, host, port, flowinfo, scope = destination
    assert host is not None
    if family == socket.AF_UNIX:
        return host
    if family == socket.AF_INET6:
        return host, port, flowinfo, scope
    return host, port


# -- native stream and frame -----------------------------------------------------------------------

class NativeFrame(_egress.Frame):
    """One rung frame's RTP payloads in a native buffer shared by all viewers (refcounted: the
    retransmission histories that still refer to it keep it alive, nothing else copies it)."""

    __slots__ = ()
    payloads: tuple[bytes, ...]  # copies, for tests and the reference path
    payload_count: int
    nbytes: int
    keyframe: bool
    vp8: bool
    audio_level: int | None  # 0..127 = -dBov, written when the stream negotiated audio level

    @classmethod
    def from_vp8(cls, frame: bytes | bytearray | memoryview, *, keyframe: bool) -> NativeFrame:
        return cls(packetize_vp8(frame), keyframe=keyframe, vp8=True)

    @classmethod
    def from_opus(cls, packet: bytes, *, audio_level: int | None = None) -> NativeFrame:
        # every Opus packet decodes on its own: a new audio viewer starts anywhere
        return cls([packet], keyframe=True, vp8=False, audio_level=audio_level)


class EgressStream(_egress.Stream):
    """One viewer's outgoing RTP stream of one kind, sent natively.

    ``fd`` is the viewer's UDP socket (the stream sends from its own duplicate, so a descriptor
    number reused after aioice closes its socket never receives media); ``remote_addr`` the peer
    (IPv4 or IPv6 tuple); ``srtp`` the viewer's tx Session (kept alive by the stream). ``fd=None``
    makes a stream that only numbers packets (``clear_packets``, tests). ``clear_rtp`` must be set
    to send without SRTP (tests and benchmarks only). ``gso``: on a UDP socket, send each run of
    equal-size packets (a VP8 frame but its last) as one UDP GSO message; the receiver gets the same
    datagrams, the kernel does a fraction of the work. It turns itself off for good on a stream
    whose route refuses it (attribute ``gso`` then reads False).
    """

    params: StreamParams
    packets_sent: int
    octets_sent: int
    frames_sent: int
    frames_skipped: int
    packets_dropped: int
    send_errors: int
    srtp_errors: int
    retransmissions: int
    last_errno: int
    last_timestamp: int | None
    last_ntp_time: int
    next_sequence_number: int
    next_picture_id: int | None
    ssrc: int
    history_size: int
    closed: bool
    gso: bool
    waiting_for_keyframe: bool

    def __init__(
        self,
        params: StreamParams,
        fd: int | None,
        remote_addr: tuple[Any, ...] | str | None,
        srtp: pylibsrtp.Session | None,
        *,
        clear_rtp: bool = False,
        gso: bool = True,
    ) -> None:
        _check_stream_args(fd, remote_addr, srtp, clear_rtp)
        destination: Destination = (0, None, 0, 0, 0)
        if fd is not None and remote_addr is not None:
            destination = _destination(fd, remote_addr)
        family, host, port, flowinfo, scope_id = destination
        super().__init__(
            ssrc=params.ssrc, payload_type=params.payload_type, timestamp_origin=params.timestamp_origin,
            sequence_number=params.first_sequence_number,
            picture_id=-1 if params.first_picture_id is None else params.first_picture_id,
            mid=None if params.mid is None else params.mid.encode("utf8"), mid_id=params.mid_id or 0,
            abs_send_time_id=params.abs_send_time_id or 0, audio_level_id=params.audio_level_id or 0,
            history_size=params.history_size, wait_for_keyframe=params.kind == "video",
            fd=-1 if fd is None else fd, family=family, host=host, port=port, flowinfo=flowinfo,
            scope_id=scope_id, srtp_owner=srtp, srtp=0 if srtp is None else _srtp_pointer(srtp),
            protect=0 if srtp is None else _SRTP_PROTECT, gso=gso,
        )
        self.params = params

    @classmethod
    def open(cls, transceiver: Any, params: StreamParams | None = None) -> EgressStream | None:
        """The stream for ``transceiver``'s sender over its viewer's transport; None until that
        transport is connected (see transport_of)."""
        dtls = transceiver.sender.transport
        found = transport_of(dtls)
        if found is None:
            return None
        fd, remote_addr, session = found
        stream = cls(params or StreamParams.from_transceiver(transceiver), fd, remote_addr, session)
        if not isinstance(tx_srtp_session(dtls), LockedSrtpSession):
            set_tx_srtp_session(dtls, LockedSrtpSession(session))
        route = _RTCP_ROUTES.get(dtls)
        if route is None:
            route = _RTCP_ROUTES[dtls] = RtcpRoute()
            route_rtcp(dtls, route.send)
        route.add(stream)
        return stream

    def __repr__(self) -> str:
        return (f"EgressStream({self.params.kind}, ssrc={self.ssrc}, sent={self.packets_sent}, "
                f"dropped={self.packets_dropped}, errors={self.send_errors}, closed={self.closed})")


def send_frame(streams: Sequence[EgressStream], frame: NativeFrame, timestamp: int, ntp_time: int | None = None) -> int:
    """Send one rung frame to every open stream in ``streams``; returns the packets sent."""
    sent: int = _egress.send_frame(streams, frame, timestamp, ntp_time)
    return sent


class SendThread:
    """The process's native send thread (in _egress.c), which sends every rung frame handed to it,
    in order, beside the event loop.

    send_frame releases the GIL, but on the event loop thread it still held the loop for the whole
    call (~3.4 ms per 100 viewers per 720p frame): with hundreds of viewers the loop had no time
    left for RTCP, ICE and signaling. A Python thread did not help: it had to win the GIL twice per
    frame, ~5 ms each under load, and fell behind at 250 viewers. The native thread never takes the
    GIL; the loop only queues (microseconds). The native lock (see _egress.c, "Threading") keeps the
    loop's retransmissions and aiortc's RTCP off a session while the thread uses it.
    """

    def submit(self, streams: Sequence[EgressStream], frame: NativeFrame, timestamp: int) -> None:
        """Send ``frame`` to ``streams`` soon (abs-send-time is taken when it goes out)."""
        _egress.submit(streams, frame, timestamp)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far has been sent; False on timeout."""
        done: bool = _egress.flush(timeout)
        return done

    def stats(self) -> dict[str, float]:
        """pending (queued or being sent), frames_sent, packets_sent, delay_s (a frame's smoothed
        wait in the queue: how far the thread is behind) and max_delay_s (the longest wait since
        the previous call, which resets it: one caller, /metrics)."""
        stats: dict[str, float] = _egress.sender_stats()
        return stats


SENDER = SendThread()


def send_frame_soon(streams: Sequence[EgressStream], frame: NativeFrame, timestamp: int) -> None:
    """Queue one rung frame for every stream in ``streams`` on the process's send thread."""
    SENDER.submit(streams, frame, timestamp)


def send_rtcp_soon(stream: EgressStream, packet: bytes) -> None:
    """Queue a clear RTCP compound for the send thread, which protects it with the stream's SRTP
    session and sends it after the frames queued before it (dropped if the stream closes first)."""
    _egress.submit_rtcp(stream, _SRTP_PROTECT_RTCP, packet)


def retransmit(stream: EgressStream, sequence_number: int) -> bool:
    """Send packet ``sequence_number`` again exactly as first sent; False if it is not in the
    history any more (or never was) or could not be sent."""
    done: bool = stream.retransmit(sequence_number)
    return done


def current_ntp_time() -> int:
    """Now as a 64-bit NTP timestamp, the clock send_frame uses when given none."""
    now: int = _egress.ntp_now()
    return now


def clear_packets(stream: EgressStream, frame: NativeFrame, timestamp: int, ntp_time: int) -> list[bytes]:
    """Advance ``stream`` exactly as send_frame would, but return the clear RTP packets instead of
    protecting and sending them (counted as neither sent nor dropped). For tests."""
    packets: list[bytes] = _egress.clear_packets(stream, frame, timestamp, ntp_time)
    return packets


def clear_retransmission(stream: EgressStream, sequence_number: int) -> bytes | None:
    """The clear packet ``retransmit`` would send, None if it has left the history. For tests."""
    packet: bytes | None = _egress.clear_retransmission(stream, sequence_number)
    return packet


def live_frame_buffers() -> int:
    """Native frame buffers alive (Python frames plus those only histories still refer to)."""
    count: int = _egress.live_frame_buffers()
    return count


# -- Python reference ----------------------------------------------------------------------------

def header_extensions_reference(params: StreamParams, abs_send_time: int, audio_level: int | None) -> bytes:
    """The header extension block (profile, length, elements, padding; b"" for none) exactly as
    aiortc's sender writes it: mid, abs-send-time, audio level, in that order; one-byte form unless
    an id is above 14 or a value is empty or longer than 16 bytes (aiortc.rtp.pack_header_extensions)."""
    elements: list[tuple[int, bytes]] = []
    if params.mid is not None and params.mid_id:
        elements.append((params.mid_id, params.mid.encode("utf8")))
    if params.abs_send_time_id:
        elements.append((params.abs_send_time_id, (abs_send_time & 0xFFFFFF).to_bytes(3, "big")))
    if audio_level is not None and params.audio_level_id:
        elements.append((params.audio_level_id, bytes((audio_level & 0x7F,))))  # V bit 0, as aiortc
    if not elements:
        return b""
    one_byte = all(ext_id <= 14 and 1 <= len(value) <= 16 for ext_id, value in elements)
    body = b"".join(
        (bytes(((ext_id << 4) | (len(value) - 1),)) if one_byte else bytes((ext_id, len(value)))) + value
        for ext_id, value in elements
    )
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", 0xBEDE if one_byte else 0x1000, len(body) // 4) + body


def build_rtp_reference(
    params: StreamParams,
    *,
    sequence_number: int,
    timestamp: int,
    marker: bool,
    abs_send_time: int,
    audio_level: int | None,
    payload: bytes,
) -> bytes:
    """One clear RTP packet: version 2, no padding, no CSRC, ``payload`` verbatim."""
    extensions = header_extensions_reference(params, abs_send_time, audio_level)
    first = 0x80 | (0x10 if extensions else 0)
    header = struct.pack("!BBHLL", first, (int(marker) << 7) | params.payload_type, sequence_number & 0xFFFF,
                         timestamp & 0xFFFFFFFF, params.ssrc)
    return header + extensions + payload


class FrameLike(Protocol):
    @property
    def payloads(self) -> tuple[bytes, ...]: ...
    @property
    def keyframe(self) -> bool: ...
    @property
    def vp8(self) -> bool: ...
    @property
    def audio_level(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class ReferenceFrame:
    """NativeFrame's Python twin, with the same checks."""

    payloads: tuple[bytes, ...]
    keyframe: bool = False
    vp8: bool = False
    audio_level: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.payloads) <= MAX_PAYLOADS:
            raise ValueError(f"a frame has 1..{MAX_PAYLOADS} payloads")
        for index, payload in enumerate(self.payloads):
            if not 1 <= len(payload) <= MAX_PAYLOAD:
                raise ValueError(f"payload {index} has {len(payload)} bytes; allowed 1..{MAX_PAYLOAD}")
            if self.vp8 and (len(payload) <= VP8_DESCRIPTOR_SIZE or not payload[0] & payload[1] & payload[2] & 0x80):
                raise ValueError(f"payload {index} lacks the 15-bit picture-id VP8 descriptor")
        if self.audio_level is not None and not 0 <= self.audio_level <= 127:
            raise ValueError("audio_level is 0..127 (-dBov) or None")

    @classmethod
    def from_vp8(cls, frame: bytes, *, keyframe: bool) -> ReferenceFrame:
        return cls(tuple(packetize_vp8(frame)), keyframe=keyframe, vp8=True)

    @classmethod
    def from_opus(cls, packet: bytes, *, audio_level: int | None = None) -> ReferenceFrame:
        return cls((bytes(packet),), keyframe=True, audio_level=audio_level)


@dataclass(frozen=True, slots=True)
class _Sent:
    """A history entry: enough to rebuild the packet byte for byte."""

    sequence_number: int
    frame: FrameLike
    payload_index: int
    timestamp: int
    picture_id: int
    abs_send_time: int


@dataclass(frozen=True, slots=True)
class _FrameHeader:
    timestamp: int
    picture_id: int
    abs_send_time: int


# A full socket buffer is congestion (counted like loss on the path), anything else an error.
_TRANSIENT_ERRNOS = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS))


class ReferenceStream:
    """EgressStream in plain Python (pylibsrtp ``Session.protect`` + ``socket.sendto``), with the
    same numbering, timestamp rule, picture ids, history, counters and failure accounting."""

    def __init__(
        self,
        params: StreamParams,
        fd: int | None,
        remote_addr: tuple[Any, ...] | str | None,
        srtp: pylibsrtp.Session | None,
        *,
        clear_rtp: bool = False,
    ) -> None:
        _check_stream_args(fd, remote_addr, srtp, clear_rtp)
        self.params = params
        self._srtp = srtp
        self._sock: socket.socket | None = None
        self._address: tuple[Any, ...] | str | None = None
        if fd is not None and remote_addr is not None:
            self._address = _sockaddr(_destination(fd, remote_addr))
            duplicate = os.dup(fd)  # its own duplicate, as the native stream has
            try:
                self._sock = socket.socket(fileno=duplicate)
            except OSError:
                os.close(duplicate)
                raise
        self.next_sequence_number = params.first_sequence_number
        self._picture_id = params.first_picture_id or 0
        self.last_timestamp: int | None = None
        self.last_ntp_time = 0
        self.waiting_for_keyframe = params.kind == "video"
        self.packets_sent = self.octets_sent = self.frames_sent = self.frames_skipped = 0
        self.packets_dropped = self.send_errors = self.srtp_errors = self.retransmissions = 0
        self.last_errno = 0
        self._history: list[_Sent | None] = [None] * params.history_size
        self.closed = False

    @property
    def ssrc(self) -> int:
        return self.params.ssrc

    @property
    def next_picture_id(self) -> int | None:
        return self._picture_id if self.params.vp8 else None

    @property
    def history_size(self) -> int:
        return len(self._history)

    def sender_report(self) -> tuple[int, int, int, int] | None:
        if self.last_timestamp is None:
            return None
        return self.last_ntp_time, self.last_timestamp, self.packets_sent, self.octets_sent

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._history = []
        self._srtp = None
        self.closed = True

    def check_kind(self, frame: FrameLike) -> None:
        if self.params.vp8 != frame.vp8:
            raise ValueError("a VP8 stream needs a VP8 frame, and a VP8 frame a VP8 stream")

    def _begin_frame(self, frame: FrameLike, timestamp: int, ntp_time: int) -> _FrameHeader | None:
        if self.waiting_for_keyframe:
            if not frame.keyframe:
                self.frames_skipped += 1
                return None
            self.waiting_for_keyframe = False
        ts = (self.params.timestamp_origin + timestamp) & 0xFFFFFFFF
        last = self.last_timestamp
        if last is not None and ((ts - last) & 0xFFFFFFFF == 0 or (ts - last) & 0x80000000):
            ts = (last + 1) & 0xFFFFFFFF  # not newer than the last frame (serial arithmetic)
        self.last_timestamp = ts
        self.last_ntp_time = ntp_time
        picture_id = self._picture_id
        if self.params.vp8:
            self._picture_id = (picture_id + 1) & MAX_PICTURE_ID
        return _FrameHeader(ts, picture_id, (ntp_time >> 14) & 0xFFFFFF)

    def _packet(self, sent: _Sent) -> bytes:
        payload = sent.frame.payloads[sent.payload_index]
        if self.params.vp8:
            payload = with_picture_id(payload, sent.picture_id)
        return build_rtp_reference(
            self.params, sequence_number=sent.sequence_number, timestamp=sent.timestamp,
            marker=sent.payload_index == len(sent.frame.payloads) - 1, abs_send_time=sent.abs_send_time,
            audio_level=sent.frame.audio_level, payload=payload,
        )

    def _number(self, frame: FrameLike, header: _FrameHeader) -> list[_Sent]:
        numbered = []
        for index in range(len(frame.payloads)):
            sent = _Sent(self.next_sequence_number, frame, index, header.timestamp, header.picture_id,
                         header.abs_send_time)
            self.next_sequence_number = (self.next_sequence_number + 1) & 0xFFFF
            if self._history:
                self._history[sent.sequence_number % len(self._history)] = sent
            numbered.append(sent)
        return numbered

    def clear_packets(self, frame: FrameLike, timestamp: int, ntp_time: int) -> list[bytes]:
        """Like ``_egress.clear_packets``: advance as send does, return the clear packets."""
        self.check_kind(frame)
        if self.closed:
            raise ValueError("stream is closed")
        header = self._begin_frame(frame, timestamp & 0xFFFFFFFF, ntp_time)
        return [] if header is None else [self._packet(sent) for sent in self._number(frame, header)]

    def send(self, frame: FrameLike, timestamp: int, ntp_time: int) -> int:
        """One frame to this stream; returns the packets sent (see EgressStream's counters)."""
        if self.closed:
            return 0
        header = self._begin_frame(frame, timestamp & 0xFFFFFFFF, ntp_time)
        if header is None:
            return 0
        self.frames_sent += 1
        before = self.packets_sent
        failure = 0  # errno of this frame's first failed send: the rest is counted the same way
        for sent in self._number(frame, header):
            if failure:
                self._count_failed(failure)
                continue
            try:
                packet = self._protect(self._packet(sent))
            except pylibsrtp.Error:
                self.srtp_errors += 1
                continue
            failure = self._send(packet)
            if not failure:
                self.packets_sent += 1
                self.octets_sent += len(frame.payloads[sent.payload_index])
        return self.packets_sent - before

    def retransmit(self, sequence_number: int) -> bool:
        sent = self._lookup(sequence_number)
        if sent is None:
            return False
        if self._sock is None:
            self._count_failed(errno.EBADF)
            return False
        try:
            packet = self._protect(self._packet(sent))
        except pylibsrtp.Error:
            self.srtp_errors += 1
            return False
        if self._send(packet):
            return False
        self.retransmissions += 1
        return True

    def clear_retransmission(self, sequence_number: int) -> bytes | None:
        sent = self._lookup(sequence_number)
        return None if sent is None else self._packet(sent)

    def _lookup(self, sequence_number: int) -> _Sent | None:
        if self.closed or not self._history or not 0 <= sequence_number <= 0xFFFF:
            return None
        sent = self._history[sequence_number % len(self._history)]
        return sent if sent is not None and sent.sequence_number == sequence_number else None

    def _protect(self, packet: bytes) -> bytes:
        return packet if self._srtp is None else self._srtp.protect(packet)

    def _send(self, packet: bytes) -> int:
        """0 when the kernel took ``packet``, else the errno (already counted)."""
        if self._sock is None or self._address is None:
            self._count_failed(errno.EBADF)
            return errno.EBADF
        try:
            self._sock.sendto(packet, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            code = exc.errno or 0
            self._count_failed(code)
            return code or -1
        return 0

    def _count_failed(self, code: int) -> None:
        if code in _TRANSIENT_ERRNOS:
            self.packets_dropped += 1
        else:
            self.send_errors += 1
            self.last_errno = code


def send_frame_reference(
    streams: Sequence[ReferenceStream], frame: FrameLike, timestamp: int, ntp_time: int | None = None
) -> int:
    """send_frame in Python: the fallback path, and what the native one is checked against."""
    if len({id(stream) for stream in streams}) != len(streams):
        raise RuntimeError("a stream is listed twice")  # as the native call refuses it
    for stream in streams:
        stream.check_kind(frame)
    now = current_ntp_time() if ntp_time is None else ntp_time & 0xFFFFFFFFFFFFFFFF
    return sum(stream.send(frame, timestamp, now) for stream in streams)
