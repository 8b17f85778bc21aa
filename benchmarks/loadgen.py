"""Cheap load viewers: real WHEP sessions whose media is counted by a native receiver.

    python -m benchmarks.loadgen [--whep URL] [--viewers N | --levels 50,200] [--seconds S] [--compare-harness]
    python -m benchmarks.loadgen --worker --whep URL        (driven over stdin, like harness ``load``)

Why: the fan-out benchmark must put ~1,000 viewers on a 2-core machine whose server is meant to spend
~0.001 core-s per viewer-second, so one load viewer may spend at most ~0.00025 core-s per
viewer-second (~1.5 us per RTP packet at ~150 packets/s). A full aiortc receiver (an asyncio callback,
aioice's queue, SRTP unprotect and RTP parsing in Python, per packet) costs several times the server's
own work.

How: each viewer negotiates for real through WHEP with an aiortc RTCPeerConnection (recvonly video +
audio, no ICE servers), so the server does all its per-viewer work: ICE, DTLS-SRTP, per-viewer SRTP.
Once the connection is up, the viewer's UDP socket (the nominated pair of its aioice Connection) stops
being read by asyncio and is handed to ``_loadrecv.c``, compiled on first use with the machine's ``cc``
into a cache under the system temp dir (keyed by the source's hash) and loaded with ctypes (which
releases the GIL during each call). One native thread epolls every viewer's socket, drains it with
recvmmsg and reads only the clear RTP header (SRTP encrypts the payload, not the header): packets,
bytes, extended highest seq, loss (RFC 3550 expected - received), jitter, whole video frames (marker
bit, no gap since the previous one) and their lateness (transit above the least transit seen on that
SSRC; the kernel's receive timestamp is the arrival time, so the load viewer's own scheduling does
not count against the server).

RTCP is native too, because per viewer per second it would cost Python more than all of the
viewer's RTP costs natively: the thread unprotects the server's SRTCP sender reports (for LSR/DLSR)
and, about once a second per viewer, builds a receiver report (fraction and cumulative lost, highest
seq, jitter, LSR/DLSR) plus a REMB from the counters, SRTCP-protects it and sends it to the
nominated remote address, with that viewer's own libsrtp sessions (aiortc's ``_rx_srtp`` /
``_tx_srtp``; pylibsrtp hands over libsrtp's functions and the session pointers; after the take-over
nothing in Python uses those sessions). So the server keeps hearing from every viewer (it drops one
silent for 15 s), measures its RTT and loss, and keeps it on the top rung. STUN and DTLS (ICE consent
both ways, the DTLS close: well under one datagram per second per viewer) go to a bounded queue that
wakes the event loop through an eventfd (once per native poll round at most). ICE consent (RFC 7675) is answered and
sent by a lean STUN path here (binding requests and success responses, MESSAGE-INTEGRITY checked and
added, FINGERPRINT), because aioice's pure-Python STUN coding costs ~0.3 ms per message, the largest
per-viewer cost left in Python; aioice's own consent task is stopped, and everything else (an error
response, a role conflict, a bad signature, DTLS) is handed back to aioice (``datagram_received``).

Closing a viewer detaches its socket from the native side first (the poll thread never touches a
detached fd or its SRTP sessions again), then closes the peer connection, which closes the sockets.

Cost on the 2-core dev machine (720p30 VP8 + Opus, ~200 packets/s per viewer): ~1.9 us per packet
in the native thread, ~1.4 us of it the kernel's own recvmmsg path (copy, skb, timestamp), plus
~0.06-0.09 ms per viewer-second in Python (consent): ~0.0004 core-s per viewer-second in all, against
~0.005 for harness ``load`` (~35 us per packet). With ``gro`` (UDP_GRO on the viewers' sockets) a
run of packets the server sent as one UDP GSO message is read at once: ~1.0 us per packet natively.
It is off by default because it changes the server's side too: without it the kernel cuts each GSO
run into datagrams on the way in, charged to the sending server as software GSO at a NIC would be;
with it nobody does, as with a NIC that segments UDP itself (~15 % less server CPU per viewer).

The standalone run measures ``--levels`` (default: ``--viewers``) of cheap viewers, and with
``--compare-harness`` harness ``load`` viewers too, one after the other against one room: the load
processes' and the server's CPU over each window, packets per viewer-second, what the viewers saw.
Without ``--whep`` it starts its own server with a 720p publisher in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import ctypes
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import platform
import random
import secrets
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Self

import aiohttp
import psutil
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.sdp import SessionDescription

from relay.client import WebRtcClient, WhipError, whep_play

log = logging.getLogger("bench.loadgen")

ROOT = Path(__file__).resolve().parent.parent
NATIVE_SOURCE = Path(__file__).with_name("_loadrecv.c")
CC_FLAGS = ("-O2", "-shared", "-fPIC", "-pthread")

KIND_VIDEO, KIND_AUDIO, KIND_OTHER = 0, 1, 255
KINDS = {"video": KIND_VIDEO, "audio": KIND_AUDIO}
HIST_BUCKETS = 9  # LR_HIST_BUCKETS in _loadrecv.c
MAX_DGRAM = 2048  # LR_MAX_DGRAM
ON_TIME_MS = 200.0
# Pause between poll rounds, so each recvmmsg call finds a few frames' worth of packets: the kernel
# costs ~3 us per call plus ~1.4 us per datagram here, and 50 ms takes ~12 datagrams per call (2 ms:
# ~5). Arrival times are the kernel's receive timestamps, so the pause does not show in lateness or
# gaps; it only delays consent answers (by far less than their 0.5 s timeout) and RTCP (by <= 50 ms).
DEFAULT_BATCH_US = 50_000
# Constant and above the top rung's need ((1.5 Mbit/s + audio) x 1.15): the server keeps every load
# viewer on its top rung, the case the benchmark measures (0 turns REMB off).
DEFAULT_REMB_BPS = 5_000_000
RTCP_INTERVAL_MS = 1000  # a receiver report per viewer about every second, as browsers send
# A busy server answers a join with 503 + Retry-After (2 s): a real viewer's page tries again.
BUSY_RETRY_S = 2.0
BUSY_GIVE_UP_S = 60.0
# ICE consent freshness (RFC 7675) as aioice does it: a check every 5 s (x 0.8-1.2), and after 6
# unanswered checks the viewer is gone.
CONSENT_INTERVAL_S = 5.0
CONSENT_FAILURES = 6
CONSENT_TICK_S = 0.25
LOAD_NICE = 10  # as harness.LOAD_NICE: sinks standing in for other machines yield to the server


def _harness() -> ModuleType:
    """The benchmark harness (servers, rooms, publisher, the old load worker). The only place this
    module imports it, and lazily: the worker process needs none of it, and it may move."""
    from . import harness

    return harness


# --- aiortc / aioice / pylibsrtp internals this module relies on ------------------------------------
# Written against aiortc 1.16.0, aioice 0.13.0, pylibsrtp 1.0.0 (the server's own list is
# relay/aiortc_private.py); each helper says what it reaches for.


def _nominated_protocol(dtls: RTCDtlsTransport) -> tuple[Any, tuple[str, int]]:
    """(aioice StunProtocol: one UDP socket, remote address) of the pair ICE nominated for component 1."""
    connection = dtls.transport._connection  # aioice.Connection behind the RTCIceTransport
    pair = connection._nominated.get(1)
    if pair is None:
        raise ConnectionError("ICE connected without a nominated pair")
    return pair.protocol, pair.remote_addr


def _srtp_sessions(dtls: RTCDtlsTransport) -> tuple[Any, Any]:
    """aiortc's receive and send pylibsrtp Sessions of this transport (set once DTLS is done)."""
    if dtls._rx_srtp is None or dtls._tx_srtp is None:
        raise ConnectionError("DTLS done without SRTP sessions")
    return dtls._rx_srtp, dtls._tx_srtp


