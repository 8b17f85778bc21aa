"""Adaptive bitrate end to end: a real aiortc viewer behind an emulated 400 kbit/s link."""

from __future__ import annotations

import asyncio

from relay.client import whep_play, whip_publish
from relay.linkemu import LinkProfile
from relay.synthetic import PatternTrack

from .conftest import FrameCollector, RunningServer

CAPPED = LinkProfile(rate_bps=400_000, delay_ms=20)
OPEN = LinkProfile(delay_ms=20)


async def test_capped_viewer_moves_down_keeps_playing_and_climbs_back(server: RunningServer) -> None:
    room = await server.create_room(title="abr")
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(640, 360, grain=True)])
    free, free_frames = FrameCollector(), None
    capped = FrameCollector()
    free_viewer = await whep_play(server.http, room["links"]["whep"], on_track=free.on_track, kinds=("video",))
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=capped.on_track, link=OPEN)
    live_room = server.rooms.get(room["id"])
    try:
        await viewer.wait_connected()
        await free_viewer.wait_connected()
        server_viewer = next(v for v in live_room.viewers.values() if v.video is not None and v.audio is not None)

        def rung() -> str | None:
            return str(server_viewer.describe()["rung"])

        # The top rung a 640x360 source fills (720p is skipped: it would only upscale).
        await capped.wait_until(lambda: rung() == "360p", timeout=10)
        await capped.wait_until(lambda: capped.last_video is not None and capped.last_video.height == 360, timeout=10)

        await capped.wait_until(lambda: server_viewer.abr.estimate_bps is not None and rung() == "360p", timeout=20)
        viewer.link.set_downstream(CAPPED)  # type: ignore[union-attr]
        await capped.wait_until(lambda: rung() == "180p", timeout=10)
        frames_at_switch = capped.frames["video"]
        # Still playing, now on the small rung, decoded without a rejoin.
        await capped.wait_until(lambda: capped.last_video is not None and capped.last_video.height == 180, timeout=5)
        await capped.wait_for("video", frames_at_switch + 60, timeout=10)
        # The unconstrained viewer never left the top rung.
        assert free.last_video is not None and free.last_video.height == 360
        assert live_room.media.video_encoders == 2  # one per watched rung, not per viewer

        viewer.link.set_downstream(OPEN)  # type: ignore[union-attr]
        await capped.wait_until(lambda: rung() == "360p", timeout=40)
        await capped.wait_until(lambda: capped.last_video is not None and capped.last_video.height == 360, timeout=5)
        free_frames = free.frames["video"]
        await asyncio.sleep(0.5)
        assert free.frames["video"] > free_frames
        assert live_room.media.rung_viewers() == {"720p": 0, "360p": 2, "180p": 0}
    finally:
        await viewer.close()
        await free_viewer.close()
        await capped.stop()
        await free.stop()
        await pub.close()
