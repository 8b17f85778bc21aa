"""relay.egress: the native per-viewer RTP path, held byte for byte to aiortc and to the Python
reference, over real sockets, with real SRTP, and once against a real aiortc receiver."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import struct
import threading
import time
import types
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs.vpx import PACKET_MAX, Vp8Encoder, vp8_depayload
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from av.video.codeccontext import VideoCodecContext
from pylibsrtp import Policy, Session

from relay.egress import (
    ABS_SEND_TIME_URI,
    SENDER,
    AUDIO_LEVEL_URI,
    MAX_PAYLOAD,
    MID_URI,
    EgressStream,
    LockedSrtpSession,
    NativeFrame,
    ReferenceFrame,
    ReferenceStream,
    StreamParams,
    build_rtp_reference,
    clear_packets,
    clear_retransmission,
    current_ntp_time,
    depacketize_vp8,
    live_frame_buffers,
    packetize_vp8,
    report_to_sender,
    retransmit,
    send_frame,
    send_frame_reference,
    send_frame_soon,
    send_rtcp_soon,
    transport_of,
    with_picture_id,
)
from relay.ice import announce_host_addresses

NTP = 0xE9A1_2345_6789_ABCD  # some 64-bit NTP time; abs-send-time is bits 14..37 of it


def ntp_at(frame_index: int) -> int:
    return NTP + frame_index * 0x0123_4567  # a different abs-send-time per frame


def abs_send_time(ntp: int) -> int:
    return (ntp >> 14) & 0xFFFFFF


def video_params(**changes: Any) -> StreamParams:
    fields: dict[str, Any] = {"kind": "video", "ssrc": 0x1234_5678, "payload_type": 96, "clock_rate": 90000,
                              "first_sequence_number": 1000, "timestamp_origin": 0x1000_0000, "first_picture_id": 100,
                              "mid": "0", "mid_id": 1, "abs_send_time_id": 3}
    fields.update(changes)
    return StreamParams(**fields)


def audio_params(**changes: Any) -> StreamParams:
    fields: dict[str, Any] = {"kind": "audio", "ssrc": 0x0102_0304, "payload_type": 111, "clock_rate": 48000,
                              "first_sequence_number": 7, "timestamp_origin": 5, "mid": "1", "mid_id": 1,
                              "audio_level_id": 2}
    fields.update(changes)
    return StreamParams(**fields)


def sequence_number(packet: bytes) -> int:
    return int(struct.unpack_from("!H", packet, 2)[0])


# -- aiortc as the oracle for the clear packets ----------------------------------------------------

def aiortc_extensions_map(params: StreamParams) -> HeaderExtensionsMap:
    negotiated = [RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri) for ext_id, uri in (
        (params.mid_id, MID_URI), (params.abs_send_time_id, ABS_SEND_TIME_URI), (params.audio_level_id, AUDIO_LEVEL_URI),
    ) if ext_id is not None]
    extensions_map = HeaderExtensionsMap()
    extensions_map.configure(RTCRtpParameters(headerExtensions=negotiated))
    return extensions_map


def aiortc_packet(params: StreamParams, *, seq: int, ts: int, marker: bool, payload: bytes, ntp: int,
                  audio_level: int | None) -> bytes:
    """The packet as aiortc's RTCRtpSender._run_rtp builds and serializes it."""
    packet = RtpPacket(payload_type=params.payload_type, marker=int(marker), sequence_number=seq, timestamp=ts,
                       ssrc=params.ssrc, payload=payload)
    packet.extensions.abs_send_time = abs_send_time(ntp)
    packet.extensions.mid = params.mid
    if audio_level is not None:
        packet.extensions.audio_level = (False, audio_level)
    return packet.serialize(aiortc_extensions_map(params))


def aiortc_stream(params: StreamParams, frames: list[ReferenceFrame], timestamps: list[int]) -> list[list[bytes]]:
    """Every packet of ``frames`` (increasing timestamps) numbered independently of relay.egress."""
    out, seq, picture_id = [], params.first_sequence_number, params.first_picture_id
    for index, (frame, timestamp) in enumerate(zip(frames, timestamps)):
        packets = []
        for i, payload in enumerate(frame.payloads):
            if picture_id is not None:
                payload = with_picture_id(payload, picture_id)
            packets.append(aiortc_packet(params, seq=seq, ts=(params.timestamp_origin + timestamp) % 2**32,
                                         marker=i == len(frame.payloads) - 1, payload=payload, ntp=ntp_at(index),
                                         audio_level=frame.audio_level))
            seq = (seq + 1) % 2**16
        if picture_id is not None:
            picture_id = (picture_id + 1) % 2**15
        out.append(packets)
    return out


# -- sockets ---------------------------------------------------------------------------------------

@pytest.fixture
def sockets() -> Iterator[Callable[..., socket.socket]]:
    made: list[socket.socket] = []

    def make(family: int = socket.AF_INET, host: str = "127.0.0.1", kind: int = socket.SOCK_DGRAM) -> socket.socket:
        sock = socket.socket(family, kind)
        made.append(sock)
        if host:
            sock.bind((host, 0))
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(2.0)
        return sock

    yield make
    for sock in made:
        sock.close()


def receive(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(4096) for _ in range(count)]


