"""Glass-to-glass latency and join time: direct aiortc (the floor) vs shelfcast vs a naive aiortc relay.

    python -m benchmarks.latency [--quick]

A synthetic 720p30 VP8 1.5 Mbit/s publisher (aiortc, this process) stamps each frame with its capture
time (CLOCK_MONOTONIC) in the top-left corner (benchmarks/timecode.py); a viewer (aiortc, this
process) decodes every frame and reads the code: latency = decode time - capture time. The variants
run one after another in the same run, each with the same publisher:

- ``direct``: publisher peer connection straight into a viewer peer connection, no server (the floor);
- ``shelfcast``: WHIP -> ``python -m signaling.cli serve`` (own process) -> WHEP;
- ``naive``: WHIP -> ``python -m benchmarks.naive_relay`` (own process; MediaRelay + an encoder per
  viewer) -> WHEP;
- ``cascade``: two shelfcast nodes sharing a local redis-server; one probe through the origin, one
  through the other node (one cascade hop), recording the same frames at the same time:
  ``cascade_hop_p95_ms`` is what the hop adds.

Join time (first WHEP request -> first decoded frame): aiortc viewers for shelfcast and the naive
relay, and Chromium watch pages (/watch/{room}; first frame by requestVideoFrameCallback) for
shelfcast, while the latency viewer stays connected (the room's encoder is running).

The benchmark room has no SKUs, so the stock overlay draws nothing: ``env.overlay_on`` (with the
room's overlay settings) records that; the metric names (``shelfcast_p95_ms``) stay the same when a
later run turns it on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from relay.client import WebRtcClient, whip_publish
from relay.synthetic import PatternTrack

from . import harness as h
from tests.tools.chromium import CHROMIUM, CHROMIUM_FLAGS
from .common import emit, env_info, percentile
from tests.tools.redis_server import RedisServer

log = logging.getLogger("bench.latency")

BASELINE = {
    "source": "issue 7 reference figures, this 2-core machine, same 720p30 VP8 1.5 Mbit/s publisher",
    "direct_p50_ms": 47,
    "direct_p95_ms": 50,
    "direct_note": "about 33 ms of the direct figure is aiortc's receiver holding each frame until the next frame's first packet",
    "naive_p95_ms_1_viewer": 98,
    "naive_join_aiortc_p50_ms": 94,
    "naive_join_aiortc_p95_ms": 99,
    "janus_p95_ms": 49,
    "targets": {
        "shelfcast_over_direct_p95_ms": 15,
        "join_aiortc_p95_ms": 100,
        "join_chromium_p95_ms": 200,
    },
}


# Runs before the watch page's own script: note when the first video frame is presented.
FIRST_FRAME_HOOK = """
window.__bench = { first: null, error: null };
document.addEventListener("DOMContentLoaded", () => {
  const video = document.getElementById("player") || document.getElementById("remote");  // watch / call page
  if (!video || !video.requestVideoFrameCallback) { window.__bench.error = "no rVFC"; return; }
  video.requestVideoFrameCallback((now) => { window.__bench.first = now; });
});
"""

JOIN_GAP_S = 0.7  # between joins: more than the room's keyframe coalescing window (0.5 s)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    await asyncio.wait_for(event.wait(), timeout)


LOAD: dict[str, dict[str, float]] = {}  # per variant: machine busy / foreign cores while recording
LATENCIES: dict[str, list[float]] = {}  # per variant: glass-to-glass ms of every recorded frame


async def record(probe: h.Probe, warmup_s: float, seconds: float, variant: str) -> list[h.Sample]:
    await _wait(probe.first_frame, 15)
    await asyncio.sleep(warmup_s)
    meter = h.MachineMeter()
    meter.start()
    probe.recording = True
    await asyncio.sleep(seconds)
    probe.recording = False
    LOAD[variant] = meter.stop()
    return list(probe.samples)


def summarise(prefix: str, samples: list[h.Sample], probe: h.Probe, metrics: dict[str, float]) -> None:
    values = h.latencies(samples)
    LATENCIES[prefix] = values
    s = h.stats(values)
    metrics[f"{prefix}_p50_ms"] = s["p50"]
    metrics[f"{prefix}_p95_ms"] = s["p95"]
    metrics[f"{prefix}_p99_ms"] = s["p99"]
    metrics[f"{prefix}_frames"] = s["n"]
    share, expected, _ = h.delivery(samples)
    metrics[f"{prefix}_frames_expected"] = expected
    metrics[f"{prefix}_unreadable_frames"] = probe.unreadable
    log.info("%s: %s (of %d frames expected, %d unreadable)", prefix, s, expected, probe.unreadable)


async def run_direct(warmup_s: float, seconds: float, metrics: dict[str, float]) -> None:
    video, audio = h.publisher_tracks()
    pub, sub, probe = await h.direct_pair(video, audio)
    try:
        samples = await record(probe, warmup_s, seconds, "direct")
        summarise("direct", samples, probe, metrics)
    finally:
        await probe.stop()
        await pub.close()
        await sub.close()


async def aiortc_joins(http: aiohttp.ClientSession, whep: str, count: int, token: str | None = None) -> list[float]:
    joins: list[float] = []
    for _ in range(count):
        await asyncio.sleep(JOIN_GAP_S)
        probe = h.Probe()
        started = time.monotonic()
        client: WebRtcClient | None = None
        try:
            client = await h.whep_play(http, whep, kinds=("video", "audio"), on_track=probe.on_track, token=token)
            await _wait(probe.first_frame, 10)
            assert probe.first_frame_at is not None
            joins.append((probe.first_frame_at - started) * 1000)
        except (asyncio.TimeoutError, h.WhipError, ConnectionError) as exc:
            log.warning("aiortc join failed: %r", exc)
        finally:
            await probe.stop()
            if client is not None:
                await client.close()
    return joins


async def chromium_joins(watch_url: str, count: int) -> tuple[list[float], list[float]]:
    """(from navigation start, from the WHEP POST) to the first presented frame, ms."""
    from playwright.async_api import async_playwright

    from_nav: list[float] = []
    from_whep: list[float] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            context = await browser.new_context()
            await context.add_init_script(FIRST_FRAME_HOOK)
            # One page load to warm the browser process (not counted).
            for i in range(count + 1):
                await asyncio.sleep(JOIN_GAP_S)
                page = await context.new_page()
                try:
                    await page.goto(watch_url)
                    await page.wait_for_function("window.__bench && window.__bench.first !== null", timeout=15000)
                    first, whep_start = await page.evaluate(
                        """() => {
                            const e = performance.getEntriesByType("resource").find((r) => r.name.includes("/whep/"));
                            return [window.__bench.first, e ? e.startTime : null];
                        }"""
                    )
                    if i > 0:
                        from_nav.append(first)
                        if whep_start is not None:
                            from_whep.append(first - whep_start)
                except Exception as exc:  # a failed join is reported by its absence, not fatal
                    log.warning("chromium join failed: %r", exc)
                finally:
                    await page.close(run_before_unload=True)
        finally:
            await browser.close()
    return from_nav, from_whep


def plot(latencies: dict[str, list[float]], path: Path) -> None:
    """Glass-to-glass latency CDF per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in latencies.items():
        if values:
            ordered = sorted(values)
            ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xlabel("glass-to-glass latency (ms)")
    ax.set_ylabel("share of frames")
    ax.set_title("720p30 VP8: direct aiortc vs shelfcast (overlay on) vs naive aiortc relay")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(values: list[float], q: float) -> float:
    return round(percentile(values, q), 1) if values else float("nan")


