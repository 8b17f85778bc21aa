"""A starved server is not a congested link: the load judgement (tables), the ABR holding still on a
busy server, and over HTTP a busy node sending new viewers elsewhere (503 + Retry-After) while the
viewers it has keep their rung."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator


import pytest

from relay.abr import DEFAULT_LADDER, AbrConfig, Feedback, initial_state, step
from relay.client import WhipError, whep_play, whip_publish
from relay.load import LoadConfig, LoadSample, LoadState, judge
from relay.synthetic import PatternTrack
from signaling.config import Config
from signaling.keys import LOAD

from .conftest import FrameCollector, RunningServer, serving_with_media, until

CFG = LoadConfig(busy_lag_s=0.05, busy_cores=0.85, calm_lag_s=0.015, calm_cores=0.6, calm_hold_s=2.0, smoothing=1.0)


# (samples as (time, lag_s, cores), busy after each). Smoothing 1.0: each judged on its own sample.
LOAD_CASES = [
    ([(0, 0.001, 0.2), (1, 0.002, 0.3)], [False, False]),
    ([(0, 0.001, 0.95), (1, 0.080, None)], [False, True]),  # timers late while a core burns: busy
    ([(0, 0.200, 0.10)], [False]),  # late without burning CPU: a blocking call, not a shortage
    ([(0, 0.001, 1.90)], [False]),  # threads (encoders) busy but the loop on time: no shortage
    # calm needs calm_hold_s of calm, and any hot sample restarts the wait
    ([(0, 0.08, 1.0), (1, 0.01, 1.0), (2, 0.01, 1.0), (3, 0.01, 1.0)], [True, True, True, False]),
    # (a late timer with the process off its core counts as calm: t=4)
    ([(0, 0.08, 1.0), (1, 0.01, 0.5), (2, 0.06, 1.0), (3, 0.01, 1.0), (4, 0.08, 0.5), (5, 0.01, 0.3)],
     [True, True, True, True, True, False]),
    ([(0, 0.08, 1.0), (1, 0.03, 0.7), (5, 0.03, 0.7)], [True, True, True]),  # between thresholds: stays
]


@pytest.mark.parametrize("samples, expected", LOAD_CASES)
def test_load_judgement(samples: list[tuple[float, float, float | None]], expected: list[bool]) -> None:
    state, seen = LoadState(), []
    for at, lag, cores in samples:
        state = judge(state, LoadSample(at, lag, cores), CFG)
        seen.append(state.busy)
    assert seen == expected


def test_busy_periods_count_entries_not_samples() -> None:
    state = LoadState()
    for at, lag in [(0, 0.08), (1, 0.09), (2, 0.01), (3, 0.01), (4, 0.01), (5, 0.1)]:
        state = judge(state, LoadSample(at, lag, 1.0), CFG)
    assert state.busy_periods == 2


def test_lag_is_smoothed() -> None:
    state = judge(LoadState(), LoadSample(0, 0.1, 1.0), LoadConfig(smoothing=0.3))
    assert state.lag_s == pytest.approx(0.03) and not state.busy  # one late timer is not enough


def test_a_busy_server_holds_every_rung_where_congestion_would_move_it() -> None:
    abr = AbrConfig()
    state = initial_state(0, 0.0)
    for t in range(1, 6):  # a clean link: RTT floor 40 ms
        state = step(state, Feedback(float(t), remb_bps=2_600_000, fraction_lost=0.0, rtt_s=0.04), DEFAULT_LADDER, abr)
    queued = Feedback(7.0, remb_bps=900_000, fraction_lost=0.12, rtt_s=0.4)  # what starvation looks like
    held = step(state, Feedback(7.0, remb_bps=900_000, fraction_lost=0.12, rtt_s=0.4, server_busy=True), DEFAULT_LADDER, abr)
    assert (held.rung, held.reason, held.loss, held.rtt_s, held.estimate_bps) == (0, "server_busy", state.loss, state.rtt_s, state.estimate_bps)
    moved = step(state, queued, DEFAULT_LADDER, abr)
    assert moved.rung > 0  # the same evidence on a calm server is congestion


def _starve(loop_blocked_s: float, stop: asyncio.Event) -> asyncio.Task[None]:
    """Burn the event loop's core, as a server short of CPU does (the test and server share one loop)."""

    async def hog() -> None:
        while not stop.is_set():
            end = time.perf_counter() + loop_blocked_s
            while time.perf_counter() < end:
                pass
            await asyncio.sleep(0.01)

    return asyncio.ensure_future(hog())


@pytest.fixture
async def shedding_server(config: Config) -> AsyncIterator[RunningServer]:
    async with serving_with_media(config, shed_load=True) as server:
        yield server


async def test_a_busy_node_refuses_new_viewers_and_holds_the_ones_it_has(shedding_server: RunningServer) -> None:
    server = shedding_server
    room = await server.create_room()
    live = server.rooms.get(room["id"])
    pub = await whip_publish(server.http, room["links"]["whip"], room["tokens"]["host"], [PatternTrack(320, 180)])
    collector = FrameCollector()
    viewer = await whep_play(server.http, room["links"]["whep"], on_track=collector.on_track, kinds=("video",))
    stop = asyncio.Event()
    hog: asyncio.Task[None] | None = None
    try:
        await collector.wait_for("video", 5)
        watching = next(iter(live.viewers.values()))
        rung_before = watching.abr.rung
        hog = _starve(0.2, stop)
        load = server.app[LOAD]
        await until(lambda: load.busy, 10, 0.05)
        with pytest.raises(WhipError) as refused:
            await whep_play(server.http, room["links"]["whep"], kinds=("video",))
        assert refused.value.status == 503 and '"node_busy"' in refused.value.body
        async with server.http.get(f"{server.base}/metrics") as resp:
            assert "shelfcast_node_busy 1.0" in await resp.text()
        await until(lambda: watching.abr.reason == "server_busy", 10, 0.05)
        assert watching.abr.rung == rung_before and len(live.viewers) == 1  # refused: nothing changed
        stop.set()
        await hog
        await until(lambda: not load.busy, 10, 0.1)
        again = await whep_play(server.http, room["links"]["whep"], kinds=("video",))
        await again.close()
    finally:
        stop.set()
        if hog is not None:
            await hog
        await collector.stop()
        await viewer.close()
        await pub.close()