def nothing_more(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        sock.recv(4096)
    except (TimeoutError, BlockingIOError):
        return True
    return False


SRTP_PROFILES = {  # profile: master key + salt length
    "AES128_CM_SHA1_80": (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    "AEAD_AES_128_GCM": (Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    "AEAD_AES_256_GCM": (Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
}


def srtp_pair(profile: int, key: bytes) -> tuple[Session, Session]:
    """(tx, rx) sessions as aiortc's RTCDtlsTransport makes them from one exported key."""
    tx_policy = Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
    tx_policy.allow_repeat_tx = True
    tx_policy.window_size = 1024
    rx_policy = Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=profile)
    rx_policy.window_size = 1024
    return Session(tx_policy), Session(rx_policy)


def some_frames() -> list[ReferenceFrame]:
    """A multi-packet keyframe, a one-packet frame, a frame of exactly two full payloads."""
    chunk = PACKET_MAX - 4
    return [ReferenceFrame.from_vp8(os.urandom(2 * chunk + 17), keyframe=True),
            ReferenceFrame.from_vp8(os.urandom(100), keyframe=False),
            ReferenceFrame.from_vp8(os.urandom(2 * chunk), keyframe=False)]


def native(frame: ReferenceFrame) -> NativeFrame:
    return NativeFrame(frame.payloads, keyframe=frame.keyframe, vp8=frame.vp8, audio_level=frame.audio_level)


# -- packetization ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 100, PACKET_MAX - 4, PACKET_MAX - 3, 2 * (PACKET_MAX - 4), 10_000])
def test_packetize_vp8_is_aiortcs_packetizer_with_a_patchable_picture_id(size: int) -> None:
    frame = os.urandom(size)
    payloads = packetize_vp8(frame)
    chunk = PACKET_MAX - 4
    assert [len(p) for p in payloads] == [4 + min(chunk, size - pos) for pos in range(0, size, chunk)]
    assert payloads[0][:4] == b"\x90\x80\x80\x00"  # X, S, PID 0 | I | M + 15-bit picture id 0
    assert all(p[:4] == b"\x80\x80\x80\x00" for p in payloads[1:])
    assert depacketize_vp8(payloads) == frame
    for picture_id in (0, 127, 128, 32767):
        patched = [with_picture_id(p, picture_id) for p in payloads]
        assert patched == Vp8Encoder._packetize(frame, picture_id)
        assert b"".join(vp8_depayload(p) for p in patched) == frame


def test_packetize_vp8_of_nothing_is_no_payload() -> None:
    assert packetize_vp8(b"") == []


# -- clear packets: native == reference == aiortc --------------------------------------------------

HEADER_CASES = {
    # seq 65534 -> 65535 -> 0, picture id 32766 -> 32767 -> 0, timestamp wraps on the second frame
    "video, one-byte extensions, wraps": video_params(first_sequence_number=65534, first_picture_id=32766,
                                                      timestamp_origin=2**32 - 2000),
    "video, no extensions": video_params(mid=None, mid_id=None, abs_send_time_id=None),
    "video, mid not negotiated": video_params(mid_id=None),
    "video, id 15 forces the two-byte form": video_params(mid_id=15),
    "video, long mid forces the two-byte form": video_params(mid="m" * 20),
    "video, no history": video_params(history_size=0),
    "audio, mid + level": audio_params(first_sequence_number=65535, timestamp_origin=2**32 - 1),
    "audio, mid + abs-send-time + level": audio_params(abs_send_time_id=3, audio_level_id=14),
    "audio, nothing negotiated": audio_params(mid=None, mid_id=None, audio_level_id=None),
}


@pytest.mark.parametrize("params", HEADER_CASES.values(), ids=HEADER_CASES.keys())
def test_native_clear_packets_equal_aiortc_and_the_reference(params: StreamParams) -> None:
    if params.vp8:
        frames = some_frames()
    else:
        frames = [ReferenceFrame.from_opus(os.urandom(n), audio_level=level)
                  for n, level in ((60, 30), (1, None), (400, 127), (200, 0))]
    timestamps = [3000 * i for i in range(len(frames))]
    expected = aiortc_stream(params, frames, timestamps)

    stream = EgressStream(params, None, None, None, clear_rtp=True)
    reference = ReferenceStream(params, None, None, None, clear_rtp=True)
    reference.waiting_for_keyframe = stream.waiting_for_keyframe = False
    for index, (frame, timestamp) in enumerate(zip(frames, timestamps)):
        got = clear_packets(stream, native(frame), timestamp, ntp_at(index))
        assert got == expected[index]
        assert reference.clear_packets(frame, timestamp, ntp_at(index)) == expected[index]
    # the history rebuilds every packet byte for byte (same seq, same header, same abs-send-time)
    for packet in (p for frame_packets in expected for p in frame_packets):
        want = packet if params.history_size else None
        assert clear_retransmission(stream, sequence_number(packet)) == want
        assert reference.clear_retransmission(sequence_number(packet)) == want
    assert stream.next_sequence_number == reference.next_sequence_number
    assert stream.next_picture_id == reference.next_picture_id
    assert stream.last_timestamp == reference.last_timestamp == (params.timestamp_origin + timestamps[-1]) % 2**32
    stream.close()


def test_a_clear_audio_packet_byte_by_byte() -> None:
    """Written out by hand from RFC 3550 / RFC 8285 / RFC 6464, not by any of the code under test."""
    params = audio_params(first_sequence_number=0xFFFF, timestamp_origin=0xFFFF_FFF0, mid="a")
    stream = EgressStream(params, None, None, None, clear_rtp=True)
    (packet,) = clear_packets(stream, NativeFrame.from_opus(b"\xfc\xff\xfe", audio_level=30), 0x20, NTP)
    assert packet == (
        b"\x90\xef\xff\xff"    # V=2 X=1 | M=1 PT=111 | seq 65535
        b"\x00\x00\x00\x10"    # timestamp 0xFFFFFFF0 + 0x20, wrapped
        b"\x01\x02\x03\x04"    # SSRC
        b"\xbe\xde\x00\x01"    # one-byte header extensions, one 32-bit word
        b"\x10a\x20\x1e"       # id 1 (mid) "a" | id 2 (audio level) V=0 level 30
        b"\xfc\xff\xfe"        # the Opus packet
    )
    assert stream.next_sequence_number == 0
    assert build_rtp_reference(params, sequence_number=0xFFFF, timestamp=0x10, marker=True, abs_send_time=0,
                               audio_level=30, payload=b"\xfc\xff\xfe") == packet


def test_timestamps_never_go_backwards_or_repeat_for_a_new_frame() -> None:
    params = audio_params(timestamp_origin=2**32 - 1000)
    stream = EgressStream(params, None, None, None, clear_rtp=True)
    reference = ReferenceStream(params, None, None, None, clear_rtp=True)
    # (rung timestamp, what the stream must send): the same clock, a frame from a rung that lags
    # behind, a repeat, and across the 32-bit wrap of the stream's own timestamps
    steps = [(0, 2**32 - 1000), (960, 2**32 - 40), (960, 2**32 - 39), (500, 2**32 - 38), (1920, 920),
             (1000, 921), (2**32 + 2880, 1880), (2879 + 2**31, 1879 + 2**31)]
    for index, (timestamp, expected) in enumerate(steps):
        frame = ReferenceFrame.from_opus(b"\x01\x02")
        (packet,) = clear_packets(stream, native(frame), timestamp, ntp_at(index))
        assert reference.clear_packets(frame, timestamp, ntp_at(index)) == [packet]
        assert struct.unpack_from("!L", packet, 4)[0] == expected == stream.last_timestamp
    # exactly half the space ahead is not "newer" in serial arithmetic (RFC 1982): last + 1
    (packet,) = clear_packets(stream, NativeFrame.from_opus(b"\x01"), 2879, NTP)
    assert struct.unpack_from("!L", packet, 4)[0] == 1880 + 2**31


def test_video_waits_for_a_keyframe_without_using_numbers() -> None:
    params = video_params()
    stream = EgressStream(params, None, None, None, clear_rtp=True)
    reference = ReferenceStream(params, None, None, None, clear_rtp=True)
    assert stream.waiting_for_keyframe and reference.waiting_for_keyframe
    delta, key = ReferenceFrame.from_vp8(b"d" * 50, keyframe=False), ReferenceFrame.from_vp8(b"k" * 50, keyframe=True)
    for index, frame in enumerate([delta, delta, key, delta]):
        got = clear_packets(stream, native(frame), 3000 * index, NTP)
        assert got == reference.clear_packets(frame, 3000 * index, NTP)
        assert len(got) == (0 if index < 2 else 1)
    assert stream.frames_skipped == reference.frames_skipped == 2
    assert stream.next_sequence_number == params.first_sequence_number + 2
    assert stream.next_picture_id == params.first_picture_id + 2  # type: ignore[operator]
    stream.waiting_for_keyframe = True  # e.g. a rung switch
    assert clear_packets(stream, native(delta), 12000, NTP) == []


# -- over real sockets -----------------------------------------------------------------------------

@pytest.mark.parametrize("profile_name", SRTP_PROFILES)
def test_srtp_over_udp_unprotects_to_the_reference_and_matches_the_python_path(
    profile_name: str, sockets: Callable[..., socket.socket]
) -> None:
    profile, key_length = SRTP_PROFILES[profile_name]
    key = os.urandom(key_length)
    tx, rx = srtp_pair(profile, key)
    tx_python, _ = srtp_pair(profile, key)
    sender, receiver, receiver_python = sockets(), sockets(), sockets()
    params = video_params(first_sequence_number=65500)
    stream = EgressStream(params, sender.fileno(), receiver.getsockname(), tx)
    python_stream = ReferenceStream(params, sender.fileno(), receiver_python.getsockname(), tx_python)
    clear = ReferenceStream(params, None, None, None, clear_rtp=True)
    # 70 payloads: more than one sendmmsg batch, and the sequence numbers wrap inside it
    frames = some_frames() + [ReferenceFrame.from_vp8(os.urandom(70 * (PACKET_MAX - 4)), keyframe=False)]
    for index, frame in enumerate(frames):
        native_frame = native(frame)
        sent = send_frame([stream], native_frame, 3000 * index, ntp_at(index))
        assert sent == len(frame.payloads)
        assert send_frame_reference([python_stream], frame, 3000 * index, ntp_at(index)) == sent
        expected = clear.clear_packets(frame, 3000 * index, ntp_at(index))
        protected = receive(receiver, sent)
        assert [rx.unprotect(p) for p in protected] == expected
        assert receive(receiver_python, sent) == protected  # same key, same index: same bytes
    assert nothing_more(receiver)
    payload_octets = sum(len(p) for f in frames for p in f.payloads)
    for s in (stream, python_stream):
        assert (s.packets_sent, s.octets_sent, s.frames_sent) == (sum(len(f.payloads) for f in frames), payload_octets, 4)
        assert (s.packets_dropped, s.send_errors, s.srtp_errors, s.last_errno) == (0, 0, 0, 0)
    stream.close()
    python_stream.close()


@pytest.mark.parametrize("family, sender_host, receiver_host", [
    (socket.AF_INET6, "::1", "::1"),
    (socket.AF_INET6, "::", "127.0.0.1"),  # an IPv4 peer on a dual-stack socket: sent to ::ffff:127.0.0.1
])
def test_ipv6_destinations(family: int, sender_host: str, receiver_host: str,
                           sockets: Callable[..., socket.socket]) -> None:
    sender = sockets(family, "")
    sender.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(sender_host == "::1"))
    sender.bind((sender_host, 0))
    receiver = sockets(socket.AF_INET6 if ":" in receiver_host else socket.AF_INET, receiver_host)
    tx, rx = srtp_pair(Policy.SRTP_PROFILE_AEAD_AES_128_GCM, os.urandom(28))
    stream = EgressStream(audio_params(), sender.fileno(), receiver.getsockname()[:2], tx)
    frame = ReferenceFrame.from_opus(b"opus!", audio_level=10)
    assert send_frame([stream], native(frame), 960, NTP) == 1
    assert rx.unprotect(receive(receiver, 1)[0]) == ReferenceStream(
        audio_params(), None, None, None, clear_rtp=True).clear_packets(frame, 960, NTP)[0]
    stream.close()


def test_many_viewers_one_call_each_their_own_numbers_and_keys(sockets: Callable[..., socket.socket]) -> None:
    viewers = []
    for index in range(5):
        key = os.urandom(30)
        tx, rx = srtp_pair(Policy.SRTP_PROFILE_AES128_CM_SHA1_80, key)
        params = video_params(ssrc=index + 1, first_sequence_number=index * 10_000, timestamp_origin=index * 7,
                              first_picture_id=32765 + index if index < 3 else index)
        receiver = sockets()
        viewers.append((EgressStream(params, sockets().fileno(), receiver.getsockname(), tx), rx, receiver,
                        ReferenceStream(params, None, None, None, clear_rtp=True)))
    for stream, *_ in viewers:
        stream.waiting_for_keyframe = False
    streams = [v[0] for v in viewers]
    for index, frame in enumerate(some_frames()):
        assert send_frame(streams, native(frame), 3000 * index, ntp_at(index)) == 5 * len(frame.payloads)
        for stream, rx, receiver, clear in viewers:
            assert [rx.unprotect(p) for p in receive(receiver, len(frame.payloads))] == clear.clear_packets(
                frame, 3000 * index, ntp_at(index))
    for stream in streams:
        stream.close()


def test_retransmit_resends_the_identical_packet(sockets: Callable[..., socket.socket]) -> None:
    tx, rx = srtp_pair(Policy.SRTP_PROFILE_AEAD_AES_128_GCM, os.urandom(28))
    sender, receiver = sockets(), sockets()
    params = video_params(history_size=16)
    stream = EgressStream(params, sender.fileno(), receiver.getsockname(), tx)
    clear = ReferenceStream(params, None, None, None, clear_rtp=True)
    frame = ReferenceFrame.from_vp8(os.urandom(3000), keyframe=True)
    expected = clear.clear_packets(frame, 0, NTP)
    send_frame([stream], native(frame), 0, NTP)
    first, lost, _ = receive(receiver, 3)
    assert rx.unprotect(first) == expected[0]
    # the middle packet is "lost" (never unprotected by the receiver) and asked for again
    assert retransmit(stream, sequence_number(expected[1]))
    again = receive(receiver, 1)[0]
    assert again == lost  # same index, same clear bytes: the same ciphertext
    assert rx.unprotect(again) == expected[1]
    assert stream.retransmissions == 1 and stream.packets_sent == 3  # SR counts exclude repeats
    assert not retransmit(stream, sequence_number(expected[2]) + 1)  # not sent yet
    for index in range(1, 7):  # 18 more packets: the first frame leaves the 16-packet history
        send_frame([stream], NativeFrame.from_vp8(os.urandom(3000), keyframe=False), 3000 * index, NTP)
    assert not retransmit(stream, sequence_number(expected[0]))
    assert not retransmit(stream, 70000)
    stream.close()
    assert not retransmit(stream, sequence_number(expected[0]))


def rtp_fields(packet: bytes) -> tuple[int, int, int, bool, bytes]:
    parsed = RtpPacket.parse(packet)
    return parsed.ssrc, parsed.sequence_number, parsed.timestamp, parsed.marker, parsed.payload


def drain(sock: socket.socket, into: list[bytes], stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while True:
        try:
            into.append(sock.recv(4096))
        except TimeoutError:
            if stop.is_set():
                return


def test_the_send_thread_sends_in_order_what_send_frame_would(sockets: Callable[..., socket.socket]) -> None:
    viewers = []
    for index in range(3):
        tx, rx = srtp_pair(Policy.SRTP_PROFILE_AES128_CM_SHA1_80, os.urandom(30))
        params = video_params(ssrc=index + 1, first_sequence_number=index * 1000)
        receiver = sockets()
        stream = EgressStream(params, sockets().fileno(), receiver.getsockname(), tx)
        stream.waiting_for_keyframe = False
        viewers.append((stream, rx, receiver, ReferenceStream(params, None, None, None, clear_rtp=True)))
    before = SENDER.stats()
    frames = some_frames() * 4
    for index, frame in enumerate(frames):
        send_frame_soon([v[0] for v in viewers], native(frame), 3000 * index)
    assert SENDER.flush(5.0)
    after = SENDER.stats()
    assert after["frames_sent"] - before["frames_sent"] == len(frames)
    assert after["packets_sent"] - before["packets_sent"] == 3 * sum(len(f.payloads) for f in frames)
    assert after["pending"] == 0
    for stream, rx, receiver, clear in viewers:
        for index, frame in enumerate(frames):
            got = [rx.unprotect(p) for p in receive(receiver, len(frame.payloads))]
            # abs-send-time is the send thread's clock: compare everything else with the reference
            want = clear.clear_packets(frame, 3000 * index, stream.last_ntp_time)
            assert [rtp_fields(p) for p in got] == [rtp_fields(p) for p in want]
        report = stream.sender_report()
        assert report is not None and report[2] == stream.packets_sent == sum(len(f.payloads) for f in frames)
        stream.close()


def test_the_send_thread_skips_a_stream_closed_while_queued(sockets: Callable[..., socket.socket]) -> None:
    receiver = sockets()
    stream = EgressStream(video_params(), sockets().fileno(), receiver.getsockname(), None, clear_rtp=True)
    stream.waiting_for_keyframe = False
    stream.close()
    send_frame_soon([stream], native(some_frames()[0]), 0)
    assert SENDER.flush(5.0)
    assert stream.packets_sent == 0 and nothing_more(receiver)


def test_retransmit_close_and_rtcp_while_the_send_thread_sends(sockets: Callable[..., socket.socket]) -> None:
    """The event loop's uses of a session (retransmit, aiortc's SRTCP through the lock, close) meet
    the send thread's on the same sessions: every packet still unprotects, nothing raises."""
    key = os.urandom(30)
    tx, rx = srtp_pair(Policy.SRTP_PROFILE_AES128_CM_SHA1_80, key)
    receiver = sockets()
    # room for every datagram of the test even if the reader thread is starved (as root: past the cap)
    roomy = os.geteuid() == 0
    if roomy:
        receiver.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 32 << 20)
    datagrams: list[bytes] = []
    stop = threading.Event()
    reader = threading.Thread(target=drain, args=(receiver, datagrams, stop))
    reader.start()
    stream = EgressStream(video_params(history_size=1024), sockets().fileno(), receiver.getsockname(), tx)
    stream.waiting_for_keyframe = False
    locked = LockedSrtpSession(tx)
    sr = bytes([0x80, 200, 0, 6]) + stream.ssrc.to_bytes(4, "big") + bytes(20)
    frame = native(ReferenceFrame.from_vp8(os.urandom(6000), keyframe=True))
    first_seq = stream.next_sequence_number
    protected_rtcp = []
    send_frame_soon([stream], frame, 0)
    assert SENDER.flush(5.0)
    for index in range(1, 200):  # the thread sends frame `index` while the loop repeats frame 0's
        send_frame_soon([stream], frame, 3000 * index)
        protected_rtcp.append(locked.protect_rtcp(sr))
        assert retransmit(stream, (first_seq + index % frame.payload_count) & 0xFFFF)
    assert SENDER.flush(10.0)
    sent, repeats = stream.packets_sent, stream.retransmissions
    stream.close()
    stop.set()
    reader.join()
    assert sent == 200 * frame.payload_count and repeats == 199
    unique = set(datagrams)  # a repeat is byte-identical to its original
    assert len(unique) == sent if roomy else 0.5 * sent < len(unique) <= sent
    assert len(datagrams) <= sent + repeats
    for datagram in unique:
        assert rx.unprotect(datagram)[8:12] == stream.ssrc.to_bytes(4, "big")
    assert [rx.unprotect_rtcp(p) for p in protected_rtcp] == [sr] * 199
    send_frame_soon([stream], frame, 3000 * 200)  # closed: nothing, no error
    assert SENDER.flush(5.0) and stream.packets_sent == sent


def test_rtcp_handed_to_the_send_thread_goes_out_in_order_with_the_frames(sockets: Callable[..., socket.socket]) -> None:
    """aiortc's RTCP, submitted between frames, is SRTCP-protected on the stream's session by the
    send thread and leaves after the frames queued before it; a closed stream drops it."""
    tx, rx = srtp_pair(Policy.SRTP_PROFILE_AES128_CM_SHA1_80, os.urandom(30))
    receiver = sockets()
    stream = EgressStream(video_params(), sockets().fileno(), receiver.getsockname(), tx)
    stream.waiting_for_keyframe = False
    sr = bytes([0x80, 200, 0, 6]) + stream.ssrc.to_bytes(4, "big") + bytes(20)
    frame = some_frames()[0]
    send_frame_soon([stream], native(frame), 0)
    send_rtcp_soon(stream, sr)
    assert SENDER.flush(5.0)
    got = receive(receiver, len(frame.payloads) + 1)
    assert [sequence_number(rx.unprotect(p)) for p in got[:-1]] == [sequence_number(p) for p in
                                                                    ReferenceStream(video_params(), None, None, None, clear_rtp=True)
                                                                    .clear_packets(frame, 0, stream.last_ntp_time)]
    assert rx.unprotect_rtcp(got[-1]) == sr and stream.rtcp_sent == 1
    with pytest.raises(ValueError):
        send_rtcp_soon(stream, b"\x80")  # not an RTCP compound
    stream.close()
    send_rtcp_soon(stream, sr)
    assert SENDER.flush(5.0) and nothing_more(receiver) and stream.rtcp_sent == 1


def test_sender_reports_describe_now_even_without_new_frames() -> None:
    """Each report has its own NTP time (receiver reports answer one report, not several) and the
    RTP timestamp of that instant on the stream's clock."""
    stream = EgressStream(video_params(), None, None, None, clear_rtp=True)
    stream.waiting_for_keyframe = False
    sender = types.SimpleNamespace()
    report_to_sender(stream, sender)
    assert not vars(sender)  # nothing sent yet: nothing to report
    sent_at = current_ntp_time()
    send_frame([stream], native(some_frames()[0]), 9000, sent_at)
    reports = []
    for _ in range(2):
        time.sleep(0.05)
        report_to_sender(stream, sender)
        reports.append((sender._RTCRtpSender__ntp_timestamp, sender._RTCRtpSender__rtp_timestamp,
                        sender._RTCRtpSender__packet_count))
    (ntp1, ts1, count1), (ntp2, ts2, count2) = reports
    assert sent_at < ntp1 < ntp2 and count1 == count2 == stream.packets_sent
    for ntp, ts in ((ntp1, ts1), (ntp2, ts2)):
        assert ts - stream.last_timestamp == pytest.approx((ntp - sent_at) / 2**32 * 90000, abs=1)
    stream.close()


def test_the_locked_session_protects_exactly_as_pylibsrtp() -> None:
    key = os.urandom(30)
    plain, _ = srtp_pair(Policy.SRTP_PROFILE_AES128_CM_SHA1_80, key)
    twin, _ = srtp_pair(Policy.SRTP_PROFILE_AES128_CM_SHA1_80, key)
    locked = LockedSrtpSession(twin)
    rtp = bytes([0x80, 96, 0, 1, 0, 0, 0, 9, 0, 0, 0, 7]) + os.urandom(300)
    rtcp = bytes([0x80, 200, 0, 6, 0, 0, 0, 7]) + bytes(20)
    assert locked.protect(rtp) == plain.protect(rtp)
    assert locked.protect_rtcp(rtcp) == plain.protect_rtcp(rtcp)
    assert locked.protect_rtcp(rtcp) == plain.protect_rtcp(rtcp)  # the SRTCP index advances alike
    with pytest.raises(RuntimeError):
        locked.protect(b"\x80")  # not an RTP packet: libsrtp refuses, as pylibsrtp raises


SO_NO_CHECK = getattr(socket, "SO_NO_CHECK", 11)  # Linux: UDP checksums off, which GSO refuses


@pytest.mark.parametrize("refuse_gso", [False, True], ids=["gso", "gso refused by the socket"])
def test_gso_sends_the_same_datagrams(refuse_gso: bool, sockets: Callable[..., socket.socket]) -> None:
    key = os.urandom(30)
    receivers, streams = [], []
    for gso in (True, False):
        tx, _ = srtp_pair(Policy.SRTP_PROFILE_AES128_CM_SHA1_80, key)
        sender, receiver = sockets(), sockets()
        if refuse_gso and gso:
            sender.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        streams.append(EgressStream(video_params(), sender.fileno(), receiver.getsockname(), tx, gso=gso))
        receivers.append(receiver)
    assert [s.gso for s in streams] == [True, False]
    # 5 equal payloads and a short last one; 50 equal (one run would exceed 60 000 bytes); and a
    # frame whose sizes go up and down (runs end at every change)
    chunk = PACKET_MAX - 4
    frames = [ReferenceFrame.from_vp8(os.urandom(5 * chunk + 99), keyframe=True),
              ReferenceFrame.from_vp8(os.urandom(50 * chunk), keyframe=False),
              ReferenceFrame(tuple(b"\x80\x80\x80\x00" + os.urandom(n) for n in (900, 900, 1200, 100, 100, 1000, 5)),
                             vp8=True)]
    for index, frame in enumerate(frames):
        counts = [send_frame([s], native(frame), 3000 * index, ntp_at(index)) for s in streams]
        assert counts == [len(frame.payloads)] * 2
        assert receive(receivers[0], counts[0]) == receive(receivers[1], counts[1])
    assert streams[0].gso is not refuse_gso  # a refusal turns GSO off for that stream, nothing is lost
    assert [(s.packets_sent, s.send_errors, s.packets_dropped) for s in streams] == [(63, 0, 0)] * 2
    for s in streams:
        s.close()


def test_gso_is_never_used_where_it_would_merge_datagrams(tmp_path: Path, sockets: Callable[..., socket.socket]) -> None:
    """An AF_UNIX socket ignores UDP_SEGMENT: a run would arrive as one datagram."""
    receiver = sockets(socket.AF_UNIX, "")
    receiver.bind(str(tmp_path / "viewer.sock"))
    stream = EgressStream(video_params(), sockets(socket.AF_UNIX, "").fileno(), str(tmp_path / "viewer.sock"), None,
                          clear_rtp=True)
    assert not stream.gso
    frame = ReferenceFrame.from_vp8(os.urandom(3 * (PACKET_MAX - 4)), keyframe=True)
    assert send_frame([stream], native(frame), 0, NTP) == 3
    assert [len(p) for p in receive(receiver, 3)] == [12 + 12 + PACKET_MAX] * 3
    stream.close()


def test_a_full_receiver_queue_counts_drops_never_raises(tmp_path: Path, sockets: Callable[..., socket.socket]) -> None:
    """AF_UNIX datagrams: the kernel refuses (EAGAIN) once the receiver holds max_dgram_qlen."""
    path = str(tmp_path / "viewer.sock")
    receiver = sockets(socket.AF_UNIX, "")
    receiver.bind(path)
    frame = ReferenceFrame(tuple(b"\x01" * 100 for _ in range(100)), keyframe=True)
    counts = []
    for stream in (EgressStream(audio_params(), sockets(socket.AF_UNIX, "").fileno(), path, None, clear_rtp=True),
                   ReferenceStream(audio_params(), sockets(socket.AF_UNIX, "").fileno(), path, None, clear_rtp=True)):
        if isinstance(stream, EgressStream):
            sent = send_frame([stream], native(frame), 0, NTP)
        else:
            sent = send_frame_reference([stream], frame, 0, NTP)
        counts.append((sent, stream.packets_sent, stream.packets_dropped, stream.send_errors, stream.next_sequence_number))
        assert 0 < sent < 100 and stream.packets_dropped == 100 - sent and stream.send_errors == 0
        # every packet was numbered and remembered: a NACK can still recover a dropped one
        assert stream.next_sequence_number == audio_params().first_sequence_number + 100
        receiver.setblocking(False)
        while True:  # drain for the next stream
            try:
                receiver.recv(4096)
            except BlockingIOError:
                break
        assert stream.retransmit(audio_params().first_sequence_number + 99)
        receiver.recv(4096)
        stream.close()
    assert counts[0] == counts[1]


def test_a_broken_destination_counts_errors_never_raises(tmp_path: Path) -> None:
    nobody = str(tmp_path / "nobody")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    read_end, write_end = os.pipe()
    try:
        streams: list[tuple[EgressStream | ReferenceStream, int]] = [
            (EgressStream(audio_params(), unix.fileno(), nobody, None, clear_rtp=True), errno.ENOENT),
            (ReferenceStream(audio_params(), unix.fileno(), nobody, None, clear_rtp=True), errno.ENOENT),
            # not a socket at all (Python's socket module cannot even wrap this one)
            (EgressStream(audio_params(), write_end, nobody, None, clear_rtp=True), errno.ENOTSOCK),
        ]
        for stream, code in streams:
            frame = ReferenceFrame((b"a", b"b", b"c"), keyframe=True)
            if isinstance(stream, EgressStream):
                assert send_frame([stream], native(frame), 0, NTP) == 0
            else:
                assert send_frame_reference([stream], frame, 0, NTP) == 0
            assert (stream.send_errors, stream.last_errno, stream.packets_sent) == (3, code, 0)
            assert not stream.retransmit(audio_params().first_sequence_number)
            assert stream.send_errors == 4
            stream.close()
        bare = EgressStream(audio_params(), None, None, None, clear_rtp=True)  # no transport at all
        assert send_frame([bare], NativeFrame.from_opus(b"x"), 0, NTP) == 0
        assert (bare.send_errors, bare.last_errno) == (1, errno.EBADF)
        bare.close()
    finally:
        unix.close()
        os.close(read_end)
        os.close(write_end)


def test_the_stream_keeps_its_own_socket(sockets: Callable[..., socket.socket]) -> None:
    """The caller closing its descriptor (aioice on disconnect) leaves the stream's duplicate
    working until close(): a reused descriptor number never receives this viewer's media."""
    receiver = sockets()
    descriptors = len(os.listdir("/proc/self/fd"))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stream = EgressStream(audio_params(), sender.fileno(), receiver.getsockname(), None, clear_rtp=True)
    sender.close()
    assert send_frame([stream], NativeFrame.from_opus(b"x"), 0, NTP) == 1
    assert len(receive(receiver, 1)) == 1
    stream.close()
    assert len(os.listdir("/proc/self/fd")) == descriptors  # the duplicate is gone with the stream
    assert send_frame([stream], NativeFrame.from_opus(b"x"), 960, NTP) == 0  # closed: skipped
    assert stream.packets_sent == 1 and stream.send_errors == 0


# -- validation and lifetime ------------------------------------------------------------------------

def test_frames_are_validated() -> None:
    with pytest.raises(ValueError):
        NativeFrame([b"x" * (MAX_PAYLOAD + 1)])
    NativeFrame([b"x" * MAX_PAYLOAD])
    with pytest.raises(ValueError):
        NativeFrame([])
    with pytest.raises(ValueError):
        NativeFrame([b""])
    with pytest.raises(ValueError):
        NativeFrame([b"\x90\x80\x05xyz"], vp8=True)  # 7-bit picture id: not patchable in place
    with pytest.raises(ValueError):
        NativeFrame([b"opus"], audio_level=128)
    with pytest.raises(TypeError):
        NativeFrame([1, 2])
    for bad in ([b"x" * (MAX_PAYLOAD + 1)], [b"\x90\x80\x05xyz"]):
        with pytest.raises(ValueError):
            ReferenceFrame(tuple(bad), vp8=True)
    frame = NativeFrame.from_opus(b"abc", audio_level=5)
    assert (frame.payloads, frame.payload_count, frame.nbytes, frame.keyframe, frame.vp8, frame.audio_level) == (
        (b"abc",), 1, 3, True, False, 5)


def test_a_call_that_cannot_be_made_sends_nothing() -> None:
    video, audio = (EgressStream(p, None, None, None, clear_rtp=True) for p in (video_params(), audio_params()))
    opus = NativeFrame.from_opus(b"x")
    with pytest.raises(ValueError):
        send_frame([video], opus, 0, NTP)
    with pytest.raises(ValueError):
        send_frame([audio, video], opus, 0, NTP)  # checked before anything is sent
    assert audio.frames_sent == 0 and audio.next_sequence_number == audio_params().first_sequence_number
    with pytest.raises(RuntimeError):
        send_frame([audio, audio], opus, 0, NTP)
    with pytest.raises(TypeError):
        send_frame([object()], opus, 0, NTP)  # type: ignore[list-item]
    assert send_frame([audio], opus, 0, NTP) == 0 and audio.frames_sent == 1  # nothing left claimed
    with pytest.raises(ValueError):
        EgressStream(audio_params(), None, None, None)  # SRTP is not optional by accident
    with pytest.raises(ValueError):
        video_params(history_size=1000)  # must divide the sequence number space
    with pytest.raises(ValueError):
        video_params(first_picture_id=32768)
    video.close()
    audio.close()


def test_frame_buffers_are_shared_and_released() -> None:
    gc.collect()
    baseline = live_frame_buffers()
    streams = [EgressStream(video_params(history_size=16), None, None, None, clear_rtp=True) for _ in range(3)]
    frames = [NativeFrame.from_vp8(os.urandom(3000), keyframe=True) for _ in range(7)]  # 3 payloads each
    assert live_frame_buffers() == baseline + 7
    for index, frame in enumerate(frames):
        for stream in streams:
            clear_packets(stream, frame, 3000 * index, NTP)
    assert live_frame_buffers() == baseline + 7  # one buffer per frame whatever the viewer count
    del frame, frames
    # 21 packets through 16-packet histories: packets 5..20 are kept, i.e. frames 1..6; frame 0 is gone
    assert live_frame_buffers() == baseline + 6
    streams[0].close()
    streams[0].close()  # idempotent
    assert live_frame_buffers() == baseline + 6  # the other two still refer to them
    del streams[1]
    gc.collect()
    assert live_frame_buffers() == baseline + 6
    streams[1].close()
    assert live_frame_buffers() == baseline
    assert streams[1].closed and clear_retransmission(streams[1], 1000) is None


# -- with a real aiortc receiver -------------------------------------------------------------------

def vp8_encoder(width: int, height: int) -> VideoCodecContext:
    codec = cast(VideoCodecContext, av.CodecContext.create("libvpx", "w"))
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = Fraction(1, 30)
    codec.bit_rate = 500_000
    codec.options = {"deadline": "realtime", "lag-in-frames": "0", "cpu-used": "8"}
    return codec


async def connected_pair(on_track: Callable[[Any], None]) -> tuple[RTCPeerConnection, RTCPeerConnection]:
    """Sender (offers a sendonly video transceiver without a track) and receiver, on loopback."""
    sender, receiver = (RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2))
    receiver.on("track", on_track)  # fires inside setRemoteDescription
    sender.addTransceiver("video", direction="sendonly")
    announce_host_addresses(sender, ("127.0.0.1",))  # aioice leaves loopback out by itself
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    announce_host_addresses(receiver, ("127.0.0.1",))
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)
    return sender, receiver


