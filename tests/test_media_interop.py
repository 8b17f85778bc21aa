"""An independent WHIP encoder (FFmpeg's whip muxer, H.264 + Opus) publishes; aiortc viewers watch."""

from __future__ import annotations

import asyncio
import sys

import pytest

from relay.client import whep_play

from .conftest import FrameCollector, RunningServer

pytestmark = pytest.mark.interop


async def test_ffmpeg_whip_publisher_reaches_viewers(server: RunningServer) -> None:
    room = await server.create_room(title="ffmpeg")
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track)
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.tools.ffmpeg_whip", room["links"]["whip"], room["tokens"]["host"], "--seconds", "10"
    )
    live_room = server.rooms.get(room["id"])
    try:
        await viewer.wait_connected()
        await collector.wait_until(lambda: live_room.live, timeout=20)
        assert live_room.publisher.video_codec == "video/H264"
        # FFmpeg's picture is half red, half green: strongly saturated, unlike the dark slate.
        def ffmpeg_picture() -> bool:
            r, g, b = collector.mean_colour()
            return r > 60 and g > 60 and b < 80

        await collector.wait_until(ffmpeg_picture, timeout=15)
        audio_before = collector.frames["audio"]
        await collector.wait_for("audio", audio_before + 25, timeout=10)
        assert live_room.media.video_encoders == 1
    finally:
        if publisher.returncode is None:
            publisher.kill()
        await publisher.wait()
        await viewer.close()
        await collector.stop()