def _libsrtp_pointers(rx: Any, tx: Any) -> tuple[int, int, int, int]:
    """(rx srtp_t, tx srtp_t, srtp_unprotect_rtcp, srtp_protect_rtcp) as addresses for C."""
    from pylibsrtp._binding import ffi, lib

    def address(cdata: Any) -> int:
        return int(ffi.cast("uintptr_t", cdata))

    return (
        address(rx._srtp[0]),
        address(tx._srtp[0]),
        address(ffi.addressof(lib, "srtp_unprotect_rtcp")),
        address(ffi.addressof(lib, "srtp_protect_rtcp")),
    )


def _stop_receiver_reports(pc: RTCPeerConnection) -> None:
    """aiortc's receivers wake about twice a second each to report streams they will never see (RTP
    goes to the native side): stop those loops. Their stop() still works: the loop, once started,
    ends by setting the event stop() waits for."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        task = getattr(receiver, "_RTCRtpReceiver__rtcp_task", None)
        started = getattr(receiver, "_RTCRtpReceiver__rtcp_started", None)
        if task is not None and started is not None and started.is_set():
            task.cancel()


def _ice_credentials(dtls: RTCDtlsTransport) -> IceConsent:
    """What consent checks need from the aioice Connection: both ends' credentials, our role and
    tie-breaker. Also stops aioice's own consent task (this module sends the checks instead); its
    close() copes with a cancelled task."""
    from aioice.candidate import candidate_priority

    connection = dtls.transport._connection
    if connection.remote_username is None or connection.remote_password is None:
        raise ConnectionError("ICE connected without the remote credentials")
    task = connection._query_consent_task
    if task is not None:
        task.cancel()
    return IceConsent(
        local_ufrag=connection.local_username,
        local_key=connection.local_password.encode(),
        remote_ufrag=connection.remote_username,
        remote_key=connection.remote_password.encode(),
        controlling=connection.ice_controlling,
        tie_breaker=connection._tie_breaker,
        priority=candidate_priority(1, "prflx"),  # what aioice's build_request sends
    )


def _sender_ssrc(pc: RTCPeerConnection) -> int:
    """aiortc's receivers report from their transceiver's sender SSRC; so do we (the video one)."""
    transceivers = pc.getTransceivers()
    video = [t for t in transceivers if t.kind == "video"] or transceivers
    return int(video[0].sender._ssrc)


async def _drop_rtp(data: bytes, arrival_time_ms: int) -> None:
    """Stands in for RTCDtlsTransport._handle_rtp_data until the socket is taken over."""


# --- lean STUN for ICE consent (RFC 8489 / 8445 / 7675) --------------------------------------------

STUN_COOKIE = 0x2112A442
_COOKIE = struct.pack("!I", STUN_COOKIE)
BINDING_REQUEST, BINDING_SUCCESS = 0x0001, 0x0101
ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, ATTR_XOR_MAPPED_ADDRESS, ATTR_PRIORITY = 0x0006, 0x0008, 0x0020, 0x0024
ATTR_ICE_CONTROLLED, ATTR_ICE_CONTROLLING, ATTR_FINGERPRINT = 0x8029, 0x802A, 0x8028
_FINGERPRINT_XOR = 0x5354554E


def stun_attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)


def stun_message(msg_type: int, transaction_id: bytes, attributes: bytes, key: bytes) -> bytes:
    """A STUN message with ``attributes``, then MESSAGE-INTEGRITY (HMAC-SHA1 with ``key``, over the
    message with its length counting itself) and FINGERPRINT (CRC-32 over all before it)."""
    header = struct.pack("!HHI", msg_type, len(attributes) + 24, STUN_COOKIE) + transaction_id
    integrity = hmac.new(key, header + attributes, hashlib.sha1).digest()
    body = attributes + struct.pack("!HH", ATTR_MESSAGE_INTEGRITY, 20) + integrity
    header = struct.pack("!HHI", msg_type, len(body) + 8, STUN_COOKIE) + transaction_id
    fingerprint = binascii.crc32(header + body) ^ _FINGERPRINT_XOR
    return header + body + struct.pack("!HHI", ATTR_FINGERPRINT, 4, fingerprint)


def stun_attributes(data: bytes) -> dict[int, tuple[int, bytes]] | None:
    """{type: (offset of the attribute, value)}; None if ``data`` is not a well-formed STUN message."""
    if len(data) < 20 or data[4:8] != _COOKIE or struct.unpack_from("!H", data, 2)[0] + 20 != len(data):
        return None
    found: dict[int, tuple[int, bytes]] = {}
    offset = 20
    while offset + 4 <= len(data):
        kind, length = struct.unpack_from("!HH", data, offset)
        if offset + 4 + length > len(data):
            return None
        found.setdefault(kind, (offset, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length + (-length % 4)
    return found


def stun_integrity_ok(data: bytes, attributes: dict[int, tuple[int, bytes]], key: bytes) -> bool:
    """MESSAGE-INTEGRITY of a received message, checked as RFC 8489 section 14.5 says."""
    if ATTR_MESSAGE_INTEGRITY not in attributes:
        return False
    offset, value = attributes[ATTR_MESSAGE_INTEGRITY]
    covered = data[:2] + struct.pack("!H", offset - 20 + 24) + data[4:offset]
    return hmac.compare_digest(hmac.new(key, covered, hashlib.sha1).digest(), value)


def xor_mapped_address(addr: tuple[str, int], transaction_id: bytes) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    pad = _COOKIE if ip.version == 4 else _COOKIE + transaction_id
    family = 1 if ip.version == 4 else 2
    xored = bytes(a ^ b for a, b in zip(ip.packed, pad))
    return stun_attribute(ATTR_XOR_MAPPED_ADDRESS, struct.pack("!BBH", 0, family, addr[1] ^ (STUN_COOKIE >> 16)) + xored)


@dataclass
class IceConsent:
    """One viewer socket's ICE consent state: credentials, role, the check in flight."""

    local_ufrag: str
    local_key: bytes
    remote_ufrag: str
    remote_key: bytes
    controlling: bool
    tie_breaker: int
    priority: int
    pending: bytes | None = None  # transaction id of our unanswered check
    failures: int = 0
    next_check: float = 0.0
    _mapped: dict[tuple[str, int], bytes] = field(default_factory=dict)  # IPv4 XOR-MAPPED-ADDRESS by source

    def request(self, transaction_id: bytes) -> bytes:
        """Our consent check, with the attributes aioice's build_request puts in one."""
        role = ATTR_ICE_CONTROLLING if self.controlling else ATTR_ICE_CONTROLLED
        attributes = (
            stun_attribute(ATTR_USERNAME, f"{self.remote_ufrag}:{self.local_ufrag}".encode())
            + stun_attribute(ATTR_PRIORITY, struct.pack("!I", self.priority))
            + stun_attribute(role, struct.pack("!Q", self.tie_breaker))
        )
        return stun_message(BINDING_REQUEST, transaction_id, attributes, self.remote_key)

    def answer(self, data: bytes, addr: tuple[str, int]) -> bytes | None:
        """The success response to a valid consent check from the server; None for anything this
        lean path leaves to aioice (not a binding request, wrong user, bad signature, role conflict)."""
        attributes = stun_attributes(data)
        if attributes is None or struct.unpack_from("!H", data)[0] != BINDING_REQUEST:
            return None
        username = attributes.get(ATTR_USERNAME, (0, b""))[1]
        if not username.startswith(self.local_ufrag.encode() + b":"):
            return None
        if (ATTR_ICE_CONTROLLING if self.controlling else ATTR_ICE_CONTROLLED) in attributes:
            return None  # both sides claim one role: aioice's repair applies
        if not stun_integrity_ok(data, attributes, self.local_key):
            return None
        transaction_id = data[8:20]
        mapped = self._mapped.get(addr)
        if mapped is None:
            mapped = xor_mapped_address(addr, transaction_id)
            if ":" not in addr[0]:  # an IPv6 one is XORed with the transaction id too
                self._mapped[addr] = mapped
        return stun_message(BINDING_SUCCESS, transaction_id, mapped, self.local_key)

    def answered(self, data: bytes) -> bool:
        """Whether ``data`` is the signed success response to our check in flight (and clears it)."""
        if self.pending is None or data[8:20] != self.pending or struct.unpack_from("!H", data)[0] != BINDING_SUCCESS:
            return False
        attributes = stun_attributes(data)
        if attributes is None or not stun_integrity_ok(data, attributes, self.remote_key):
            return False
        self.pending = None
        self.failures = 0
        return True