async def test_a_real_aiortc_receiver_decodes_what_the_native_path_sends(collector_factory: Any) -> None:
    collector = collector_factory()
    sender, receiver = await connected_pair(collector.on_track)
    stream: EgressStream | None = None
    try:
        async def connected() -> None:
            while transport_of(sender) is None or receiver.connectionState != "connected":
                await asyncio.sleep(0.05)

        await asyncio.wait_for(connected(), 15)
        transceiver = sender.getTransceivers()[0]
        params = StreamParams.from_transceiver(transceiver)
        assert (params.kind, params.ssrc, params.mid, params.mid_id, params.abs_send_time_id, params.history_size) == (
            "video", transceiver.sender._ssrc, transceiver.mid, 1, 3, 1024)
        assert params.payload_type == transceiver._codecs[0].payloadType and params.vp8
        stream = EgressStream.open(transceiver, params)
        assert stream is not None

        codec, colour = vp8_encoder(320, 240), np.array([200, 40, 90], dtype=np.uint8)
        for index in range(12):
            image = av.VideoFrame.from_ndarray(np.broadcast_to(colour, (240, 320, 3)).copy(), format="rgb24")
            image = image.reformat(format="yuv420p")
            image.pts, image.time_base = index, Fraction(1, 30)
            for packet in codec.encode(image):
                frame = NativeFrame.from_vp8(bytes(packet), keyframe=packet.is_keyframe)
                assert send_frame([stream], frame, index * 3000) == frame.payload_count
            report_to_sender(stream, transceiver.sender)
            await asyncio.sleep(1 / 30)
        # aiortc completes a frame when the next one starts: all but the last are decoded
        await collector.wait_for("video", 11, timeout=10)
        last = collector.last_video
        assert (last.width, last.height) == (320, 240)
        assert np.abs(collector.mean_colour() - colour).max() < 12
        assert (stream.send_errors, stream.packets_dropped, stream.srtp_errors) == (0, 0, 0)

        # aiortc's own sender reports now carry the native counters to the receiver
        async def reported() -> bool:
            stats = await receiver.getReceivers()[0].getStats()
            return any(s.type == "remote-outbound-rtp" and s.packetsSent == stream.packets_sent for s in stats.values())

        async def until_reported() -> None:
            while not await reported():
                await asyncio.sleep(0.1)

        await asyncio.wait_for(until_reported(), 5)
    finally:
        await collector.stop()
        if stream is not None:
            stream.close()
        await sender.close()
        await receiver.close()


async def test_a_pair_relayed_by_the_servers_own_turn_allocation_is_left_to_aiortc(
    collector_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aioice's TurnTransport has no socket of its own (its packets need TURN framing): the native
    path must decline it (None: aiortc keeps sending) instead of raising for that viewer."""
    from aioice.turn import TurnTransport

    import relay.egress as egress_module

    collector = collector_factory()
    sender, receiver = await connected_pair(collector.on_track)
    try:
        async def connected() -> None:
            while transport_of(sender) is None or receiver.connectionState != "connected":
                await asyncio.sleep(0.05)

        await asyncio.wait_for(connected(), 15)
        real_route = egress_module.nominated_route
        relayed = object.__new__(TurnTransport)
        monkeypatch.setattr(egress_module, "nominated_route", lambda dtls: (relayed, real_route(dtls)[1]))
        assert transport_of(sender) is None
        assert EgressStream.open(sender.getTransceivers()[0]) is None
    finally:
        await sender.close()
        await receiver.close()
