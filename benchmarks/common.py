"""Shared helper for `python -m benchmarks.<name>`: environment facts and the one-line JSON contract.

Every benchmark prints, as its LAST stdout line, one JSON object
{"benchmark": name, "metrics": {...}, "baseline": {...}, "env": {...}} and writes the same to
benchmarks/results/<name>.json (plus whatever plots it makes next to it).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def env_info(**extra: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info.update(extra)
    return info


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def emit(name: str, metrics: dict[str, float], baseline: dict[str, Any], env: dict[str, Any],
         results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    """Write results/<name>.json and print the contract line last; returns the record."""
    record = {"benchmark": name, "metrics": metrics, "baseline": baseline, "env": env}
    line = json.dumps(record, separators=(",", ":"), sort_keys=False)
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = results_dir / f"{name}.json.tmp"
    tmp.write_text(line + "\n")
    tmp.replace(results_dir / f"{name}.json")
    sys.stdout.flush()
    print(line, flush=True)
    return record