# --- the native receiver ------------------------------------------------------------------------


class LrCounters(ctypes.Structure):
    """lr_counters in _loadrecv.c (same field order)."""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("expected", ctypes.c_uint64),
        ("lost", ctypes.c_int64),
        ("ssrc_changes", ctypes.c_uint64),
        ("ssrc", ctypes.c_uint32),
        ("highest_seq", ctypes.c_uint32),
        ("jitter", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("frames", ctypes.c_uint64),
        ("frames_incomplete", ctypes.c_uint64),
        ("frames_on_time", ctypes.c_uint64),
        ("frames_late", ctypes.c_uint64),
        ("lateness_hist", ctypes.c_uint64 * HIST_BUCKETS),
        ("window_max_lateness_ms", ctypes.c_double),
        ("window_max_frame_gap_ms", ctypes.c_double),
    ]

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name, *_ in self._fields_ if name not in ("_pad", "lateness_hist")}
        out["lateness_hist"] = list(self.lateness_hist)
        return out


class LrMisc(ctypes.Structure):
    """lr_misc_counters in _loadrecv.c."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "other_packets",
            "other_bytes",
            "control_datagrams",
            "control_dropped",
            "srtcp_received",
            "srtcp_errors",
            "sender_reports",
            "rtcp_sent",
            "rtcp_send_errors",
            "poll_rounds",
            "recv_calls",
            "gro_reads",
        )
    ]

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name, *_ in self._fields_}


class LrControl(ctypes.Structure):
    """lr_control in _loadrecv.c: one datagram for Python (STUN, DTLS, ...)."""

    _fields_ = [
        ("fd", ctypes.c_int32),
        ("viewer", ctypes.c_int32),
        ("len", ctypes.c_int32),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("arrival_ns", ctypes.c_int64),
        ("host", ctypes.c_char * 64),
        ("data", ctypes.c_uint8 * MAX_DGRAM),
    ]


_DATA_OFFSET = LrControl.data.offset


@dataclass(frozen=True)
class ControlDatagram:
    fd: int
    viewer: int
    data: bytes
    addr: tuple[str, int]
    arrival_ns: int


def build_native(source: Path = NATIVE_SOURCE) -> Path:
    """Compile ``source`` once per content + compiler + machine into a per-user cache dir under the
    system temp dir (never the repository), atomically, so concurrent workers can race safely."""
    cc = os.environ.get("CC", "cc")
    code = source.read_bytes()
    key = hashlib.sha256(code + " ".join((cc, *CC_FLAGS, platform.machine())).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"shelfcast-loadrecv-{os.getuid()}"
    lib = cache / f"_loadrecv-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = cache / f".{lib.name}.{os.getpid()}.tmp"
    result = subprocess.run([cc, *CC_FLAGS, "-o", str(tmp), str(source)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr}")
    os.replace(tmp, lib)
    return lib


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB  # one loaded library per process, like any extension module
    if _LIB is not None:
        return _LIB
    lib = ctypes.CDLL(str(build_native()))
    c_int, c_void_p, c_u32, c_u64, c_i64, c_double = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64, ctypes.c_double
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "lr_create": (c_void_p, [c_int, c_double, c_int, c_int]),
        "lr_destroy": (None, [c_void_p]),
        "lr_notify_fd": (c_int, [c_void_p]),
        "lr_add_viewer": (c_int, [c_void_p]),
        "lr_set_payload_kind": (c_int, [c_void_p, c_int, c_int, c_int, c_u32]),
        "lr_attach": (c_int, [c_void_p, c_int, c_int]),
        "lr_set_rtcp": (c_int, [c_void_p, c_int, c_void_p, c_void_p, c_void_p, c_void_p, ctypes.c_char_p, c_int, c_u32, c_u64, c_int]),
        "lr_detach": (c_int, [c_void_p, c_int]),
        "lr_remove_viewer": (None, [c_void_p, c_int]),
        "lr_feed": (None, [c_void_p, c_int, ctypes.c_char_p, c_int, c_i64]),
        "lr_pop_control": (c_int, [c_void_p, ctypes.POINTER(LrControl), c_int]),
        "lr_viewer_counters": (c_int, [c_void_p, c_int, c_int, ctypes.POINTER(LrCounters), c_int]),
        "lr_totals": (c_int, [c_void_p, c_int, ctypes.POINTER(LrCounters), c_int]),
        "lr_misc": (None, [c_void_p, ctypes.POINTER(LrMisc)]),
        "lr_note_sr": (None, [c_void_p, c_int, c_u32, c_u32, c_i64]),
        "lr_build_rtcp": (c_int, [c_void_p, c_int, c_u32, c_u64, ctypes.c_char_p, c_int]),
        "lr_thread_cpu_s": (c_double, [c_void_p]),
        "lr_hist_buckets": (c_int, []),
        "lr_hist_edge_ms": (c_double, [c_int]),
        "lr_control_size": (c_int, []),
        "lr_counters_size": (c_int, []),
        "lr_misc_size": (c_int, []),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    # A layout mismatch would silently garble every counter: refuse to run instead.
    native = (lib.lr_hist_buckets(), lib.lr_counters_size(), lib.lr_control_size(), lib.lr_misc_size())
    mirror = (HIST_BUCKETS, ctypes.sizeof(LrCounters), ctypes.sizeof(LrControl), ctypes.sizeof(LrMisc))
    if native != mirror:
        raise RuntimeError(f"_loadrecv.c and its ctypes mirror disagree on struct layout: {native} != {mirror}")
    _LIB = lib
    return lib


def lateness_edges_ms() -> list[float]:
    """Upper edges of the lateness histogram's buckets (the last bucket has none)."""
    lib = _lib()
    return [lib.lr_hist_edge_ms(i) for i in range(HIST_BUCKETS - 1)]


