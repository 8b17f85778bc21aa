"""Fan-out cost: server CPU per viewer-second and RSS per viewer, shelfcast vs its previous egress
vs a naive aiortc relay.

    python -m benchmarks.fanout [--quick] [--workers N]

The server runs as its own process (``python -m signaling.cli serve``, or
``python -m benchmarks.naive_relay``); its CPU time (user + system, all threads) and RSS are read
from /proc through psutil, never wall time. A synthetic 720p30 VP8 1.5 Mbit/s + Opus publisher and a
few *sampled* viewers (aiortc, decode every frame and read the capture-time code) live in this
process; the *load* viewers live in two worker processes (benchmarks/loadgen.py): real WHEP sessions
(ICE, DTLS-SRTP, so the server does its whole per-viewer work) whose media a native receiver counts
from the clear RTP headers, answering with RTCP receiver reports, REMB and ICE consent like a browser.

Viewer counts are stepped up (sampled viewers only, then 10, 50, 100, 250, 500, 1000 for shelfcast,
stopping when the server refuses more (503 node_busy); 10, 50 for the same server with
``--egress aiortc``, the previous path, as the same-run baseline; 1, 2, 4 for the naive relay, which
encodes once per viewer); at each step the server's CPU rate and RSS are measured over a window and
the sampled viewers count frames decoded within 200 ms of capture.
Per-viewer cost is the slope of a least-squares line through (viewers, cores) over the steps where
the sampled viewers got >= 90 % of frames on time (a starved server sends less and looks cheaper).
The first step has only the sampled viewers (the encoders run from the first viewer on), so the
room's own decode + encode (a fixed cost) is not charged to viewers; ``*_cpu_per_viewer_s_at_N``
(cores above that first step, per added viewer) is reported next to it. Each step also records the
CPU of the load workers, of this process, and of everything else on the machine (``foreign``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from relay.client import WebRtcClient

from . import harness as h
from tests.tools.redis_server import RedisServer
from .common import emit, env_info
from .loadgen import CheapLoadWorker

log = logging.getLogger("bench.fanout")

BASELINE = {
    "source": "issue 7 reference figures, this 2-core machine, same 720p30 VP8 1.5 Mbit/s publisher",
    "naive_cpu_core_s_per_viewer_s": [0.25, 0.31],
    "naive_rss_mb_per_viewer": 85,
    "naive_saturates_2_cores_at_viewers": 8,
    "janus_cpu_core_s_per_viewer_s": [0.0042, 0.0051],
    "janus_rss_mb_per_viewer": 0.5,
    "targets": {
        "shelfcast_cpu_core_s_per_viewer_s": 0.0025,
        "naive_over_shelfcast_cpu_ratio": 100,
        "shelfcast_on_time_share_at_200": 0.99,
        "shelfcast_rss_mb_per_viewer": 1.0,
    },
}

ON_TIME_MS = 200.0


def slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    a, _ = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a)


class Step(dict):  # type: ignore[type-arg]
    """One measured point: viewers, cores, rss_mb, on_time, p95_ms, machine_busy."""


async def measure_server(
    prefix: str,
    server: h.ServerProcess,
    levels: list[int],
    sampled: int,
    window_s: float,
    settle_s: float,
    workers: int,
    cheap: bool = True,
) -> list[Step]:
    steps: list[Step] = []
    load: list[h.LoadWorker | CheapLoadWorker] = []
    probes: list[tuple[WebRtcClient, h.Probe]] = []
    async with h.running(server), aiohttp.ClientSession() as http:
        ep = await h.create_room(http, server)
        publisher, video = await h.publish(http, ep, encoded=True)
        meter = h.CpuMeter(server.pid)
        try:
            await publisher.wait_connected(15)
            await asyncio.sleep(settle_s)
            cores, rss = await meter.measure(window_s)
            steps.append(Step(viewers=0, cores=cores, rss_mb=rss, on_time=float("nan"), p95_ms=float("nan"), machine_busy=float("nan")))
            log.info("%s: publisher only: %.3f cores, %.1f MB", prefix, cores, rss)
            for _ in range(sampled):
                client, probe = await h.probe_viewer(http, ep.whep)
                probes.append((client, probe))
            for _, probe in probes:
                await asyncio.wait_for(probe.first_frame.wait(), 15)
            load = [CheapLoadWorker(ep.whep) if cheap else h.LoadWorker(ep.whep) for _ in range(workers)]
            failed = 0
            # The first step has only the sampled viewers: the encoders run from the first viewer on,
            # so this, not the publisher-only point, is the fixed cost per-viewer costs sit on.
            for level in [sampled, *levels]:
                want = max(0, level - sampled - sum(w.viewers for w in load))
                per = [want // workers + (1 if i < want % workers else 0) for i in range(workers)]
                started = time.monotonic()
                results = await asyncio.gather(*(w.add(n) for w, n in zip(load, per)))
                failed += sum(results)
                viewers = sampled + sum(w.viewers for w in load)
                if steps and viewers <= steps[-1]["viewers"]:
                    log.info("%s: no more viewers joined (the server refuses them): stop", prefix)
                    break
                log.info("%s: %d viewers connected in %.1f s (%d failed so far)", prefix, viewers, time.monotonic() - started, failed)
                await asyncio.sleep(settle_s)
                for _, probe in probes:
                    probe.samples.clear()
                    probe.recording = True
                machine = h.MachineMeter()
                machine.start()
                window = h.CpuWindow(meter, {"load": [w.proc.pid for w in load], "driver": [os.getpid()]})
                p0 = sum(await asyncio.gather(*(w.packets() for w in load)))
                frames0 = await _load_frames(load)
                per_process_0 = meter.per_process_cpu_s()
                used = await window.measure(window_s)
                process_cores = [(b - a) / window_s for a, b in zip(per_process_0, meter.per_process_cpu_s())]
                p1 = sum(await asyncio.gather(*(w.packets() for w in load)))
                frames1 = await _load_frames(load)
                load_on, load_not = (b - a for a, b in zip(frames0, frames1))
                load_viewers = max(1, sum(w.viewers for w in load))
                pkt_rate = (p1 - p0) / window_s / load_viewers
                cores, rss = used["server_cores"], used["rss_mb"]
                load_info = machine.stop()
                busy = load_info["machine_busy_cores"] / (psutil.cpu_count() or 2)
                for _, probe in probes:
                    probe.recording = False
                shares = [h.delivery(p.samples, ON_TIME_MS)[0] for _, p in probes]
                lat = [s.latency_ms for _, p in probes for s in p.samples]
                step = Step(
                    viewers=viewers,
                    cores=cores,
                    rss_mb=rss,
                    on_time=min(shares) if shares else float("nan"),
                    p95_ms=h.stats(lat)["p95"],
                    machine_busy=busy,
                    failed_joins=failed,
                    server_loop_cores=used["server_loop_cores"],
                    load_worker_cores=used["load_cores"],
                    driver_cores=used["driver_cores"],
                    foreign_cores=load_info["foreign_cores"],
                    load_viewer_pkt_per_s=pkt_rate,
                    load_on_time=load_on / (load_on + load_not) if load_on + load_not else float("nan"),
                    process_cores=[round(c, 3) for c in process_cores],  # supervisor first, then each worker
                )
                steps.append(step)
                log.info("%s: %s", prefix, {k: round(v, 4) if isinstance(v, float) else v for k, v in step.items()})
                if _collapsed(steps, sampled):
                    log.info("%s: delivery collapsed at %d viewers: no larger step", prefix, viewers)
                    break
        finally:
            await asyncio.gather(*(asyncio.to_thread(worker.stop) for worker in load))
            for client, probe in probes:
                await probe.stop()
                await client.close()
            await publisher.close()
    return steps


async def _load_frames(load: list[h.LoadWorker | CheapLoadWorker]) -> tuple[int, int]:
    """(frames on time, frames late or incomplete) so far over every cheap load viewer: lateness is
    a frame's transit above the least transit that viewer saw (see benchmarks/loadgen.py)."""
    stats = await asyncio.gather(*(w.stats() for w in load if isinstance(w, CheapLoadWorker)))
    return (sum(s["frames_on_time"] for s in stats),
            sum(s["frames_late"] + s["frames_incomplete"] for s in stats))


