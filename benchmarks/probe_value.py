"""Is `run --probe` worth it? Studies of equal trial budget with and without the probe's narrowing, several seeds,
on the demo model and on the real pretrained ViT-S in ../shared/assets (feature metric, ImageNet sample images).

For each model the probe runs once (`dsm-tune probe`, --probe-limit images); then, per seed, one study runs with
`--probe <probe.json>` and one without, everything else equal (sampler, seed, trials, images, one worker).
Reported per pair:
- the hypervolume of each front (accuracy drop in [0, --max-drop] x relative latency in [0, 1], both minimised;
  see fronts.py), larger is better;
- the trials each study needs to reach the other's best feasible speedup (drop <= --max-drop), "never" when it
  does not within the budget. The probe is worth keeping only if it reaches the same front with fewer trials.

    python benchmarks/probe_value.py                                   # both models, 24 trials, seeds 0 1 2
    python benchmarks/probe_value.py --models demo --trials 3 --seeds 0   # a smoke check (does it run?)

Timing is measured inside each trial (dense and merged interleaved), but run it on idle cores: the studies' own
latency objective is what the fronts are made of.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fronts import best_speedup_within, hypervolume  # noqa: E402  (the search benchmarks' shared front arithmetic)

from dsm_tune.cli import main as cli_main  # noqa: E402
from dsm_tune.search.results import load_study  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
VIT_S_WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_224.safetensors"
IMAGENET_SAMPLE = ASSETS / "imagenet-sample"


@dataclass(frozen=True)
class Setting:
    label: str
    model_args: tuple[str, ...]     # --model/--checkpoint/--data, as `probe` and `run` both take them
    limit: int
    run_args: tuple[str, ...] = ()
    available: str | None = None    # why it cannot run here, or None


def settings(args: argparse.Namespace) -> list[Setting]:
    found = []
    for name in args.models:
        if name == "demo":
            found.append(Setting("demo", ("--model", "demo"), args.demo_limit))
        elif name == "vit_s":
            missing = [str(p) for p in (VIT_S_WEIGHTS, IMAGENET_SAMPLE) if not p.exists()]
            found.append(Setting(
                "vit_s", ("--model", "vit_small_patch14_dinov2", "--checkpoint", str(VIT_S_WEIGHTS),
                          "--data", str(IMAGENET_SAMPLE)), args.vit_limit, run_args=("--metric", "feature"),
                available=f"asset absent: {', '.join(missing)}" if missing else None))
        else:
            raise SystemExit(f"unknown model {name!r}: choose demo or vit_s")
    return found


def cli(*argv: str) -> None:
    """Run a dsm-tune command in this process, its output kept out of the report."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        code = cli_main(list(argv))
    if code != 0:
        raise SystemExit(f"dsm-tune {' '.join(argv)} failed ({code}):\n{captured.getvalue()[-2000:]}")


def trials_in_order(study_dir: Path) -> list[tuple[int, float, float]]:
    """(trial number, accuracy drop, relative latency = 1/speedup) of every timed trial, by trial number (the
    number counts every trial asked before it, timed or not, so it is the budget spent to get there)."""
    rows = []
    for trial in load_study(study_dir).get_trials():
        attrs = trial.user_attrs
        if trial.state.name == "COMPLETE" and attrs.get("speedup") and attrs.get("accuracy_drop") is not None:
            rows.append((trial.number, float(attrs["accuracy_drop"]), 1.0 / float(attrs["speedup"])))
    return sorted(rows)


def trials_to_reach(rows: list[tuple[int, float, float]], speedup: float, max_drop: float) -> int | None:
    """Trials (counted from the study's first, by number) until a feasible speedup >= `speedup`; None if never."""
    for number, drop, latency in rows:
        if drop <= max_drop and 1.0 / latency >= speedup - 1e-12:
            return number + 1
    return None