async def run_server_variant(
    prefix: str,
    server: h.ServerProcess,
    warmup_s: float,
    seconds: float,
    joins: int,
    browser_joins: int,
    metrics: dict[str, float],
    overlay: dict[str, Any],
) -> None:
    async with h.running(server), aiohttp.ClientSession() as http:
        ep = await h.create_room(http, server)
        if prefix == "shelfcast":
            overlay.update(await h.overlay_state(http, server, ep))
        video, audio = h.publisher_tracks()
        publisher = await whip_publish(http, ep.whip, ep.host_token or "", [video, audio], video_codec="video/VP8")
        viewer: WebRtcClient | None = None
        probe: h.Probe | None = None
        try:
            await publisher.wait_connected(15)
            viewer, probe = await h.probe_viewer(http, ep.whep)
            samples = await record(probe, warmup_s, seconds, prefix)
            summarise(prefix, samples, probe, metrics)
            if joins:
                values = await aiortc_joins(http, ep.whep, joins)
                jp = "join_aiortc" if prefix == "shelfcast" else f"{prefix}_join_aiortc"
                metrics[f"{jp}_p50_ms"] = _pct(values, 50)
                metrics[f"{jp}_p95_ms"] = _pct(values, 95)
                metrics[f"{jp}_n"] = len(values)
                log.info("%s aiortc joins: %s", prefix, [round(v) for v in values])
            if browser_joins and ep.watch:
                nav, whep = await chromium_joins(ep.watch, browser_joins)
                metrics["join_chromium_p50_ms"] = _pct(nav, 50)
                metrics["join_chromium_p95_ms"] = _pct(nav, 95)
                metrics["join_chromium_n"] = len(nav)
                metrics["join_chromium_from_whep_p50_ms"] = _pct(whep, 50)
                metrics["join_chromium_from_whep_p95_ms"] = _pct(whep, 95)
                log.info("chromium joins (from navigation): %s", [round(v) for v in nav])
        finally:
            if probe is not None:
                await probe.stop()
            if viewer is not None:
                await viewer.close()
            await publisher.close()


