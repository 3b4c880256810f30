"""The study driver's own cost per trial, early in a study and late in it: does it grow with the trials told?

The real driver (`run_study`: ask, dispatch, tell, trials.csv, progress, the sampler) runs a study of `--trials`
trials with a zero-cost stand-in evaluator, so the time between two consecutive tells is the driver's own work
(plus the hop to the worker and back). The storage's completion timestamps give the time per trial in windows of
`--window` consecutive tells (in the order they were told): the first window against the last one is the growth.
The driver runs in-process (`--no-ray`, default) or over `--workers` Ray workers (`--ray`); `--profile` prints the
driver's cProfile for the whole run (the functions whose total time grows are the per-trial work to look at).

    python benchmarks/driver_overhead.py                              # in-process, 300 trials
    python benchmarks/driver_overhead.py --ray --workers 2            # over 2 Ray workers
    python benchmarks/driver_overhead.py --sampler random --profile   # without TPE's own cost, profiled

Optuna's TPE sampler models every finished trial on each ask, and the traced space's proposer (`--space traced`)
refits its latency model over every timed trial on each tell: their cost grows with the study by design. The
random sampler over the sampled space leaves the driver's own bookkeeping alone in the figures. No MLflow; the
study lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.results import load_study
from dsm_tune.search.space import SPACES_DIR
from dsm_tune.search.study import SAMPLERS, StudySpec, run_study
from dsm_tune.search.testing import StandInFactory
from dsm_tune.search.tracking import NullTracker

# The demo model's shape: the stand-in's metrics come from its token schedule.
DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
SAMPLED_DEMO = SPACES_DIR / "sampled" / "demo.yaml"


def run(args: argparse.Namespace, out: Path) -> tuple[list[float], float]:
    """Completion times (seconds since the first) in the order trials were told, and the run's wall time."""
    spec = StudySpec(model="demo", target="cpu", trials=args.trials, workers=args.workers if args.ray else 1,
                     out=out, mlflow=False, study="overhead", max_accuracy_drop=1.0, sampler=args.sampler,
                     no_ray=not args.ray, space=None if args.space == "traced" else str(SAMPLED_DEMO))
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    run_study(spec, evaluator_factory=StandInFactory(DEMO, cost_s=0.0), tracker=NullTracker(), stream=io.StringIO())
    if profiler is not None:
        profiler.disable()
    total = time.perf_counter() - started
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.profile_lines)
        print(text.getvalue())
    completes = sorted(t.datetime_complete for t in load_study(spec.study_dir).get_trials(deepcopy=False)
                       if t.datetime_complete is not None)
    return [(c - completes[0]).total_seconds() for c in completes], total


def windows(times: list[float], size: int) -> list[tuple[int, int, float]]:
    """(first tell, last tell, ms per trial) for consecutive windows of `size` tells; the last window ends at the
    last tell but one, so each window's gaps all lie inside the run."""
    rows = []
    start = 0
    while start + size < len(times):
        end = start + size
        rows.append((start, end - 1, (times[end] - times[start]) / size * 1000.0))
        start = end
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--window", type=int, default=37, help="tells per window (default 37: eight windows of 300)")
    parser.add_argument("--ray", action="store_true", help="run over Ray workers instead of in-process")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers with --ray")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="tpe")
    parser.add_argument("--space", choices=("sampled", "traced"), default="sampled",
                        help="the demo's sampled space (the sampler proposes; default) or its traced space (the "
                             "traced strategy proposes, refitting its latency model on every trial)")
    parser.add_argument("--profile", action="store_true", help="print the driver's cProfile (cumulative)")
    parser.add_argument("--profile-lines", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="study folder root (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        times, total = run(args, args.out or Path(scratch))
    rows = windows(times, args.window)
    where = f"Ray, {args.workers} worker(s)" if args.ray else "in-process"
    print(f"{len(times)} trials told in {total:.1f} s ({where}, {args.space} space, sampler {args.sampler}, "
          f"zero-cost stand-in)")
    print(f"{'tells':>11} {'ms/trial':>9}")
    for first, last, ms in rows:
        print(f"{f'{first}-{last}':>11} {ms:>9.1f}")
    if len(rows) >= 2:
        print(f"\nlast window / first window: {rows[-1][2] / rows[0][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