def run_pair(setting: Setting, probe_path: Path, seed: int, args: argparse.Namespace, out: Path) -> dict:
    common = [*setting.model_args, *setting.run_args, "--device", "cpu", "--workers", "1", "--no-mlflow", "--trials", str(args.trials),
              "--seed", str(seed), "--limit", str(setting.limit), "--max-accuracy-drop", str(args.max_drop),
              "--out", str(out)]
    results = {}
    for arm, extra in (("plain", []), ("probe", ["--probe", str(probe_path)])):
        study = f"{setting.label}-{arm}-seed{seed}"
        cli("run", *common, "--study", study, *extra)
        rows = trials_in_order(out / study)
        points = [(drop, latency) for _, drop, latency in rows]
        results[arm] = {"rows": rows, "hypervolume": hypervolume(points, args.max_drop),
                        "best_speedup": best_speedup_within(points, args.max_drop)}
    for arm, other in (("plain", "probe"), ("probe", "plain")):
        results[arm]["trials_to_other_best"] = trials_to_reach(results[arm]["rows"], results[other]["best_speedup"],
                                                               args.max_drop)
    return results


def describe(count: int | None) -> str:
    return "never" if count is None else str(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "vit_s"], help="demo and/or vit_s")
    parser.add_argument("--trials", type=int, default=24, help="trials per study (default 24)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds (default 0 1 2)")
    parser.add_argument("--demo-limit", type=int, default=300, help="evaluation images for the demo (default 300)")
    parser.add_argument("--vit-limit", type=int, default=64, help="evaluation images for ViT-S (default 64)")
    parser.add_argument("--probe-limit", type=int, default=64, help="images the probe sees (default 64)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy-drop limit in points (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="where studies go (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        for setting in settings(args):
            if setting.available is not None:
                print(f"{setting.label}: skipped ({setting.available})")
                continue
            probe_dir = out / f"{setting.label}-probe"
            cli("probe", *setting.model_args, "--limit", str(args.probe_limit), "--out", str(probe_dir))
            probe = json.loads((probe_dir / "probe.json").read_text())
            print(f"\n{setting.label}: probe on {probe['num_images']} images -> convergence block "
                  f"{probe['convergence_block']} ({probe['rule']})")
            print(f"{'seed':>4} {'HV plain':>9} {'HV probe':>9} {'best x plain':>12} {'best x probe':>12} "
                  f"{'plain->probe best':>18} {'probe->plain best':>18}")
            summary: dict[str, list] = {"plain": [], "probe": [], "plain_reach": [], "probe_reach": []}
            for seed in args.seeds:
                pair = run_pair(setting, probe_dir / "probe.json", seed, args, out)
                plain, probed = pair["plain"], pair["probe"]
                print(f"{seed:>4} {plain['hypervolume']:>9.4f} {probed['hypervolume']:>9.4f} "
                      f"{plain['best_speedup']:>12.3f} {probed['best_speedup']:>12.3f} "
                      f"{describe(plain['trials_to_other_best']):>18} {describe(probed['trials_to_other_best']):>18}",
                      flush=True)
                summary["plain"].append(plain["hypervolume"])
                summary["probe"].append(probed["hypervolume"])
                summary["plain_reach"].append(plain["trials_to_other_best"])
                summary["probe_reach"].append(probed["trials_to_other_best"])
            mean = {arm: statistics.fmean(summary[arm]) for arm in ("plain", "probe")}
            reached = {arm: sum(v is not None for v in summary[f"{arm}_reach"]) for arm in ("plain", "probe")}
            print(f"mean hypervolume: plain {mean['plain']:.4f}, probe {mean['probe']:.4f} "
                  f"(ratio {mean['probe'] / mean['plain'] if mean['plain'] > 0 else math.inf:.3f}); "
                  f"reached the other's best feasible speedup within {args.trials} trials: plain "
                  f"{reached['plain']}/{len(args.seeds)} seeds, probe {reached['probe']}/{len(args.seeds)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
