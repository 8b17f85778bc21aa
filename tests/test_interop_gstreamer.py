"""GStreamer's webrtcbin (Debian's packages, default settings) publishes into a room and plays from one.

The peer is ``tests/tools/gst_webrtc.py``, run with Debian's ``/usr/bin/python3`` (the only Python
with ``gi``); it prints a JSON line a second. Each test runs 45 s and checks that media still flows
in its last 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
import pytest

from relay.client import whep_play

from .conftest import FrameCollector, RunningServer, live_show, until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = str(Path(__file__).parent / "tools" / "gst_webrtc.py")
SECONDS = 45
DEBIAN_PACKAGES = (
    "gstreamer1.0-plugins-bad gstreamer1.0-nice gstreamer1.0-plugins-good gstreamer1.0-libav "
    "python3-gi gir1.2-gst-plugins-bad-1.0"
)
# The top two thirds of videotestsrc's smpte pattern: seven full bars, white to blue.
SMPTE_BARS = [(255, 255, 255), (255, 255, 0), (0, 255, 255), (0, 255, 0), (255, 0, 255), (255, 0, 0), (0, 0, 255)]


def require_gstreamer() -> None:
    """Fail (never skip) when Debian's GStreamer pieces are missing."""
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0'); "
        "gi.require_version('GstSdp', '1.0'); from gi.repository import Gst; Gst.init(None); "
        "missing = [e for e in ('webrtcbin', 'nicesrc', 'dtlssrtpenc', 'vp8enc', 'vp8dec', 'opusenc', 'opusdec', "
        "'avdec_h264') if Gst.ElementFactory.find(e) is None]; print(' '.join(missing))"
    )
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail(f"{SYSTEM_PYTHON} is missing: install Debian's packages {DEBIAN_PACKAGES}")
    if done.returncode != 0 or done.stdout.strip():
        problem = done.stderr.strip().splitlines()[-1:] or [f"missing elements: {done.stdout.strip()}"]
        pytest.fail(f"GStreamer with webrtcbin is not usable ({problem[0]}): apt-get install {DEBIAN_PACKAGES}")


class GstPeer:
    """The script's process and the JSON lines it has printed so far."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.stderr = b""

    @property
    def last(self) -> dict[str, Any]:
        states = [line for line in self.lines if "counts" in line and "t" in line]
        return states[-1] if states else {}

    def count(self, kind: str) -> int:
        return int(self.last.get("counts", {}).get(kind, 0))

    def errors(self) -> list[str]:
        return [line["error"] for line in self.lines if "error" in line]

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"unparsed": raw.decode(errors="replace")})

    def check_alive(self) -> None:
        assert not self.errors(), f"GStreamer peer: {self.errors()} (last state {self.last})"
        assert self.process.returncode is None, f"GStreamer peer exited {self.process.returncode}: {self.lines[-3:]}"

    def describe(self) -> str:
        return f"last state {self.last}; errors {self.errors()}; stderr {self.stderr[-2000:].decode(errors='replace')}"


@contextlib.asynccontextmanager
async def gst_peer(*args: str) -> AsyncIterator[GstPeer]:
    require_gstreamer()
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, SCRIPT, *args, "--seconds", str(SECONDS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    peer = GstPeer(process)
    reader = asyncio.ensure_future(peer.read())
    assert process.stderr is not None
    stderr = asyncio.ensure_future(process.stderr.read())
    try:
        yield peer
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        peer.stderr = await stderr
        await reader


async def sample_twice(peer: GstPeer, read: Callable[[], tuple[int, ...]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``read()`` at 30 s and at 42 s of the peer's run (it stops at 45 s), the peer alive at both."""
    samples = []
    for at in (30.0, 42.0):
        await until(lambda: (peer.check_alive(), peer.last.get("t", 0) >= at)[1], timeout=at + 10)
        samples.append(read())
    return samples[0], samples[1]


async def wait_exit(peer: GstPeer) -> None:
    """The peer ends its run by itself: its DELETE answered, exit status 0."""
    try:
        await asyncio.wait_for(peer.process.wait(), 15)
    except asyncio.TimeoutError:
        pytest.fail(f"GStreamer peer did not stop after its {SECONDS} s: {peer.describe()}")
    await until(lambda: any(line.get("done") for line in peer.lines), timeout=5)
    assert peer.process.returncode == 0 and not peer.errors(), peer.describe()


def smpte_bars_seen(frame: np.ndarray) -> bool:
    """Each of the seven bars, sampled at a third of the height in its middle, near its colour."""
    height, width, _ = frame.shape
    row = frame[height // 3]
    for index, colour in enumerate(SMPTE_BARS):
        x = int((index + 0.5) * width / len(SMPTE_BARS))
        if np.abs(row[x].astype(int) - colour).max() > 60:
            return False
    return True


async def test_gstreamer_webrtcbin_publishes_into_a_room(server: RunningServer) -> None:
    room = await server.create_room(title="gstreamer publisher")
    live_room = server.rooms.get(room["id"])
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track)
    try:
        async with gst_peer("publish", room["links"]["whip"], room["tokens"]["host"]) as gst:
            await viewer.wait_connected()
            try:
                await until(lambda: (gst.check_alive(), live_room.live)[1], timeout=25)
            except asyncio.TimeoutError:
                pytest.fail(f"GStreamer never went live: {gst.describe()}")
            assert live_room.publisher.video_codec == "video/VP8"
            await collector.wait_until(
                lambda: collector.last_video is not None and smpte_bars_seen(collector.last_video.to_ndarray(format="rgb24")),
                timeout=15,
            )
            then, now = await sample_twice(gst, lambda: (gst.count("video"), collector.frames["video"], collector.frames["audio"]))
            # 12 s apart: GStreamer encodes 30 fps; here at least 10 fps and 25 audio frames a second decoded.
            assert now[0] - then[0] > 200, gst.describe()
            assert now[1] - then[1] > 120, (then, now)
            assert now[2] - then[2] > 300, (then, now)
            assert smpte_bars_seen(collector.last_video.to_ndarray(format="rgb24")), collector.mean_colour()
            assert live_room.live and live_room.publisher.video_codec == "video/VP8"
            await wait_exit(gst)
            await until(lambda: not live_room.live, timeout=10)
    finally:
        await viewer.close()
        await collector.stop()


async def test_gstreamer_webrtcbin_plays_from_a_room(server: RunningServer) -> None:
    async with live_show(server, "gstreamer viewer") as (room, live_room), gst_peer("play", room["links"]["whep"]) as gst:
        try:
            await until(lambda: (gst.check_alive(), gst.count("video") > 0 and gst.count("audio") > 0)[1], timeout=25)
        except asyncio.TimeoutError:
            pytest.fail(f"GStreamer decoded nothing: {gst.describe()}")
        assert live_room.audience == 1
        then, now = await sample_twice(gst, lambda: (gst.count("video"), gst.count("audio")))
        # 12 s apart: at least 10 fps and 25 audio buffers a second decoded by GStreamer.
        assert now[0] - then[0] > 120, gst.describe()
        assert now[1] - then[1] > 300, gst.describe()
        # The host's picture (colour bars, bright), not the dark slate.
        mean = gst.last.get("mean_rgb")
        assert mean is not None and sum(mean) / 3 > 70, gst.describe()
        assert gst.last["connection"] == "connected", gst.describe()
        await wait_exit(gst)
        await until(lambda: live_room.audience == 0, timeout=10)

