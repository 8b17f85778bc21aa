"""1v1 sales call: seller and buyer each publish and each receive the other; nobody else gets in."""

from __future__ import annotations

import av
import numpy as np
import pytest
from aiortc.mediastreams import VideoStreamTrack

from relay.client import WhipError, whep_play, whip_publish
from relay.synthetic import PatternTrack

from .conftest import ADMIN_KEY, FrameCollector, RunningServer, until


class SolidTrack(VideoStreamTrack):
    """The buyer's 'camera': a flat colour that is easy to recognise after coding."""

    def __init__(self, rgb: tuple[int, int, int], size: tuple[int, int] = (320, 180)) -> None:
        super().__init__()
        self._pixels = np.zeros((size[1], size[0], 3), np.uint8)
        self._pixels[:] = rgb

    async def recv(self) -> av.VideoFrame:  # type: ignore[override]
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self._pixels, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


async def test_seller_and_buyer_see_each_other_and_nobody_else_joins(server: RunningServer) -> None:
    call = await server.create_room(mode="call", title="private demo")
    other = await server.create_room(mode="call")
    assert set(call["tokens"]) == {"seller", "buyer"} and "watch" not in call["links"]
    tokens = call["tokens"]
    seller_pub = await whip_publish(server.http, call["links"]["whip"], tokens["seller"], [PatternTrack(320, 180)])
    buyer_pub = await whip_publish(server.http, call["links"]["whip"], tokens["buyer"], [SolidTrack((20, 200, 60))])
    seller_sees, buyer_sees = FrameCollector(), FrameCollector()
    seller_view = await whep_play(server.http, call["links"]["whep"], token=tokens["seller"], on_track=seller_sees.on_track)
    buyer_view = await whep_play(server.http, call["links"]["whep"], token=tokens["buyer"], on_track=buyer_sees.on_track)
    live = server.rooms.get(call["id"])
    try:
        for client in (seller_pub, buyer_pub, seller_view, buyer_view):
            await client.wait_connected()
        # The seller sees the buyer's green; the buyer sees the seller's colour bars.
        await seller_sees.wait_until(lambda: seller_sees.last_video is not None and _is_green(seller_sees.mean_colour()))
        await buyer_sees.wait_until(lambda: buyer_sees.last_video is not None and _is_bars(buyer_sees.mean_colour()))
        assert live.describe()["parties"] == {"seller": True, "buyer": True}
        # The seller's picture is encoded once (it carries the overlay); the buyer's is forwarded as
        # it arrives: never decoded, never encoded.
        seller, buyer = live.sources["seller"], live.sources["buyer"]
        assert len(seller.media.pipelines()) == 1
        assert buyer.media.pipelines() == [] and buyer.media.raw.pipeline is None
        assert buyer.media.forwarded == {"video"}  # the buyer's 'camera' has no microphone here
        assert buyer.publisher is not None and buyer.publisher.decode_queue is None
        assert buyer.media.forwarders.video.stats.frames > 0

        # Nobody else: no token, a token of another call, a second seller connection.
        whep = call["links"]["whep"]
        cases = [(None, 401), (other["tokens"]["buyer"], 403), ("forged.token", 401)]
        for token, status in cases:
            with pytest.raises(WhipError) as info:
                await whep_play(server.http, whep, token=token)
            assert info.value.status == status
        with pytest.raises(WhipError) as info:
            await whip_publish(server.http, call["links"]["whip"], tokens["seller"], [PatternTrack(160, 90)])
        assert info.value.status == 409
        assert len(live.viewers) == 2
    finally:
        for client in (seller_view, buyer_view, seller_pub, buyer_pub):
            await client.close()
        await seller_sees.stop()
        await buyer_sees.stop()


async def test_a_buyer_sending_h264_is_decoded_and_encoded_for_the_seller(server: RunningServer) -> None:
    """Viewers' egress carries VP8: a buyer whose only video codec is H.264 cannot be forwarded as it
    is, so the seller gets it through an encoder of its own (no overlay), and still sees it."""
    call = await server.create_room(mode="call")
    tokens = call["tokens"]
    buyer_pub = await whip_publish(server.http, call["links"]["whip"], tokens["buyer"], [SolidTrack((20, 200, 60))],
                                   video_codec="video/H264")
    seller_sees = FrameCollector()
    seller_view = await whep_play(server.http, call["links"]["whep"], token=tokens["seller"], on_track=seller_sees.on_track)
    buyer = server.rooms.get(call["id"]).sources["buyer"]
    try:
        await buyer_pub.wait_connected()
        await seller_view.wait_connected()
        await seller_sees.wait_until(lambda: seller_sees.last_video is not None and _is_green(seller_sees.mean_colour()))
        assert buyer.media.forwarded == frozenset()
        assert buyer.publisher is not None and buyer.publisher.decode_queue is not None
        assert buyer.media.raw.pipeline is not None and buyer.media.pipelines() == []
    finally:
        for client in (seller_view, buyer_pub):
            await client.close()
        await seller_sees.stop()


async def test_the_seller_sees_the_slate_then_the_buyer_as_sent_then_the_slate_again(server: RunningServer) -> None:
    """What feeds the seller's view of the buyer changes under the seller's open session: a slate
    encoder while nobody publishes, the buyer's own frames while the buyer is live, the slate again."""
    call = await server.create_room(mode="call")
    tokens = call["tokens"]
    seller_sees = FrameCollector()
    seller_view = await whep_play(server.http, call["links"]["whep"], token=tokens["seller"], on_track=seller_sees.on_track)
    buyer = server.rooms.get(call["id"]).sources["buyer"].media
    buyer_pub = None
    try:
        await seller_view.wait_connected()
        await seller_sees.wait_until(lambda: seller_sees.last_video is not None)
        assert buyer.raw.pipeline is not None and not _is_green(seller_sees.mean_colour())  # "Waiting for the host"
        buyer_pub = await whip_publish(server.http, call["links"]["whip"], tokens["buyer"], [SolidTrack((20, 200, 60))])
        await seller_sees.wait_until(lambda: _is_green(seller_sees.mean_colour()))
        assert buyer.raw.pipeline is None and buyer.forwarded == {"video"}
        await buyer_pub.close()
        await until(lambda: buyer.raw.pipeline is not None, 5)
        await seller_sees.wait_until(lambda: not _is_green(seller_sees.mean_colour()))
        assert buyer.forwarded == frozenset()
    finally:
        for client in (seller_view, buyer_pub):
            if client is not None:
                await client.close()
        await seller_sees.stop()


async def test_call_room_api(server: RunningServer) -> None:
    call = await server.create_room(mode="call")
    assert call["links"]["seller"].endswith(f"/call/{call['id']}#token={call['tokens']['seller']}")
    async with server.http.get(f"{server.base}/call/{call['id']}") as resp:
        assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
    async with server.http.post(
        f"{server.base}/api/rooms", json={"mode": "pk"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as resp:
        assert resp.status == 400  # PK battles are not built yet: a clear error, not a half room


def _is_green(rgb: np.ndarray) -> bool:
    return bool(rgb[1] > 150 and rgb[0] < 80 and rgb[2] < 110)


def _is_bars(rgb: np.ndarray) -> bool:
    return bool(abs(rgb[0] - rgb[1]) < 40 and rgb.max() > 90)
