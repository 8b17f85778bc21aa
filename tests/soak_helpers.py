"""Process-level resource accounting for the churn soak test (tests/test_soak.py).

The server runs in the test's own event loop and process, so "did the server release everything?"
is answered by looking at the process itself: live asyncio tasks, threads, file descriptors (ICE's
UDP sockets in particular), RSS and the aiortc objects still reachable after a full collection.
Client-side peers (the synthetic host, the viewers) live in the same process; every count is
therefore compared with a baseline taken while the same long-lived peers (host client + server
publisher) exist.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

import psutil
from aiortc import RTCPeerConnection

from relay.fanout import PacketTrack
from relay.linkemu import LinkEmulator
from relay.sessions import Viewer

MB = 1024 * 1024

# Workers of asyncio's default executor ("asyncio_3": run_in_executor, to_thread, aiohttp's DNS) are
# created on demand and then reused; their number is bounded by the pool's max_workers, so they are
# tracked apart from threads started per session or per encoder, which must all go away.
ASYNCIO_POOL = "<asyncio executor>"
ASYNCIO_POOL_MAX = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default max_workers


def _thread_kind(name: str) -> str:
    """Group threads by what they are: 'video-decoder', 'shelfcast-video-encoder-180p', 'Thread-7' -> 'Thread'."""
    if re.fullmatch(r"asyncio_\d+", name):
        return ASYNCIO_POOL
    pool = re.fullmatch(r"(ThreadPoolExecutor-\d+)_\d+", name)  # another pool: a new one per session would leak
    if pool:
        return pool.group(1)
    return re.sub(r"[-_]?\d+(\s*\(.*\))?$", "", name) or name


def _task_kind(task: asyncio.Task) -> str:  # type: ignore[type-arg]
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or type(coro).__name__


def _udp_sockets(process: psutil.Process) -> int:
    connections = getattr(process, "net_connections", None) or process.connections
    return len(connections(kind="udp"))


@dataclass
class Snapshot:
    """What the process holds at one moment (after a full garbage collection)."""

    tasks: int
    threads: int
    fds: int
    udp_sockets: int
    rss: int
    pcs_total: int  # RTCPeerConnection objects still reachable (client and server side)
    pcs_open: int  # ... of which not closed
    viewer_sessions: int  # server-side relay.sessions.Viewer objects still reachable
    packet_tracks: int  # fan-out tracks (one per viewer and kind) still reachable
    link_emulators: int
    task_kinds: Counter[str] = field(repr=False, default_factory=Counter)
    thread_kinds: Counter[str] = field(repr=False, default_factory=Counter)

    @property
    def pinned_threads(self) -> Counter[str]:
        """Threads that are not asyncio executor workers (encoders, aiortc decoders, anything ad hoc)."""
        return Counter({k: n for k, n in self.thread_kinds.items() if k != ASYNCIO_POOL})

    @property
    def pool_threads(self) -> int:
        return self.thread_kinds[ASYNCIO_POOL]

    def figures(self) -> str:
        return (
            f"tasks={self.tasks} threads={self.threads} fds={self.fds} udp={self.udp_sockets} "
            f"rss={self.rss / MB:.1f}MB pcs={self.pcs_total} (open {self.pcs_open}) "
            f"viewer_sessions={self.viewer_sessions} packet_tracks={self.packet_tracks}"
        )


def take_snapshot() -> Snapshot:
    gc.collect()
    pcs = [o for o in gc.get_objects() if isinstance(o, RTCPeerConnection)]
    viewers = packet_tracks = links = 0
    for obj in gc.get_objects():
        if isinstance(obj, Viewer):
            viewers += 1
        elif isinstance(obj, PacketTrack):
            packet_tracks += 1
        elif isinstance(obj, LinkEmulator):
            links += 1
    tasks = asyncio.all_tasks()
    threads = threading.enumerate()
    process = psutil.Process()
    snap = Snapshot(
        tasks=len(tasks),
        threads=len(threads),
        fds=process.num_fds(),
        udp_sockets=_udp_sockets(process),
        rss=process.memory_info().rss,
        pcs_total=len(pcs),
        pcs_open=sum(1 for pc in pcs if pc.connectionState != "closed"),
        viewer_sessions=viewers,
        packet_tracks=packet_tracks,
        link_emulators=links,
        task_kinds=Counter(_task_kind(t) for t in tasks),
        thread_kinds=Counter(_thread_kind(t.name) for t in threads),
    )
    del pcs
    return snap


def counter_diff(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Kinds whose count changed: {kind: after - before}."""
    return {k: after[k] - before[k] for k in sorted(set(before) | set(after)) if after[k] != before[k]}
