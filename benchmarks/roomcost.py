"""What a room costs the server before its audience does: a 720p show with 1, 2 and 3 rungs watched,
and 1, 2, 4 concurrent 1v1 calls with both sides publishing 640x360 (and, as the same run's baseline,
one call with forwarding off: the buyer's picture and voice decoded and re-encoded).

    python -m benchmarks.roomcost [--quick]

The server runs as its own process; its CPU (user + system, all threads, psutil) is measured over a
window at each step. A show's rungs are watched the way another node pulls them (``?relay=N`` with a
relay token minted from the server's data directory): one subscriber per rung, pinned to it, so the
step measures the rung's scale + overlay + encode, not viewers or ABR. The publishers and the
subscribers (aiortc, this process) decode and encode on the driver's side, which is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp

from relay.client import WebRtcClient, whep_play, whip_publish
from relay.synthetic import PatternTrack, ToneTrack
from signaling.auth import TokenSigner

from . import harness as h
from .common import emit, env_info

log = logging.getLogger("bench.roomcost")

TARGETS = {"show_3_rungs_cores": 0.25, "call_cores_per_call": 0.15}


async def _measure(meter: h.CpuMeter, settle_s: float, window_s: float) -> float:
    await asyncio.sleep(settle_s)
    cores, _ = await meter.measure(window_s)
    return round(cores, 3)


async def show_costs(window_s: float, settle_s: float) -> dict[str, float]:
    metrics: dict[str, float] = {}
    server = h.shelfcast_server()
    clients: list[WebRtcClient] = []
    async with h.running(server), aiohttp.ClientSession() as http:
        assert server._tmp is not None
        signer = TokenSigner.from_data_dir(Path(server._tmp.name) / "data")
        ep = await h.create_room(http, server)
        publisher, video = await h.publish(http, ep, encoded=True)
        meter = h.CpuMeter(server.pid)
        try:
            await publisher.wait_connected(15)
            metrics["show_host_only_cores"] = await _measure(meter, settle_s, window_s)
            token = signer.issue(ep.room, "relay", time.time() + 3600)
            audio_pull = await whep_play(http, f"{ep.whep}?relay=audio", token=token, kinds=("audio",))
            clients.append(audio_pull)
            for rung in range(3):
                pull = await whep_play(http, f"{ep.whep}?relay={rung}", token=token, kinds=("video",))
                clients.append(pull)
                await pull.wait_connected(15)
                metrics[f"show_{rung + 1}_rungs_cores"] = await _measure(meter, settle_s, window_s)
                log.info("show, %d rungs watched: %.3f cores", rung + 1, metrics[f"show_{rung + 1}_rungs_cores"])
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            await publisher.close()
    return metrics


async def call_costs(counts: list[int], window_s: float, settle_s: float, forward: bool = True) -> dict[str, float]:
    """Cores at each count of concurrent calls. ``forward`` False: the buyer's direction is decoded
    and re-encoded like the seller's (the path before forwarding: the same run's baseline)."""
    metrics: dict[str, float] = {}
    server = h.shelfcast_server(forward=forward)
    clients: list[WebRtcClient] = []
    async with h.running(server), aiohttp.ClientSession() as http:
        meter = h.CpuMeter(server.pid)
        calls = 0
        try:
            metrics["calls_0_cores"] = await _measure(meter, settle_s, window_s)
            for count in counts:
                while calls < count:
                    ep = await h.create_room(http, server, title=f"call {calls}", mode="call")
                    for side in ("seller", "buyer"):
                        token = ep.tokens[side]
                        pub = await whip_publish(http, ep.whip, token, [PatternTrack(640, 360, side), ToneTrack()])
                        clients.append(pub)
                        clients.append(await whep_play(http, ep.whep, token=token))
                    calls += 1
                for client in clients:
                    await client.wait_connected(15)
                metrics[f"calls_{count}_cores"] = await _measure(meter, settle_s, window_s)
                log.info("%d calls: %.3f cores", count, metrics[f"calls_{count}_cores"])
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    top = counts[-1]
    metrics["call_cores_per_call"] = round((metrics[f"calls_{top}_cores"] - metrics["calls_0_cores"]) / top, 3)
    if not forward:
        return {f"{name}_decoded": value for name, value in metrics.items()}
    return metrics


async def run(quick: bool) -> tuple[dict[str, float], dict[str, Any]]:
    h.pin_aiortc_vp8_bitrate()
    window_s, settle_s, counts = (3.0, 2.0, [1, 2]) if quick else (8.0, 3.0, [1, 2, 4])
    started = time.monotonic()
    metrics = await show_costs(window_s, settle_s)
    metrics.update(await call_costs(counts, window_s, settle_s))
    metrics.update(await call_costs([1], window_s, settle_s, forward=False))
    env = env_info(
        quick=quick,
        show="720p30 VP8 1.5 Mbit/s + Opus host (aiortc, this process); each rung pulled by one relay subscriber",
        calls="both sides publish 640x360 test pattern + tone and receive the other (aiortc, this process); "
              "the buyer's direction is forwarded as it arrives; *_decoded: the same with forwarding off (SHELFCAST_FORWARD=0)",
        window_s=window_s,
        settle_s=settle_s,
        duration_s=round(time.monotonic() - started, 1),
        **h.media_env(),
    )
    return metrics, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roomcost", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, 1 and 2 calls (CI)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    metrics, env = asyncio.run(run(args.quick))
    emit("roomcost", h.clean(metrics), {"targets": TARGETS}, h.clean(env),
         results_dir=h.RESULTS_QUICK if args.quick else h.RESULTS)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
