"""werift (npm, a TypeScript WebRTC stack) publishes into a room and plays from one, 45 s each.

The peer is ``tests/tools/werift/peer.mjs`` on Node (``npm ci --prefix tests/tools/werift`` installs
the pinned werift). werift encodes and decodes nothing, so here the test is its camera and its
screen: it encodes VP8 + Opus into RTP that werift sends as it is, and decodes the RTP werift
receives and forwards back over loopback UDP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any, AsyncIterator

import av
import numpy as np
import pytest
from aiortc.codecs import depayload, get_decoder, get_encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from relay.client import whep_play

from .conftest import FrameCollector, RunningServer, live_show, until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]

PEER_DIR = Path(__file__).parent / "tools" / "werift"
SECONDS = 45
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def node() -> str:
    """Fail (never skip) when Node or the pinned werift is missing."""
    binary = shutil.which("node")
    if binary is None:
        pytest.fail("node is missing: apt-get install nodejs, then npm ci --prefix tests/tools/werift")
    if not (PEER_DIR / "node_modules" / "werift" / "package.json").exists():
        pytest.fail("werift is not installed: run npm ci --prefix tests/tools/werift")
    return binary


class WeriftPeer:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []

    @property
    def state(self) -> dict[str, Any]:
        states = [line for line in self.lines if "t" in line]
        return states[-1] if states else {}

    def first(self, key: str) -> Any:
        return next((line[key] for line in self.lines if key in line), None)

    def check_alive(self) -> None:
        errors = [line["error"] for line in self.lines if "error" in line]
        assert not errors, f"werift: {errors}"
        assert self.process.returncode is None, f"werift exited {self.process.returncode}: {self.lines[-3:]}"

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))

    async def finished(self) -> None:
        """werift ends its run itself: DELETE answered, exit 0."""
        await asyncio.wait_for(self.process.wait(), 15)
        assert self.process.returncode == 0 and self.first("deleted") == 200, self.lines[-3:]


@contextlib.asynccontextmanager
async def werift(*args: str) -> AsyncIterator[WeriftPeer]:
    process = await asyncio.create_subprocess_exec(
        node(), str(PEER_DIR / "peer.mjs"), *args, "--seconds", str(SECONDS),
        stdout=asyncio.subprocess.PIPE, cwd=PEER_DIR,
    )
    peer = WeriftPeer(process)
    reader = asyncio.ensure_future(peer.read())
    try:
        yield peer
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await reader


def colour_bars(index: int) -> av.VideoFrame:
    img = np.zeros((240, 320, 3), np.uint8)
    img[:, :160] = (230, 40, 40)
    img[:, 160:] = (40, 230, 40)
    frame = av.VideoFrame.from_ndarray(np.roll(img, index * 2, axis=1), format="rgb24")
    frame.pts, frame.time_base = index * 3000, Fraction(1, 90000)
    return frame


def tone(index: int) -> av.AudioFrame:
    t = (np.arange(960) + index * 960) / 48000
    samples = (np.sin(2 * np.pi * 440 * t) * 6000).astype(np.int16)
    frame = av.AudioFrame.from_ndarray(np.repeat(samples, 2).reshape(1, -1), format="s16", layout="stereo")
    frame.sample_rate, frame.pts, frame.time_base = 48000, index * 960, Fraction(1, 48000)
    return frame


async def feed(ports: dict[str, int], stop: asyncio.Event) -> None:
    """Be werift's camera and microphone: VP8 at 30 fps (a keyframe a second) and Opus every 20 ms."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=None, local_addr=("127.0.0.1", 0))
    video, audio = get_encoder(VP8), get_encoder(OPUS)
    sequence = {"video": 0, "audio": 0}

    def send(kind: str, payloads: list[bytes], timestamp: int) -> None:
        for i, payload in enumerate(payloads):
            packet = RtpPacket(payload_type=VP8.payloadType if kind == "video" else OPUS.payloadType,
                               sequence_number=sequence[kind] % 65536, timestamp=timestamp % 2**32,
                               marker=int(kind == "audio" or i == len(payloads) - 1), ssrc=1 if kind == "video" else 2)
            packet.payload = payload
            sequence[kind] += 1
            transport.sendto(packet.serialize(), ("127.0.0.1", ports[kind]))

    start, tick, frame = loop.time(), 0, 0
    try:
        while not stop.is_set():  # a 20 ms tick: one Opus frame, and the video frames now due
            send("audio", *audio.encode(tone(tick)))
            while frame * 3 <= tick * 2:  # frame / 30 s <= tick / 50 s
                send("video", *video.encode(colour_bars(frame), force_keyframe=frame % 30 == 0))
                frame += 1
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * 0.02 - loop.time()))
    finally:
        transport.close()


