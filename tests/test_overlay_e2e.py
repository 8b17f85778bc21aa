"""End to end: a stock change posted to the feed API shows up in a viewer's DECODED frames."""

from __future__ import annotations

import time

import numpy as np

from overlay.render import STATUS_RGB, panel_geometry, tile_origin
from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack

from .conftest import ADMIN_KEY, FrameCollector, RunningServer

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SIZE = (640, 360)


async def seed_catalogue(server: RunningServer, skus: dict[str, str], on_hand: int) -> None:
    async with server.http.put(
        f"{server.base}/api/warehouses/LAX", json={"name": "Los Angeles", "regions": ["US-West"]}, headers=ADMIN
    ) as resp:
        assert resp.status == 200, await resp.text()
    for sku, size in skus.items():
        body = {"name": "Hoodie 连帽衫", "price": "29.99", "currency": "USD", "group": "hoodie", "attributes": {"size": size}}
        async with server.http.put(f"{server.base}/api/skus/{sku}", json=body, headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
    levels = [{"sku": sku, "on_hand": on_hand} for sku in skus]
    async with server.http.put(
        f"{server.base}/api/warehouses/LAX/snapshot", json={"as_of": time.time(), "levels": levels}, headers=ADMIN
    ) as resp:
        assert resp.status == 200, await resp.text()


def tile_colour(frame_rgb: np.ndarray, index: int, tiles: int) -> np.ndarray:
    g = panel_geometry(SIZE[0], SIZE[1], True, tiles, "bottom-left", 1.0)
    x0, y0 = tile_origin(g, index)
    return frame_rgb[y0 + 2 : y0 + 6, x0 + 2 : x0 + 8].reshape(-1, 3).mean(axis=0)


def close_to(colour: np.ndarray, status: str) -> bool:
    return bool(np.abs(colour - STATUS_RGB[status]).max() < 40)


async def test_stock_change_reaches_decoded_frames(server: RunningServer) -> None:
    skus = {"hoodie-s": "S", "hoodie-m": "M", "hoodie-l": "L"}
    await seed_catalogue(server, skus, on_hand=100)
    room = await server.create_room(title="overlay", region="US-West", skus=list(skus))
    collector = FrameCollector()
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(*SIZE)])
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track)
    try:
        await pub.wait_connected()
        await viewer.wait_connected()

        def tile(index: int) -> np.ndarray:
            assert collector.last_video is not None
            return tile_colour(collector.last_video.to_ndarray(format="rgb24").astype(float), index, len(skus))

        await collector.wait_for("video", 5)
        await collector.wait_until(lambda: all(close_to(tile(i), "plenty") for i in range(3)))

        # 80 of 100 hoodies in size S leave the warehouse: the S tile turns amber ("low").
        posted = time.monotonic()
        async with server.http.post(
            f"{server.base}/api/stock/events",
            json={"events": [{"id": "ev-1", "warehouse": "LAX", "sku": "hoodie-s", "delta": -80, "seq": 1}]},
            headers=ADMIN,
        ) as resp:
            assert resp.status == 200, await resp.text()
        await collector.wait_until(lambda: close_to(tile(0), "low"), timeout=5)
        delay_ms = (time.monotonic() - posted) * 1000
        print(f"stock change -> decoded frame: {delay_ms:.0f} ms")
        assert close_to(tile(1), "plenty") and close_to(tile(2), "plenty")

        # A buyer takes the last 20: sold out, grey, in the picture too.
        async with server.http.post(
            f"{server.base}/api/rooms/{room['id']}/orders",
            json={"sku": "hoodie-s", "quantity": 20, "region": "US-West", "idempotency_key": "buyer-1"},
        ) as resp:
            assert resp.status == 201, await resp.text()
        await collector.wait_until(lambda: close_to(tile(0), "sold_out"), timeout=5)
        media = server.rooms.get(room["id"]).media
        assert media.video_encoders == 1
    finally:
        await viewer.close()
        await collector.stop()
        await pub.close()


async def test_overlay_settings_api(server: RunningServer) -> None:
    await seed_catalogue(server, {"a": "S", "b": "M"}, on_hand=10)
    room = await server.create_room(region="US-West", skus=["a", "b"])
    url = f"{server.base}/api/rooms/{room['id']}/overlay"
    host = {"Authorization": f"Bearer {room['tokens']['host']}"}
    async with server.http.put(url, json={"featured_sku": "b", "position": "top-right"}, headers=host) as resp:
        assert resp.status == 200
        assert (await resp.json())["featured_sku"] == "b"
    compositor = server.rooms.get(room["id"]).media.frame_filter
    assert compositor.scene is not None and compositor.scene.position == "top-right"
    cases = [
        ({"featured_sku": "zzz"}, host, 400, "invalid_overlay"),
        ({"scale": 9}, host, 400, "invalid_overlay"),
        ({"colour": "red"}, host, 400, "invalid_overlay"),
        ({"position": "top-left"}, {"Authorization": f"Bearer {room['tokens']['viewer']}"}, 403, "forbidden"),
        ({"position": "top-left"}, {}, 401, "unauthorized"),
    ]
    for body, headers, status, code in cases:
        async with server.http.put(url, json=body, headers=headers) as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (status, code), body
    async with server.http.get(url) as resp:
        assert (await resp.json())["position"] == "top-right"  # rejected changes changed nothing
