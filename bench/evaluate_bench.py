"""Evaluation wall time: ``posguard-server evaluate`` computed directly against the replay through a server.

    .venv/bin/python bench/evaluate_bench.py [--data FILE] [--seeds 0] [--jobs 2] [--repeats 3]
        [--baseline-checkout DIR]

Runs ``posguard-server evaluate FILE --seeds ... --json`` in fresh processes, alternating in the same run: the
baseline, then the direct computation with ``--jobs``; ``--repeats`` rounds. The baseline is this checkout's
``--through-server`` replay, or, with ``--baseline-checkout``, the plain command of another checkout of the
repository (e.g. ``git worktree add /tmp/base a3d77a9``, an earlier version), run with this virtualenv and
that checkout's packages first on the path. Reports the median wall time of each (and of each stage, as the
command reports them), the ratio, and checks that both gave the same detection numbers, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "handbook_dev.csv.gz"
SAMPLE = ROOT / "tests" / "data" / "handbook_sample.csv.gz"


def run(args: list[str], checkout: Path | None) -> tuple[float, dict[str, Any]]:
    env = dict(os.environ)
    if checkout is not None:
        paths = [str(checkout / part) for part in ("server", "models", "clients")]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "posguard_server", "evaluate", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    seconds = time.perf_counter() - began
    try:  # an older checkout prints one indented document
        return seconds, json.loads(done.stdout)
    except json.JSONDecodeError:  # JSON lines: a line per seed, then the report
        return seconds, json.loads(done.stdout.splitlines()[-1])


def detection(report: dict[str, Any]) -> dict[str, Any]:
    """Everything but the timings, which name different stages in either way."""
    seeds = [{k: v for k, v in seed.items() if k != "seconds"} for seed in report["seeds"]]
    return {**report, "seeds": seeds}


def stages(reports: list[dict[str, Any]]) -> str:
    names = reports[0]["seeds"][0]["seconds"]
    return ", ".join(
        f"{name} {statistics.median(r['seeds'][0]['seconds'][name] for r in reports):.1f}s" for name in names
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEV if DEV.exists() else SAMPLE)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-checkout", type=Path, default=None)
    options = parser.parse_args()
    common = [str(options.data), "--seeds", options.seeds]
    baseline_args = common if options.baseline_checkout else [*common, "--through-server"]
    baseline = "earlier checkout" if options.baseline_checkout else "--through-server"
    walls: dict[str, list[float]] = {baseline: [], "direct": []}
    reports: dict[str, list[dict[str, Any]]] = {baseline: [], "direct": []}
    for round_ in range(options.repeats):
        for name, args, checkout in (
            (baseline, baseline_args, options.baseline_checkout),
            ("direct", [*common, "--jobs", str(options.jobs)], None),
        ):
            seconds, report = run(args, checkout)
            walls[name].append(seconds)
            reports[name].append(report)
            print(f"round {round_ + 1}: {name} {seconds:.1f}s", flush=True)
    print(f"{options.data.name}, seeds {options.seeds}, median of {options.repeats}:")
    for name in walls:
        print(f"  {name}: {statistics.median(walls[name]):.1f}s wall ({stages(reports[name])})")
    ratio = statistics.median(walls[baseline]) / statistics.median(walls["direct"])
    print(f"  direct is {ratio:.2f}x faster")
    answers = {json.dumps(detection(r), sort_keys=True) for rs in reports.values() for r in rs}
    print("  same detection numbers in every run" if len(answers) == 1 else "  DETECTION NUMBERS DIFFER")
    if len(answers) != 1:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
