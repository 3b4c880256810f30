"""Does the tuner beat a hand sweep on a real model?

The real pretrained ViT-S/14 of ../shared/assets, the `feature` metric (100 * (1 - cosine) of the embedding) on
real ImageNet images, CPU, batch 8, one worker. Compared in one run:
- tuned: `dsm-tune run` with the default (traced) space and sampler, N trials, per seed;
- operators: the same on `search_spaces/operators/vit_small.yaml`, whose shapes also choose how tokens go (the first
  blocks prune, the rest merge by ToMe's average, a norm-keeping one or redundancy first), per seed;
- sweep: ToMe's constant r (start 0, depth 0, proportional attention) at r = 2, 4, ... 20, every config measured;
- sampled-tpe (with --sampled-tpe-seeds): `dsm-tune run` on the sampled space (per-stage ratios) with the default
  sampler, the default before the traced search;
- random: N random configs of the sampled space (`search_spaces/sampled/vit_small.yaml`, per-stage ratios), per
  seed, scored with the same accuracy screen and timed only when within the limit (the tuner's cheap machinery,
  so only the choice of configs differs).
Sweep and random share one evaluator with the tuned study's images and dense cache.

    python benchmarks/real_front.py                       # 30 trials, seeds 0 1, 128 images
    python benchmarks/real_front.py --trials 30 --seeds 0 1 2 --limit 128

Reported: best speedup within 0.25 / 0.5 / 1.0 points, hypervolume (drop <= limit, latency <= dense), at how
many feasible sweep points the tuned front is as fast or faster, wall time and trials per hour. Run it on idle
cores: every speedup is timed.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fronts import as_fast_at, best_speedup_within, hypervolume, study_points  # noqa: E402

from dsm_tune.merging import DSMConfig, Stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_224.safetensors"
IMAGES = ASSETS / "imagenet-sample"
MODEL = "vit_small_patch14_dinov2"
SAMPLED_SPACE = REPO / "search_spaces" / "sampled" / "vit_small.yaml"
OPERATOR_SPACE = REPO / "search_spaces" / "operators" / "vit_small.yaml"
DROPS = (0.25, 0.5, 1.0)


def evaluator(args: argparse.Namespace, cache: Path):
    from dsm_tune.evaluation.targets import load_target
    from dsm_tune.evaluation.trial import TrialEvaluator

    return TrialEvaluator(MODEL, load_target("cpu"), str(IMAGES), metric="feature", limit=args.limit,
                          checkpoint=WEIGHTS, cache_dir=cache)


def point(result: dict) -> tuple[float, float] | None:
    speedup = result.get("speedup")
    return (float(result["accuracy_drop"]), 1.0 / float(speedup)) if speedup else None


def run_sweep(ev, args: argparse.Namespace) -> tuple[list, float, int]:
    points, started = [], time.perf_counter()
    for r in args.sweep:
        cfg = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(ev.fingerprint.num_blocks, r=r),),
                        proportional_attention=True, model=ev.fingerprint)
        result = ev.evaluate(cfg)
        points.append(point(result))
        print(f"  sweep r={r}: drop {result['accuracy_drop']:.3f}, {result['speedup']:.3f}x", flush=True)
    return points, time.perf_counter() - started, len(args.sweep)


def run_random(ev, seed: int, args: argparse.Namespace) -> tuple[list, float, int]:
    from dsm_tune.search.space import load_space

    space = load_space(SAMPLED_SPACE, MODEL, ev.fingerprint)
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    points, started = [], time.perf_counter()
    for _ in range(args.trials):
        trial = study.ask()
        cfg = space.suggest(trial)
        if space.violation(cfg):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        result = ev.evaluate(cfg, screen_drop=args.max_drop, timing={"max_drop": args.max_drop})
        found = point(result)
        if found is not None:
            points.append(found)
            study.tell(trial, list(found))
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return points, time.perf_counter() - started, args.trials


def run_tuned(seed: int, args: argparse.Namespace, out: Path, space: Path | None = None,
              name: str = "tuned") -> tuple[list, float, int]:
    from dsm_tune.search.study import StudySpec, run_study

    spec = StudySpec(model=MODEL, target="cpu", checkpoint=str(WEIGHTS), data=str(IMAGES), metric="feature",
                     limit=args.limit, trials=args.trials, workers=1, out=out, mlflow=False, seed=seed,
                     max_accuracy_drop=args.max_drop, study=f"{name}-seed{seed}",
                     space=str(space) if space else None)
    started = time.perf_counter()
    log = io.StringIO()
    run_study(spec, stream=log)
    seconds = time.perf_counter() - started
    (out / f"{name}-seed{seed}.log").write_text(log.getvalue())
    return study_points(spec.study_dir), seconds, args.trials


def summarize(name: str, points: list, seconds: float, trials: int, sweep: list, args) -> dict:
    row = {"method": name, "hypervolume": hypervolume(points, args.max_drop), "seconds": seconds,
           "trials": trials, "trials_per_hour": 3600.0 * trials / seconds if seconds else 0.0}
    for drop in DROPS:
        row[f"best@{drop:g}"] = best_speedup_within(points, drop)
    if sweep is not None:
        row["as_fast_at_sweep"] = as_fast_at(points, sweep, args.max_drop)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30, help="trials per tuned / random study")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="seeds of the tuned study")
    parser.add_argument("--limit", type=int, default=128, help="ImageNet images (stratified)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy-drop limit, in points")
    parser.add_argument("--sweep", type=int, nargs="+", default=list(range(2, 21, 2)), help="ToMe r values")
    parser.add_argument("--random-seeds", type=int, nargs="*", default=None,
                        help="seeds of the random search (default: --seeds; none to skip it)")
    parser.add_argument("--sampled-tpe-seeds", type=int, nargs="*", default=[],
                        help="seeds of a study on the sampled space with the default sampler (default: none)")
    parser.add_argument("--operator-seeds", type=int, nargs="*", default=None,
                        help="seeds of a study on the operator space (search_spaces/operators/vit_small.yaml: shapes "
                             "plus prune/merge operators); default: --seeds; none to skip it")
    parser.add_argument("--out", type=Path, default=None, help="study folder root (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if not WEIGHTS.is_file() or not IMAGES.is_dir():
        print(f"real_front: the offline assets are not at {ASSETS} (see its README)", file=sys.stderr)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        ev = evaluator(args, out / "cache")
        sweep, seconds, trials = run_sweep(ev, args)
        rows.append(summarize("tome-sweep", sweep, seconds, trials, None, args))
        print(f"  {rows[0]}", flush=True)
        per_method: dict[str, list[dict]] = {"tuned": [], "operators": [], "sampled-tpe": [], "random": []}
        random_seeds = args.seeds if args.random_seeds is None else args.random_seeds
        operator_seeds = args.seeds if args.operator_seeds is None else args.operator_seeds
        for seed in args.seeds:
            print(f"tuned seed {seed} ...", flush=True)
            points, seconds, trials = run_tuned(seed, args, out)
            per_method["tuned"].append(summarize(f"tuned seed {seed}", points, seconds, trials, sweep, args))
            print(f"  {per_method['tuned'][-1]}", flush=True)
            if seed in operator_seeds:
                print(f"operators seed {seed} ...", flush=True)
                points, seconds, trials = run_tuned(seed, args, out, OPERATOR_SPACE, "operators")
                per_method["operators"].append(summarize(f"operators seed {seed}", points, seconds, trials, sweep,
                                                         args))
                print(f"  {per_method['operators'][-1]}", flush=True)
            if seed in random_seeds:
                print(f"random seed {seed} ...", flush=True)
                points, seconds, trials = run_random(ev, seed, args)
                per_method["random"].append(summarize(f"random seed {seed}", points, seconds, trials, sweep, args))
                print(f"  {per_method['random'][-1]}", flush=True)
        for seed in args.sampled_tpe_seeds:
            print(f"sampled-tpe seed {seed} ...", flush=True)
            points, seconds, trials = run_tuned(seed, args, out, SAMPLED_SPACE, "sampled-tpe")
            per_method["sampled-tpe"].append(summarize(f"sampled-tpe seed {seed}", points, seconds, trials, sweep,
                                                       args))
            print(f"  {per_method['sampled-tpe'][-1]}", flush=True)
        for method_rows in per_method.values():
            rows += method_rows

    sweep_row = rows[0]
    header = ("| method | best <=0.25 | best <=0.5 | best <=1.0 | hypervolume | as fast at sweep points | wall "
              "| trials/h |")
    print(f"\nViT-S/14 (real weights), feature metric on {args.limit} ImageNet images, CPU, limit "
          f"{args.max_drop:g} point(s), {args.trials} trials per study\n")
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        fast = row.get("as_fast_at_sweep")
        print(f"| {row['method']} | {row['best@0.25']:.3f}x | {row['best@0.5']:.3f}x | {row['best@1']:.3f}x | "
              f"{row['hypervolume']:.4f} | {f'{fast[0]}/{fast[1]}' if fast else '-'} | {row['seconds'] / 60:.1f} min "
              f"| {row['trials_per_hour']:.0f} |")
    tuned = per_method["tuned"]
    if tuned:
        gain = statistics.mean(r["best@1"] for r in tuned) / sweep_row["best@1"]
        wall = statistics.mean(r["seconds"] for r in tuned) / sweep_row["seconds"]
        every = all(r["as_fast_at_sweep"][0] == r["as_fast_at_sweep"][1] for r in tuned)
        print(f"\ntuned vs sweep: best speedup within {args.max_drop:g} point(s) x{gain:.3f} (target >= 1.05), "
              f"wall time x{wall:.2f} of the sweep's (target <= 3), as fast at every feasible sweep point: "
              f"{'yes' if every else 'no'}")
    operators = per_method["operators"]
    if tuned and operators:
        # Seed by seed: the operator space and today's space start from the same seed.
        pairs = [(o, t) for o in operators for t in tuned if o["method"].split()[-1] == t["method"].split()[-1]]
        for o, t in pairs:
            print(f"operators vs tuned, seed {o['method'].split()[-1]}: best within {args.max_drop:g} x"
                  f"{o['best@1'] / t['best@1']:.3f} (target >= 1.05), hypervolume {o['hypervolume']:.4f} vs "
                  f"{t['hypervolume']:.4f} (target >=), wall x{o['seconds'] / t['seconds']:.2f} (target <= 1.2), "
                  f"as fast at every feasible sweep point: "
                  f"{'yes' if o['as_fast_at_sweep'][0] == o['as_fast_at_sweep'][1] else 'no'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
