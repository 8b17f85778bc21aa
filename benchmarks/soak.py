"""A long show with viewers coming and going: does anything the server holds grow with time?

    python -m benchmarks.soak [--quick] [--viewers N] [--seconds S]

One shelfcast server (its own process) and one 720p host; ``--viewers`` cheap load viewers
(benchmarks.loadgen: real WHEP, ICE, DTLS-SRTP) join, then for ``--seconds`` a share of them leaves
and as many new ones join every churn period, as shoppers do. Every sample reads the server's RSS,
threads and open file descriptors (psutil) and its event loop's live tasks (``/metrics``).

What a leak looks like, and what the JSON line reports for it:
- RSS climbing through the run: ``rss_growth_mb_per_min`` (least-squares slope after the first
  quarter, when allocator pools and caches have filled);
- sessions that do not let go: the same room measured with the host alone after a first audience
  has come and gone (what is opened once and kept is not a leak) and again after the soak's last
  viewer has left, ``fds_leaked`` / ``threads_leaked`` / ``tasks_leaked``
  (after minus before), and the maxima during the run against the start;
- the show itself degrading: frames on time for the load viewers over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil

from . import harness as h
from .common import emit, env_info
from .loadgen import CheapLoadWorker, _RoomProbe

log = logging.getLogger("bench.soak")

TARGETS = {"rss_growth_mb_per_min": 1.0, "fds_leaked": 0, "threads_leaked": 0, "tasks_leaked": 0}
LOAD_WORKERS = 2
IDLE_SETTLE_S = 5.0  # after the last viewer left: the server closes its sessions


@dataclass(frozen=True)
class Sample:
    at_s: float  # since the soak started
    viewers: int  # the server's own count
    rss_mb: float
    threads: int
    fds: int
    tasks: int


async def loop_tasks(http: aiohttp.ClientSession, base: str) -> int:
    """The server's live asyncio tasks, as its /metrics says."""
    async with http.get(f"{base}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("shelfcast_event_loop_tasks "):
                return int(float(line.split()[1]))
    raise RuntimeError("/metrics has no shelfcast_event_loop_tasks")


async def sample(proc: psutil.Process, http: aiohttp.ClientSession, base: str, room: _RoomProbe, started: float) -> Sample:
    with proc.oneshot():
        rss, threads, fds = proc.memory_info().rss / 1e6, proc.num_threads(), proc.num_fds()
    return Sample(round(time.monotonic() - started, 1), await room.viewers(), round(rss, 1), threads, fds,
                  await loop_tasks(http, base))


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute (0 with fewer than two points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 60


def on_time_share(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    on_time = sum(a["frames_on_time"] - b["frames_on_time"] for a, b in zip(after, before))
    missed = sum(a["frames_late"] + a["frames_incomplete"] - b["frames_late"] - b["frames_incomplete"]
                 for a, b in zip(after, before))
    return round(on_time / max(1, on_time + missed), 4)


async def soak(viewers: int, seconds: float, churn_every_s: float, churn_share: float,
               sample_every_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    server = h.shelfcast_server()
    async with h.running(server), aiohttp.ClientSession() as http:
        ep = await h.create_room(http, server)
        publisher, _ = await h.publish(http, ep, encoded=True)
        room = _RoomProbe(http, server.base, ep.room)
        proc = psutil.Process(server.pid)
        meter = h.CpuMeter(server.pid)
        pool = [CheapLoadWorker(ep.whep) for _ in range(LOAD_WORKERS)]
        started = time.monotonic()
        try:
            await publisher.wait_connected(15)
            per = [viewers // LOAD_WORKERS + (1 if i < viewers % LOAD_WORKERS else 0) for i in range(LOAD_WORKERS)]
            # A first audience comes and goes before the baseline: what the server opens once and
            # keeps (encoders' threads, the default executor's pool, allocator arenas) is not a leak.
            failed = sum(await asyncio.gather(*(w.add(n) for w, n in zip(pool, per))))
            await asyncio.sleep(3)
            await asyncio.gather(*(w.drop(n) for w, n in zip(pool, per)))
            await room.wait_viewers(0, 30)
            await asyncio.sleep(IDLE_SETTLE_S)
            idle_before = await sample(proc, http, server.base, room, started)
            failed += sum(await asyncio.gather(*(w.add(n) for w, n in zip(pool, per))))
            joins, leaves = 2 * viewers, viewers
            await asyncio.sleep(3)
            first = await sample(proc, http, server.base, room, started)
            stats_before = list(await asyncio.gather(*(w.stats() for w in pool)))
            cpu_before, soak_started = meter.cpu_s(), time.monotonic()
            samples = [first]
            next_churn = soak_started + churn_every_s
            next_sample = soak_started + sample_every_s
            while (now := time.monotonic()) < soak_started + seconds:
                if churn_share > 0 and now >= next_churn:
                    next_churn += churn_every_s
                    for worker, n in zip(pool, per):
                        moving = max(1, round(n * churn_share))
                        await worker.drop(moving)
                        failed += await worker.add(moving)
                        joins, leaves = joins + moving, leaves + moving
                if now >= next_sample:
                    next_sample += sample_every_s
                    samples.append(await sample(proc, http, server.base, room, started))
                    log.info("%s", samples[-1])
                wake = min(next_churn, next_sample) if churn_share > 0 else next_sample
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
            stats_after = list(await asyncio.gather(*(w.stats() for w in pool)))
            cores = (meter.cpu_s() - cpu_before) / (time.monotonic() - soak_started)
            last = await sample(proc, http, server.base, room, started)
            samples.append(last)
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in pool))
            pool = []
            left = await room.wait_viewers(0, 30)
            await asyncio.sleep(IDLE_SETTLE_S)
            idle_after = await sample(proc, http, server.base, room, started)
        finally:
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in pool))
            await publisher.close()
    settled = [s for s in samples if s.at_s >= first.at_s + seconds / 4]
    metrics: dict[str, Any] = {
        "viewers": viewers,
        "soak_s": round(seconds),
        "joins": joins,
        "leaves": leaves,
        "failed_joins": failed,
        "viewers_left_at_end": left,
        "server_cores": round(cores, 3),
        "load_on_time_share": on_time_share(stats_before, stats_after),
        "rss_mb_start": first.rss_mb,
        "rss_mb_end": last.rss_mb,
        "rss_mb_max": max(s.rss_mb for s in samples),
        "rss_growth_mb_per_min": round(slope_per_min([(s.at_s, s.rss_mb) for s in settled]), 3),
        "threads_start": first.threads,
        "threads_max": max(s.threads for s in samples),
        "fds_start": first.fds,
        "fds_max": max(s.fds for s in samples),
        "tasks_start": first.tasks,
        "tasks_max": max(s.tasks for s in samples),
        "fds_leaked": idle_after.fds - idle_before.fds,
        "threads_leaked": idle_after.threads - idle_before.threads,
        "tasks_leaked": idle_after.tasks - idle_before.tasks,
        "rss_mb_idle_before": idle_before.rss_mb,
        "rss_mb_idle_after": idle_after.rss_mb,
    }
    env = {
        "churn": f"every {churn_every_s:g} s, {churn_share:.0%} of the viewers leave and as many join",
        "sample_every_s": sample_every_s,
        "idle_before": idle_before.__dict__,
        "idle_after": idle_after.__dict__,
        "samples": [s.__dict__ for s in samples],
    }
    return metrics, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 viewers for 60 s (CI)")
    parser.add_argument("--viewers", type=int, help="load viewers (default 200; quick 50)")
    parser.add_argument("--seconds", type=float, help="soak length (default 600; quick 60)")
    parser.add_argument("--churn", type=float, default=0.1,
                        help="share of the viewers replaced every churn period (0: the same viewers throughout)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    viewers = args.viewers or (50 if args.quick else 200)
    seconds = args.seconds or (60.0 if args.quick else 600.0)
    churn_every_s, sample_every_s = (5.0, 5.0) if args.quick else (10.0, 15.0)
    h.pin_aiortc_vp8_bitrate()
    started = time.monotonic()
    metrics, env = asyncio.run(soak(viewers, seconds, churn_every_s, args.churn, sample_every_s))
    env = env_info(quick=args.quick, duration_s=round(time.monotonic() - started, 1),
                   host="720p30 VP8 1.5 Mbit/s + Opus (aiortc, this process)",
                   load=f"benchmarks.loadgen cheap viewers over {LOAD_WORKERS} processes", **env)
    emit("soak", h.clean(metrics), {"targets": TARGETS}, h.clean(env),
         results_dir=h.RESULTS_QUICK if args.quick else h.RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
