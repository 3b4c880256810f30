"""Orchestration overhead and scaling of the study driver: trials per hour with 1, 2, 4 Ray workers.

The evaluator is the fixed-cost stand-in (it sleeps), so the numbers measure the driver (ask/tell, storage
writes, trials.csv, dispatch over Ray), not the CPU: with perfect orchestration N workers give N times the
trials per hour of one. Prints throughput and the efficiency ratio against linear scaling (target: >= 90% at 4).

    python benchmarks/worker_scaling.py                       # 2 s per trial, 8 trials per worker
    python benchmarks/worker_scaling.py --cost 5 --trials-per-worker 12 --workers 1 2 4 8

The window measured runs from the first trial's start to the last trial's end in the storage, so worker startup
and the final plots are left out (they are paid once per study, not per trial).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.results import load_study
from dsm_tune.search.study import StudySpec, run_study
from dsm_tune.search.testing import StandInFactory
from dsm_tune.search.tracking import NullTracker
from dsm_tune.search.workers import start_ray, stop_ray

# The demo model's shape: the stand-in's metrics come from its token schedule.
DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)


def measure(workers: int, cost_s: float, trials: int, out: Path) -> dict:
    spec = StudySpec(model="demo", target="cpu", trials=trials, workers=workers, out=out, mlflow=False,
                     study=f"scaling-{workers}", max_accuracy_drop=1.0)
    started = time.perf_counter()
    run_study(spec, evaluator_factory=StandInFactory(DEMO, cost_s=cost_s), tracker=NullTracker(),
              stream=io.StringIO())
    total = time.perf_counter() - started
    trials_done = [t for t in load_study(spec.study_dir).get_trials() if t.datetime_complete is not None]
    begin = min(t.datetime_start for t in trials_done)
    end = max(t.datetime_complete for t in trials_done)
    measured = [t for t in trials_done if "duplicate_of" not in t.user_attrs and t.state.name != "FAIL"]
    window = (end - begin).total_seconds()
    # Duplicates are settled from earlier results without a worker: only measured trials count as throughput.
    return {"workers": workers, "trials": len(trials_done), "measured": len(measured), "window_s": window,
            "total_s": total, "per_hour": len(measured) / window * 3600.0,
            # Busy share of the workers: sleeping time over the worker-seconds available in the window.
            "busy": len(measured) * cost_s / (window * workers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cost", type=float, default=2.0, help="seconds per trial of the stand-in evaluator")
    parser.add_argument("--trials-per-worker", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="study folder root (default: a temporary folder)")
    args = parser.parse_args(argv)

    started_ray = start_ray(None, num_cpus=max(args.workers))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            out = args.out or Path(scratch)
            for workers in args.workers:
                row = measure(workers, args.cost, args.trials_per_worker * workers, out)
                rows.append(row)
                print(f"  {workers} worker(s): {row['measured']} measured trials (+{row['trials'] - row['measured']} "
                      f"duplicates) in {row['window_s']:.1f} s ({row['total_s']:.1f} s with startup) -> "
                      f"{row['per_hour']:.0f} trials/hour, "
                      f"workers busy {row['busy']:.0%}", flush=True)
    finally:
        stop_ray(started_ray)

    base = next((r for r in rows if r["workers"] == 1), rows[0])
    per_worker = base["per_hour"] / base["workers"]
    print(f"\nstand-in cost {args.cost:g} s/trial; ideal: {3600.0 / args.cost:.0f} trials/hour per worker")
    print(f"{'workers':>7} {'measured trials/hour':>21} {'speedup':>8} {'efficiency':>10}")
    for row in rows:
        speedup = row["per_hour"] / base["per_hour"]
        efficiency = row["per_hour"] / (per_worker * row["workers"])
        print(f"{row['workers']:>7} {row['per_hour']:>21.0f} {speedup:>7.2f}x {efficiency:>10.1%}")
    largest = rows[-1]
    efficiency = largest["per_hour"] / (per_worker * largest["workers"])
    verdict = "meets" if efficiency >= 0.9 else "misses"
    print(f"\nefficiency at {largest['workers']} workers: {efficiency:.1%} ({verdict} the 90% target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
