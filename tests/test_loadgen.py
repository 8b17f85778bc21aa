"""The cheap load viewers (benchmarks/loadgen.py + _loadrecv.c): the native classifier on handcrafted
datagrams, the lean STUN path against aioice's own coding, and real viewers of a real server process
(consent and RTCP keep them alive past the server's 15 s silence timeout; stop() releases everything).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aioice import stun
from aiortc.rtp import RtcpPacket, RtcpPsfbPacket, RtcpRrPacket, unpack_remb_fci

from benchmarks.loadgen import (
    KIND_AUDIO,
    KIND_OTHER,
    KIND_VIDEO,
    CheapLoadWorker,
    IceConsent,
    LoadPool,
    NativeReceiver,
    lateness_edges_ms,
    udp_socket_drops,
)
from relay.client import WebRtcClient, whip_publish
from relay.synthetic import PatternTrack, ToneTrack

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "loadgen-test-admin-key"
VIDEO_PT, AUDIO_PT, RTX_PT = 96, 111, 97
SECOND_NS = 1_000_000_000
FRAME_NS = SECOND_NS // 30
T0 = 1_700_000_000 * SECOND_NS  # a CLOCK_REALTIME-like arrival time


def rtp(seq: int, timestamp: int, *, marker: bool = False, pt: int = VIDEO_PT, ssrc: int = 0x1111, size: int = 1000) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc) + bytes(size - 12)


def video_frame(receiver: NativeReceiver, viewer: int, first_seq: int, packets: int, frame: int, arrival_ns: int) -> int:
    """``packets`` packets of frame number ``frame`` (90 kHz, 30 fps); returns the next seq."""
    for i in range(packets):
        receiver.feed(viewer, rtp(first_seq + i, frame * 3000, marker=i == packets - 1), arrival_ns)
    return first_seq + packets


@pytest.fixture
def receiver() -> Iterator[NativeReceiver]:
    r = NativeReceiver(thread=False)
    yield r
    r.close()


def new_viewer(receiver: NativeReceiver) -> int:
    viewer = receiver.add_viewer()
    receiver.set_payload_kind(viewer, VIDEO_PT, KIND_VIDEO, 90000)
    receiver.set_payload_kind(viewer, AUDIO_PT, KIND_AUDIO, 48000)
    receiver.set_payload_kind(viewer, RTX_PT, KIND_OTHER, 90000)
    return viewer


# --- the native classifier -----------------------------------------------------------------------


def test_rtp_counters_frames_and_loss_across_the_seq_wrap(receiver: NativeReceiver) -> None:
    v = new_viewer(receiver)
    seq = 65530
    seq = video_frame(receiver, v, seq, 3, 0, T0)  # 65530..65532
    seq = video_frame(receiver, v, seq, 3, 1, T0 + FRAME_NS)  # 65533..65535
    # frame 2 loses its middle packet, across the wrap: 0 and 2 arrive, 1 does not
    receiver.feed(v, rtp(seq, 2 * 3000), T0 + 2 * FRAME_NS)
    receiver.feed(v, rtp(seq + 2, 2 * 3000, marker=True), T0 + 2 * FRAME_NS)
    seq += 3
    # frame 3 whole but 300 ms late: its transit is 300 ms above the least seen
    seq = video_frame(receiver, v, seq, 2, 3, T0 + 3 * FRAME_NS + 300_000_000)
    c = receiver.counters(v, KIND_VIDEO)
    assert c["packets"] == 10 and c["bytes"] == 10_000
    assert c["ssrc"] == 0x1111
    assert c["highest_seq"] == 65536 + 4  # extended: one wrap, then seq 4
    assert c["expected"] == 11 and c["lost"] == 1
    assert c["frames"] == 3 and c["frames_incomplete"] == 1
    assert c["frames_on_time"] == 2 and c["frames_late"] == 1
    edges = lateness_edges_ms()
    late_bucket = next(i for i, edge in enumerate(edges) if 300 <= edge)
    assert c["lateness_hist"][0] == 2 and c["lateness_hist"][late_bucket] == 1 and sum(c["lateness_hist"]) == 3
    assert 299 < c["window_max_lateness_ms"] < 301
    assert 300 + 33 - 1 < c["window_max_frame_gap_ms"] < 300 + 34
    assert receiver.counters(v, KIND_AUDIO)["packets"] == 0


def test_a_late_packet_is_not_lost_and_a_new_ssrc_starts_afresh(receiver: NativeReceiver) -> None:
    v = new_viewer(receiver)
    for seq in (10, 12, 11, 13):  # 11 arrives late, not lost
        receiver.feed(v, rtp(seq, 0, marker=seq == 13), T0)
    c = receiver.counters(v, KIND_VIDEO)
    assert c["lost"] == 0 and c["expected"] == 4
    assert c["frames"] == 1 and c["frames_incomplete"] == 0
    for seq in (500, 502):  # a new SSRC (another rung, a restart): its own sequence space
        receiver.feed(v, rtp(seq, 90000, ssrc=0x2222, marker=seq == 502), T0 + SECOND_NS)
    c = receiver.counters(v, KIND_VIDEO)
    assert c["ssrc"] == 0x2222 and c["ssrc_changes"] == 1
    assert c["expected"] == 4 + 3 and c["lost"] == 1
    assert c["frames_incomplete"] == 1


def test_kinds_and_everything_that_is_not_rtp(receiver: NativeReceiver) -> None:
    v = new_viewer(receiver)
    receiver.feed(v, rtp(1, 960, pt=AUDIO_PT, marker=True, size=100), T0)  # audio: marker is not a frame
    receiver.feed(v, rtp(2, 1920, pt=AUDIO_PT, size=100), T0)
    receiver.feed(v, rtp(7, 0, pt=RTX_PT), T0)  # retransmission stream: counted, not sequenced
    receiver.feed(v, rtp(8, 0, pt=100), T0)  # a payload type the answer did not name
    sender_report = struct.pack("!BBHI", 0x80, 200, 6, 0x1111) + bytes(20)
    rtcp_bye = struct.pack("!BBHI", 0x81, 203, 1, 0x1111)
    stun_request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    dtls_alert = bytes([21, 0xFE, 0xFD]) + bytes(10)
    control = [sender_report, rtcp_bye, bytes(stun_request), dtls_alert, b"\x40junk"]
    for datagram in control:
        receiver.feed(v, datagram, T0)
    audio = receiver.counters(v, KIND_AUDIO)
    assert audio["packets"] == 2 and audio["bytes"] == 200 and audio["lost"] == 0
    assert audio["frames"] == 0
    assert receiver.counters(v, KIND_VIDEO)["packets"] == 0
    misc = receiver.misc()
    assert misc["other_packets"] == 2 and misc["other_bytes"] == 2000
    assert misc["control_datagrams"] == len(control) and misc["control_dropped"] == 0
    popped = receiver.pop_control()
    assert [d.data for d in popped] == control
    assert all(d.viewer == v and d.arrival_ns == T0 for d in popped)
    assert receiver.pop_control() == []


def test_receiver_report_and_remb_parse_as_aiortc_reads_them(receiver: NativeReceiver) -> None:
    v = new_viewer(receiver)
    assert receiver.build_rtcp(v, 0xABCD, 5_000_000) == b""  # nothing received yet: nothing to report
    for seq in (100, 101, 103):  # 102 lost
        receiver.feed(v, rtp(seq, 0, ssrc=0x1111), T0)
    receiver.feed(v, rtp(5, 0, pt=AUDIO_PT, ssrc=0x3333, size=100), T0)
    receiver.note_sr(v, 0x1111, 0x12345678, time.time_ns() - SECOND_NS // 2)
    packets = RtcpPacket.parse(receiver.build_rtcp(v, 0xABCD, 5_000_000))
    rr, remb = packets
    assert isinstance(rr, RtcpRrPacket) and rr.ssrc == 0xABCD
    video, audio = sorted(rr.reports, key=lambda r: r.ssrc)
    assert (video.ssrc, video.highest_sequence, video.packets_lost, video.fraction_lost) == (0x1111, 103, 1, 256 // 4)
    assert video.lsr == 0x12345678 and 0.45 < video.dlsr / 65536 < 0.9
    assert (audio.ssrc, audio.packets_lost, audio.lsr, audio.dlsr) == (0x3333, 0, 0, 0)
    assert isinstance(remb, RtcpPsfbPacket) and remb.fmt == 15
    bitrate, ssrcs = unpack_remb_fci(remb.fci)
    assert ssrcs == [0x1111] and abs(bitrate - 5_000_000) < 5_000_000 / 2**17
    # fraction lost covers the interval since the previous report only
    receiver.feed(v, rtp(104, 0, ssrc=0x1111), T0)
    rr = RtcpPacket.parse(receiver.build_rtcp(v, 0xABCD, 0))[0]
    assert isinstance(rr, RtcpRrPacket)
    video = next(r for r in rr.reports if r.ssrc == 0x1111)
    assert video.fraction_lost == 0 and video.packets_lost == 1
    assert len(RtcpPacket.parse(receiver.build_rtcp(v, 0xABCD, 0))) == 1  # no REMB when asked for none


async def test_native_thread_drains_a_real_udp_socket() -> None:
    receiver = NativeReceiver(batch_us=1000)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.bind(("127.0.0.1", 0))
        v = new_viewer(receiver)
        receiver.attach(v, rx.fileno())
        for seq in range(200):
            tx.sendto(rtp(seq, (seq // 5) * 3000, marker=seq % 5 == 4), rx.getsockname())
        binding = bytes(stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST))
        tx.sendto(binding, rx.getsockname())
        deadline = time.monotonic() + 5
        while receiver.counters(v, KIND_VIDEO)["packets"] < 200 or receiver.misc()["control_datagrams"] < 1:
            assert time.monotonic() < deadline, receiver.counters(v, KIND_VIDEO)
            await asyncio.sleep(0.02)
        c = receiver.counters(v, KIND_VIDEO)
        assert c["lost"] == 0 and c["frames"] == 40
        (control,) = receiver.pop_control()
        assert control.data == binding and control.fd == rx.fileno() and control.addr == tx.getsockname()
        assert receiver.thread_cpu_s() > 0
        assert receiver.detach(rx.fileno()) and not receiver.detach(rx.fileno())
        tx.sendto(rtp(200, 0), rx.getsockname())  # after detach: stays in the socket for its owner
        await asyncio.sleep(0.05)
        assert receiver.counters(v, KIND_VIDEO)["packets"] == 200
        assert rx.recv(2048)[:4] == rtp(200, 0)[:4]
    finally:
        receiver.detach(rx.fileno())
        rx.close()
        tx.close()
        receiver.close()


async def test_a_gso_run_is_read_whole_and_split() -> None:
    """With UDP_GRO a sender's GSO run (UDP_SEGMENT) arrives as one read: every datagram still counts."""
    receiver = NativeReceiver(batch_us=1000, gro=True)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        v = new_viewer(receiver)
        receiver.attach(v, rx.fileno())
        udp_segment = 103  # linux/udp.h
        for frame in range(10):  # 4 packets of 1000 bytes then a 300-byte last one, per frame
            run = b"".join(rtp(frame * 5 + i, frame * 3000) for i in range(4))
            tx.sendmsg([run], [(socket.SOL_UDP, udp_segment, struct.pack("=H", 1000))], 0, rx.getsockname())
            tx.sendto(rtp(frame * 5 + 4, frame * 3000, marker=True, size=300), rx.getsockname())
        deadline = time.monotonic() + 5
        while receiver.counters(v, KIND_VIDEO)["packets"] < 50:
            assert time.monotonic() < deadline, receiver.counters(v, KIND_VIDEO)
            await asyncio.sleep(0.02)
        c = receiver.counters(v, KIND_VIDEO)
        assert (c["packets"], c["bytes"], c["lost"], c["frames"]) == (50, 40 * 1000 + 10 * 300, 0, 10)
        assert receiver.misc()["gro_reads"] == 10  # each run was one read
    finally:
        receiver.detach(rx.fileno())
        rx.close()
        tx.close()
        receiver.close()