SERVED_ON_TIME = 0.99  # the bar: a step is served when >= 99 % of frames are on time
HEALTHY_ON_TIME = 0.9  # a step counts for the per-viewer slope only if the server kept up
COLLAPSED_ON_TIME = 0.5  # below this (or half the light-load packet rate) a larger step is pointless


def _collapsed(steps: list[Step], sampled: int) -> bool:
    loaded = [s for s in steps[1:] if s["viewers"] > sampled]
    if not loaded:
        return False
    last, first = loaded[-1], loaded[0]
    # The sampled viewers decode in the driver, which shares the two cores with everything else:
    # late there while every load viewer still gets its frames on time says more about the driver
    # than about the server, so a larger step is still measured.
    late = last["on_time"] < COLLAPSED_ON_TIME and not last.get("load_on_time", 0.0) >= SERVED_ON_TIME
    return late or last["load_viewer_pkt_per_s"] < 0.5 * first["load_viewer_pkt_per_s"]


def summarise(prefix: str, steps: list[Step], metrics: dict[str, float]) -> None:
    idle = steps[0]["cores"]
    base = steps[1]  # only the sampled viewers: decode + encoders running
    loaded = steps[1:]
    xs = [s["viewers"] for s in loaded]
    # A starved server sends less and so spends less per viewer: only steps where the sampled
    # viewers got >= 90 % of frames on time count; with fewer than two, the figure is missing.
    healthy = [s for s in loaded if s["on_time"] >= HEALTHY_ON_TIME]
    metrics[f"{prefix}_cpu_core_s_per_viewer_s"] = (
        round(slope([s["viewers"] for s in healthy], [s["cores"] for s in healthy]), 5) if len(healthy) > 1 else float("nan")
    )
    metrics[f"{prefix}_cpu_slope_healthy_steps"] = len(healthy)
    metrics[f"{prefix}_cpu_core_s_per_viewer_s_all_steps"] = round(slope(xs, [s["cores"] for s in loaded]), 5)
    metrics[f"{prefix}_rss_mb_per_viewer"] = round(slope(xs, [s["rss_mb"] for s in loaded]), 3)
    metrics[f"{prefix}_cpu_cores_publisher_only"] = round(idle, 3)
    for s in loaded:
        n = s["viewers"]
        metrics[f"{prefix}_cpu_cores_at_{n}"] = round(s["cores"], 3)
        if n > base["viewers"]:
            metrics[f"{prefix}_cpu_per_viewer_s_at_{n}"] = round((s["cores"] - base["cores"]) / (n - base["viewers"]), 5)
        metrics[f"{prefix}_rss_mb_at_{n}"] = round(s["rss_mb"], 1)
        metrics[f"{prefix}_on_time_share_at_{n}"] = round(s["on_time"], 4)
        if s.get("load_on_time") == s.get("load_on_time"):  # not NaN: cheap load viewers at this step
            metrics[f"{prefix}_load_on_time_share_at_{n}"] = round(s["load_on_time"], 4)
        metrics[f"{prefix}_sampled_p95_ms_at_{n}"] = s["p95_ms"]
        metrics[f"{prefix}_machine_busy_at_{n}"] = round(s["machine_busy"], 3)
        metrics[f"{prefix}_event_loop_cores_at_{n}"] = round(s["server_loop_cores"], 3)
        metrics[f"{prefix}_foreign_cores_at_{n}"] = round(s["foreign_cores"], 3)
        metrics[f"{prefix}_load_viewer_pkt_per_s_at_{n}"] = round(s["load_viewer_pkt_per_s"], 1)
    metrics[f"{prefix}_max_viewers"] = steps[-1]["viewers"]
    metrics[f"{prefix}_largest_step_99_on_time"] = max(
        (s["viewers"] for s in loaded
         if s["on_time"] >= SERVED_ON_TIME and not s.get("load_on_time", 1.0) < SERVED_ON_TIME),
        default=0)
    metrics[f"{prefix}_failed_joins"] = steps[-1].get("failed_joins", 0)


