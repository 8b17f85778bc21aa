"""Check the latest benchmark results against benchmarks/budgets.toml.

    python -m benchmarks.check_budgets [--quick | --full] [--budgets FILE] [--results DIR]

For every budgeted benchmark it reads the newest of benchmarks/results/<name>.json (full run) and
benchmarks/results/quick/<name>.json (--quick run), unless told which. Each figure is OK (meets its
target), WARN (misses it, but within the tolerance: noise on a shared machine) or FAIL (far off: worse
than target x tolerance, or missing). Exit status 1 if anything FAILs.

Where shelfcast does not reach a target yet, a budget names an explicit regression limit
(`fail_above` / `fail_below`, set from what was last measured, with room for noise): CI then catches
a regression from where the code is, and the gap to the target stays visible as WARN.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUDGETS = HERE / "budgets.toml"
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Verdict:
    benchmark: str
    metric: str
    value: float | None
    target: float
    kind: str  # "max" | "min"
    limit: float
    status: str  # OK | WARN | FAIL
    source: str


def judge(value: float | None, budget: dict[str, Any], default_tolerance: float) -> tuple[str, str, float, float]:
    """(status, kind, target, fail limit) of one figure against one budget (pure)."""
    tolerance = float(budget.get("tolerance", default_tolerance))
    if "max" in budget:
        kind, target = "max", float(budget["max"])
        limit = float(budget.get("fail_above", target * tolerance))
        if value is None or math.isnan(value):
            return "FAIL", kind, target, limit
        return ("OK" if value <= target else "WARN" if value <= limit else "FAIL"), kind, target, limit
    kind, target = "min", float(budget["min"])
    if "fail_below" in budget:
        limit = float(budget["fail_below"])
    elif "miss_tolerance" in budget:  # shares: the tolerance applies to what is missed (1 - share)
        limit = 1.0 - (1.0 - target) * float(budget["miss_tolerance"])
    else:
        limit = target / tolerance
    if value is None or math.isnan(value):
        return "FAIL", kind, target, limit
    return ("OK" if value >= target else "WARN" if value >= limit else "FAIL"), kind, target, limit


def latest_result(name: str, results: Path, mode: str) -> tuple[dict[str, Any] | None, str]:
    candidates = {"full": [results / f"{name}.json"], "quick": [results / "quick" / f"{name}.json"]}
    paths = candidates[mode] if mode in candidates else candidates["full"] + candidates["quick"]
    existing = [p for p in paths if p.exists()]
    if not existing:
        return None, "no result file"
    path = max(existing, key=lambda p: p.stat().st_mtime)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]), str(path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path)


def check(budgets: dict[str, Any], results: Path, mode: str) -> list[Verdict]:
    default_tolerance = float(budgets.get("defaults", {}).get("tolerance", 3.0))
    verdicts: list[Verdict] = []
    for name, metrics in budgets.items():
        if name == "defaults":
            continue
        record, source = latest_result(name, results, mode)
        is_quick = bool(record and record.get("env", {}).get("quick"))
        for metric, budget in metrics.items():
            key = budget.get("quick_metric", metric) if is_quick else metric
            raw = (record or {}).get("metrics", {}).get(key)
            value = float(raw) if isinstance(raw, (int, float)) else None
            status, kind, target, limit = judge(value, budget, default_tolerance)
            verdicts.append(Verdict(name, key, value, target, kind, limit, status, source))
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_budgets", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", const="quick", dest="mode", help="only --quick results")
    group.add_argument("--full", action="store_const", const="full", dest="mode", help="only full results")
    parser.add_argument("--budgets", type=Path, default=BUDGETS)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budgets = tomllib.loads(args.budgets.read_text())
    verdicts = check(budgets, args.results, args.mode or "newest")
    width = max((len(f"{v.benchmark}.{v.metric}") for v in verdicts), default=10)
    for v in verdicts:
        shown = "missing" if v.value is None else f"{v.value:g}"
        rule = f"{'<=' if v.kind == 'max' else '>='} {v.target:g} (fail {'>' if v.kind == 'max' else '<'} {v.limit:g})"
        print(f"{v.status:4}  {v.benchmark}.{v.metric:<{width - len(v.benchmark) - 1}}  {shown:>10}  {rule}  [{v.source}]")
    failed = [v for v in verdicts if v.status == "FAIL"]
    warned = [v for v in verdicts if v.status == "WARN"]
    print(f"budgets: {len(verdicts) - len(failed) - len(warned)} ok, {len(warned)} warn, {len(failed)} FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
