"""The lean egress in a real room: real aiortc viewers on loopback decode what the native path
sends, each rung frame is packetized once whatever the number of viewers, lost packets come back
from the native history, sender reports describe what went out, and nothing is left behind. The
aiortc egress (the baseline) still works behind its setting."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, AsyncIterator

import pytest

from relay import egress, fanout
from relay.client import whep_play
from relay.linkemu import LinkProfile
from signaling.config import Config

from .conftest import ADMIN_KEY, FrameCollector, RunningServer, serving_with_media, until
from .test_media_show import publish, watch


@pytest.fixture
async def aiortc_egress_server(config: Config) -> AsyncIterator[RunningServer]:
    async with serving_with_media(config, egress="aiortc") as server:
        yield server


async def test_viewers_decode_the_native_egress_and_each_frame_is_packetized_once(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real = fanout.native_frame

    def counting(packet: Any, kind: str) -> egress.NativeFrame:
        made.append(kind)
        return real(packet, kind)

    monkeypatch.setattr(fanout, "native_frame", counting)
    room = await server.create_room()
    live = server.rooms.get(room["id"])
    pub = await publish(server, room)
    viewers = [await watch(server, room) for _ in range(4)]
    try:
        for _, collector in viewers:
            await collector.wait_for("video", 30, timeout=15)
            await collector.wait_for("audio", 20, timeout=15)
        sessions = list(live.viewers.values())
        assert len(sessions) == 4
        for session in sessions:
            for track in (session.video, session.audio):
                assert track is not None and track.egress is not None, "every track went native"
                assert track.egress.packets_sent > 0 and track.egress.send_errors == 0
        # Once per rung frame, not once per viewer: a frame made for a viewer's backlog on joining
        # is the only per-viewer packetizing there is.
        rung = live.media.rungs[live.media.served_rung(0)].fanout
        before_video, before_published = made.count("video"), rung.packets_published
        await asyncio.sleep(1.0)
        published = rung.packets_published - before_published
        assert published >= 10
        assert made.count("video") - before_video == published
    finally:
        for viewer, collector in viewers:
            await collector.stop()
            await viewer.close()  # type: ignore[attr-defined]
        await pub.close()
    await until(lambda: not live.viewers, 5)
    assert all(s.video is None or s.video.egress is None or s.video.egress.closed for s in sessions)


async def test_the_viewer_sees_sender_reports_of_what_went_out_natively(server: RunningServer) -> None:
    room = await server.create_room()
    live = server.rooms.get(room["id"])
    pub = await publish(server, room)
    viewer, collector = await watch(server, room)
    try:
        await collector.wait_for("video", 30, timeout=15)
        stream = next(iter(live.viewers.values())).video.egress
        assert stream is not None

        async def reported() -> int:
            stats = await viewer.pc.getStats()  # type: ignore[attr-defined]
            return max((s.packetsSent for s in stats.values() if s.type == "remote-outbound-rtp" and s.kind == "video"),
                       default=0)

        deadline = asyncio.get_running_loop().time() + 8
        seen = 0
        while seen == 0 and asyncio.get_running_loop().time() < deadline:
            seen = await reported()
            await asyncio.sleep(0.2)
        assert 0 < seen <= stream.packets_sent  # an SR (sent every ~1 s) describes what was sent
        audio = next(iter(live.viewers.values())).audio.egress
        assert audio is not None
        # aiortc's SR/SDES left through the send thread (on either of the viewer's streams)
        assert stream.rtcp_sent + audio.rtcp_sent > 0
    finally:
        await collector.stop()
        await viewer.close()  # type: ignore[attr-defined]
        await pub.close()


async def test_lost_packets_are_sent_again_from_the_native_history(server: RunningServer) -> None:
    room = await server.create_room()
    live = server.rooms.get(room["id"])
    pub = await publish(server, room)
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",),
                             link=LinkProfile(loss=0.03))
    try:
        await collector.wait_for("video", 20, timeout=15)
        session = next(iter(live.viewers.values()))
        await until(lambda: session.video is not None and session.video.egress is not None
                    and session.video.egress.retransmissions > 0, 15, 0.1)
        assert session.nacks > 0
        frames = collector.frames["video"]
        await collector.wait_for("video", frames + 30, timeout=15)  # still decoding through the loss
    finally:
        await collector.stop()
        await viewer.close()
        await pub.close()


async def test_native_frames_are_released_when_the_room_ends(server: RunningServer) -> None:
    gc.collect()
    baseline = egress.live_frame_buffers()
    room = await server.create_room()
    pub = await publish(server, room)
    viewer, collector = await watch(server, room)
    await collector.wait_for("video", 10, timeout=15)
    assert egress.live_frame_buffers() > baseline  # histories hold recent frames while viewers watch
    await collector.stop()
    await viewer.close()  # type: ignore[attr-defined]
    await pub.close()
    async with server.http.delete(f"{server.base}/api/rooms/{room['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 204
    await until(lambda: (gc.collect(), egress.live_frame_buffers())[1] <= baseline, 10, 0.2)


async def test_the_aiortc_egress_remains_as_the_baseline(aiortc_egress_server: RunningServer) -> None:
    server = aiortc_egress_server
    room = await server.create_room()
    live = server.rooms.get(room["id"])
    pub = await publish(server, room)
    viewer, collector = await watch(server, room)
    try:
        await collector.wait_for("video", 20, timeout=15)
        session = next(iter(live.viewers.values()))
        assert session.video is not None and session.video.egress is None and session.video.packets_sent > 0
    finally:
        await collector.stop()
        await viewer.close()  # type: ignore[attr-defined]
        await pub.close()