def plot(steps: dict[str, list[Step]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, marker in (("shelfcast", "o"), ("aiortc_egress", "^"), ("naive", "s")):
        data = steps.get(name)
        if not data:
            continue
        xs = [s["viewers"] for s in data]
        ax1.plot(xs, [s["cores"] for s in data], marker=marker, label=name)
        base = data[1]
        later = [s for s in data[2:]]
        per = [(s["cores"] - base["cores"]) / (s["viewers"] - base["viewers"]) for s in later]
        ax2.plot([s["viewers"] for s in later], per, marker=marker, label=name)
    ax1.axhline(psutil.cpu_count() or 2, color="grey", ls=":", lw=1, label="all cores")
    ax1.set_xlabel("viewers")
    ax1.set_ylabel("server CPU (cores)")
    ax1.set_title("Server CPU vs viewers (720p30 VP8 + Opus)")
    ax1.legend()
    ax2.axhline(BASELINE["targets"]["shelfcast_cpu_core_s_per_viewer_s"], color="green", ls="--", lw=1, label="target 0.0025")
    ax2.set_yscale("log")
    ax2.set_xscale("log")
    ax2.set_xlabel("viewers")
    ax2.set_ylabel("core-s per added viewer-s")
    ax2.set_title("Per-viewer CPU")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def run(quick: bool) -> tuple[dict[str, float], dict[str, Any], dict[str, list[Step]]]:
    h.pin_aiortc_vp8_bitrate()
    if quick:
        shelf_levels, base_levels, naive_levels, window_s, settle_s, sampled = [10, 30], [10, 30], [2], 4.0, 2.0, 1
    else:
        shelf_levels, base_levels, naive_levels, window_s, settle_s, sampled = (
            [10, 50, 100, 250, 500, 1000], [10, 50], [2, 4], 10.0, 3.0, 2)
    started = time.monotonic()
    metrics: dict[str, float] = {}
    steps: dict[str, list[Step]] = {}
    steps["shelfcast"] = await measure_server("shelfcast", h.shelfcast_server(), shelf_levels, sampled, window_s, settle_s, workers=2)
    summarise("shelfcast", steps["shelfcast"], metrics)
    metrics["shelfcast_viewers_served"], _ = viewers_served(steps["shelfcast"], sampled)
    # The same server with the previous egress (every viewer's aiortc sender packetizing for itself),
    # at small counts, in this run: what the lean egress saves on this machine today.
    steps["aiortc_egress"] = await measure_server("aiortc_egress", h.shelfcast_server(egress="aiortc"), base_levels, sampled,
                                                  window_s, settle_s, workers=2)
    summarise("aiortc_egress", steps["aiortc_egress"], metrics)
    lean, old = metrics["shelfcast_cpu_core_s_per_viewer_s_all_steps"], metrics["aiortc_egress_cpu_core_s_per_viewer_s_all_steps"]
    metrics["aiortc_egress_over_shelfcast_cpu_ratio"] = round(old / lean, 2) if lean > 0 else float("nan")
    steps["naive"] = await measure_server("naive", h.naive_server(), naive_levels, 1, window_s, settle_s, workers=1)
    summarise("naive", steps["naive"], metrics)
    s, n = metrics["shelfcast_cpu_core_s_per_viewer_s"], metrics["naive_cpu_core_s_per_viewer_s"]
    metrics["naive_over_shelfcast_cpu_ratio"] = round(n / s, 1) if s > 0 else float("nan")  # NaN stays NaN
    # Over every loaded step, healthy or not: always defined (quick runs have three steps, and one
    # starved by the shared machine leaves the healthy slope without a second point).
    s_all, n_all = metrics["shelfcast_cpu_core_s_per_viewer_s_all_steps"], metrics["naive_cpu_core_s_per_viewer_s_all_steps"]
    metrics["naive_over_shelfcast_cpu_ratio_all_steps"] = round(n_all / s_all, 1) if s_all > 0 else float("nan")
    # At the largest step measured (a full run stops where delivery collapses, before 1000).
    metrics["shelfcast_on_time_share_at_max"] = round(steps["shelfcast"][-1]["on_time"], 4)
    env = env_info(
        quick=quick,
        overlay_on=False,
        rung="top (720p) with audio",
        sampled_viewers=sampled,
        window_s=window_s,
        settle_s=settle_s,
        on_time_ms=ON_TIME_MS,
        load_viewers="benchmarks/loadgen.py: WHEP sessions negotiated by aiortc (ICE, DTLS-SRTP), then read natively: "
                     "clear RTP headers counted, RTCP receiver reports + REMB and ICE consent kept up; 2 worker processes, no GRO",
        cpu_method="psutil cpu_times (user+system, all threads) of the server process over each window",
        per_viewer_method="least-squares slope of cores vs viewers, publisher-only point included",
        duration_s=round(time.monotonic() - started, 1),
        **h.media_env(),
    )
    return metrics, env, steps


def viewers_served(steps: list[Step], sampled: int) -> tuple[int, float]:
    """(most viewers served in full, most packets/s delivered to load viewers at any step). In full:
    the sampled viewers got >= 90 % of frames on time AND the load viewers >= 90 % of the packet
    rate they got at the lightest load (a saturated server sends every viewer less)."""
    loaded = [s for s in steps[1:] if s["viewers"] > sampled]
    full_rate = loaded[0]["load_viewer_pkt_per_s"] if loaded else float("nan")
    served = [
        s["viewers"] for s in steps[1:]
        if s["on_time"] >= HEALTHY_ON_TIME and (s["viewers"] <= sampled or s["load_viewer_pkt_per_s"] >= 0.9 * full_rate)
    ]
    delivered = max((s["load_viewer_pkt_per_s"] * (s["viewers"] - sampled) for s in loaded), default=0.0)
    return max(served, default=0), delivered


async def run_workers(quick: bool, workers: int) -> tuple[dict[str, float], dict[str, Any], dict[str, list[Step]]]:
    """The same room and load against one process (the default, no Redis) and ``workers`` worker
    processes behind one port (with Redis): viewers served on this machine, CPU per process."""
    h.pin_aiortc_vp8_bitrate()
    levels, window_s, settle_s, sampled = ([10, 40], 4.0, 2.0, 1) if quick else ([10, 50, 100, 150, 200], 10.0, 3.0, 2)
    started = time.monotonic()
    metrics: dict[str, float] = {}
    steps: dict[str, list[Step]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, RedisServer(Path(tmp)) as redis:
        for name, server in (
            ("w1", h.shelfcast_server()),
            (f"w{workers}", h.shelfcast_server(redis_url=redis.url, workers=workers)),
        ):
            steps[name] = await measure_server(name, server, levels, sampled, window_s, settle_s, workers=2)
            summarise(name, steps[name], metrics)
            served, delivered = viewers_served(steps[name], sampled)
            metrics[f"{name}_viewers_served"] = served
            metrics[f"{name}_delivered_pkt_per_s_max"] = round(delivered)
            top = steps[name][-1]
            for i, cores in enumerate(top["process_cores"]):
                metrics[f"{name}_process{i}_cores_at_{top['viewers']}"] = cores
    metrics["viewers_served_ratio"] = round(metrics[f"w{workers}_viewers_served"] / max(1, metrics["w1_viewers_served"]), 2)
    metrics["delivered_ratio"] = round(metrics[f"w{workers}_delivered_pkt_per_s_max"] / max(1, metrics["w1_delivered_pkt_per_s_max"]), 2)
    env = env_info(
        quick=quick,
        workers=workers,
        compared="w1: one process, no Redis (the default); wN: serve --workers N --redis (a local redis-server)",
        load_viewers="aiortc peer connections in 2 load processes on the same 2-core machine (they compete for the cores)",
        viewers_served="most viewers with the sampled viewers getting >= 90 % of frames within 200 ms and the load viewers >= 90 % of their light-load packet rate",
        delivered="RTP packets per second received by all load viewers together, best step",
        process_cores="per process at the top step: index 0 is the process started (the supervisor with workers)",
        window_s=window_s,
        duration_s=round(time.monotonic() - started, 1),
        **h.media_env(),
    )
    return metrics, env, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small viewer counts, short windows (CI)")
    parser.add_argument("--workers", type=int, default=1, help="compare one process with N workers (with Redis)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results_dir = h.RESULTS_QUICK if args.quick else h.RESULTS
    if args.workers > 1:
        metrics, env, steps = asyncio.run(run_workers(args.quick, args.workers))
        env["steps"] = {k: [{kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in s.items()} for s in v] for k, v in steps.items()}
        emit("fanout_workers", h.clean(metrics), {"targets": {"viewers_served_ratio": 2.0}}, h.clean(env), results_dir=results_dir)
        return 0
    metrics, env, steps = asyncio.run(run(args.quick))
    plot(steps, results_dir / "fanout_cpu.png")
    env["plot"] = str((results_dir / "fanout_cpu.png").relative_to(h.ROOT))
    env["steps"] = {k: [{kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in s.items()} for s in v] for k, v in steps.items()}
    emit("fanout", h.clean(metrics), BASELINE, h.clean(env), results_dir=results_dir)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