async def run_pk_host_to_host(warmup_s: float, seconds: float, metrics: dict[str, float]) -> None:
    """PK: host A's camera -> host B's studio (the raw host feed, not the composed picture)."""
    async with h.running(h.shelfcast_server()) as server, aiohttp.ClientSession() as http:
        room_a = await h.create_room(http, server, "Anna")
        room_b = await h.create_room(http, server, "Bo")
        video, audio = h.publisher_tracks()
        pub_a = await whip_publish(http, room_a.whip, room_a.host_token or "", [video, audio], video_codec="video/VP8")
        pub_b = await whip_publish(http, room_b.whip, room_b.host_token or "", [PatternTrack(640, 360)])
        viewer: WebRtcClient | None = None
        probe: h.Probe | None = None
        try:
            await pub_a.wait_connected(15)
            await pub_b.wait_connected(15)
            await asyncio.sleep(0.5)
            headers_a = {"Authorization": f"Bearer {room_a.host_token}"}
            async with http.post(f"{server.base}/api/rooms/{room_a.room}/pk", json={"room": room_b.room, "duration_s": 300}, headers=headers_a) as resp:
                pk = await resp.json()
            async with http.post(f"{server.base}/api/pk/{pk['id']}/accept", headers={"Authorization": f"Bearer {room_b.host_token}"}) as resp:
                resp.raise_for_status()
            viewer, probe = await h.probe_viewer(http, room_a.whep + "?feed=host", kinds=("video",), token=room_b.host_token)
            samples = await record(probe, warmup_s, seconds, "pk_host_to_host")
            summarise("pk_host_to_host", samples, probe, metrics)
        finally:
            if probe is not None:
                await probe.stop()
            if viewer is not None:
                await viewer.close()
            await pub_a.close()
            await pub_b.close()


async def run_call_joins(joins: int, browser_joins: int, metrics: dict[str, float]) -> None:
    """1v1: the buyer opens the call -> first decoded frame of the seller (aiortc, Chromium)."""
    async with h.running(h.shelfcast_server()) as server, aiohttp.ClientSession() as http:
        call = await h.create_room(http, server, "call", mode="call")
        video, audio = h.publisher_tracks()
        seller = await whip_publish(http, call.whip, call.tokens["seller"], [video, audio], video_codec="video/VP8")
        try:
            await seller.wait_connected(15)
            values = await aiortc_joins(http, call.whep, joins, token=call.tokens["buyer"])
            metrics["call_join_aiortc_p50_ms"] = _pct(values, 50)
            metrics["call_join_aiortc_p95_ms"] = _pct(values, 95)
            metrics["call_join_aiortc_n"] = len(values)
            if browser_joins:
                nav, whep = await chromium_joins(call.links["buyer"], browser_joins)
                metrics["call_join_chromium_p50_ms"] = _pct(nav, 50)
                metrics["call_join_chromium_p95_ms"] = _pct(nav, 95)
                metrics["call_join_chromium_n"] = len(nav)
        finally:
            await seller.close()


