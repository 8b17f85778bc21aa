"""``shelfcast serve --workers N``: N worker processes behind one public port.

Each worker is a whole shelfcast process and a node of the cluster (they share state through
Redis, so ``--redis`` is required): the kernel spreads incoming connections over the workers
(``SO_REUSEPORT`` on the public port), each worker also listens on a private loopback port that the
others use to reach it (cascade pulls, forwarded requests). A room's pipeline lives in one worker,
its origin; the others serve its viewers from one pulled copy per worker. The supervisor (this
module) only starts the workers, restarts one that crashes, and passes SIGTERM on. It also gives the
workers one fresh metrics directory (prometheus_client's multiprocess mode), so that a scrape of
``/metrics``, whichever worker answers it, adds up all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from prometheus_client import multiprocess

from .metrics import MULTIPROC_ENV

log = logging.getLogger("shelfcast.workers")

RESTART_DELAY_S = 1.0


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def supervise(argv: list[str], workers: int) -> int:
    """Run ``workers`` copies of ``shelfcast <argv> --worker i`` until SIGTERM/SIGINT; exit 0 if
    every worker stopped cleanly."""
    stopping = False
    metrics_dir = tempfile.mkdtemp(prefix="shelfcast-metrics-")  # this server's only: counts start at 0
    env = {**os.environ, MULTIPROC_ENV: metrics_dir}

    def spawn(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "signaling.cli", *argv, "--worker", str(index)], env=env)

    procs = {i: spawn(i) for i in range(workers)}

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def reload(signum: int, _frame: object) -> None:
        # SIGHUP (a renewed TLS certificate): each worker reloads its own; the supervisor holds none.
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        time.sleep(0.2)
        for index, proc in list(procs.items()):
            code = proc.poll()
            if code is None or index in codes:
                continue
            if stopping:
                codes[index] = code
            else:
                log.warning("worker %d exited with %d; restarting it", index, code)
                multiprocess.mark_process_dead(proc.pid, metrics_dir)  # its gauges go; its counts stay
                time.sleep(RESTART_DELAY_S)
                procs[index] = spawn(index)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if all(code == 0 for code in codes.values()) else 1
