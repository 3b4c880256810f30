"""What the confirmation split buys: the front's drops on images the search never saw, and which selection rule
keeps the exported config within the limit there.

The real pretrained ViT-S/14 of ../shared/assets, the `feature` metric, `../shared/assets/imagenet-sample` (one
image per ImageNet class). Per seed (the sampler's and the split's), one `run_study` in-process with `--confirm`
of the folder held out and `--search-images` as its `--limit` (which caps the held-out part at as many), so both
parts are balanced random samples over the classes. The study's own end-of-study confirmation is timed, and its
scorer keeps each held-out image's loss (the drop is their mean), so that any subset's drop can be taken:
- per front candidate: the search drop with its 95% interval (the study's figures) and the held-out drop with its;
- selection: the held-out images are split in two halves, `--splits` times at random; the rule sees one half
  ("confirmation") and the exported config is judged on the other ("unseen"). Per rule (search drop, as before;
  confirmed drop, the new default; the confirmed interval's upper bound, --conservative): how often the exported
  config's drop on unseen images exceeds the limit, and its mean speedup;
- class bias: the same front's drops on the held-out half with the lowest class indices (what a short `--limit`
  took before) against a balanced half, and on all held-out images.

    python benchmarks/confirm_value.py                       # 2 seeds, 16 trials, 256 search images
    python benchmarks/confirm_value.py --seeds 0 1 2 --trials 24 --json out.json

Accuracy figures do not depend on the machine's load; the front's membership does (every speedup is timed), so
run it on idle cores. Running it again with the same --out reuses the finished studies (their confirmation too,
which then has no per-image record: use a fresh --out).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_224.safetensors"
IMAGES = ASSETS / "imagenet-sample"
MODEL = "vit_small_patch14_dinov2"
Z_95 = 1.959963984540054


def run_seed(seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One study with the product's end-of-study confirmation, its scorer recording each image's loss."""
    from dsm_tune.evaluation import trial as trial_module
    from dsm_tune.evaluation.intervals import mean_interval
    from dsm_tune.evaluation.metrics import per_image_losses
    from dsm_tune.merging import apply_dsm, check_fits, remove_dsm
    from dsm_tune.search import confirmation
    from dsm_tune.search.results import trials_frame
    from dsm_tune.search.study import StudySpec, run_study

    spec = StudySpec(model=MODEL, target="cpu", checkpoint=str(WEIGHTS), data=str(IMAGES), metric="feature",
                     limit=args.search_images, confirm=args.confirm, trials=args.trials, workers=1, no_ray=True,
                     out=out, mlflow=False, seed=seed, data_seed=seed, max_accuracy_drop=args.max_drop,
                     study=f"confirm-seed{seed}")
    recorded: dict = {"losses": {}, "labels": None}

    def recording_score(self, cfg):
        # One pass per candidate, as the product makes, keeping what it averages (the feature metric's drop is
        # the mean of the per-image losses and its interval the normal one, as in AccuracyEvaluator).
        check_fits(self.model, cfg)
        apply_dsm(self.merged_model, cfg)
        try:
            losses = per_image_losses(self.accuracy, self.merged_model).numpy()
        finally:
            remove_dsm(self.merged_model)
        recorded["losses"][json.dumps(cfg.replace(model=None).merge_dict(), sort_keys=True)] = losses
        recorded["labels"] = self.data.labels.numpy()
        interval = mean_interval(len(losses), float(losses.sum()), float((losses * losses).sum()))
        return type("Scored", (), {"drop": float(losses.mean()), "ci_low": interval.low, "ci_high": interval.high,
                                   "num_images": len(losses)})()

    confirm_seconds = []
    original_confirm, original_score = confirmation.confirm_front, trial_module.HeldOutScorer.score

    def timed_confirm(*a, **k):
        begin = time.perf_counter()
        try:
            return original_confirm(*a, **k)
        finally:
            confirm_seconds.append(time.perf_counter() - begin)

    confirmation.confirm_front, trial_module.HeldOutScorer.score = timed_confirm, recording_score
    begin = time.perf_counter()
    log = io.StringIO()
    try:
        run_study(spec, stream=log)
    finally:
        confirmation.confirm_front, trial_module.HeldOutScorer.score = original_confirm, original_score
    study_seconds = time.perf_counter() - begin
    (out / f"confirm-seed{seed}.log").write_text(log.getvalue())
    study = spec.folder.load()
    frame = trials_frame(study)
    print(f"seed {seed}: study {study_seconds:.0f} s (confirmation {sum(confirm_seconds):.0f} s)", flush=True)
    return {"seed": seed, "study": study, "frame": frame, "study_s": study_seconds,
            "confirm_s": sum(confirm_seconds), "recorded": recorded}


def interval(losses: np.ndarray) -> tuple[float, float, float]:
    mean = float(losses.mean())
    half = Z_95 * float(losses.std(ddof=1)) / math.sqrt(len(losses))
    return mean, mean - half, mean + half


def pick(rows: list[dict], max_drop: float, key: str) -> dict | None:
    """The fastest row whose `key` is within the limit (rows are the front, fastest first)."""
    return next((r for r in rows if r[key] <= max_drop), None)


