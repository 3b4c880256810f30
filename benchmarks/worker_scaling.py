"""Trials per hour of the study driver with 1, 2, 4 Ray workers, and why CPU workers on one host do not add up.

Two evaluators:
- `--evaluator stand-in` (default): a fixed-cost stand-in that sleeps, so the numbers measure the driver (ask/tell,
  storage writes, trials.csv, dispatch over Ray), not the CPU: with perfect orchestration N workers give N times
  the trials per hour of one (target: >= 90% efficiency at 4).
- `--evaluator demo`: real trials of the embedded demo model on the CPU target, as `dsm-tune run --model demo
  --device cpu --workers N` runs them. Every evaluation holds the host's timing lock, so a second CPU worker
  mostly waits for it; the table shows how much it still adds and how long workers wait for the lock.

`--oversubscription` adds a measurement of the cause of the 2.8x slowdown seen when CPU workers' accuracy passes
were allowed to overlap (an attempt since reverted, docs/decisions.md): demo forward passes (the accuracy pass's work, at
the demo's cpu batch size) alone, then two processes side by side, first with every core's worth of torch threads
each (as each worker sets torch.set_num_threads(os.cpu_count())), then with their fair share. Two passes sharing
the cores fairly take about 2x as long each; much more than 2x with full threads and about 2x with shared ones
means thread oversubscription.

    python benchmarks/worker_scaling.py                                   # stand-in, 2 s per trial
    python benchmarks/worker_scaling.py --cost 5 --trials-per-worker 12 --workers 1 2 4 8
    python benchmarks/worker_scaling.py --evaluator demo --workers 1 2 --trials-per-worker 8 --oversubscription

The window measured runs from the first trial's start to the last trial's end in the storage, so worker startup
and the final plots are left out (they are paid once per study, not per trial).
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dsm_tune.commands.run import DEFAULT_DEMO_CPU_BATCH, DEFAULT_DEMO_LIMIT
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.results import load_study
from dsm_tune.search.study import StudySpec, run_study
from dsm_tune.search.testing import StandInFactory
from dsm_tune.search.tracking import NullTracker
from dsm_tune.search.workers import start_ray, stop_ray

# The demo model's shape: the stand-in's metrics come from its token schedule.
DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)


def measure(workers: int, evaluator: str, cost_s: float, trials: int, limit: int, out: Path) -> dict:
    real = evaluator == "demo"
    # Real trials as `dsm-tune run --model demo --device cpu` runs them: its image count and batch size.
    spec = StudySpec(model="demo", target="cpu", trials=trials, workers=workers, out=out, mlflow=False,
                     study=f"scaling-{evaluator}-{workers}", max_accuracy_drop=1.0,
                     limit=limit if real else None, batch_size=DEFAULT_DEMO_CPU_BATCH if real else None)
    factory = StandInFactory(DEMO, cost_s=cost_s) if evaluator == "stand-in" else None   # None: the real one
    started = time.perf_counter()
    run_study(spec, evaluator_factory=factory, tracker=NullTracker(), stream=io.StringIO())
    total = time.perf_counter() - started
    trials_done = [t for t in load_study(spec.study_dir).get_trials() if t.datetime_complete is not None]
    begin = min(t.datetime_start for t in trials_done)
    end = max(t.datetime_complete for t in trials_done)
    measured = [t for t in trials_done if "duplicate_of" not in t.user_attrs and t.state.name != "FAIL"
                and "eval_seconds" in t.user_attrs]
    window = (end - begin).total_seconds()
    evaluating = sum(float(t.user_attrs["eval_seconds"]) for t in measured)
    waiting = sum(float(t.user_attrs.get("lock_wait_s", 0.0)) for t in measured)
    # Duplicates are settled from earlier results without a worker: only measured trials count as throughput.
    return {"workers": workers, "trials": len(trials_done), "measured": len(measured), "window_s": window,
            "total_s": total, "per_hour": len(measured) / window * 3600.0,
            # Share of the worker-seconds in the window spent evaluating, and waiting for the host's timing lock.
            "busy": evaluating / (window * workers), "lock_wait": waiting / (window * workers),
            "eval_s": evaluating / max(len(measured), 1)}


def scaling(args: argparse.Namespace) -> list[dict]:
    started_ray = start_ray(None, num_cpus=max(max(args.workers), os.cpu_count() or 1))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            out = args.out or Path(scratch)
            for workers in args.workers:
                row = measure(workers, args.evaluator, args.cost, args.trials_per_worker * workers, args.limit,
                              out)
                rows.append(row)
                print(f"  {workers} worker(s): {row['measured']} measured trials (+{row['trials'] - row['measured']} "
                      f"duplicates/pruned) in {row['window_s']:.1f} s ({row['total_s']:.1f} s with startup) -> "
                      f"{row['per_hour']:.0f} trials/hour, {row['eval_s']:.2f} s evaluating per trial, workers "
                      f"busy {row['busy']:.0%}, waiting for the timing lock {row['lock_wait']:.0%}", flush=True)
    finally:
        stop_ray(started_ray)

    base = next((r for r in rows if r["workers"] == 1), rows[0])
    per_worker = base["per_hour"] / base["workers"]
    if args.evaluator == "stand-in":
        print(f"\nstand-in cost {args.cost:g} s/trial; ideal: {3600.0 / args.cost:.0f} trials/hour per worker")
    else:
        print(f"\nreal demo trials on the cpu target, {args.limit} images, {os.cpu_count()} cores; the sampler's "
              "configs differ with the worker count, so compare seconds evaluating per trial too")
    print(f"{'workers':>7} {'measured trials/hour':>21} {'speedup':>8} {'efficiency':>10}")
    for row in rows:
        speedup = row["per_hour"] / base["per_hour"]
        efficiency = row["per_hour"] / (per_worker * row["workers"])
        print(f"{row['workers']:>7} {row['per_hour']:>21.0f} {speedup:>7.2f}x {efficiency:>10.1%}")
    largest = rows[-1]
    efficiency = largest["per_hour"] / (per_worker * largest["workers"])
    if args.evaluator == "stand-in":
        verdict = "meets" if efficiency >= 0.9 else "misses"
        print(f"\nefficiency at {largest['workers']} workers: {efficiency:.1%} ({verdict} the 90% target)")
    else:
        print(f"\nefficiency at {largest['workers']} workers: {efficiency:.1%} (one CPU host is one timing device)")
    return rows


# Oversubscription ----------------------------------------------------------------------------------------------------

def _forward_passes(threads: int, batches: int, barrier, results) -> None:
    """One accuracy pass's worth of demo forwards with `threads` torch threads, started with the other process."""
    import torch

    from dsm_tune.evaluation.models import build_model, input_size

    torch.set_num_threads(threads)
    model = build_model("demo")
    images = torch.randn(DEFAULT_DEMO_CPU_BATCH, *input_size(model))
    with torch.inference_mode():
        for _ in range(3):
            model(images)
        barrier.wait()
        started = time.perf_counter()
        for _ in range(batches):
            model(images)
        results.put(time.perf_counter() - started)


