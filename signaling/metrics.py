"""Prometheus text exposition of what operators watch during a show (``GET /metrics``)."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiohttp import web

from relay.egress import SENDER

from .errors import ERROR_CODE
from .keys import LOAD, ROOMS, STOCK, TELEMETRY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JOIN_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense (``le`` upper bounds, +Inf implied)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        lines += [f"{name}_sum {self.total:.4f}", f"{name}_count {running}"]
        return lines


@dataclass
class Telemetry:
    """Process-wide counters that outlive the sessions they describe."""

    join_seconds: Histogram = field(default_factory=lambda: Histogram(JOIN_BUCKETS_S))
    rejected: Counter[tuple[int, str]] = field(default_factory=Counter)  # (status, code) -> requests


HELP = {
    "shelfcast_rooms": ("gauge", "Rooms open."),
    "shelfcast_viewers": ("gauge", "Viewers connected per room."),
    "shelfcast_video_encoders": ("gauge", "Video encoders open per room."),
    "shelfcast_host_live": ("gauge", "Whether the room's host is live."),
    "shelfcast_frames_dropped_total": ("counter", "Source frames replaced before encoding (newest-frame policy)."),
    "shelfcast_ingest_frames_dropped_total": ("counter", "Host frames dropped at ingest to stay live (behind)."),
    "shelfcast_rung_viewers": ("gauge", "Viewers per ladder rung."),
    "shelfcast_rung_switches_total": ("counter", "Rung switches completed by viewers."),
    "shelfcast_encode_seconds_total": ("counter", "Time spent encoding video, per rung."),
    "shelfcast_composite_seconds_total": ("counter", "Time spent blending the overlay, per rung."),
    "shelfcast_upstream_pulls": ("gauge", "Rungs (and audio) this node pulls from the room's origin on another node."),
    "shelfcast_node_busy": ("gauge", "1 while this process is short of CPU: new viewers get 503, rungs hold."),
    "shelfcast_node_busy_periods_total": ("counter", "Times this process became busy."),
    "shelfcast_event_loop_lag_seconds": ("gauge", "How late the event loop runs timers (smoothed)."),
    "shelfcast_egress_queued_frames": ("gauge", "Rung frames waiting for the native send thread."),
    "shelfcast_egress_delay_seconds": ("gauge", "How long a frame waits for the native send thread (smoothed)."),
    "shelfcast_egress_max_delay_seconds": ("gauge", "The longest such wait since the previous scrape."),
    "shelfcast_egress_frames_sent_total": ("counter", "Rung frames the native send thread has sent (one per rung, not per viewer)."),
    "shelfcast_egress_packets_sent_total": ("counter", "RTP packets the native send thread has sent to viewers."),
    "shelfcast_process_cpu_cores": ("gauge", "CPU this process used lately, in cores."),
    "shelfcast_join_seconds": ("histogram", "From a viewer's WHEP offer to its connection being up."),
    "shelfcast_rejected_requests_total": ("counter", "Requests refused, by status and reason (error code)."),
    "shelfcast_stock_feed_age_seconds": ("gauge", "Seconds since a warehouse's feed was last heard from."),
    "shelfcast_stock_feed_stale": ("gauge", "Whether a warehouse's numbers show as syncing (silent or a seq gap)."),
}


def _room_lines(app: web.Application) -> list[str]:
    open_rooms = [r for r in app[ROOMS] if not r.closed]
    lines = [f"shelfcast_rooms {len(open_rooms)}"]
    for room in open_rooms:
        label = f'room="{room.id}"'
        pipelines = room.media.pipelines()
        publisher = room.publisher
        ingest_dropped = 0
        if publisher is not None:
            queued = publisher.decode_queue.frames_dropped if publisher.decode_queue is not None else 0
            ingest_dropped = publisher.frames_skipped + queued
        lines += [
            f"shelfcast_ingest_frames_dropped_total{{{label}}} {ingest_dropped}",
            f"shelfcast_viewers{{{label}}} {room.audience}",
            f"shelfcast_video_encoders{{{label}}} {room.media.video_encoders}",
            f"shelfcast_upstream_pulls{{{label}}} {len(room.media.upstream.pulls) if room.media.upstream else 0}",
            f"shelfcast_host_live{{{label}}} {int(room.live)}",
            f"shelfcast_frames_dropped_total{{{label}}} {sum(p.frames_dropped for p in pipelines)}",
            f"shelfcast_rung_switches_total{{{label}}} {sum(int(v.describe()['switches']) for v in room.viewers.values())}",
        ]
        for rung, count in room.media.rung_viewers().items():
            lines.append(f'shelfcast_rung_viewers{{{label},rung="{rung}"}} {count}')
        for pipeline in pipelines:
            rung_label = f'{label},rung="{pipeline.name}"'
            lines.append(f"shelfcast_encode_seconds_total{{{rung_label}}} {pipeline.encode_seconds:.4f}")
            lines.append(f"shelfcast_composite_seconds_total{{{rung_label}}} {pipeline.composite_seconds:.4f}")
    return lines


def _stock_lines(app: web.Application) -> list[str]:
    service = app.get(STOCK)
    if service is None:
        return []
    now, stale_after_s = service.clock(), service.cfg.stale_after_s
    lines = []
    for wh_id in sorted(service.ledger.warehouses):
        feed = service.ledger.feeds.get(wh_id)
        label = f'warehouse="{wh_id}"'
        if feed is not None and feed.last_update is not None:
            lines.append(f"shelfcast_stock_feed_age_seconds{{{label}}} {max(0.0, now - feed.last_update):.1f}")
        lines.append(f"shelfcast_stock_feed_stale{{{label}}} {int(service.ledger.is_stale(wh_id, now, stale_after_s))}")
    return lines


def _telemetry_lines(app: web.Application) -> list[str]:
    telemetry = app[TELEMETRY]
    load = app[LOAD].state
    sender = SENDER.stats()
    lines = [
        f"shelfcast_node_busy {int(load.busy)}",
        f"shelfcast_node_busy_periods_total {load.busy_periods}",
        f"shelfcast_event_loop_lag_seconds {load.lag_s:.4f}",
        f"shelfcast_process_cpu_cores {load.cores:.3f}",
        f"shelfcast_egress_queued_frames {sender['pending']}",
        f"shelfcast_egress_delay_seconds {sender['delay_s']:.4f}",
        f"shelfcast_egress_max_delay_seconds {sender['max_delay_s']:.4f}",
        f"shelfcast_egress_frames_sent_total {sender['frames_sent']}",
        f"shelfcast_egress_packets_sent_total {sender['packets_sent']}",
    ]
    lines += telemetry.join_seconds.render("shelfcast_join_seconds")
    for (status, code), count in sorted(telemetry.rejected.items()):
        lines.append(f'shelfcast_rejected_requests_total{{status="{status}",reason="{code}"}} {count}')
    return lines


@web.middleware
async def count_rejections(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if response.status >= 400:
        request.app[TELEMETRY].rejected[(response.status, response.get(ERROR_CODE, "http_error"))] += 1
    return response


async def metrics(request: web.Request) -> web.Response:
    lines = []
    for name, (kind, text) in HELP.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    lines += _room_lines(request.app) + _telemetry_lines(request.app) + _stock_lines(request.app)
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
