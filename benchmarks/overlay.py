"""Overlay cost and freshness.

1. Per-frame composite cost at 1280x720 and 640x360: shelfcast's way (cached sprite, blend the
   bounding box into the I420 planes) against the naive way (whole frame to RGB, draw with OpenCV,
   back to YUV), measured in the same run.
2. Stock change -> decoded frame: a feed event posted over HTTP until a real aiortc viewer decodes a
   frame whose badge tile shows the new status (p50/p95).

    python -m benchmarks.overlay [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import av
import cv2
import numpy as np
from aiohttp import web

from overlay.compositor import Compositor, copy_frame
from overlay.render import STATUS_RGB, panel_geometry, tile_origin
from overlay.scene import Card, OverlayScene, Tile
from relay.client import whep_play, whip_publish
from relay.synthetic import PatternTrack, colour_bars
from signaling.app import create_app
from signaling.config import NO_LIMIT, Config
from signaling.keys import ROOMS
from signaling.keys import OVERLAYS

from .common import RESULTS_DIR, emit, env_info, percentile

SCENE = OverlayScene(
    Card("Cloud Hoodie 云朵连帽衫", "$29.00", "$39.00", "Only 36 left", "low", "04:59"),
    tuple(Tile(s, st) for s, st in zip(("S", "M", "L", "XL", "XXL", "3XL"), ("low", "plenty", "plenty", "critical", "sold_out", "syncing"))),
)
TARGETS = {"composite_720p_ms": 0.5, "speedup_vs_naive_720p": 10.0, "stock_to_frame_p95_ms": 150.0}


def source_frame(width: int, height: int) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(colour_bars(width, height), format="bgr24").reformat(format="yuv420p")


def naive_composite(frame: av.VideoFrame, scene: OverlayScene) -> av.VideoFrame:
    """What one would write first: the whole frame through BGR, OpenCV drawing, and back."""
    img = frame.to_ndarray(format="bgr24")
    g = panel_geometry(frame.width, frame.height, scene.card is not None, len(scene.tiles), scene.position, scene.scale)
    panel = img[g.y : g.y + g.height, g.x : g.x + g.width]
    panel[:] = (panel * 0.16 + np.array((28, 20, 16)) * 0.84).astype(np.uint8)
    if scene.card is not None:
        scale = g.card_height / 160
        cv2.putText(img, scene.card.name, (g.x + 8, g.y + int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2)
        cv2.putText(img, scene.card.price, (g.x + 8, g.y + int(90 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (64, 214, 255), 2)
        cv2.putText(img, scene.card.headline, (g.x + 8, g.y + int(140 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2)
    for i, tile in enumerate(scene.tiles):
        x0, y0 = tile_origin(g, i)
        r, gr, b = STATUS_RGB[tile.status]
        cv2.rectangle(img, (x0, y0), (x0 + g.tile_width, y0 + g.tile_height), (b, gr, r), -1)
        cv2.putText(img, tile.label, (x0 + 4, y0 + g.tile_height - 6), cv2.FONT_HERSHEY_SIMPLEX, g.tile_height / 60, (255, 255, 255), 1)
    out = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format="yuv420p")
    return out


def time_per_frame(fn, frame: av.VideoFrame, iterations: int) -> float:  # type: ignore[no-untyped-def]
    fn(frame)  # warm-up (fonts, first sprite)
    started = time.perf_counter()
    for _ in range(iterations):
        fn(frame)
    return (time.perf_counter() - started) / iterations * 1000


def composite_costs(iterations: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for label, (w, h) in (("720p", (1280, 720)), ("360p", (640, 360))):
        frame = source_frame(w, h)
        compositor = Compositor()
        compositor.set_scene(SCENE)
        owned = copy_frame(frame)
        blend_ms = time_per_frame(lambda f: compositor.apply(f, owned=True), owned, iterations)
        with_copy_ms = time_per_frame(lambda f: compositor.apply(f), frame, iterations)
        naive_ms = time_per_frame(lambda f: naive_composite(f, SCENE), frame, iterations)
        started = time.perf_counter()
        compositor.set_scene(OverlayScene(SCENE.card, SCENE.tiles[:-1]))
        compositor.apply(owned, owned=True)
        render_ms = (time.perf_counter() - started) * 1000
        metrics[f"composite_{label}_ms"] = round(blend_ms, 4)
        metrics[f"composite_with_copy_{label}_ms"] = round(with_copy_ms, 4)
        metrics[f"naive_{label}_ms"] = round(naive_ms, 4)
        metrics[f"speedup_vs_naive_{label}"] = round(naive_ms / blend_ms, 1)
        metrics[f"sprite_render_{label}_ms"] = round(render_ms, 2)
    return metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stock_to_frame(changes: int) -> tuple[list[float], list[float]]:
    """Post feed events that flip tile 0 between plenty and low; time until a decoded frame shows it."""
    port = _free_port()
    admin = "bench-admin"
    config = Config(port=port, data_dir=Path(tempfile.mkdtemp(prefix="shelfcast-bench-")), admin_key=admin, join_limit=NO_LIMIT)
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base, headers = config.base_url, {"Authorization": f"Bearer {admin}"}
    size = (640, 360)
    delays: list[float] = []
    scene_delays: list[float] = []  # the part before the encoder: HTTP, ledger, commit, scene
    latest: dict[str, np.ndarray] = {}
    arrived = asyncio.Event()

    def on_track(track) -> None:  # type: ignore[no-untyped-def]
        async def read() -> None:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    latest["rgb"] = frame.to_ndarray(format="rgb24")
                    arrived.set()

        tasks.append(asyncio.ensure_future(read()))

    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession() as http:
        try:
            await http.put(f"{base}/api/warehouses/LAX", json={"name": "LAX", "regions": ["US-West"]}, headers=headers)
            for sku in ("a", "b"):
                await http.put(f"{base}/api/skus/{sku}", json={"name": "Hoodie", "price": "9", "currency": "USD", "attributes": {"size": sku}}, headers=headers)
            await http.put(f"{base}/api/warehouses/LAX/snapshot", json={"as_of": time.time(), "levels": [{"sku": "a", "on_hand": 100}, {"sku": "b", "on_hand": 100}]}, headers=headers)
            async with http.post(f"{base}/api/rooms", json={"region": "US-West", "skus": ["a", "b"]}, headers=headers) as resp:
                room = await resp.json()
            pub = await whip_publish(http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(*size)])
            viewer = await whep_play(http, room["links"]["whep"], on_track=on_track)
            await viewer.wait_connected()
            await asyncio.sleep(1.0)
            g = panel_geometry(*size, True, 2, "bottom-left", 1.0)
            x0, y0 = tile_origin(g, 0)

            def tile_is(status: str) -> bool:
                patch = latest["rgb"][y0 + 2 : y0 + 6, x0 + 2 : x0 + 8].reshape(-1, 3).mean(axis=0)
                return bool(np.abs(patch - STATUS_RGB[status]).max() < 40)

            for i in range(changes):
                delta, status = (-80, "low") if i % 2 == 0 else (80, "plenty")
                event = {"id": f"e{i}", "warehouse": "LAX", "sku": "a", "delta": delta, "seq": i + 1}
                overlay = app[OVERLAYS][room["id"]]
                changes_before = overlay.updates
                posted = time.perf_counter()
                posted_mono = time.monotonic()
                async with http.post(f"{base}/api/stock/events", json={"events": [event]}, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                while True:
                    arrived.clear()
                    await asyncio.wait_for(arrived.wait(), 5)
                    if tile_is(status):
                        delays.append((time.perf_counter() - posted) * 1000)
                        break
                if overlay.updates > changes_before and overlay.last_change_at is not None:
                    scene_delays.append((overlay.last_change_at - posted_mono) * 1000)
                await asyncio.sleep(0.3)
            assert app[ROOMS].get(room["id"]).media.video_encoders == 1
            await viewer.close()
            await pub.close()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cleanup()
    return delays, scene_delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI)")
    args = parser.parse_args()
    metrics = composite_costs(60 if args.quick else 400)
    delays, scene_delays = asyncio.run(stock_to_frame(8 if args.quick else 40))
    metrics.update(
        stock_to_frame_p50_ms=round(percentile(delays, 50), 1),
        stock_to_frame_p95_ms=round(percentile(delays, 95), 1),
        stock_to_frame_mean_ms=round(statistics.fmean(delays), 1),
        stock_to_scene_p50_ms=round(percentile(scene_delays, 50), 1),
        stock_to_scene_p95_ms=round(percentile(scene_delays, 95), 1),
        stock_changes=len(delays),
    )
    baseline = {"targets": TARGETS, "naive": "whole frame to BGR, OpenCV drawing, back to yuv420p (same run)"}
    emit(
        "overlay",
        metrics,
        baseline,
        env_info(quick=args.quick, publisher="640x360 30 fps VP8 (aiortc)"),
        results_dir=RESULTS_DIR / "quick" if args.quick else RESULTS_DIR,
    )


if __name__ == "__main__":
    main()