class Screen(asyncio.DatagramProtocol):
    """Be werift's screen and speaker: reassemble VP8 frames on the marker bit and decode them, and
    decode every Opus packet."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.decoder = get_decoder(VP8 if kind == "video" else OPUS)
        self.decoded = 0
        self.last: av.VideoFrame | None = None
        self._parts: list[bytes] = []
        self._timestamp: int | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        packet = RtpPacket.parse(data)
        if self.kind == "audio":
            self.decoded += len(self.decoder.decode(JitterFrame(packet.payload, packet.timestamp)))
            return
        if packet.timestamp != self._timestamp:
            self._parts, self._timestamp = [], packet.timestamp
        self._parts.append(depayload(VP8, packet.payload))
        if packet.marker:
            frames = self.decoder.decode(JitterFrame(b"".join(self._parts), packet.timestamp))
            self._parts = []
            if frames:
                self.decoded += len(frames)
                self.last = frames[-1]  # type: ignore[assignment]


async def at(peer: WeriftPeer, seconds: float) -> None:
    await until(lambda: (peer.check_alive(), peer.state.get("t", 0) >= seconds)[1], timeout=seconds + 15)


async def test_werift_publishes_into_a_room(server: RunningServer) -> None:
    room = await server.create_room(title="werift publisher")
    live_room = server.rooms.get(room["id"])
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track)
    stop = asyncio.Event()
    try:
        async with werift("publish", room["links"]["whip"], room["tokens"]["host"]) as peer:
            await until(lambda: (peer.check_alive(), peer.first("ports") is not None)[1], timeout=15)
            feeding = asyncio.ensure_future(feed(peer.first("ports"), stop))
            try:
                await until(lambda: (peer.check_alive(), live_room.live)[1], timeout=20)
                assert live_room.publisher.video_codec == "video/VP8"

                def werift_picture() -> bool:
                    r, g, b = collector.mean_colour()
                    return r > 60 and g > 60 and b < 80

                await collector.wait_until(werift_picture, timeout=15)
                await at(peer, 30)
                then = (live_room.publisher.frames_received, collector.frames["audio"])
                await at(peer, 42)
                now = (live_room.publisher.frames_received, collector.frames["audio"])
                # 30 fps and 50 Opus frames a second sent: at least two thirds arrive decoded.
                assert now[0] - then[0] > 200 * 12 / 10, (then, now)
                assert now[1] - then[1] > 330 * 12 / 10, (then, now)
                assert werift_picture() and live_room.live
                await peer.finished()
                await until(lambda: not live_room.live, timeout=10)
            finally:
                stop.set()
                await feeding
    finally:
        await viewer.close()
        await collector.stop()


async def test_werift_plays_from_a_room(server: RunningServer) -> None:
    loop = asyncio.get_running_loop()
    screens = {kind: Screen(kind) for kind in ("video", "audio")}
    transports = [
        (await loop.create_datagram_endpoint(lambda kind=kind: screens[kind], local_addr=("127.0.0.1", 0)))[0]  # type: ignore[misc]
        for kind in ("video", "audio")
    ]
    ports = [t.get_extra_info("sockname")[1] for t in transports]
    try:
        async with live_show(server, "werift viewer") as (room, live_room), \
                werift("play", room["links"]["whep"], "--video-port", str(ports[0]), "--audio-port", str(ports[1])) as peer:
            await until(lambda: (peer.check_alive(), screens["video"].decoded > 0 and screens["audio"].decoded > 0)[1],
                        timeout=25)
            assert live_room.audience == 1
            await at(peer, 30)
            then = (screens["video"].decoded, screens["audio"].decoded)
            await at(peer, 42)
            now = (screens["video"].decoded, screens["audio"].decoded)
            assert now[0] - then[0] > 10 * 12, (then, now)  # at least 10 fps decoded
            assert now[1] - then[1] > 25 * 12, (then, now)
            last = screens["video"].last
            assert last is not None and last.to_ndarray(format="rgb24").mean() > 70  # the host, not the slate
            await peer.finished()
            await until(lambda: live_room.audience == 0, timeout=10)
    finally:
        for transport in transports:
            transport.close()
