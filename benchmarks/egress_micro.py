"""Egress micro-benchmark: CPU microseconds per RTP packet per viewer, native vs Python.

    python -m benchmarks.egress_micro [--quick]

Three ways to send one rung's frames to N viewers, each viewer with its own UDP socket and its own
SRTP session (distinct keys), over real sockets on loopback to receivers that a separate process
drains (so their work is not charged here):

  native        relay.egress.send_frame: one call per frame for all viewers (C, GIL released,
                one sendmmsg per viewer, equal-size packets as UDP GSO runs)
  reference     relay.egress.send_frame_reference: the same semantics in Python
                (pylibsrtp Session.protect + socket.sendto per packet)
  aiortc_style  what aiortc's RTCRtpSender does per packet, minus its asyncio/aioice layers:
                RtpPacket + HeaderExtensionsMap serialize + Session.protect + socket.sendto
                (so a lower bound of today's cost)

CPU is the sending thread's own (CLOCK_THREAD_CPUTIME_ID: user + system, which on loopback
includes the kernel's delivery to the receiving socket and the receiver's wake-up: dearer than a
NIC's transmit path); never wall time. The user/system split (getrusage) separates our C code and
libsrtp from the kernel. The wall time of one
native call is reported too: it is how long the event loop is blocked per rung frame.

Frames: video 6250 B (720p30 at 1.5 Mbit/s: 5 payloads, VP8 descriptors), audio one 160 B Opus
packet. SRTP profile AES128_CM_SHA1_80 (the costliest aiortc negotiates) unless named.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from pylibsrtp import Policy, Session

from relay.egress import (
    ABS_SEND_TIME_URI,
    AUDIO_LEVEL_URI,
    MID_URI,
    EgressStream,
    NativeFrame,
    ReferenceFrame,
    ReferenceStream,
    StreamParams,
    current_ntp_time,
    send_frame,
    send_frame_reference,
    with_picture_id,
)

from .common import emit, env_info

VIDEO_FRAME_BYTES = 6250  # 1.5 Mbit/s at 30 fps
AUDIO_PACKET_BYTES = 160
PROFILES = {
    "cm_sha1_80": (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    "aes_128_gcm": (Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
}

# The receivers' process: epoll every socket, read until empty, forever (until stdin closes).
DRAIN = r"""
import os, select, sys
fds = [int(x) for x in sys.argv[1:]]
poller = select.epoll()
for fd in fds:
    os.set_blocking(fd, False)
    poller.register(fd, select.EPOLLIN)
poller.register(0, select.EPOLLIN | select.EPOLLHUP)
while True:
    for fd, _ in poller.poll():
        if fd == 0:
            sys.exit(0)
        try:
            while True:
                os.read(fd, 4096)
        except BlockingIOError:
            pass
