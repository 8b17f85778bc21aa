"""Prometheus metrics of what operators watch during a show (``GET /metrics``), by prometheus_client.

Counters only go up. What the media code counts on objects that come and go (a rung pipeline's
dropped frames, a viewer's rung switches) is added to its counter as it grows, so a room ending or
a viewer leaving never takes anything back. Gauges are set from the live state before a scrape and
once a second: what an object counted in its last second is all a counter can miss of it (a room
ended or a viewer gone between two scrapes still counts). Several worker processes (``--workers``):
the supervisor gives each server one fresh
``PROMETHEUS_MULTIPROC_DIR``; every worker writes its values there and a scrape of any worker adds up
all of theirs (counters and histograms sum; each gauge says how, ``multiprocess_mode``).
"""

from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator, Awaitable, Callable, Hashable, Literal

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest, multiprocess)

from relay.egress import SENDER

from .errors import ERROR_CODE
from .keys import LOAD, ROOMS, STOCK, TELEMETRY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JOIN_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
Combine = Literal["livesum", "livemax", "livemin"]  # how several workers' values of a gauge combine
REFRESH_S = 1.0

disable_created_metrics()  # no *_created series: nobody here alerts on them, and they double the output


class Telemetry:
    """This process's metrics (one registry per app: several test servers in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry

        def gauge(name: str, text: str, labels: tuple[str, ...] = (), mode: Combine = "livesum") -> Gauge:
            return Gauge(name, text, labels, registry=reg, multiprocess_mode=mode)

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, text, labels, registry=reg)

        room, rung = ("room",), ("room", "rung")
        # Rooms are known to every worker (shared directory): the most any one sees, not the sum.
        self.rooms = gauge("shelfcast_rooms", "Rooms open.", mode="livemax")
        self.viewers = gauge("shelfcast_viewers", "Viewers connected per room.", room)
        self.video_encoders = gauge("shelfcast_video_encoders", "Video encoders open per room.", room)
        self.host_live = gauge("shelfcast_host_live", "Whether the room's host is live.", room, mode="livemax")
        self.upstream_pulls = gauge("shelfcast_upstream_pulls",
                                    "Rungs (and audio) this node pulls from the room's origin on another node.", room)
        self.rung_viewers = gauge("shelfcast_rung_viewers", "Viewers per ladder rung.", rung)
        self.frames_dropped = counter("shelfcast_frames_dropped_total",
                                      "Source frames replaced before encoding (newest-frame policy).", room)
        self.ingest_frames_dropped = counter("shelfcast_ingest_frames_dropped_total",
                                             "Host frames dropped at ingest to stay live (behind).", room)
        self.rung_switches = counter("shelfcast_rung_switches_total", "Rung switches completed by viewers.", room)
        self.encode_seconds = counter("shelfcast_encode_seconds_total", "Time spent encoding video, per rung.", rung)
        self.composite_seconds = counter("shelfcast_composite_seconds_total",
                                         "Time spent blending the overlay, per rung.", rung)
        self.node_busy = gauge("shelfcast_node_busy",
                               "1 while this process is short of CPU: new viewers get 503, rungs hold.", mode="livemax")
        self.node_busy_periods = counter("shelfcast_node_busy_periods_total", "Times this process became busy.")
        self.event_loop_lag = gauge("shelfcast_event_loop_lag_seconds",
                                    "How late the event loop runs timers (smoothed).", mode="livemax")
        self.egress_queued = gauge("shelfcast_egress_queued_frames", "Rung frames waiting for the native send thread.")
        self.egress_delay = gauge("shelfcast_egress_delay_seconds",
                                  "How long a frame waits for the native send thread (smoothed).", mode="livemax")
        self.egress_max_delay = gauge("shelfcast_egress_max_delay_seconds",
                                      "The longest such wait since the previous scrape (of this worker).",
                                      mode="livemax")
        self.egress_frames = counter("shelfcast_egress_frames_sent_total",
                                     "Rung frames the native send thread has sent (one per rung, not per viewer).")
        self.egress_packets = counter("shelfcast_egress_packets_sent_total",
                                      "RTP packets the native send thread has sent to viewers.")
        self.cpu_cores = gauge("shelfcast_process_cpu_cores", "CPU this process used lately, in cores.")
        # Every session's tasks end with it: a count that keeps climbing while viewers come and go is a leak.
        self.event_loop_tasks = gauge("shelfcast_event_loop_tasks", "asyncio tasks alive on this process's event loop.")
        self.join_seconds = Histogram("shelfcast_join_seconds", "From a viewer's WHEP offer to its connection being up.",
                                      buckets=JOIN_BUCKETS_S, registry=reg)
        self.rejected = counter("shelfcast_rejected_requests_total",
                                "Requests refused, by status and reason (error code).", ("status", "reason"))
        # The stock ledger is shared by every worker: all of them see the same feeds.
        self.feed_age = gauge("shelfcast_stock_feed_age_seconds",
                              "Seconds since a warehouse's feed was last heard from.", ("warehouse",), mode="livemin")
        self.feed_stale = gauge("shelfcast_stock_feed_stale",
                                "Whether a warehouse's numbers show as syncing (silent or a seq gap).",
                                ("warehouse",), mode="livemax")
        self._counted: dict[tuple[int, tuple[str, ...], Hashable], float] = {}
        # The send thread's longest wait resets when read; refreshes between scrapes keep the peak.
        self.max_delay_s = 0.0
        self._labelled: dict[int, set[tuple[str, ...]]] = {}

    # -- turning what the code keeps into metrics
    def _grow(self, seen: dict[tuple[int, tuple[str, ...], Hashable], float], counter: Counter,
              labels: tuple[str, ...], source: Hashable, total: float) -> None:
        """``source`` (an object that may go away) has counted ``total`` so far: add what is new."""
        key = (id(counter), labels, source)
        new = total - self._counted.get(key, 0.0)
        if new > 0:
            (counter.labels(*labels) if labels else counter).inc(new)
        seen[key] = max(total, self._counted.get(key, 0.0))

    def _set(self, gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
        """Exactly these labelled values; a room gone is set to 0 first (a worker's file keeps the
        last value written) and then dropped."""
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        for gone in self._labelled.get(id(gauge), set()) - values.keys():
            gauge.labels(*gone).set(0)
            gauge.remove(*gone)
        self._labelled[id(gauge)] = set(values)

    def refresh(self, app: web.Application) -> None:
        seen: dict[tuple[int, tuple[str, ...], Hashable], float] = {}
        open_rooms = [r for r in app[ROOMS] if not r.closed]
        self.rooms.set(len(open_rooms))
        per_room: dict[Gauge, dict[tuple[str, ...], float]] = {
            g: {} for g in (self.viewers, self.video_encoders, self.host_live, self.upstream_pulls, self.rung_viewers)}
        for room in open_rooms:
            label = (room.id,)
            pipelines = room.media.pipelines()
            per_room[self.viewers][label] = room.audience
            per_room[self.video_encoders][label] = room.media.video_encoders
            per_room[self.upstream_pulls][label] = len(room.media.upstream.pulls) if room.media.upstream else 0
            per_room[self.host_live][label] = int(room.live)
            for name, count in room.media.rung_viewers().items():
                per_room[self.rung_viewers][(room.id, str(name))] = count
            publisher = room.publisher
            if publisher is not None:
                queued = publisher.decode_queue.frames_dropped if publisher.decode_queue is not None else 0
                self._grow(seen, self.ingest_frames_dropped, label, publisher, publisher.frames_skipped + queued)
            for viewer in room.viewers.values():
                self._grow(seen, self.rung_switches, label, viewer, int(viewer.describe()["switches"]))
            for pipeline in pipelines:
                rung_label = (room.id, pipeline.name)
                self._grow(seen, self.frames_dropped, label, pipeline, pipeline.frames_dropped)
                self._grow(seen, self.encode_seconds, rung_label, pipeline, pipeline.encode_seconds)
                self._grow(seen, self.composite_seconds, rung_label, pipeline, pipeline.composite_seconds)
            # A room with nothing counted yet still shows its counters (at 0).
            for counter in (self.frames_dropped, self.ingest_frames_dropped, self.rung_switches):
                counter.labels(*label)
        for gauge, values in per_room.items():
            self._set(gauge, values)

        load = app[LOAD].state
        sender = SENDER.stats()
        self.node_busy.set(int(load.busy))
        self._grow(seen, self.node_busy_periods, (), app[LOAD], load.busy_periods)
        self.event_loop_lag.set(load.lag_s)
        self.cpu_cores.set(load.cores)
        self.event_loop_tasks.set(len(asyncio.all_tasks()))
        self.egress_queued.set(sender["pending"])
        self.egress_delay.set(sender["delay_s"])
        self.max_delay_s = max(self.max_delay_s, sender["max_delay_s"])
        self.egress_max_delay.set(self.max_delay_s)
        self._grow(seen, self.egress_frames, (), SENDER, sender["frames_sent"])
        self._grow(seen, self.egress_packets, (), SENDER, sender["packets_sent"])

        service = app.get(STOCK)
        ages: dict[tuple[str, ...], float] = {}
        stale: dict[tuple[str, ...], float] = {}
        if service is not None:
            now, stale_after_s = service.clock(), service.cfg.stale_after_s
            for wh_id in service.ledger.warehouses:
                feed = service.ledger.feeds.get(wh_id)
                if feed is not None and feed.last_update is not None:
                    ages[(wh_id,)] = round(max(0.0, now - feed.last_update), 1)
                stale[(wh_id,)] = int(service.ledger.is_stale(wh_id, now, stale_after_s))
        self._set(self.feed_age, ages)
        self._set(self.feed_stale, stale)
        self._counted = seen  # sources gone are forgotten (what they counted stays in the counters)


def setup_metrics(app: web.Application) -> None:
    app[TELEMETRY] = Telemetry()
    app.cleanup_ctx.append(_refresh_loop)


async def _refresh_loop(app: web.Application) -> AsyncIterator[None]:
    """Counts kept on short-lived objects are taken while they live, not only when a scrape comes;
    and with several workers a scrape reaches one of them, so each keeps its file fresh."""

    async def loop() -> None:
        while True:
            app[TELEMETRY].refresh(app)
            await asyncio.sleep(REFRESH_S)

    task = asyncio.create_task(loop(), name="metrics-refresh")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@web.middleware
async def count_rejections(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if response.status >= 400:
        request.app[TELEMETRY].rejected.labels(str(response.status), response.get(ERROR_CODE, "http_error")).inc()
    return response


async def metrics(request: web.Request) -> web.Response:
    telemetry = request.app[TELEMETRY]
    telemetry.refresh(request.app)
    registry = telemetry.registry
    if os.environ.get(MULTIPROC_ENV):  # every worker's values, this one's included
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    body = generate_latest(registry)
    telemetry.max_delay_s = 0.0
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
