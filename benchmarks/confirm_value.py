"""What the confirmation split buys: the front's drops on images the search never saw, and which selection rule
keeps the exported config within the limit there.

The real pretrained ViT-S/14 of ../shared/assets, the `feature` metric, `../shared/assets/imagenet-sample` (one
image per ImageNet class). Per seed (the sampler's and the split's), one `run_study` in-process on
`--search-images` images drawn balanced over the classes, the rest held out (`--confirm` = the rest's share), with
the study's own end-of-study confirmation timed. Then every point of the study's feasible front is scored once on
all 1,000 images, keeping each image's loss, so that any subset's drop is a mean over it:
- per front point: the search drop and its 95% interval (the study's figures), and the drop on the held-out
  images with its interval;
- selection: the held-out images are split in two halves, `--splits` times at random; the rule sees one half
  ("confirmation") and the exported config is judged on the other ("unseen"). Reported per rule (search drop, as
  before; confirmed drop, the new default; the confirmed interval's upper bound, --conservative): how often the
  exported config's drop on unseen images exceeds the limit, and its mean speedup;
- class bias: the same front's drops on the first-classes prefix (what `--limit N` took before) against a
  balanced prefix of the same size, and against all 1,000 images.

    python benchmarks/confirm_value.py                       # 2 seeds, 16 trials, 256 search images
    python benchmarks/confirm_value.py --seeds 0 1 2 --trials 24 --json out.json

Accuracy figures do not depend on the machine's load; the front's order does (every speedup is timed), so run it
on idle cores.
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
    from dsm_tune.search import confirmation
    from dsm_tune.search.results import trials_frame
    from dsm_tune.search.study import StudySpec, run_study

    total = sum(1 for p in IMAGES.rglob("*") if p.is_file())
    spec = StudySpec(model=MODEL, target="cpu", checkpoint=str(WEIGHTS), data=str(IMAGES), metric="feature",
                     trials=args.trials, workers=1, no_ray=True, out=out, mlflow=False, seed=seed, data_seed=seed,
                     max_accuracy_drop=args.max_drop, study=f"confirm-seed{seed}",
                     confirm=1.0 - args.search_images / total)
    confirm_seconds = []
    original = confirmation.confirm_front

    def timed_confirm(*a, **k):
        begin = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            confirm_seconds.append(time.perf_counter() - begin)

    confirmation.confirm_front = timed_confirm
    begin = time.perf_counter()
    log = io.StringIO()
    try:
        run_study(spec, stream=log)
    finally:
        confirmation.confirm_front = original
    study_seconds = time.perf_counter() - begin
    (out / f"confirm-seed{seed}.log").write_text(log.getvalue())
    study = spec.folder.load()
    frame = trials_frame(study)
    front = confirmation.candidates(frame, args.max_drop, limit=10_000)
    print(f"seed {seed}: study {study_seconds:.0f} s (confirmation {sum(confirm_seconds):.0f} s), "
          f"front {front}", flush=True)
    return {"seed": seed, "spec": spec, "study": study, "frame": frame, "front": front,
            "study_s": study_seconds, "confirm_s": sum(confirm_seconds)}


class AllImages:
    """Every image of the folder, each front config's per-image loss on each (balanced order, data seed 0)."""

    def __init__(self, cache: Path):
        from dsm_tune.evaluation.data import load_data
        from dsm_tune.evaluation.metrics import AccuracyEvaluator
        from dsm_tune.evaluation.models import build_model
        from dsm_tune.evaluation.trial import shared_weights_copy

        self.model = build_model(MODEL, checkpoint=WEIGHTS)
        self.data = load_data(str(IMAGES), self.model)
        self.accuracy = AccuracyEvaluator(self.model, self.data, "feature", cache_dir=cache)
        self.merged = shared_weights_copy(self.model)
        self.paths = [str(p) for p in self.data.dataset.paths]
        self.labels = self.data.labels.numpy()
        self._losses: dict[str, np.ndarray] = {}

    def losses(self, config_document: dict, fingerprint: dict) -> np.ndarray:
        from dsm_tune.evaluation.metrics import per_image_losses
        from dsm_tune.merging import DSMConfig, apply_dsm, remove_dsm

        key = json.dumps(config_document, sort_keys=True)
        if key not in self._losses:
            cfg = DSMConfig.from_dict({**config_document, "model": fingerprint}, require_model=True)
            apply_dsm(self.merged, cfg)
            try:
                self._losses[key] = per_image_losses(self.accuracy, self.merged).numpy()
            finally:
                remove_dsm(self.merged)
        return self._losses[key]