async def run_cascade(warmup_s: float, seconds: float, metrics: dict[str, float]) -> None:
    """One cascade hop: two nodes sharing a Redis; the host publishes to the origin, one probe
    watches through the origin and one through the other node (which pulls the encoded rung once).
    Both record the same frames at the same time: the difference is what the hop adds."""
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, RedisServer(Path(tmp)) as redis:
        async with (
            h.running(h.shelfcast_server(redis_url=redis.url)) as origin,
            h.running(h.shelfcast_server(redis_url=redis.url)) as edge,
            aiohttp.ClientSession() as http,
        ):
            ep = await h.create_room(http, origin)
            video, audio = h.publisher_tracks()
            publisher = await whip_publish(http, ep.whip, ep.host_token or "", [video, audio], video_codec="video/VP8")
            clients: list[tuple[WebRtcClient, h.Probe]] = []
            try:
                await publisher.wait_connected(15)
                for whep in (ep.whep, ep.whep.replace(origin.base, edge.base)):
                    clients.append(await h.probe_viewer(http, whep))
                at_origin, at_edge = await asyncio.gather(
                    *(record(probe, warmup_s, seconds, name) for (_, probe), name in zip(clients, ("cascade_origin", "cascade_edge")))
                )
                summarise("cascade_origin", at_origin, clients[0][1], metrics)
                summarise("cascade_edge", at_edge, clients[1][1], metrics)
                for q in ("p50", "p95"):
                    metrics[f"cascade_hop_{q}_ms"] = round(metrics[f"cascade_edge_{q}_ms"] - metrics[f"cascade_origin_{q}_ms"], 2)
            finally:
                for client, probe in clients:
                    await probe.stop()
                    await client.close()
                await publisher.close()


async def run(quick: bool) -> dict[str, Any]:
    h.pin_aiortc_vp8_bitrate()
    warmup_s, seconds = (2.0, 6.0) if quick else (3.0, 20.0)
    joins, browser_joins = (6, 4) if quick else (20, 20)
    metrics: dict[str, float] = {}
    started = time.monotonic()
    await run_direct(warmup_s, seconds, metrics)
    overlay: dict[str, Any] = {}
    await run_server_variant("shelfcast", h.shelfcast_server(), warmup_s, seconds, joins, browser_joins, metrics, overlay)
    await run_server_variant("naive", h.naive_server(), warmup_s, seconds, joins, 0, metrics, {})
    await run_pk_host_to_host(warmup_s, seconds, metrics)
    await run_call_joins(joins, browser_joins, metrics)
    await run_cascade(warmup_s, seconds, metrics)
    if "shelfcast_p95_ms" in metrics and "direct_p95_ms" in metrics:
        metrics["shelfcast_over_direct_p95_ms"] = round(metrics["shelfcast_p95_ms"] - metrics["direct_p95_ms"], 2)
        metrics["shelfcast_over_direct_p50_ms"] = round(metrics["shelfcast_p50_ms"] - metrics["direct_p50_ms"], 2)
    env = env_info(
        quick=quick,
        **{"overlay_on": False, **overlay},
        viewers_per_variant=1,
        record_s=seconds,
        warmup_s=warmup_s,
        join_gap_s=JOIN_GAP_S,
        chromium=CHROMIUM,
        load_while_recording=LOAD,
        duration_s=round(time.monotonic() - started, 1),
        **h.media_env(),
    )
    return {"metrics": metrics, "env": env}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run for CI")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = asyncio.run(run(args.quick))
    name = "latency"
    results_dir = h.RESULTS_QUICK if args.quick else h.RESULTS
    plot(LATENCIES, results_dir / "latency_cdf.png")
    emit(name, h.clean(result["metrics"]), BASELINE, h.clean(result["env"]), results_dir=results_dir)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