class NativeReceiver:
    """One native poll thread and the per-viewer counters it keeps (thread=False: no thread, for
    feeding handcrafted datagrams through ``feed``; gro: sockets read GSO runs whole, UDP_GRO)."""

    def __init__(self, *, batch_us: int = DEFAULT_BATCH_US, on_time_ms: float = ON_TIME_MS, thread: bool = True, gro: bool = False) -> None:
        self._lib = _lib()
        handle = self._lib.lr_create(batch_us, on_time_ms, int(thread), int(gro))
        if not handle:
            raise OSError("lr_create failed")
        self._h: int | None = handle
        self._pop_buf = (LrControl * 64)()
        self._rtcp_buf = ctypes.create_string_buffer(256)

    @property
    def handle(self) -> int:
        if self._h is None:
            raise RuntimeError("native receiver closed")
        return self._h

    @property
    def notify_fd(self) -> int:
        """Readable when control datagrams are waiting (an eventfd)."""
        return int(self._lib.lr_notify_fd(self.handle))

    def add_viewer(self) -> int:
        viewer = int(self._lib.lr_add_viewer(self.handle))
        if viewer < 0:
            raise MemoryError("lr_add_viewer")
        return viewer

    def set_payload_kind(self, viewer: int, payload_type: int, kind: int, clock_rate: int) -> None:
        if self._lib.lr_set_payload_kind(self.handle, viewer, payload_type, kind, clock_rate) != 0:
            raise ValueError(f"bad viewer {viewer} or payload type {payload_type}")

    def attach(self, viewer: int, fd: int) -> None:
        rc = self._lib.lr_attach(self.handle, viewer, fd)
        if rc != 0:
            raise OSError(-rc, f"attach fd {fd}: {os.strerror(-rc)}")

    def set_rtcp(
        self, fd: int, libsrtp: tuple[int, int, int, int], remote: tuple[str, int], sender_ssrc: int, remb_bps: int, interval_ms: int = RTCP_INTERVAL_MS
    ) -> None:
        """Native RTCP for an attached fd: unprotect incoming SRTCP, send RR (+ REMB) every interval."""
        rx, tx, unprotect, protect = libsrtp
        rc = self._lib.lr_set_rtcp(self.handle, fd, rx, tx, unprotect, protect, remote[0].encode(), remote[1], sender_ssrc, remb_bps, interval_ms)
        if rc != 0:
            raise OSError(-rc, f"set_rtcp fd {fd}: {os.strerror(-rc)}")

    def detach(self, fd: int) -> bool:
        """After this returns the native thread never touches ``fd`` again (its owner may close it)."""
        return self._h is not None and self._lib.lr_detach(self._h, fd) > 0

    def remove_viewer(self, viewer: int) -> None:
        """Detach every fd of the viewer; its counters stay in the totals."""
        if self._h is not None:
            self._lib.lr_remove_viewer(self._h, viewer)

    def feed(self, viewer: int, data: bytes, arrival_ns: int) -> None:
        """Run the classifier on one datagram as the poll thread does (tests, replays)."""
        self._lib.lr_feed(self.handle, viewer, data, len(data), arrival_ns)

    def pop_control(self) -> list[ControlDatagram]:
        out: list[ControlDatagram] = []
        while True:
            n = self._lib.lr_pop_control(self.handle, self._pop_buf, len(self._pop_buf))
            for entry in self._pop_buf[:n]:
                data = ctypes.string_at(ctypes.addressof(entry) + _DATA_OFFSET, entry.len)
                out.append(ControlDatagram(entry.fd, entry.viewer, data, (entry.host.decode(), entry.port), entry.arrival_ns))
            if n < len(self._pop_buf):
                return out

    def counters(self, viewer: int, kind: int, *, reset_window: bool = False) -> dict[str, Any]:
        c = LrCounters()
        if self._lib.lr_viewer_counters(self.handle, viewer, kind, ctypes.byref(c), int(reset_window)) != 0:
            raise ValueError(f"bad viewer {viewer} or kind {kind}")
        return c.as_dict()

    def packets(self, viewer: int) -> int:
        """Video + audio RTP packets of one viewer so far (cheap: for stall detection)."""
        c = LrCounters()
        total = 0
        for kind in (KIND_VIDEO, KIND_AUDIO):
            self._lib.lr_viewer_counters(self.handle, viewer, kind, ctypes.byref(c), 0)
            total += c.packets
        return total

    def totals(self, kind: int, *, reset_window: bool = False) -> dict[str, Any]:
        """Every viewer's counters of ``kind`` summed (window maxima and jitter: the worst viewer's)."""
        c = LrCounters()
        self._lib.lr_totals(self.handle, kind, ctypes.byref(c), int(reset_window))
        return c.as_dict()

    def misc(self) -> dict[str, int]:
        out = LrMisc()
        self._lib.lr_misc(self.handle, ctypes.byref(out))
        return out.as_dict()

    def thread_cpu_s(self) -> float:
        """CPU seconds used by the poll thread so far."""
        return float(self._lib.lr_thread_cpu_s(self.handle))

    def note_sr(self, viewer: int, ssrc: int, lsr: int, arrival_ns: int) -> None:
        """As if the viewer had received a sender report (tests)."""
        self._lib.lr_note_sr(self.handle, viewer, ssrc, lsr, arrival_ns)

    def build_rtcp(self, viewer: int, sender_ssrc: int, remb_bps: int) -> bytes:
        """The clear compound RTCP (RR [+ REMB]) the viewer's next report would carry; b"" before any
        RTP. Advances the fraction-lost interval as sending does."""
        n = self._lib.lr_build_rtcp(self.handle, viewer, sender_ssrc, remb_bps, self._rtcp_buf, len(self._rtcp_buf))
        if n < 0:
            raise ValueError(f"bad viewer {viewer}")
        return self._rtcp_buf.raw[:n]

    def close(self) -> None:
        """Stop the thread and free the counters; every fd must have been detached before."""
        if self._h is not None:
            self._lib.lr_destroy(self._h)
            self._h = None


def udp_socket_drops(inodes: set[int]) -> int:
    """Datagrams the kernel dropped on these sockets because their receive queue was full (the load
    side fell behind), from /proc/net/udp{,6}: tells our own loss from loss upstream."""
    total = 0
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(name) as table:
            next(table)  # header
            for line in table:
                fields = line.split()
                if len(fields) > 12 and int(fields[9]) in inodes:
                    total += int(fields[12])
    return total


# --- one cheap viewer ------------------------------------------------------------------------------


