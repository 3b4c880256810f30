"""Search quality on the demo model: hypervolume of the front after N trials, default sampler vs. random search
vs. a ToMe constant-r sweep of equal cost (N configs), over several seeds.

Objectives are the study's own: accuracy drop (points) and latency, taken as 1/speedup (the merged model's
latency over the dense model's, timed interleaved in the same trial, so machine drift cancels). The hypervolume
is the area the front dominates inside the region of interest: drop in [0, --max-drop], relative latency in
[0, 1] (i.e. feasible and faster than dense). Larger is better; 0 means nothing useful was found.

    python benchmarks/search_quality.py                          # ~15 min on 2 CPU cores
    python benchmarks/search_quality.py --trials 48 --seeds 0 1 2 3 4 --limit 1000

The tuned studies include the tuner's seeds (dense, three ToMe r values, the paper's style), as a user's study
does; the dominance check below says how the tuned front compares with the whole ToMe sweep at equal latency.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dsm_tune.merging import DSMConfig, Stage
from dsm_tune.search.results import load_study
from dsm_tune.search.study import DEFAULT_SAMPLER, StudySpec, run_study
from dsm_tune.search.tracking import NullTracker
from dsm_tune.search.workers import start_ray, stop_ray


def hypervolume(points: list[tuple[float, float]], max_drop: float) -> float:
    """Area dominated by `points` (drop, relative latency) within [0, max_drop] x [0, 1] (both minimised)."""
    inside = sorted((max(d, 0.0), r) for d, r in points if d <= max_drop and r < 1.0)
    area, best_latency = 0.0, 1.0
    for index, (drop, latency) in enumerate(inside):
        best_latency = min(best_latency, latency)
        next_drop = inside[index + 1][0] if index + 1 < len(inside) else max_drop
        area += (next_drop - drop) * (1.0 - best_latency)
    return area


def front_latency_at(points: list[tuple[float, float]], drop: float) -> float:
    """Best relative latency among points with at most `drop` accuracy drop (1.0 = dense, inf = none)."""
    latencies = [r for d, r in points if d <= drop + 1e-9]
    return min(latencies) if latencies else math.inf


def study_points(study_dir: Path) -> list[tuple[float, float]]:
    points = []
    for trial in load_study(study_dir).get_trials():
        attrs = trial.user_attrs
        if trial.state.name != "COMPLETE" or not attrs.get("speedup"):
            continue
        points.append((float(attrs["accuracy_drop"]), 1.0 / float(attrs["speedup"])))
    return points


def run_tuned(sampler: str, seed: int, args: argparse.Namespace, out: Path) -> tuple[list, float]:
    spec = StudySpec(model="demo", target="cpu", trials=args.trials, workers=1, out=out, mlflow=False,
                     sampler=sampler, seed=seed, limit=args.limit, max_accuracy_drop=args.max_drop,
                     study=f"{sampler}-seed{seed}")
    started = time.perf_counter()
    run_study(spec, tracker=NullTracker(), stream=io.StringIO())
    return study_points(spec.study_dir), time.perf_counter() - started


def run_tome_sweep(args: argparse.Namespace, out: Path) -> tuple[list, float]:
    """N ToMe schedules (constant r from block 0, global matching, proportional attention), same evaluator."""
    from dsm_tune.evaluation.targets import load_target
    from dsm_tune.evaluation.trial import TrialEvaluator

    evaluator = TrialEvaluator("demo", load_target("cpu"), None, limit=args.limit, cache_dir=out / "cache",
                               max_drop=None)
    fingerprint = evaluator.fingerprint
    tokens = fingerprint.grid[0] * fingerprint.grid[1]
    blocks = fingerprint.num_blocks
    # r from 1 to the count that leaves ~5% of the tokens, evenly spread over the N trials of the budget.
    top = max(1, math.floor(0.95 * tokens / blocks))
    r_values = sorted({max(1, round(1 + i * (top - 1) / max(args.trials - 1, 1))) for i in range(args.trials)})
    points = []
    started = time.perf_counter()
    for r in r_values:
        cfg = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(blocks, r=r),), proportional_attention=True,
                        model=fingerprint)
        result = evaluator.evaluate(cfg)
        points.append((float(result["accuracy_drop"]), 1.0 / float(result["speedup"])))
    return points, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="trials per study (and ToMe sweep points)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampler seeds")
    parser.add_argument("--limit", type=int, default=300, help="evaluation images (the demo slice has 2000)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy-drop limit, in points")
    parser.add_argument("--samplers", nargs="+", default=[DEFAULT_SAMPLER, "random"])
    parser.add_argument("--out", type=Path, default=None, help="study folder root (default: temporary)")
    args = parser.parse_args(argv)

    started_ray = start_ray(None)
    results: dict[str, list[float]] = {}
    fronts: dict[str, list[list]] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            out = args.out or Path(scratch)
            tome_points, seconds = run_tome_sweep(args, out)
            tome_hv = hypervolume(tome_points, args.max_drop)
            print(f"ToMe sweep ({len(tome_points)} configs): hypervolume {tome_hv:.4f}  [{seconds:.0f} s]", flush=True)
            for sampler in args.samplers:
                for seed in args.seeds:
                    points, seconds = run_tuned(sampler, seed, args, out)
                    value = hypervolume(points, args.max_drop)
                    results.setdefault(sampler, []).append(value)
                    fronts.setdefault(sampler, []).append(points)
                    print(f"{sampler} seed {seed}: hypervolume {value:.4f}  [{seconds:.0f} s]", flush=True)
    finally:
        stop_ray(started_ray)

    print(f"\nhypervolume within drop <= {args.max_drop:g} points and latency <= dense, {args.trials} trials each "
          f"(mean over seeds {args.seeds}):")
    print(f"{'method':<14} {'mean HV':>8} {'min':>8} {'max':>8} {'vs ToMe':>8} {'vs random':>10}")
    random_mean = statistics.mean(results["random"]) if "random" in results else None
    rows = [("tome-sweep", [tome_hv])] + list(results.items())
    for name, values in rows:
        mean = statistics.mean(values)
        vs_tome = f"{mean / tome_hv:.2f}x" if tome_hv > 0 else "inf"
        vs_random = f"{mean / random_mean:.2f}x" if random_mean else "-"
        print(f"{name:<14} {mean:>8.4f} {min(values):>8.4f} {max(values):>8.4f} {vs_tome:>8} {vs_random:>10}")

    # Dominance of the ToMe sweep: at each ToMe point's accuracy drop, is the tuned front at least as fast?
    default = fronts.get(DEFAULT_SAMPLER, [])
    for seed, points in zip(args.seeds, default):
        feasible = [(d, r) for d, r in tome_points if d <= args.max_drop]
        faster = sum(front_latency_at(points, d) <= r for d, r in feasible)
        strictly = sum(front_latency_at(points, d) < r - 1e-9 for d, r in feasible)
        gains = [r / front_latency_at(points, d) for d, r in feasible if math.isfinite(front_latency_at(points, d))]
        gain = f", latency ratio ToMe/tuned at equal drop: median {statistics.median(gains):.3f}" if gains else ""
        print(f"{DEFAULT_SAMPLER} seed {seed}: at the drop of each feasible ToMe point the tuned front is as fast or "
              f"faster for {faster}/{len(feasible)} (strictly faster for {strictly}){gain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