def analyse(result: dict, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    from dsm_tune.merging import DSMConfig
    from dsm_tune.search.confirmation import candidates

    frame = result["frame"].set_index("number")
    recorded = result["recorded"]
    points = []
    for number in candidates(result["frame"], args.max_drop):
        row = frame.loc[number]
        key = json.dumps(DSMConfig.from_dict(json.loads(row["config"])).merge_dict(), sort_keys=True)
        if key not in recorded["losses"]:
            continue   # confirmed by an earlier run of this benchmark: no per-image record
        losses = recorded["losses"][key]
        held_drop, held_low, held_high = interval(losses)
        points.append({"trial": int(number), "speedup": float(row["speedup"]),
                       "search_drop": float(row["accuracy_drop"]),
                       "search_low": float(row["accuracy_drop_ci_low"]),
                       "search_high": float(row["accuracy_drop_ci_high"]),
                       "held_drop": held_drop, "held_low": held_low, "held_high": held_high, "losses": losses})
    held = np.arange(len(points[0]["losses"])) if points else np.zeros(0, dtype=int)
    # Selection on one half of the held-out images, judged on the other half.
    outcomes = {rule: {"over": 0, "none": 0, "speedups": []} for rule in ("search", "confirmed", "conservative")}
    half = len(held) // 2
    for _ in range(args.splits if points else 0):
        shuffled = rng.permutation(held)
        confirm_part, unseen = shuffled[:half], shuffled[half:]
        rows = []
        for p in points:
            drop, _, high = interval(p["losses"][confirm_part])
            rows.append({"p": p, "search": p["search_drop"], "confirmed": drop, "conservative": high})
        for rule, tally in outcomes.items():
            chosen = pick(rows, args.max_drop, rule)
            if chosen is None:
                tally["none"] += 1
                continue
            tally["speedups"].append(chosen["p"]["speedup"])
            tally["over"] += float(chosen["p"]["losses"][unseen].mean()) > args.max_drop
    # Class bias, on the held-out images: the lowest class indices (what a short --limit took before) against a
    # balanced prefix of as many (the held-out images are in the balanced order).
    bias = []
    if points:
        size = len(held) // 2
        first_classes = np.argsort(recorded["labels"], kind="stable")[:size]
        balanced = np.arange(size)
        bias = [{"trial": p["trial"], "first_classes": float(p["losses"][first_classes].mean()),
                 "balanced": float(p["losses"][balanced].mean()), "all": float(p["losses"].mean()),
                 "first_classes_top": int(recorded["labels"][first_classes].max())} for p in points]
    for p in points:
        del p["losses"]
    search_images = int(frame["num_images"].dropna().max()) if "num_images" in frame else None
    return {"seed": result["seed"], "study_s": result["study_s"], "confirm_s": result["confirm_s"],
            "trials": args.trials, "search_images": search_images, "held_images": len(held), "front": points,
            "selection": {rule: {"over_limit": t["over"], "no_winner": t["none"], "splits": args.splits,
                                 "mean_speedup": statistics.fmean(t["speedups"]) if t["speedups"] else None}
                          for rule, t in outcomes.items()},
            "class_bias": bias}


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
    for row in rows:
        print(f"\nseed {row['seed']}: {row['trials']} trials on {row['search_images']} search images, "
              f"{row['held_images']} held out; study {row['study_s'] / 60:.1f} min, of which confirmation "
              f"{row['confirm_s']:.0f} s")
        print("| trial | speedup | search drop [95% CI] | held-out drop [95% CI] | held-out / search |")
        print("|---|---|---|---|---|")
        for p in row["front"]:
            ratio = p["held_drop"] / p["search_drop"] if p["search_drop"] > 0 else math.nan
            print(f"| {p['trial']} | {p['speedup']:.3f}x | {p['search_drop']:.3f} [{p['search_low']:.3f}, "
                  f"{p['search_high']:.3f}] | {p['held_drop']:.3f} [{p['held_low']:.3f}, {p['held_high']:.3f}] | "
                  f"{ratio:.2f} |")
    print(f"\nselection ({args.splits} random halves of the held-out images per seed: the rule sees one, the "
          f"exported config is judged on the other; limit {args.max_drop:g})")
    print("| rule | exported over the limit on unseen images | no winner | mean speedup of the exported |")
    print("|---|---|---|---|")
    for rule in ("search", "confirmed", "conservative"):
        over = sum(r["selection"][rule]["over_limit"] for r in rows)
        none = sum(r["selection"][rule]["no_winner"] for r in rows)
        total = sum(r["selection"][rule]["splits"] for r in rows)
        speedups = [r["selection"][rule]["mean_speedup"] for r in rows if r["selection"][rule]["mean_speedup"]]
        print(f"| {rule} | {over}/{total - none} ({100 * over / max(total - none, 1):.0f}%) | {none}/{total} | "
              f"{statistics.fmean(speedups):.3f}x |" if speedups else f"| {rule} | - | {none}/{total} | - |")
    print("\nclass bias, on the held-out images: the front's drops on the half of them with the lowest class indices "
          "vs a balanced half, and on all of them")
    print("| seed | trial | first classes | balanced | all images | first / balanced |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for b in row["class_bias"]:
            print(f"| {row['seed']} | {b['trial']} | {b['first_classes']:.3f} | {b['balanced']:.3f} | "
                  f"{b['all']:.3f} | {b['first_classes'] / b['balanced']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="trials per study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampler and split seeds")
    parser.add_argument("--search-images", type=int, default=256,
                        help="images the search sees (--limit; the held-out part is capped at as many)")
    parser.add_argument("--confirm", type=float, default=0.5, help="share of the folder held out of the search")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy-drop limit, in points")
    parser.add_argument("--splits", type=int, default=200, help="random halves of the held-out images per seed")
    parser.add_argument("--out", type=Path, default=None, help="study folder root (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if not WEIGHTS.is_file() or not IMAGES.is_dir():
        print(f"confirm_value: the offline assets are not at {ASSETS} (see its README)", file=sys.stderr)
        return 2
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="confirm-value-"))
    results = [run_seed(seed, args, out) for seed in args.seeds]
    rng = np.random.default_rng(0)
    rows = [analyse(result, args, rng) for result in results]
    print_report(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
