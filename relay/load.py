"""Is this server itself short of CPU? (pure judgement, plus a small sampler for the event loop)

When the process is starved, every packet it sends leaves late: receivers see delay growing, their
estimates fall, RTT rises. That looks exactly like congestion on every viewer's link at once, and if
the ABR believed it, everybody would move down and the lower rungs' encoders would open, spending
more CPU exactly when there is none. So the node judges its own load from what only it can see, the
event loop's lag (a timer firing late) while it burns about a core, and while it is busy the ABR holds every viewer
where it is and new viewers are sent to another node (503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace


log = logging.getLogger("shelfcast.load")


@dataclass(frozen=True)
class LoadConfig:
    # Busy needs both: timers firing late for a while AND this process burning about a core (the
    # event loop's thread is saturated). A late timer alone is a blocking call (a key generated, a
    # codec opened), not a shortage, and must not turn viewers away.
    busy_lag_s: float = 0.050  # smoothed event-loop lag above this ...
    busy_cores: float = 0.85  # ... while the process uses more than this many cores
    calm_lag_s: float = 0.015  # calm: lag below this, or the process well below a core
    calm_cores: float = 0.60
    calm_hold_s: float = 2.0  # calm this long before the node is no longer busy
    smoothing: float = 0.1  # weight of a new lag sample (samples every 0.1 s: ~1 s memory)


@dataclass(frozen=True)
class LoadSample:
    at: float
    lag_s: float  # how late the sampler's timer fired
    cores: float | None = None  # process CPU over the last interval, in cores (None: not measured now)


@dataclass(frozen=True)
class LoadState:
    busy: bool = False
    lag_s: float = 0.0  # smoothed
    cores: float = 0.0
    calm_since: float | None = None
    busy_periods: int = 0


def judge(state: LoadState, sample: LoadSample, cfg: LoadConfig = LoadConfig()) -> LoadState:
    """Fold one sample in: busy at once on evidence, calm only after ``calm_hold_s`` of calm."""
    lag = (1 - cfg.smoothing) * state.lag_s + cfg.smoothing * sample.lag_s
    cores = state.cores if sample.cores is None else sample.cores
    hot = lag > cfg.busy_lag_s and cores > cfg.busy_cores
    cool = lag < cfg.calm_lag_s or cores < cfg.calm_cores
    if hot:
        return replace(state, busy=True, lag_s=lag, cores=cores, calm_since=None,
                       busy_periods=state.busy_periods + (0 if state.busy else 1))
    if not state.busy:
        return replace(state, lag_s=lag, cores=cores)
    if not cool:
        return replace(state, lag_s=lag, cores=cores, calm_since=None)
    since = sample.at if state.calm_since is None else state.calm_since
    if sample.at - since >= cfg.calm_hold_s:
        return replace(state, busy=False, lag_s=lag, cores=cores, calm_since=None)
    return replace(state, lag_s=lag, cores=cores, calm_since=since)


class LoadMonitor:
    """Samples the running loop's lag every ``interval_s`` and the process CPU about once a second."""

    def __init__(self, cfg: LoadConfig = LoadConfig(), interval_s: float = 0.1) -> None:
        self.cfg = cfg
        self.state = LoadState()
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self.state.busy

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="load-monitor")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        cpu_at, cpu_used = time.monotonic(), time.process_time()
        while True:
            planned = time.monotonic() + self._interval_s
            await asyncio.sleep(self._interval_s)
            now = time.monotonic()
            cores: float | None = None
            if now - cpu_at >= 0.5:
                used = time.process_time()
                cores = (used - cpu_used) / (now - cpu_at)
                cpu_at, cpu_used = now, used
            before = self.state.busy
            self.state = judge(self.state, LoadSample(now, max(0.0, now - planned), cores), self.cfg)
            if self.state.busy != before:
                log.warning("node %s (event loop lag %.0f ms, %.2f cores)",
                            "busy: new viewers go elsewhere, rungs hold" if self.state.busy else "calm again",
                            self.state.lag_s * 1000, self.state.cores)
