"""Adaptive bitrate under a capped-then-released link, against plain aiortc in the same run.

One viewer watches through the userspace link emulator (relay/linkemu.py): open, then capped at
400 kbit/s, then open again. For shelfcast: time to switch down (cap -> first decoded frame on a lower
rung), total freeze (sum of gaps between decoded frames longer than 200 ms), time to climb back
(release -> first decoded frame on the top rung), switches per minute in steady state (second half of
each phase). For the naive aiortc relay (one encoder per viewer that follows REMB): freeze and
delivered frame rate under the same cap.

    python -m benchmarks.abr [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from relay.client import WebRtcClient, whep_play, whip_publish
from relay.linkemu import LinkProfile
from relay.synthetic import PatternTrack

from . import harness as h
from .common import emit, env_info

OPEN = LinkProfile(delay_ms=20)
CAPPED = LinkProfile(rate_bps=400_000, delay_ms=20)
SOURCE = (640, 360)  # rungs 360p (500 kbit/s, does not fit the cap) and 180p (150 kbit/s, fits)
FREEZE_GAP_S = 0.2
VERBOSE = False
TARGETS = {"down_s": 2.0, "freeze_s": 0.5, "up_s": 10.0, "switches_per_min_steady": 1.0}


@dataclass
class Viewer:
    frames: list[tuple[float, int]] = field(default_factory=list)  # (decode time, height)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self.tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self.frames.append((time.monotonic(), frame.height))  # type: ignore[attr-defined]
        except MediaStreamError:
            pass

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def freeze_s(self, start: float, end: float) -> float:
        times = [t for t, _ in self.frames if start <= t <= end]
        gaps = [b - a for a, b in zip([start] + times, times + [end])]
        return sum(g for g in gaps if g > FREEZE_GAP_S)

    def gaps(self, start: float, end: float) -> list[tuple[float, float]]:
        """(offset from start, length) of every freeze."""
        times = [t for t, _ in self.frames if start <= t <= end]
        return [(a - start, b - a) for a, b in zip([start] + times, times + [end]) if b - a > FREEZE_GAP_S]

    def fps(self, start: float, end: float) -> float:
        return sum(1 for t, _ in self.frames if start <= t <= end) / max(end - start, 1e-9)

    def first(self, after: float, predicate) -> float | None:  # type: ignore[no-untyped-def]
        return next((t - after for t, height in self.frames if t >= after and predicate(height)), None)


async def rung_history(http: aiohttp.ClientSession, base: str, room: str, until: float, out: list[tuple[float, str]]) -> None:
    while time.monotonic() < until:
        async with http.get(f"{base}/api/rooms/{room}/viewers", headers={"Authorization": f"Bearer {h.ADMIN_KEY}"}) as resp:
            body = await resp.json()
        for viewer in body.get("viewers", []):
            out.append((time.monotonic(), str(viewer["rung"])))
        await asyncio.sleep(0.25)


def switches(history: list[tuple[float, str]], start: float, end: float) -> int:
    rungs = [rung for t, rung in history if start <= t <= end]
    return sum(1 for a, b in zip(rungs, rungs[1:]) if a != b)


async def run_variant(server: h.ServerProcess, warm_s: float, phase_s: float) -> dict[str, float]:
    metrics: dict[str, float] = {}
    async with h.running(server), aiohttp.ClientSession() as http:
        ep = await h.create_room(http, server, "abr")
        publisher = await whip_publish(http, ep.whip, ep.host_token or "", [PatternTrack(*SOURCE, grain=True)])
        viewer = Viewer()
        client: WebRtcClient = await whep_play(http, ep.whep, on_track=viewer.on_track, kinds=("video",), link=OPEN)
        history: list[tuple[float, str]] = []
        try:
            await client.wait_connected()
            await asyncio.sleep(warm_s)
            started = time.monotonic()
            poller = (
                asyncio.create_task(rung_history(http, server.base, ep.room, started + 2 * phase_s, history))
                if server.name == "shelfcast"
                else None
            )
            assert client.link is not None
            capped_at = time.monotonic()
            client.link.set_downstream(CAPPED)
            await asyncio.sleep(phase_s)
            released_at = time.monotonic()
            client.link.set_downstream(OPEN)
            await asyncio.sleep(phase_s)
            ended = time.monotonic()
            if poller is not None:
                await poller
        finally:
            await client.close()
            await viewer.stop()
            await publisher.close()
    top = SOURCE[1]
    metrics["freeze_s"] = round(viewer.freeze_s(capped_at, ended), 3)
    metrics["freeze_capped_s"] = round(viewer.freeze_s(capped_at, released_at), 3)
    freezes = viewer.gaps(capped_at, ended)
    metrics["freeze_events"] = len(freezes)
    metrics["longest_freeze_s"] = round(max((g for _, g in freezes), default=0.0), 3)
    if VERBOSE:
        print(server.name, "freezes (s after cap, length):", [(round(a, 2), round(g, 2)) for a, g in freezes])
        print(server.name, "rungs:", [(round(t - capped_at, 2), r) for t, r in history][::4])
    metrics["fps_capped"] = round(viewer.fps(capped_at, released_at), 1)
    metrics["fps_released"] = round(viewer.fps(released_at, ended), 1)
    if server.name == "shelfcast":
        down = viewer.first(capped_at, lambda height: height < top)
        up = viewer.first(released_at, lambda height: height == top)
        metrics["down_s"] = round(down, 2) if down is not None else float("nan")
        metrics["up_s"] = round(up, 2) if up is not None else float("nan")
        half = phase_s / 2
        steady = switches(history, capped_at + half, released_at) + switches(history, released_at + half, ended)
        metrics["switches_per_min_steady"] = round(steady / (2 * half / 60), 2)
        metrics["switches_total"] = switches(history, capped_at, ended)
    return metrics


async def run(quick: bool) -> tuple[dict[str, float], dict[str, Any]]:
    warm_s, phase_s = (6.0, 20.0) if quick else (8.0, 40.0)
    metrics: dict[str, float] = {}
    for name, server in (("shelfcast", h.shelfcast_server()), ("naive", h.naive_server())):
        for key, value in (await run_variant(server, warm_s, phase_s)).items():
            metrics[f"{name}_{key}"] = value
    env = env_info(quick=quick, source=f"{SOURCE[0]}x{SOURCE[1]} 30 fps with grain", cap_bps=CAPPED.rate_bps, phase_s=phase_s)
    return metrics, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abr", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (CI)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each freeze and the rung history")
    args = parser.parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose
    metrics, env = asyncio.run(run(args.quick))
    baseline = {"targets": TARGETS, "naive": "aiortc MediaRelay + one VP8 encoder per viewer following REMB, same run"}
    emit("abr", h.clean(metrics), baseline, h.clean(env), results_dir=h.RESULTS_QUICK if args.quick else h.RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