def test_kernel_drops_are_read_per_socket() -> None:
    """A socket nobody reads overflows; /proc/net/udp says so, for that socket only."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as full, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        full.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        full.bind(("127.0.0.1", 0))
        inode = os.fstat(full.fileno()).st_ino
        assert udp_socket_drops({inode}) == 0
        for _ in range(100):
            tx.sendto(bytes(1000), full.getsockname())
        assert udp_socket_drops({inode}) > 50
        assert udp_socket_drops({os.fstat(tx.fileno()).st_ino}) == 0


# --- the lean STUN path ----------------------------------------------------------------------------


def test_lean_consent_stun_interoperates_with_aioice() -> None:
    ice = IceConsent("ourU", b"our-password-0123456789", "srvU", b"server-password-0123456", True, 0x1234_5678_9ABC, 1853817087)
    request = stun.parse_message(ice.request(b"T" * 12))  # aioice checks FINGERPRINT while parsing
    assert request.attributes["USERNAME"] == "srvU:ourU"
    assert request.attributes["ICE-CONTROLLING"] == 0x1234_5678_9ABC
    assert request.check_message_integrity(b"server-password-0123456")

    check = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    check.attributes["USERNAME"] = "ourU:srvU"
    check.attributes["PRIORITY"] = 1
    check.attributes["ICE-CONTROLLED"] = 42
    check.add_message_integrity(b"our-password-0123456789")
    for addr in (("127.0.0.1", 5000), ("::1", 6000)):
        answer = ice.answer(bytes(check), addr)
        assert answer is not None
        response = stun.parse_message(answer)
        assert response.message_class == stun.Class.RESPONSE and response.transaction_id == check.transaction_id
        assert response.attributes["XOR-MAPPED-ADDRESS"] == addr
        assert response.check_message_integrity(b"our-password-0123456789")

    forged = bytearray(bytes(check))
    forged[-30] ^= 1  # inside MESSAGE-INTEGRITY
    assert ice.answer(bytes(forged), ("127.0.0.1", 5000)) is None
    conflict = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    conflict.attributes["USERNAME"] = "ourU:srvU"
    conflict.attributes["ICE-CONTROLLING"] = 1
    conflict.add_message_integrity(b"our-password-0123456789")
    assert ice.answer(bytes(conflict), ("127.0.0.1", 5000)) is None  # left to aioice's repair

    ice.pending = b"P" * 12
    reply = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE, transaction_id=b"Q" * 12)
    reply.add_message_integrity(b"server-password-0123456")
    assert not ice.answered(bytes(reply))  # not our transaction
    reply = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE, transaction_id=b"P" * 12)
    reply.attributes["XOR-MAPPED-ADDRESS"] = ("127.0.0.1", 4000)
    reply.add_message_integrity(b"server-password-0123456")
    ice.failures = 3
    assert ice.answered(bytes(reply)) and ice.pending is None and ice.failures == 0


# --- real viewers of a real server ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A shelfcast server as its own process, as the benchmarks run it."""
    port = _free_port()
    data = tmp_path_factory.mktemp("loadgen-server")
    with open(data / "server.log", "wb") as log:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [sys.executable, "-m", "signaling.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data / "data"), "--join-limit", "0"],
            cwd=ROOT,
            env={**os.environ, "SHELFCAST_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (data / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Room:
    def __init__(self, http: aiohttp.ClientSession, base: str, body: dict[str, object]) -> None:
        self.http, self.base, self.id = http, base, str(body["id"])
        links, tokens = body["links"], body["tokens"]
        assert isinstance(links, dict) and isinstance(tokens, dict)
        self.whip, self.whep, self.host_token = str(links["whip"]), str(links["whep"]), str(tokens["host"])
        self.admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def viewer_count(self) -> int:
        async with self.http.get(f"{self.base}/api/rooms/{self.id}") as resp:
            return int((await resp.json())["viewers"])

    async def viewers(self) -> list[dict[str, object]]:
        async with self.http.get(f"{self.base}/api/rooms/{self.id}/viewers", headers=self.admin) as resp:
            assert resp.status == 200, await resp.text()
            return list((await resp.json())["viewers"])

    async def wait_viewers(self, want: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while (n := await self.viewer_count()) != want:
            assert time.monotonic() < deadline, f"server lists {n} viewers, want {want}"
            await asyncio.sleep(0.2)


@pytest.fixture
async def live_room(server_base: str) -> AsyncIterator[Room]:
    """A show room with a host publishing a small test pattern (30 fps) and a tone."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server_base}/api/rooms", json={"mode": "show", "title": "loadgen"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            assert resp.status == 201, await resp.text()
            room = Room(http, server_base, await resp.json())
        publisher: WebRtcClient = await whip_publish(http, room.whip, room.host_token, [PatternTrack(320, 180), ToneTrack()], video_codec="video/VP8")
        try:
            await publisher.wait_connected(15)
            yield room
        finally:
            await publisher.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_cheap_viewers_stay_alive_and_leave_nothing_behind(live_room: Room) -> None:
    fds_before = open_fds()
    pool = await LoadPool(live_room.whep).start()
    try:
        viewers, failed = await pool.add(5)
        assert (viewers, failed) == (5, 0)
        await live_room.wait_viewers(5)
        first = pool.stats()
        assert first["connected"] == 5
        await asyncio.sleep(3)
        s = pool.stats()
        seconds = s["monotonic"] - first["monotonic"]
        frames_per_viewer_s = (s["frames"] - first["frames"]) / seconds / 5
        assert s["packets"] > first["packets"] and s["video"]["packets"] > first["video"]["packets"]
        assert s["audio"]["packets"] - first["audio"]["packets"] > 5 * 40 * seconds  # Opus: 50 packets/s
        assert 20 <= frames_per_viewer_s <= 36, frames_per_viewer_s  # the host's 30 fps
        assert s["lost"] == 0 and s["frames_incomplete"] == 0  # loopback loses nothing
        assert s["stalled"] == 0 and s["control_dropped"] == 0
        assert s["frames_late"] == 0 or s["frames_on_time"] / (s["frames_on_time"] + s["frames_late"]) > 0.9

        # Past the server's 15 s silence timeout: consent and the native receiver reports keep them on.
        await asyncio.sleep(17)
        await live_room.wait_viewers(5, timeout=1)
        late = pool.stats()
        assert late["connected"] == 5 and late["stalled"] == 0 and late["lost"] == 0
        assert late["rtcp_sent"] >= 5 * 15 and late["rtcp_send_errors"] == 0
        assert late["sender_reports"] >= 5 * 15 and late["srtcp_errors"] == 0
        assert late["consent_sent"] >= 5 * 2 and late["consent_ok"] >= 5 and late["consent_timeouts"] == 0
        assert late["consent_answered"] >= 5 * 2  # the server's checks, answered by the lean path
        seen = await live_room.viewers()
        assert len(seen) == 5
        for viewer in seen:
            assert viewer["state"] == "connected" and viewer["loss"] == 0
            assert viewer["rtt_ms"] is not None  # our reports carried LSR/DLSR of its sender reports
            assert viewer["estimate_bps"] == pytest.approx(5_000_000, rel=0.01)  # our REMB
    finally:
        await pool.close()
    await live_room.wait_viewers(0)
    assert open_fds() <= fds_before  # every socket and the eventfd closed


async def test_worker_process_handle(live_room: Room) -> None:
    worker = CheapLoadWorker(live_room.whep, nice=0)
    try:
        assert await worker.add(3) == 0 and worker.viewers == 3
        await live_room.wait_viewers(3)
        p0 = await worker.packets()
        s0 = await worker.stats()
        await asyncio.sleep(3)
        s1 = await worker.stats()
        assert await worker.packets() > p0
        assert s1["connected"] == 3 and s1["frames"] > s0["frames"] and s1["lost"] == 0
        assert s1["cpu_s"] >= s1["native_cpu_s"] > 0
        # Two leave (the longest-connected): the server lets them go, the one left keeps receiving,
        # and what the two had counted stays in the totals.
        await worker.drop(2)
        assert worker.viewers == 1
        await live_room.wait_viewers(1)
        s2 = await worker.stats()
        await asyncio.sleep(1)
        s3 = await worker.stats()
        assert s2["frames"] >= s1["frames"] and s3["frames"] > s2["frames"]
        assert s3["viewers"] == 1 and s3["connected"] == 1
    finally:
        await asyncio.to_thread(worker.stop)
    assert worker.proc.returncode == 0, worker.log_tail()
    await live_room.wait_viewers(0)