@dataclass
class _Socket:
    """A viewer socket the native side reads: who it belongs to and where to hand STUN/DTLS back."""

    fd: int
    viewer: CheapViewer
    protocol: Any  # aioice.ice.StunProtocol
    remote: tuple[str, int]
    ice: IceConsent
    inode: int  # of the socket, to find it in /proc/net/udp

    def send(self, data: bytes, addr: tuple[str, int]) -> bool:
        """Send on the viewer's socket, unless aioice or the server has closed it meanwhile."""
        transport = self.protocol.transport
        if self.viewer.closed or transport.is_closing():
            return False
        transport.sendto(data, addr)
        return True


class CheapViewer:
    """A WHEP viewer whose RTP and RTCP are handled natively once it is connected."""

    def __init__(self, client: WebRtcClient, native: NativeReceiver, remb_bps: int = DEFAULT_REMB_BPS) -> None:
        self.client = client
        self.native = native
        self.remb_bps = remb_bps
        self.id = native.add_viewer()
        self.sockets: list[_Socket] = []
        self.join_s = 0.0
        self._closed = False
        self._last_packets = 0
        # Held so the libsrtp sessions the native side uses outlive its use of them, whatever aiortc does.
        self._srtp_sessions: list[Any] = []
        for transport in self._dtls_transports():
            # Until the socket is taken over, RTP that arrives is dropped rather than decoded: aiortc's
            # receivers then never learn a remote stream and never report one.
            transport._handle_rtp_data = _drop_rtp  # type: ignore[method-assign]

        @client.pc.on("connectionstatechange")
        def _state() -> None:
            if client.pc.connectionState in ("failed", "closed"):
                native.remove_viewer(self.id)  # no more reports to a session the server has ended

    @classmethod
    async def join(
        cls,
        http: aiohttp.ClientSession,
        whep: str,
        native: NativeReceiver,
        *,
        token: str | None = None,
        remb_bps: int = DEFAULT_REMB_BPS,
        timeout: float = 30.0,
        on_busy: Callable[[], None] | None = None,
    ) -> Self:
        started = time.monotonic()
        while True:
            try:
                client = await whep_play(http, whep, kinds=("video", "audio"), token=token)
                break
            except WhipError as exc:
                if exc.status != 503 or time.monotonic() - started > BUSY_GIVE_UP_S:
                    raise
                if on_busy is not None:
                    on_busy()
                await asyncio.sleep(BUSY_RETRY_S)
        viewer = cls(client, native, remb_bps)
        try:
            await client.wait_connected(timeout)
            viewer._learn_payload_types()
            viewer._take_over()
        except BaseException:
            await viewer.close()
            raise
        viewer.join_s = time.monotonic() - started
        return viewer

    @property
    def pc(self) -> RTCPeerConnection:
        return self.client.pc

    @property
    def connected(self) -> bool:
        return not self._closed and self.pc.connectionState == "connected"

    @property
    def closed(self) -> bool:
        return self._closed

    def _dtls_transports(self) -> list[RTCDtlsTransport]:
        seen: dict[int, RTCDtlsTransport] = {}
        for transceiver in self.pc.getTransceivers():
            transport = transceiver.receiver.transport
            if transport is not None:
                seen.setdefault(id(transport), transport)
        return list(seen.values())

    def _learn_payload_types(self) -> None:
        """Video vs audio by payload type, from the server's answer (RTX and FEC count as other)."""
        answer = SessionDescription.parse(self.pc.remoteDescription.sdp)
        for media in answer.media:
            kind = KINDS.get(media.kind)
            for codec in media.rtp.codecs:
                if codec.payloadType is None:
                    continue
                subtype = codec.mimeType.split("/")[-1].lower()
                primary = kind is not None and subtype not in ("rtx", "red", "ulpfec", "flexfec-03")
                self.native.set_payload_kind(self.id, codec.payloadType, kind if primary and kind is not None else KIND_OTHER, codec.clockRate or 0)

    def _take_over(self) -> None:
        ssrc = _sender_ssrc(self.pc)
        for dtls in self._dtls_transports():  # one with BUNDLE (the server bundles)
            protocol, remote = _nominated_protocol(dtls)
            rx, tx = _srtp_sessions(dtls)
            self._srtp_sessions += [rx, tx]
            transport = protocol.transport
            fd = transport.get_extra_info("socket").fileno()
            # asyncio stops reading this socket; aioice keeps sending on it (consent checks, replies).
            transport.pause_reading()
            self.native.attach(self.id, fd)
            ice = _ice_credentials(dtls)
            ice.next_check = time.monotonic() + CONSENT_INTERVAL_S * random.random()  # spread the checks
            self.sockets.append(_Socket(fd, self, protocol, remote, ice, os.fstat(fd).st_ino))
            original = protocol.connection_lost

            # asyncio calls connection_lost just before it closes the socket, whoever closes it
            # (pc.close(), aioice giving up on consent, a fatal send error): detach first.
            def connection_lost(exc: Exception | None, _fd: int = fd, _original: Callable[[Exception | None], None] = original) -> None:
                self.native.detach(_fd)
                _original(exc)

            protocol.connection_lost = connection_lost
            self.native.set_rtcp(fd, _libsrtp_pointers(rx, tx), remote, ssrc, self.remb_bps)
        _stop_receiver_reports(self.pc)

    def stalled(self) -> bool:
        """No new RTP since the previous call."""
        packets = self.native.packets(self.id)
        stalled = packets == self._last_packets
        self._last_packets = packets
        return stalled

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.native.remove_viewer(self.id)  # the native side lets go of fds and sessions first
        await self.client.close()


# --- a process's worth of load viewers ------------------------------------------------------------


@dataclass
class _Tally:
    stun: int = 0
    dtls: int = 0
    unknown: int = 0
    to_aioice: int = 0  # control datagrams the lean path left to aioice
    consent_answered: int = 0  # the server's consent checks we answered
    consent_sent: int = 0
    consent_ok: int = 0
    consent_timeouts: int = 0
    consent_expired: int = 0  # viewers closed after CONSENT_FAILURES unanswered checks
    busy_retries: int = 0  # joins the server turned away with 503 (and we retried)

    def busy(self) -> None:
        self.busy_retries += 1


