"""Every place shelfcast reaches into aiortc's or aioice's private API, each with why.

Written against aiortc 1.16.0 and aioice 0.13.0 (pyproject.toml pins them): name-mangled and
underscore attributes change without notice, so a new aiortc release is checked here, in one file,
before the pin moves. (``relay.jitter`` also subclasses aiortc's ``JitterBuffer`` and works on its
ring directly: the one other place tied to aiortc's internals.)
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aioice import Connection, stun
from aioice.ice import CONSENT_FAILURES, CONSENT_INTERVAL
from aiortc import (RTCCertificate, RTCPeerConnection, RTCRtpCodecParameters, RTCRtpReceiver, RTCRtpSender,
                    RTCRtpTransceiver)
from aiortc.rtp import is_rtcp

RtcpHandler = Callable[[Any], Awaitable[None]]
log = logging.getLogger("shelfcast.webrtc")


# -- transceivers ---------------------------------------------------------------------------------

def negotiated_codecs(transceiver: RTCRtpTransceiver) -> list[RTCRtpCodecParameters]:
    """The codecs the answer will carry (aiortc fills them in during setRemoteDescription)."""
    return list(transceiver._codecs)


def keep_codecs(transceiver: RTCRtpTransceiver, codecs: list[RTCRtpCodecParameters]) -> None:
    """Answer with exactly ``codecs``: aiortc has no public way to narrow an answer to the one codec
    our pre-encoded packets are in (setCodecPreferences only orders an offer)."""
    transceiver._codecs = codecs


def set_dtls_server(transceiver: RTCRtpTransceiver) -> None:
    """Make the DTLS transport under ``transceiver`` the DTLS server (answer ``a=setup:passive``).
    aiortc answers an ``actpass`` offer as client (``active``), and as client it offers only
    ECDHE-ECDSA suites: a peer with an RSA certificate (GStreamer's webrtcbin) then has no suite in
    common and aborts. As server, the suite follows our own (ECDSA) certificate whatever the peer's
    is. createAnswer writes the role a transport already has, setLocalDescription keeps it."""
    transceiver.receiver.transport._set_role("server")


def use_certificate(pc: RTCPeerConnection, certificate: RTCCertificate) -> None:
    """Make ``pc`` (before it has any transceiver) use ``certificate`` for DTLS: aiortc always makes
    an ECDSA one itself, and test clients stand in for peers with another kind (RSA)."""
    setattr(pc, "_RTCPeerConnection__certificates", [certificate])


# -- senders --------------------------------------------------------------------------------------

def sender_ssrc(sender: RTCRtpSender) -> int:
    """Our SSRC on this sender: the report blocks about us carry it."""
    return int(sender._ssrc)


def sender_rtt(sender: RTCRtpSender) -> float | None:
    """aiortc's own RTT (from the latest sender report only; see rtcpfeedback.SenderReports)."""
    rtt = getattr(sender, "_RTCRtpSender__rtt", None)
    return None if rtt is None else float(rtt)


def last_sender_report(sender: RTCRtpSender) -> tuple[int, float] | None:
    """(compact NTP timestamp, wall-clock send time) of the sender report aiortc is about to send:
    it sets both just before sending and keeps no history, which an RTT under a queue needs."""
    lsr, sent_at = getattr(sender, "_RTCRtpSender__lsr", None), getattr(sender, "_RTCRtpSender__lsr_time", None)
    return None if lsr is None or sent_at is None else (int(lsr), float(sent_at))


def intercept_rtcp(sender: RTCRtpSender, make_handler: Callable[[RtcpHandler], RtcpHandler]) -> None:
    """Route every RTCP packet for ``sender`` through ``make_handler(original)``: aiortc keeps receiver
    feedback (PLI, REMB, reports, NACK) for its own encoder, which a passthrough track never uses."""
    sender._handle_rtcp_packet = make_handler(sender._handle_rtcp_packet)  # type: ignore[method-assign,assignment]


def before_rtcp_send(sender: RTCRtpSender, note: Callable[[], None]) -> None:
    """Call ``note()`` just before ``sender`` sends each RTCP compound (its sender report)."""
    send = sender._send_rtcp

    async def send_and_note(packets: list[Any]) -> None:
        note()
        await send(packets)

    sender._send_rtcp = send_and_note  # type: ignore[method-assign]


async def retransmit(sender: RTCRtpSender, sequence_number: int) -> None:
    """Send a packet again from aiortc's history (a no-op once it left the history)."""
    await sender._retransmit(sequence_number)


# -- receivers ------------------------------------------------------------------------------------

def install_jitter_buffer(receiver: RTCRtpReceiver, buffer: object) -> None:
    """Replace the receiver's jitter buffer (before any packet arrives): aiortc's completes a frame
    only when the next one begins and waits on a hole until 512 packets have queued."""
    setattr(receiver, "_RTCRtpReceiver__jitter_buffer", buffer)


def install_decoder_queue(receiver: RTCRtpReceiver, queue: object) -> None:
    """Replace the queue between the receiver and its decoder thread (before that thread starts):
    aiortc's is unbounded, and a relay that forwards frames as they are wants none at all."""
    setattr(receiver, "_RTCRtpReceiver__decoder_queue", queue)


def decoder_error(receiver: RTCRtpReceiver) -> threading.Event:
    """Set it and aiortc asks the sender for a keyframe (PLI) with its next packet."""
    return getattr(receiver, "_RTCRtpReceiver__decoder_error")


def rtp_payload(packet: Any) -> bytes:
    """The depacketized payload aiortc's receiver stored on an RtpPacket (VP8 descriptor removed)."""
    return packet._data


def decoded_frames(track: Any) -> asyncio.Queue[Any] | None:
    """The queue of decoded frames behind a remote track, which aiortc lets grow without bound."""
    return getattr(track, "_queue", None)


# -- ICE ------------------------------------------------------------------------------------------

def gather_only(connection: Connection, addresses: tuple[str, ...]) -> None:
    """Make this aioice connection gather host candidates from ``addresses`` only: aioice reads every
    interface and leaves loopback out, with no per-connection setting."""

    async def gather_candidates() -> None:
        if connection._local_candidates_start:
            return
        connection._local_candidates_start = True
        for component in connection._components:
            connection._local_candidates += await connection.get_component_candidates(
                component=component, addresses=list(addresses)
            )
        connection._local_candidates_end = True

    connection.gather_candidates = gather_candidates  # type: ignore[method-assign]


def consent_while_receiving(connection: Connection, last_media_at: Callable[[], float]) -> None:
    """Make this connection's RFC 7675 consent checks fail only while no media arrives from the peer
    either (``last_media_at``, when its last decrypted frame came, stands still), instead of after
    six unanswered checks (30 s) whatever it sends.

    FFmpeg's WHIP muxer answers STUN only while it connects: aioice's consent checks then go
    unanswered and it closes a publisher 30 s in while the media keeps coming. Only an ingest uses
    this: what the server sends such a peer is RTCP, and a peer whose SRTP keeps arriving is there
    and wants the session (a stranger's datagrams fail SRTP and never count)."""

    async def query_consent() -> None:
        # aioice's own loop (Connection.query_consent), with "or media arrived" on a failed check.
        assert connection.remote_password is not None
        failures = 0
        while True:
            before = last_media_at()
            await asyncio.sleep(CONSENT_INTERVAL * (0.8 + 0.4 * random.random()))
            for pair in connection._nominated.values():
                request = connection.build_request(pair, nominate=False)
                try:
                    await pair.protocol.request(request, pair.remote_addr,
                                                integrity_key=connection.remote_password.encode("utf8"),
                                                retransmissions=0)
                    failures = 0
                except stun.TransactionError:
                    failures = 0 if last_media_at() != before else failures + 1
                if failures >= CONSENT_FAILURES:
                    log.info("ICE consent expired: no answer to consent checks and no media for %d s",
                             CONSENT_FAILURES * CONSENT_INTERVAL)
                    connection._query_consent_task = None
                    await connection.close()
                    return

    # connect() looks it up on the instance when it starts the checks.
    connection.query_consent = query_consent  # type: ignore[method-assign]


def ice_connection(ice_transport: Any) -> Connection:
    """The aioice connection behind an RTCIceTransport (its gatherer owns it)."""
    return ice_transport.iceGatherer._connection


# -- what the native egress needs (relay.egress) ---------------------------------------------------

def header_extension_ids(transceiver: RTCRtpTransceiver) -> dict[str, int]:
    """Negotiated RTP header extensions (uri -> id): what aiortc's sender would write."""
    return {ext.uri: ext.id for ext in transceiver._headerExtensions}


def tx_srtp_session(dtls_transport: Any) -> Any | None:
    """The pylibsrtp Session aiortc protects our RTP and RTCP with (exists once DTLS is done)."""
    return getattr(dtls_transport, "_tx_srtp", None)


def set_tx_srtp_session(dtls_transport: Any, session: Any) -> None:
    """Make aiortc protect this transport's outgoing RTP/RTCP with ``session`` (an object with
    ``protect``/``protect_rtcp``): relay.egress wraps the real one in its lock."""
    dtls_transport._tx_srtp = session


def route_rtcp(dtls_transport: Any, send: Callable[[bytes], bool]) -> None:
    """Offer each clear RTCP compound aiortc sends on this transport (its senders' SR, SDES, BYE)
    to ``send`` first; what it declines (returns False) goes aiortc's own way."""
    original = dtls_transport._send_rtp

    async def send_rtp(data: bytes) -> None:
        if not (is_rtcp(data) and send(data)):
            await original(data)

    dtls_transport._send_rtp = send_rtp


def nominated_route(dtls_transport: Any) -> tuple[Any, tuple[str, int]] | None:
    """(asyncio datagram transport, remote (host, port)) of the ICE pair RTP goes over, or None."""
    connection = getattr(getattr(dtls_transport, "transport", None), "_connection", None)
    pair = getattr(connection, "_nominated", {}).get(1)  # component 1: RTP (RTCP is muxed)
    if pair is None:
        return None
    host, port = pair.remote_addr[:2]
    return getattr(pair.protocol, "transport", None), (host, port)


def set_sender_report(sender: RTCRtpSender, ntp_time: int, rtp_timestamp: int, packets: int, octets: int) -> None:
    """What aiortc's next sender report says we sent. It fills its SR from four fields only its own
    RTP loop updates; a sender whose RTP goes out natively would otherwise report zeros (and the
    viewer could not map our RTP time to wall clock for lip sync)."""
    sender._RTCRtpSender__ntp_timestamp = ntp_time  # type: ignore[attr-defined]
    sender._RTCRtpSender__rtp_timestamp = rtp_timestamp  # type: ignore[attr-defined]
    sender._RTCRtpSender__packet_count = packets  # type: ignore[attr-defined]
    sender._RTCRtpSender__octet_count = octets  # type: ignore[attr-defined]


def srtp_context_pointer(session: Any) -> int:
    """The libsrtp ``srtp_t`` inside a pylibsrtp Session, for native code to protect with. pylibsrtp
    frees it when the Session is collected: whoever uses the pointer keeps the Session alive."""
    from pylibsrtp._binding import ffi

    return int(ffi.cast("uintptr_t", session._srtp[0]))
