"""An independent WHIP encoder (FFmpeg's whip muxer, H.264 + Opus) publishes; aiortc viewers watch.

It runs past 40 s on purpose: FFmpeg stops answering ICE consent checks once connected, and aioice
alone would drop it 30 s in although its media keeps coming."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from relay.client import whep_play

from .conftest import FrameCollector, RunningServer, until

pytestmark = pytest.mark.interop

PUBLISH_S = 48


async def test_ffmpeg_whip_publisher_reaches_viewers_past_consent_expiry(server: RunningServer) -> None:
    room = await server.create_room(title="ffmpeg")
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track)
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.tools.ffmpeg_whip", room["links"]["whip"], room["tokens"]["host"],
        "--seconds", str(PUBLISH_S),
    )
    started = time.monotonic()
    live_room = server.rooms.get(room["id"])
    try:
        await viewer.wait_connected()
        await collector.wait_until(lambda: live_room.live, timeout=20)
        session = live_room.publisher
        assert session.video_codec == "video/H264"
        # FFmpeg's picture is half red, half green: strongly saturated, unlike the dark slate.
        def ffmpeg_picture() -> bool:
            r, g, b = collector.mean_colour()
            return r > 60 and g > 60 and b < 80

        await collector.wait_until(ffmpeg_picture, timeout=15)
        assert live_room.media.video_encoders == 1
        # Past the 30 s at which unanswered consent checks would have closed it, and then on to 42 s.
        await asyncio.sleep(max(0.0, started + 32 - time.monotonic()))
        frames, audio = session.frames_received, collector.frames["audio"]
        await asyncio.sleep(max(0.0, started + 42 - time.monotonic()))
        assert live_room.publisher is session and not session.closed
        assert session.frames_received > frames + 5 * 20, "FFmpeg's video stopped arriving after 32 s"
        assert collector.frames["audio"] > audio + 5 * 40, "audio stopped reaching the viewer after 32 s"
        assert ffmpeg_picture()
    finally:
        if publisher.returncode is None:
            publisher.kill()
        await publisher.wait()
        await viewer.close()
        await collector.stop()


async def test_ffmpeg_with_its_own_p224_key_is_told_apart_in_the_log(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    # OpenSSL 4 (cryptography's) has no P-224 in TLS, so FFmpeg's default key cannot be accepted:
    # the operator gets the workaround in the log instead of aiortc's "error []".
    room = await server.create_room(title="ffmpeg key")
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.tools.ffmpeg_whip", room["links"]["whip"], room["tokens"]["host"],
        "--seconds", "5", "--own-key", stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert await asyncio.wait_for(publisher.wait(), 30) != 0

        def dtls_warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "DTLS" in r.getMessage()]

        await until(dtls_warnings, timeout=10)
        assert "-cert_file/-key_file" in dtls_warnings()[0]
        assert not server.rooms.get(room["id"]).live
    finally:
        if publisher.returncode is None:
            publisher.kill()
        await publisher.wait()