"""


class Viewers:
    """N viewer transports on loopback: a sending socket and an SRTP session each; receivers
    drained by another process."""

    def __init__(self, count: int) -> None:
        self.senders: list[socket.socket] = []
        self.receivers: list[socket.socket] = []
        for _ in range(count):
            sender, receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.bind(("127.0.0.1", 0))
            sender.setblocking(False)
            receiver.bind(("127.0.0.1", 0))
            self.senders.append(sender)
            self.receivers.append(receiver)
        fds = [r.fileno() for r in self.receivers]
        self._drain = subprocess.Popen([sys.executable, "-c", DRAIN, *map(str, fds)], pass_fds=fds,
                                       stdin=subprocess.PIPE)

    def close(self) -> None:
        assert self._drain.stdin is not None
        self._drain.stdin.close()
        self._drain.wait(10)
        for sock in self.senders + self.receivers:
            sock.close()


def tx_session(profile: str) -> Session:
    libsrtp_profile, key_length = PROFILES[profile]
    policy = Policy(key=os.urandom(key_length), ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=libsrtp_profile)
    policy.allow_repeat_tx = True  # as aiortc's RTCDtlsTransport
    policy.window_size = 1024
    return Session(policy)


def stream_params(kind: str, index: int) -> StreamParams:
    if kind == "video":
        return StreamParams.create("video", ssrc=index + 1, payload_type=96, clock_rate=90000, mid="0", mid_id=1,
                                   abs_send_time_id=3)
    return StreamParams.create("audio", ssrc=index + 1, payload_type=111, clock_rate=48000, mid="1", mid_id=1,
                               audio_level_id=2)


def payloads(kind: str) -> tuple[ReferenceFrame, int]:
    if kind == "video":
        return ReferenceFrame.from_vp8(os.urandom(VIDEO_FRAME_BYTES), keyframe=True), 3000
    return ReferenceFrame.from_opus(os.urandom(AUDIO_PACKET_BYTES), audio_level=40), 960


@contextmanager
def thread_cpu() -> Iterator[list[float]]:
    """Yields a list that holds, once the block ends, the thread CPU seconds spent inside it, then
    the user and the system share of them (getrusage: where the time went, C + libsrtp or kernel)."""
    spent: list[float] = []
    start, usage = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD)
    yield spent
    total, end = time.thread_time() - start, resource.getrusage(resource.RUSAGE_THREAD)
    user, system = end.ru_utime - usage.ru_utime, end.ru_stime - usage.ru_stime
    share = total / (user + system) if user + system > 0 else 0.0
    spent.extend((total, user * share, system * share))


def per_packet_us(cpu_s: float, frames: int, frame: ReferenceFrame, viewers: int) -> float:
    return cpu_s / (frames * len(frame.payloads) * viewers) * 1e6


def bench_native(viewers: Viewers, count: int, kind: str, frames: int, profile: str | None,
                 split: dict[str, float] | None = None) -> tuple[float, float]:
    """(CPU µs per packet per viewer, median wall ms of one send_frame call); ``split`` gets the
    user and system µs per packet per viewer."""
    streams = [EgressStream(stream_params(kind, i), viewers.senders[i].fileno(), viewers.receivers[i].getsockname(),
                            None if profile is None else tx_session(profile), clear_rtp=profile is None)
               for i in range(count)]
    frame, step = payloads(kind)
    native = NativeFrame(frame.payloads, keyframe=True, vp8=frame.vp8, audio_level=frame.audio_level)
    send_frame(streams, native, 0)  # warm-up (first touch of histories, ROC state)
    walls = []
    with thread_cpu() as spent:
        for index in range(1, frames + 1):
            started = time.perf_counter()
            send_frame(streams, native, index * step)
            walls.append(time.perf_counter() - started)
    lost = sum(s.packets_dropped + s.send_errors + s.srtp_errors for s in streams)
    for s in streams:
        s.close()
    if lost:
        print(f"  note: {lost} packets not sent (socket buffers full)", file=sys.stderr)
    walls.sort()
    if split is not None:
        split["user"] = per_packet_us(spent[1], frames, frame, count)
        split["system"] = per_packet_us(spent[2], frames, frame, count)
    return per_packet_us(spent[0], frames, frame, count), walls[len(walls) // 2] * 1e3


def bench_reference(viewers: Viewers, count: int, kind: str, frames: int, profile: str) -> float:
    streams = [ReferenceStream(stream_params(kind, i), viewers.senders[i].fileno(), viewers.receivers[i].getsockname(),
                               tx_session(profile)) for i in range(count)]
    frame, step = payloads(kind)
    send_frame_reference(streams, frame, 0)
    with thread_cpu() as spent:
        for index in range(1, frames + 1):
            send_frame_reference(streams, frame, index * step)
    for s in streams:
        s.close()
    return per_packet_us(spent[0], frames, frame, count)


def bench_aiortc_style(viewers: Viewers, count: int, kind: str, frames: int, profile: str) -> float:
    """Per packet as aiortc.rtcrtpsender._run_rtp: a new RtpPacket with its extensions, serialize
    with the negotiated map, protect, send."""
    frame, step = payloads(kind)
    state: list[dict[str, Any]] = []
    for i in range(count):
        params = stream_params(kind, i)
        extensions = HeaderExtensionsMap()
        extensions.configure(RTCRtpParameters(headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri) for ext_id, uri in (
                (params.mid_id, MID_URI), (params.abs_send_time_id, ABS_SEND_TIME_URI),
                (params.audio_level_id, AUDIO_LEVEL_URI)) if ext_id]))
        state.append({"params": params, "map": extensions, "session": tx_session(profile), "seq": 0,
                      "sock": viewers.senders[i], "addr": viewers.receivers[i].getsockname()})

    def send(timestamp: int) -> None:
        for viewer in state:
            params = viewer["params"]
            for i, payload in enumerate(frame.payloads):
                if params.vp8:  # aiortc packetizes per viewer with its own picture id; patching is cheaper
                    payload = with_picture_id(payload, timestamp & 0x7FFF)
                packet = RtpPacket(payload_type=params.payload_type, sequence_number=viewer["seq"],
                                   timestamp=(params.timestamp_origin + timestamp) & 0xFFFFFFFF)
                packet.ssrc = params.ssrc
                packet.payload = payload
                packet.marker = int(i == len(frame.payloads) - 1)
                packet.extensions.abs_send_time = (current_ntp_time() >> 14) & 0x00FFFFFF
                packet.extensions.mid = params.mid
                if frame.audio_level is not None:
                    packet.extensions.audio_level = (False, frame.audio_level)
                data = viewer["session"].protect(packet.serialize(viewer["map"]))
                try:
                    viewer["sock"].sendto(data, viewer["addr"])
                except BlockingIOError:
                    pass
                viewer["seq"] = (viewer["seq"] + 1) & 0xFFFF

    send(0)
    with thread_cpu() as spent:
        for index in range(1, frames + 1):
            send(index * step)
    return per_packet_us(spent[0], frames, frame, count)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # stdout's last line is the JSON record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer viewers and frames (~10 s)")
    args = parser.parse_args(argv)
    viewer_counts = [10, 100] if args.quick else [10, 100, 500, 1000]
    native_frames = 30 if args.quick else 150
    python_viewers, python_frames = (20, 10) if args.quick else (100, 30)
    largest = viewer_counts[-1]

    metrics: dict[str, float] = {}
    viewers = Viewers(largest)
    try:
        for count in viewer_counts:
            split: dict[str, float] = {}
            us, wall_ms = bench_native(viewers, count, "video", native_frames, "cm_sha1_80", split)
            metrics[f"native_video_us_per_packet_viewer_n{count}"] = round(us, 3)
            metrics[f"native_video_call_wall_ms_n{count}"] = round(wall_ms, 3)
            log(f"native  video  {count:5d} viewers: {us:6.2f} µs/packet/viewer (user {split['user']:.2f}, "
                f"system {split['system']:.2f}), one call {wall_ms:7.2f} ms wall")
        metrics[f"native_video_user_us_per_packet_viewer_n{largest}"] = round(split["user"], 3)
        metrics[f"native_video_system_us_per_packet_viewer_n{largest}"] = round(split["system"], 3)
        for profile in ("aes_128_gcm", None):
            us, _ = bench_native(viewers, largest, "video", native_frames, profile)
            name = profile or "clear"
            metrics[f"native_video_{name}_us_per_packet_viewer_n{largest}"] = round(us, 3)
            log(f"native  video  {largest:5d} viewers, {name}: {us:6.2f} µs/packet/viewer")
        split = {}
        us, wall_ms = bench_native(viewers, largest, "audio", native_frames, "cm_sha1_80", split)
        metrics[f"native_audio_us_per_packet_viewer_n{largest}"] = round(us, 3)
        metrics[f"native_audio_user_us_per_packet_viewer_n{largest}"] = round(split["user"], 3)
        metrics[f"native_audio_system_us_per_packet_viewer_n{largest}"] = round(split["system"], 3)
        metrics[f"native_audio_call_wall_ms_n{largest}"] = round(wall_ms, 3)
        log(f"native  audio  {largest:5d} viewers: {us:6.2f} µs/packet/viewer (user {split['user']:.2f}, "
            f"system {split['system']:.2f}), one call {wall_ms:7.2f} ms wall")

        for kind in ("video", "audio"):
            reference = bench_reference(viewers, python_viewers, kind, python_frames, "cm_sha1_80")
            aiortc_style = bench_aiortc_style(viewers, python_viewers, kind, python_frames, "cm_sha1_80")
            native_small, _ = bench_native(viewers, python_viewers, kind, native_frames, "cm_sha1_80")
            metrics[f"reference_{kind}_us_per_packet_viewer_n{python_viewers}"] = round(reference, 3)
            metrics[f"aiortc_style_{kind}_us_per_packet_viewer_n{python_viewers}"] = round(aiortc_style, 3)
            metrics[f"native_{kind}_us_per_packet_viewer_n{python_viewers}"] = round(native_small, 3)
            metrics[f"speedup_{kind}_vs_aiortc_style"] = round(aiortc_style / native_small, 1)
            log(f"{kind}, {python_viewers} viewers: reference {reference:.2f}, aiortc-style {aiortc_style:.2f}, "
                f"native {native_small:.2f} µs/packet/viewer")
    finally:
        viewers.close()

    baseline = {
        "what": "aiortc_style_* is aiortc's per-packet work without its asyncio/aioice layers (a lower bound "
                "of today's per-viewer cost); target: a few µs per packet per viewer in total",
        "video_frame_bytes": VIDEO_FRAME_BYTES,
        "audio_packet_bytes": AUDIO_PACKET_BYTES,
        "srtp_profile": "AES128_CM_SHA1_80 unless named",
    }
    emit("egress_micro", metrics, baseline,
         env_info(quick=args.quick, native_frames=native_frames, python_viewers=python_viewers,
                  python_frames=python_frames, loadavg=os.getloadavg()[0]))


if __name__ == "__main__":
    main()
