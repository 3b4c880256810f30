"""Search quality on the demo model: hypervolume of the front after N trials: the traced search (the default),
the traced space with the operator choice (prune first, merge variants), the sampled space with TPE (the default
before the traced search), random search of the sampled space, and a ToMe
constant-r sweep of equal cost (N configs), over several seeds.

Objectives are the study's own: accuracy drop (points) and latency, taken as 1/speedup (the merged model's
latency over the dense model's, timed interleaved in the same trial, so machine drift cancels). The hypervolume
is the area the front dominates inside the region of interest: drop in [0, --max-drop], relative latency in
[0, 1] (i.e. feasible and faster than dense). Larger is better; 0 means nothing useful was found.

    python benchmarks/search_quality.py                          # ~15 min on 2 CPU cores
    python benchmarks/search_quality.py --trials 48 --seeds 0 1 2 3 4 --limit 1000

The studies include their seeds (traced: dense and the ToMe / paper / front-loaded shapes; sampled: dense, three
ToMe r values, the paper's style), as a user's study does; the dominance check below says how each front
compares with the whole ToMe sweep at equal latency. Timing noise decides much of this on the tiny demo: run it
on idle cores.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fronts import as_fast_at, best_speedup_within, front_latency_at, hypervolume, study_points  # noqa: E402

from dsm_tune.merging import DSMConfig, Stage  # noqa: E402
from dsm_tune.search.study import DEFAULT_SAMPLER, StudySpec, run_study  # noqa: E402
from dsm_tune.search.tracking import NullTracker  # noqa: E402
from dsm_tune.search.workers import start_ray, stop_ray  # noqa: E402

SAMPLED_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "sampled" / "demo.yaml"
OPERATOR_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "operators" / "demo.yaml"
# name -> (sampler, space file or None for the default traced space)
METHODS = {
    "traced": (DEFAULT_SAMPLER, None),
    "operators": (DEFAULT_SAMPLER, OPERATOR_SPACE),
    "sampled-tpe": (DEFAULT_SAMPLER, SAMPLED_SPACE),
    "random": ("random", SAMPLED_SPACE),
}


def run_tuned(method: str, seed: int, args: argparse.Namespace, out: Path) -> tuple[list, float]:
    sampler, space = METHODS[method]
    spec = StudySpec(model="demo", target="cpu", trials=args.trials, workers=1, out=out, mlflow=False,
                     sampler=sampler, seed=seed, limit=args.limit, max_accuracy_drop=args.max_drop,
                     batch_size=args.batch_size, space=str(space) if space else None, study=f"{method}-seed{seed}")
    started = time.perf_counter()
    run_study(spec, tracker=NullTracker(), stream=io.StringIO())
    return study_points(spec.study_dir), time.perf_counter() - started


def run_tome_sweep(args: argparse.Namespace, out: Path) -> tuple[list, float]:
    """N ToMe schedules (constant r from block 0, global matching, proportional attention), same evaluator."""
    from dsm_tune.evaluation.targets import load_target
    from dsm_tune.evaluation.trial import TrialEvaluator

    evaluator = TrialEvaluator("demo", load_target("cpu", batch_size=args.batch_size), None, limit=args.limit,
                               cache_dir=out / "cache", max_drop=None)
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
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="traced: the default space and sampler; operators: the traced space that also chooses "
                             "the operators (search_spaces/operators/demo.yaml); sampled-tpe: the sampled space "
                             "(per-stage ratios) with TPE, the default before the traced search; random: random "
                             "search of that space")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="timing batch (default: the demo's cpu batch of `dsm-tune run`)")
    parser.add_argument("--out", type=Path, default=None, help="study folder root (default: temporary)")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        from dsm_tune.commands.run import DEFAULT_DEMO_CPU_BATCH

        args.batch_size = DEFAULT_DEMO_CPU_BATCH

    started_ray = start_ray(None)
    results: dict[str, list[float]] = {}
    fronts: dict[str, list[list]] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            out = args.out or Path(scratch)
            tome_points, seconds = run_tome_sweep(args, out)
            tome_hv = hypervolume(tome_points, args.max_drop)
            print(f"ToMe sweep ({len(tome_points)} configs): hypervolume {tome_hv:.4f}  [{seconds:.0f} s]", flush=True)
            for method in args.methods:
                for seed in args.seeds:
                    points, seconds = run_tuned(method, seed, args, out)
                    value = hypervolume(points, args.max_drop)
                    results.setdefault(method, []).append(value)
                    fronts.setdefault(method, []).append(points)
                    print(f"{method} seed {seed}: hypervolume {value:.4f}  [{seconds:.0f} s]", flush=True)
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

    # Dominance of the ToMe sweep: at each ToMe point's accuracy drop, is the method's front at least as fast?
    for method, method_fronts in fronts.items():
        for seed, points in zip(args.seeds, method_fronts):
            faster, feasible = as_fast_at(points, tome_points, args.max_drop)
            at_sweep = [(r, front_latency_at(points, d)) for d, r in tome_points if d <= args.max_drop]
            strictly = sum(latency < r - 1e-9 for r, latency in at_sweep)
            gains = [r / latency for r, latency in at_sweep if math.isfinite(latency)]
            gain = f", latency ratio ToMe/tuned at equal drop: median {statistics.median(gains):.3f}" if gains else ""
            print(f"{method} seed {seed}: best speedup within {args.max_drop:g} points "
                  f"{best_speedup_within(points, args.max_drop):.3f}x; at the drop of each feasible ToMe point its "
                  f"front is as fast or faster for {faster}/{feasible} (strictly faster for {strictly}){gain}")
    print(f"tome-sweep: best speedup within {args.max_drop:g} points "
          f"{best_speedup_within(tome_points, args.max_drop):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