def interval(losses: np.ndarray) -> tuple[float, float, float]:
    mean = float(losses.mean())
    half = Z_95 * float(losses.std(ddof=1)) / math.sqrt(len(losses))
    return mean, mean - half, mean + half


def positions_of(all_images: AllImages, data) -> np.ndarray:
    index = {path: i for i, path in enumerate(all_images.paths)}
    return np.array([index[str(p)] for p in data.dataset.paths])


def study_parts(all_images: AllImages, spec) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in AllImages) of the study's search and held-out images."""
    from dsm_tune.evaluation.data import load_data

    parts = []
    for part in ("search", "confirm"):
        data = load_data(str(IMAGES), all_images.model, seed=spec.data_seed, order=spec.data_order, part=part,
                         holdout=spec.confirm)
        parts.append(positions_of(all_images, data))
    return parts[0], parts[1]


def pick(rows: list[dict], max_drop: float, key: str) -> dict | None:
    """The fastest row whose `key` is within the limit (rows are the front, fastest first)."""
    return next((r for r in rows if r[key] <= max_drop), None)


def analyse(result: dict, all_images: AllImages, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    study, frame = result["study"], result["frame"].set_index("number")
    fingerprint = study.user_attrs["fingerprint"]
    search, held = study_parts(all_images, result["spec"])
    points = []
    for number in result["front"]:
        row = frame.loc[number]
        losses = all_images.losses(json.loads(row["config"]), fingerprint)
        held_drop, held_low, held_high = interval(losses[held])
        points.append({"trial": int(number), "speedup": float(row["speedup"]),
                       "search_drop": float(row["accuracy_drop"]),
                       "search_low": float(row["accuracy_drop_ci_low"]),
                       "search_high": float(row["accuracy_drop_ci_high"]),
                       "search_recomputed": float(losses[search].mean()),
                       "held_drop": held_drop, "held_low": held_low, "held_high": held_high,
                       "study_confirmed": float(row.get("confirmed_drop", math.nan)),
                       "losses": losses})
    # Selection on one half of the held-out images, judged on the other half.
    outcomes = {rule: {"over": 0, "none": 0, "speedups": []} for rule in ("search", "confirmed", "conservative")}
    half = len(held) // 2
    for _ in range(args.splits):
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
    # Class bias: the first classes against a balanced sample of the same size.
    size = args.search_images
    first_classes = np.argsort(all_images.labels, kind="stable")[:size]   # the lowest class indices
    balanced = np.arange(size)   # AllImages is in the balanced order: its prefix is a balanced sample
    bias = [{"trial": p["trial"], "first_classes": float(p["losses"][first_classes].mean()),
             "balanced": float(p["losses"][balanced].mean()), "all": float(p["losses"].mean())} for p in points]
    for p in points:
        del p["losses"]
    return {"seed": result["seed"], "study_s": result["study_s"], "confirm_s": result["confirm_s"],
            "trials": args.trials, "search_images": len(search), "held_images": len(held), "front": points,
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
    print(f"\nclass bias (the front's drops on the {args.search_images} images of the first classes vs a balanced "
          f"sample of as many, and on all the images)")
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
    parser.add_argument("--search-images", type=int, default=256, help="images the search sees (the rest held out)")
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
    all_images = AllImages(out / "cache")
    rng = np.random.default_rng(0)
    rows = [analyse(result, all_images, args, rng) for result in results]
    print_report(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