def _side_by_side(processes: int, threads: int, batches: int) -> float:
    """Mean seconds of one pass when `processes` passes run at once."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [context.Process(target=_forward_passes, args=(threads, batches, barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    seconds = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return statistics.fmean(seconds)


def oversubscription(batches: int, rounds: int) -> None:
    cores = os.cpu_count() or 1
    share = max(cores // 2, 1)
    layouts = {"alone": (1, cores), "full": (2, cores), "shared": (2, share)}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(rounds):   # interleaved, so drift in the host's load hits every layout alike
        for name, (processes, threads) in layouts.items():
            times[name].append(_side_by_side(processes, threads, batches))
    alone, full, shared = (statistics.median(times[name]) for name in ("alone", "full", "shared"))
    print(f"\naccuracy passes side by side ({batches} demo forwards at batch {DEFAULT_DEMO_CPU_BATCH}, {cores} cores, "
          f"median of {rounds} rounds); sharing the cores fairly, each pass takes about 2.00x its time alone")
    print(f"  two passes, {cores} torch threads each ({2 * cores} threads): each pass takes {full / alone:.2f}x "
          f"its time alone; both together {2 * alone / full:.2f}x the throughput of one")
    print(f"  two passes, {share} torch thread(s) each ({2 * share} threads): each pass takes {shared / alone:.2f}x "
          f"its time alone; both together {2 * alone / shared:.2f}x the throughput of one")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluator", choices=("stand-in", "demo"), default="stand-in",
                        help="stand-in (a fixed-cost sleep: the driver alone) or demo (real CPU trials)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4],
                        help="worker counts to compare (none: only --oversubscription)")
    parser.add_argument("--cost", type=float, default=2.0, help="seconds per trial of the stand-in evaluator")
    parser.add_argument("--limit", type=int, default=DEFAULT_DEMO_LIMIT,
                        help=f"images per demo trial (default: the CLI's {DEFAULT_DEMO_LIMIT})")
    parser.add_argument("--trials-per-worker", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="study folder root (default: a temporary folder)")
    parser.add_argument("--oversubscription", action="store_true",
                        help="also time demo accuracy passes alone and two side by side (full vs shared threads)")
    parser.add_argument("--batches", type=int, default=None,
                        help="forwards per pass for --oversubscription (default: --limit images at the demo's cpu "
                             f"batch of {DEFAULT_DEMO_CPU_BATCH})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --oversubscription")
    args = parser.parse_args(argv)
    if args.workers:
        scaling(args)
    if args.oversubscription:
        oversubscription(args.batches or math.ceil(args.limit / DEFAULT_DEMO_CPU_BATCH), args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