@dataclass
class LoadPool:
    """Load viewers of one WHEP endpoint, one native receiver, one event loop."""

    whep: str
    token: str | None = None
    batch: int = 10
    remb_bps: int = DEFAULT_REMB_BPS
    batch_us: int = DEFAULT_BATCH_US
    on_time_ms: float = ON_TIME_MS
    gro: bool = False
    viewers: list[CheapViewer] = field(default_factory=list)
    failed: int = 0
    tally: _Tally = field(default_factory=_Tally)
    _sockets: dict[int, _Socket] = field(default_factory=dict)
    _native: NativeReceiver | None = None
    _http: aiohttp.ClientSession | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _consent_task: asyncio.Task[None] | None = None
    _closing: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._native = NativeReceiver(batch_us=self.batch_us, on_time_ms=self.on_time_ms, gro=self.gro)
        self._loop.add_reader(self._native.notify_fd, self._drain_control)
        # A connection per join, as separate people have.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.batch, force_close=True))
        self._consent_task = asyncio.create_task(self._check_consent())
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def native(self) -> NativeReceiver:
        if self._native is None:
            raise RuntimeError("LoadPool not started")
        return self._native

    async def add(self, n: int) -> tuple[int, int]:
        """Join ``n`` more viewers, ``batch`` at a time; (viewers now, joins failed in this call)."""
        assert self._http is not None
        failed = 0
        while n > 0:
            step = min(self.batch, n)
            joins = (
                CheapViewer.join(self._http, self.whep, self.native, token=self.token, remb_bps=self.remb_bps, on_busy=self.tally.busy)
                for _ in range(step)
            )
            for result in await asyncio.gather(*joins, return_exceptions=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result
                    failed += 1
                    log.warning("join failed: %r", result)
                else:
                    self.viewers.append(result)
                    for sock in result.sockets:
                        self._sockets[sock.fd] = sock
            n -= step
        self.failed += failed
        return len(self.viewers), failed

    async def drop(self, n: int) -> int:
        """The ``n`` longest-connected viewers leave (each closes its peer connection, as a shopper
        closing the tab); returns the viewers still here."""
        leaving, self.viewers = self.viewers[:n], self.viewers[n:]
        for viewer in leaving:
            for sock in viewer.sockets:
                self._sockets.pop(sock.fd, None)
        await asyncio.gather(*(v.close() for v in leaving), return_exceptions=True)
        return len(self.viewers)

    def _drain_control(self) -> None:
        """Answer consent checks, note answers to ours, hand the rest (DTLS...) to aioice. (The native
        thread queues a whole poll round's datagrams at once, so one wake-up serves many viewers.)"""
        assert self._loop is not None and self._native is not None
        for d in self._native.pop_control():
            sock = self._sockets.get(d.fd)
            if sock is None or sock.viewer.closed:
                continue
            first = d.data[0]
            if first <= 3:
                self.tally.stun += 1
                if sock.ice.answered(d.data):
                    self.tally.consent_ok += 1
                    continue
                response = sock.ice.answer(d.data, d.addr)
                if response is not None:
                    if sock.send(response, d.addr):
                        self.tally.consent_answered += 1
                    continue
            elif 20 <= first <= 63:
                self.tally.dtls += 1
            else:
                self.tally.unknown += 1
            self.tally.to_aioice += 1
            sock.protocol.datagram_received(d.data, d.addr)

    async def _check_consent(self) -> None:
        """Every socket's consent check about every CONSENT_INTERVAL_S; a viewer whose last
        CONSENT_FAILURES checks went unanswered is closed, as aioice would."""
        while True:
            await asyncio.sleep(CONSENT_TICK_S)
            now = time.monotonic()
            for sock in list(self._sockets.values()):
                ice = sock.ice
                if not sock.viewer.connected or now < ice.next_check:
                    continue
                ice.next_check = now + CONSENT_INTERVAL_S * (0.8 + 0.4 * random.random())
                if ice.pending is not None:
                    ice.failures += 1
                    self.tally.consent_timeouts += 1
                    if ice.failures >= CONSENT_FAILURES:
                        log.warning("viewer %d: consent expired", sock.viewer.id)
                        self.tally.consent_expired += 1
                        task = asyncio.create_task(sock.viewer.close())
                        self._closing.add(task)
                        task.add_done_callback(self._closing.discard)
                        continue
                ice.pending = secrets.token_bytes(12)
                if sock.send(ice.request(ice.pending), sock.remote):
                    self.tally.consent_sent += 1

    def counts(self) -> tuple[int, int, int]:
        """(viewers connected, RTP packets and bytes received so far): the cheap subset of stats()."""
        native = self.native
        video, audio, misc = native.totals(KIND_VIDEO), native.totals(KIND_AUDIO), native.misc()
        packets = video["packets"] + audio["packets"] + misc["other_packets"]
        nbytes = video["bytes"] + audio["bytes"] + misc["other_bytes"]
        return sum(v.connected for v in self.viewers), packets, nbytes

    def stats(self, *, reset_window: bool = True) -> dict[str, Any]:
        """Cumulative counters (diff two calls for rates), maxima since the previous call with
        ``reset_window``, and this process's CPU seconds (all threads, the native one included)."""
        native = self.native
        video = native.totals(KIND_VIDEO, reset_window=reset_window)
        audio = native.totals(KIND_AUDIO, reset_window=reset_window)
        misc = native.misc()
        live = [v for v in self.viewers if not v.closed]
        joins = [v.join_s for v in self.viewers]
        return {
            "viewers": len(live),
            "connected": sum(v.connected for v in live),
            "stalled": sum(v.stalled() for v in live) if reset_window else None,
            "failed_joins": self.failed,
            "join_s_max": round(max(joins), 3) if joins else None,
            "packets": video["packets"] + audio["packets"] + misc["other_packets"],
            "bytes": video["bytes"] + audio["bytes"] + misc["other_bytes"],
            "lost": video["lost"] + audio["lost"],
            "expected": video["expected"] + audio["expected"],
            "kernel_drops": udp_socket_drops({sock.inode for v in live for sock in v.sockets}),
            "frames": video["frames"],
            "frames_incomplete": video["frames_incomplete"],
            "frames_on_time": video["frames_on_time"],
            "frames_late": video["frames_late"],
            "window_max_frame_gap_ms": round(video["window_max_frame_gap_ms"], 2),
            "window_max_lateness_ms": round(video["window_max_lateness_ms"], 2),
            "lateness_hist": video["lateness_hist"],
            "lateness_edges_ms": lateness_edges_ms(),
            "video": video,
            "audio": audio,
            **misc,
            **self.tally.__dict__,
            "cpu_s": round(time.process_time(), 4),  # every thread of this process
            "native_cpu_s": round(native.thread_cpu_s(), 4),
            "main_cpu_s": round(time.thread_time(), 4),  # the event loop (stats() runs on it)
            "monotonic": time.monotonic(),
        }

    async def close(self) -> None:
        if self._consent_task is not None:
            self._consent_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consent_task
            self._consent_task = None
        await asyncio.gather(*self._closing, *(v.close() for v in self.viewers), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._native is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._native.notify_fd)
            self._native.close()
            self._native = None
        self._sockets.clear()


# --- the worker process (stdin) and its handle ------------------------------------------------------


async def _worker(args: argparse.Namespace) -> None:
    """``add N`` -> ``ok <viewers> failed <n>``; ``drop N`` -> ``ok <viewers>``; ``count`` -> ``ok <connected> packets <p> bytes <b>``
    (both as harness ``load`` answers); ``stats`` -> ``ok <json>``; ``quit`` or EOF ends it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pool = LoadPool(args.whep, token=args.token, batch=args.batch, remb_bps=args.remb_bps, batch_us=args.batch_us, gro=args.gro)
    async with pool:
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                break
            cmd, *rest = line.split()
            if cmd == "add":
                viewers, failed = await pool.add(int(rest[0]))
                print(f"ok {viewers} failed {failed}", flush=True)
            elif cmd == "drop":
                print(f"ok {await pool.drop(int(rest[0]))}", flush=True)
            elif cmd == "count":
                connected, packets, nbytes = pool.counts()
                print(f"ok {connected} packets {packets} bytes {nbytes}", flush=True)
            elif cmd == "stats":
                print("ok " + json.dumps(pool.stats(), separators=(",", ":")), flush=True)
            else:
                print(f"error unknown command {cmd}", flush=True)


class CheapLoadWorker:
    """Handle on a cheap load-viewer worker process: the shape of ``harness.LoadWorker`` (``proc``,
    ``viewers``, async ``add(n)`` -> joins failed, async ``packets()``, ``stop()``) plus ``stats()``."""

    def __init__(
        self,
        whep: str,
        batch: int = 10,
        *,
        token: str | None = None,
        remb_bps: int = DEFAULT_REMB_BPS,
        batch_us: int = DEFAULT_BATCH_US,
        gro: bool = False,
        nice: int = LOAD_NICE,
    ) -> None:
        argv = [sys.executable, "-m", "benchmarks.loadgen", "--worker", "--whep", whep, "--batch", str(batch), "--remb-bps", str(remb_bps), "--batch-us", str(batch_us), "--nice", str(nice)]
        if token:
            argv += ["--token", token]
        if gro:
            argv.append("--gro")
        # The worker's stderr, read when it fails: open for the handle's lifetime, closed by stop().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._final_log = ""
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.viewers = 0

    def log_tail(self, n: int = 2000) -> str:
        """The end of the worker's stderr (kept after stop())."""
        if self._log.closed:
            return self._final_log[-n:]
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    async def command(self, line: str, timeout: float = 300.0) -> str:
        from .harness import ask_worker

        return await ask_worker(self.proc, line, timeout, "cheap load worker", self.log_tail)

    async def add(self, n: int) -> int:
        """Join ``n`` more viewers; returns how many joins failed."""
        if n <= 0:
            return 0
        parts = (await self.command(f"add {n}")).split()
        self.viewers = int(parts[1])
        return int(parts[3])

    async def drop(self, n: int) -> None:
        """The ``n`` longest-connected viewers leave."""
        if n > 0:
            self.viewers = int((await self.command(f"drop {n}")).split()[1])

    async def packets(self) -> int:
        """RTP packets received so far by all of this worker's viewers."""
        return int((await self.command("count")).split()[3])

    async def stats(self) -> dict[str, Any]:
        """Counters (see LoadPool.stats); window maxima reset with each call."""
        stats: dict[str, Any] = json.loads((await self.command("stats")).split(" ", 1)[1])
        return stats

    def stop(self) -> None:
        """Ask the worker to close every peer connection and exit; kill it if it does not."""
        from .harness import quit_worker

        quit_worker(self.proc, 30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if not self._log.closed:
            self._final_log = self.log_tail(100_000)
            self._log.close()


# --- standalone run ------------------------------------------------------------------------------


def _proc_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def _proc_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 1e6


@dataclass
class _RoomProbe:
    """Asks the server how many viewers a room has (its own view, not ours)."""

    http: aiohttp.ClientSession
    base: str
    room: str

    async def viewers(self) -> int:
        async with self.http.get(f"{self.base}/api/rooms/{self.room}") as resp:
            return int((await resp.json())["viewers"])

    async def wait_viewers(self, want: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = await self.viewers()
            if n == want or time.monotonic() > deadline:
                return n
            await asyncio.sleep(0.25)


async def measure_variant(
    variant: str,
    whep: str,
    level: int,
    seconds: float,
    *,
    workers: int,
    settle_s: float,
    server_pids: list[int],
    room: _RoomProbe | None = None,
) -> dict[str, Any]:
    """``level`` load viewers of one kind (``cheap``; ``cheap-gro``: with UDP_GRO; ``harness``:
    harness.LoadWorker) over ``workers`` processes: cores the load processes and the server spend
    over a ``seconds`` window, packets delivered, and (cheap) what the viewers saw in that window."""
    cheap = variant.startswith("cheap")
    if cheap:
        pool: list[Any] = [CheapLoadWorker(whep, gro=variant == "cheap-gro") for _ in range(workers)]
    elif variant == "harness":
        pool = [_harness().LoadWorker(whep) for _ in range(workers)]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    try:
        per = [level // workers + (1 if i < level % workers else 0) for i in range(workers)]
        started = time.monotonic()
        failed = sum(await asyncio.gather(*(w.add(n) for w, n in zip(pool, per))))
        join_s = time.monotonic() - started
        await asyncio.sleep(settle_s)
        load_pids = [w.proc.pid for w in pool]
        before = await asyncio.gather(*(w.stats() for w in pool)) if cheap else []
        p0 = sum(await asyncio.gather(*(w.packets() for w in pool)))
        l0, s0, w0 = _proc_cpu_s(load_pids), _proc_cpu_s(server_pids), time.monotonic()
        await asyncio.sleep(seconds)
        l1, s1, w1 = _proc_cpu_s(load_pids), _proc_cpu_s(server_pids), time.monotonic()
        p1 = sum(await asyncio.gather(*(w.packets() for w in pool)))
        rss_mb = _proc_rss_mb(load_pids)
        wall = w1 - w0
        joined = sum(w.viewers for w in pool)
        result: dict[str, Any] = {
            "variant": variant,
            "level": level,
            "viewers": joined,
            "failed_joins": failed,
            "join_s": round(join_s, 2),
            "load_cores": round((l1 - l0) / wall, 4),
            "load_core_s_per_viewer_s": round((l1 - l0) / wall / max(1, joined), 6),
            "load_us_per_packet": round((l1 - l0) / max(1, p1 - p0) * 1e6, 2),
            "server_cores": round((s1 - s0) / wall, 4) if server_pids else None,
            "pkt_per_viewer_s": round((p1 - p0) / wall / max(1, joined), 1),
            "load_rss_mb": round(rss_mb, 1),  # the load processes in all (~80 MB each before any viewer)
        }
        if cheap:
            after = await asyncio.gather(*(w.stats() for w in pool))

            def window(key: str) -> float:
                return float(sum(a[key] - b[key] for a, b in zip(after, before)))

            result.update(
                connected=sum(a["connected"] for a in after),
                stalled=sum(a["stalled"] for a in after),
                busy_retries=sum(a["busy_retries"] for a in after),
                load_native_cores=round(window("native_cpu_s") / wall, 4),
                load_main_cores=round(window("main_cpu_s") / wall, 4),
                lost=int(window("lost")),
                expected=int(window("expected")),
                kernel_drops=int(window("kernel_drops")),
                frames_on_time=int(window("frames_on_time")),
                frames_late=int(window("frames_late")),
                frames_incomplete=int(window("frames_incomplete")),
                max_frame_gap_ms=max(a["window_max_frame_gap_ms"] for a in after),
                max_lateness_ms=max(a["window_max_lateness_ms"] for a in after),
                control_dropped=int(window("control_dropped")),
                rtcp_sent=int(window("rtcp_sent")),
            )
        if room is not None:
            # The server's own count: harness viewers send no receiver reports, so it drops them after 15 s.
            result["server_viewers"] = await room.viewers()
        return result
    finally:
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in pool))
        if room is not None:
            await room.wait_viewers(0, 30)  # the next step starts from an empty room


async def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    levels = [int(x) for x in args.levels.split(",")] if args.levels else [args.viewers]
    variants = args.variants.split(",") + (["harness"] if args.compare_harness else [])
    steps: list[dict[str, Any]] = []
    started = time.monotonic()
    options = {"workers": args.workers, "settle_s": args.settle}
    if args.whep:
        server_pids = [args.server_pid] if args.server_pid else []
        for level in levels:
            for variant in variants:
                steps.append(await measure_variant(variant, args.whep, level, args.seconds, server_pids=server_pids, **options))
    else:
        h = _harness()
        h.pin_aiortc_vp8_bitrate()
        server = h.shelfcast_server()
        async with h.running(server), aiohttp.ClientSession() as http:
            ep = await h.create_room(http, server)
            publisher, video = await h.publish(http, ep, encoded=True)
            room = _RoomProbe(http, server.base, ep.room)
            try:
                await publisher.wait_connected(15)
                # One viewer first: the encoders run from the first viewer on, a fixed cost that is
                # not charged to viewers (as benchmarks/fanout.py does).
                base = await measure_variant(variants[0], ep.whep, 1, args.seconds, server_pids=[server.pid], room=room, workers=1, settle_s=args.settle)
                steps.append({**base, "variant": "base"})
                for level in levels:
                    for variant in variants:
                        step = await measure_variant(variant, ep.whep, level, args.seconds, server_pids=[server.pid], room=room, **options)
                        step["server_core_s_per_viewer_s"] = round((step["server_cores"] - base["server_cores"]) / max(1, step["viewers"] - 1), 6)
                        steps.append(step)
            finally:
                await publisher.close()
    metrics = summarise(steps, levels)
    baseline = {
        "targets": {"load_core_s_per_viewer_s": 0.00025, "load_over_server_per_viewer": 0.25},
        "server_target_core_s_per_viewer_s": 0.001,
        "note": "a load viewer must cost well under a quarter of what the server spends per viewer",
    }
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "window_s": args.seconds,
        "settle_s": args.settle,
        "server": args.whep or "own shelfcast server + 720p30 VP8 1.5 Mbit/s publisher in this process",
        "cheap": f"aiortc WHEP negotiation, then {NATIVE_SOURCE.name}: epoll + recvmmsg every {DEFAULT_BATCH_US // 1000} ms, RTP header only, native RTCP; lean STUN consent",
        "cheap-gro": "cheap, with UDP_GRO on the viewers' sockets: a GSO run of the server is read (and not cut up by the kernel) at once",
        "harness": "benchmarks.harness load: aiortc ICE + DTLS + SRTP unprotect, RTP counted; it sends no receiver reports, so the server drops its viewers after 15 s (server_viewers)",
        "cpu_method": "psutil cpu_times (user + system, all threads) of the load worker processes and the server over the window",
        "steps": steps,
        "duration_s": round(time.monotonic() - started, 1),
    }
    return metrics, baseline, env


def summarise(steps: list[dict[str, Any]], levels: list[int]) -> dict[str, Any]:
    """Flat metrics by variant and requested level (joins can fail: ``viewers`` says how many came)."""
    metrics: dict[str, Any] = {}
    for step in steps:
        if step["variant"] == "base":
            metrics["server_cores_at_1"] = step["server_cores"]
            continue
        prefix, at = step["variant"].replace("-", "_"), step["level"]
        for name in (
            "viewers",
            "load_core_s_per_viewer_s",
            "load_us_per_packet",
            "load_cores",
            "load_rss_mb",
            "pkt_per_viewer_s",
            "server_cores",
            "server_core_s_per_viewer_s",
            "server_viewers",
        ):
            if step.get(name) is not None:
                metrics[f"{prefix}_{name}_at_{at}"] = step[name]
        if prefix.startswith("cheap"):
            on_time, not_on_time = step["frames_on_time"], step["frames_late"] + step["frames_incomplete"]
            metrics[f"cheap_on_time_share_at_{at}"] = round(on_time / max(1, on_time + not_on_time), 4)
            metrics[f"cheap_loss_at_{at}"] = round(step["lost"] / max(1, step["expected"]), 5)
            metrics[f"cheap_kernel_drops_at_{at}"] = step["kernel_drops"]
    cheap = [s for s in steps if s["variant"] == "cheap"] or [s for s in steps if s["variant"].startswith("cheap")]
    if cheap:
        top = cheap[-1]
        metrics["load_core_s_per_viewer_s"] = top["load_core_s_per_viewer_s"]
        metrics["load_us_per_packet"] = top["load_us_per_packet"]
        metrics["viewers"] = top["viewers"]
        if top.get("server_core_s_per_viewer_s", 0) > 0:
            metrics["load_over_server_per_viewer"] = round(top["load_core_s_per_viewer_s"] / top["server_core_s_per_viewer_s"], 3)
    for level in levels:
        old_us = metrics.get(f"harness_load_us_per_packet_at_{level}")
        for prefix in ("cheap", "cheap_gro"):
            cheap_us = metrics.get(f"{prefix}_load_us_per_packet_at_{level}")
            if cheap_us and old_us:
                metrics[f"harness_over_{prefix}_us_per_packet_at_{level}"] = round(old_us / cheap_us, 1)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--whep", help="WHEP URL of a running room (default: start a server and a 720p publisher)")
    parser.add_argument("--token", help="viewer token, where the room requires one")
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--levels", help="comma-separated viewer counts (overrides --viewers), e.g. 50,200")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per step")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between joining and measuring")
    parser.add_argument("--workers", type=int, default=2, help="load worker processes")
    parser.add_argument(
        "--variants",
        default="cheap",
        help="comma-separated load viewer kinds to measure in turn: cheap, cheap-gro (sockets read the server's UDP GSO runs "
        "whole: cheaper for them, and the server's loopback sends no longer pay for cutting runs up, as with a NIC that "
        "segments UDP), harness",
    )
    parser.add_argument("--compare-harness", action="store_true", help="also measure harness.LoadWorker at each level")
    parser.add_argument("--gro", action="store_true", help=argparse.SUPPRESS)  # worker: UDP_GRO sockets
    parser.add_argument("--server-pid", type=int, help="with --whep: the server's pid, to report its CPU too")
    parser.add_argument("--quick", action="store_true", help="10 viewers, 4 s windows")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--remb-bps", type=int, default=DEFAULT_REMB_BPS, help=argparse.SUPPRESS)
    parser.add_argument("--batch-us", type=int, default=DEFAULT_BATCH_US, help=argparse.SUPPRESS)
    parser.add_argument("--nice", type=int, default=LOAD_NICE, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.worker:
        if not args.whep:
            parser.error("--worker needs --whep")
        if args.nice:
            os.nice(args.nice)
        asyncio.run(_worker(args))
        return 0
    if args.quick:
        args.viewers, args.levels, args.seconds, args.settle = 10, None, 4.0, 2.0
    metrics, baseline, env = asyncio.run(run(args))
    h = _harness()
    env.update(h.media_env())
    from .common import emit

    results = h.RESULTS_QUICK if args.quick else h.RESULTS
    emit("loadgen", h.clean(metrics), baseline, h.clean(env), results_dir=results)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
