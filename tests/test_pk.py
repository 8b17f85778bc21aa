"""PK battles with real peers: two shows link, viewers decode the split picture, sales move the
score, the round ends with a winner, a host leaving reverts the other room, hosts see each other."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from overlay.scene import PkScene
from relay.client import WhipError, whep_play, whip_publish
from signaling.keys import PK

from .conftest import FrameCollector, RunningServer, until
from .test_call import SolidTrack
from .test_overlay_e2e import seed_catalogue

RED, BLUE = (220, 30, 30), (30, 40, 220)


def halves(collector: FrameCollector) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the middle of each half (away from the bar and the product cards)."""
    assert collector.last_video is not None
    rgb = collector.last_video.to_ndarray(format="rgb24").astype(float)
    h, w = rgb.shape[:2]
    band = rgb[int(h * 0.3) : int(h * 0.6)]
    return band[:, int(w * 0.1) : int(w * 0.4)].reshape(-1, 3).mean(0), band[:, int(w * 0.6) : int(w * 0.9)].reshape(-1, 3).mean(0)


def looks(colour: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool(np.abs(colour - rgb).max() < 60)


async def test_pk_round_end_to_end(server: RunningServer) -> None:
    await seed_catalogue(server, {"tee-a": "S", "tee-b": "M"}, on_hand=50)
    a = await server.create_room(title="Anna", region="US-West", skus=["tee-a"])
    b = await server.create_room(title="Bo", region="US-West", skus=["tee-b"])
    host_a = {"Authorization": f"Bearer {a['tokens']['host']}"}
    host_b = {"Authorization": f"Bearer {b['tokens']['host']}"}
    pub_a = await whip_publish(server.http, a["links"]["whip"], a["tokens"]["host"], [SolidTrack(RED, (640, 360))])
    pub_b = await whip_publish(server.http, b["links"]["whip"], b["tokens"]["host"], [SolidTrack(BLUE, (640, 360))])
    in_a, in_b, a_sees_b = FrameCollector(), FrameCollector(), FrameCollector()
    viewer_a = await whep_play(server.http, a["links"]["whep"], on_track=in_a.on_track, kinds=("video",))
    viewer_b = await whep_play(server.http, b["links"]["whep"], on_track=in_b.on_track, kinds=("video",))
    studio_feed = None
    battles = server.app[PK]
    try:
        for client in (pub_a, pub_b, viewer_a, viewer_b):
            await client.wait_connected()
        await until(lambda: in_a.last_video is not None and looks(halves(in_a)[1], RED))

        # A invites B for a 3-minute round; B's host accepts.
        async with server.http.post(f"{server.base}/api/rooms/{a['id']}/pk", json={"room": b["id"], "duration_s": 180}, headers=host_a) as resp:
            assert resp.status == 201, await resp.text()
            pk_id = (await resp.json())["id"]
        async with server.http.post(f"{server.base}/api/pk/{pk_id}/accept", headers=host_a) as resp:
            assert resp.status == 403  # only the invited room's host may accept
        async with server.http.post(f"{server.base}/api/pk/{pk_id}/accept", headers=host_b) as resp:
            assert (await resp.json())["state"] == "live"

        # Each room's viewers: own host on the left, the other on the right.
        await until(lambda: looks(halves(in_a)[0], RED) and looks(halves(in_a)[1], BLUE), 10)
        await until(lambda: looks(halves(in_b)[0], BLUE) and looks(halves(in_b)[1], RED), 10)
        compositor = server.rooms.get(a["id"]).media.frame_filter
        assert isinstance(compositor.scene, PkScene) and compositor.scene.bar.left_label == "Anna"
        assert server.rooms.get(a["id"]).media.video_encoders == 1  # composed once per rung, not per viewer

        # The other host, seen from A's studio, comes straight from B's camera (no split, no bar).
        studio_feed = await whep_play(server.http, b["links"]["whep"] + "?feed=host", token=a["tokens"]["host"], on_track=a_sees_b.on_track, kinds=("video",))
        await until(lambda: a_sees_b.last_video is not None and looks(halves(a_sees_b)[0], BLUE) and looks(halves(a_sees_b)[1], BLUE), 10)
        media_b = server.rooms.get(b["id"]).media
        # ...forwarded as B's host sends it: no encoder of its own for the feed.
        assert media_b.forwarded == {"video"} and media_b.raw.pipeline is None and len(media_b.raw.fanout) == 1
        assert media_b.forwarders.video.stats.frames > 0
        with pytest.raises(WhipError) as refused:
            await whep_play(server.http, b["links"]["whep"] + "?feed=host", token=b["tokens"]["viewer"])
        assert refused.value.status == 403

        # A buyer in B's room: B scores, and the bar shows it in the next frames.
        async with server.http.post(
            f"{server.base}/api/rooms/{b['id']}/orders",
            json={"sku": "tee-b", "quantity": 2, "region": "US-West", "idempotency_key": "pk-1"},
        ) as resp:
            assert resp.status == 201
        await until(lambda: isinstance(compositor.scene, PkScene) and compositor.scene.bar.right_score == "2", 5)
        assert battles.rounds[pk_id].scores[b["id"]] == 2

        # Time runs out (moved forward instead of waiting 3 minutes): B wins, the banner shows.
        pk = battles.rounds[pk_id]
        battles.rounds[pk_id] = dataclasses.replace(pk, started_at=time.time() - pk.duration_s)
        await until(lambda: battles.rounds[pk_id].state == "result", 3)
        assert battles.rounds[pk_id].winner == b["id"]
        await until(lambda: isinstance(compositor.scene, PkScene) and compositor.scene.bar.banner == "Bo win", 3)

        # A second round, then B's host drops: A reverts to its own full picture at once.
        battles.rounds[pk_id] = dataclasses.replace(battles.rounds[pk_id], state="over")
        async with server.http.post(f"{server.base}/api/rooms/{a['id']}/pk", json={"room": b["id"], "duration_s": 60}, headers=host_a) as resp:
            second = (await resp.json())["id"]
        async with server.http.post(f"{server.base}/api/pk/{second}/accept", headers=host_b) as resp:
            assert (await resp.json())["state"] == "live"
        await until(lambda: looks(halves(in_a)[1], BLUE), 10)
        await pub_b.close()
        await until(lambda: battles.rounds[second].reason == "host_left", 3)
        await until(lambda: looks(halves(in_a)[0], RED) and looks(halves(in_a)[1], RED), 10)
        assert server.rooms.get(a["id"]).media.pk_partner is None
    finally:
        for client in (studio_feed, viewer_a, viewer_b, pub_a, pub_b):
            if client is not None:
                await client.close()
        for collector in (in_a, in_b, a_sees_b):
            await collector.stop()
