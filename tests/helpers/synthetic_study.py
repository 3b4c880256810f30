"""Real Optuna studies laid out as the driver writes them ("Study storage" in docs/interfaces.md), with synthetic
trial figures, so tracking, selection, plots and export are tested without running a search."""

from __future__ import annotations

import datetime as dt
import math
import random
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution, IntDistribution

from dsm_tune.merging import DSMConfig, ModelFingerprint, Stage

# The demo model's shape (dsm_tune_demo_vit: 6 blocks, 16x16 grid of 2-pixel patches).
DEMO_FINGERPRINT = {"name": "dsm_tune_demo_vit", "num_blocks": 6, "grid": [16, 16], "num_prefix_tokens": 1,
                    "img_size": [32, 32], "embed_dim": 64}
BASELINE_LATENCY_MS = 10.0
BASELINE_TOP1 = 88.0
VERSIONS = {"dsm_tune": "0.1.0", "timm": "1.0.31", "torch": "2.14.1"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_config(start_layer: int, depth: int, ratios: list[float], fingerprint: dict = DEMO_FINGERPRINT,
                proportional: bool = True) -> DSMConfig:
    """Stages of (nearly) equal length covering blocks start_layer..L-1, one ratio each."""
    remaining = fingerprint["num_blocks"] - start_layer
    count = len(ratios)
    sizes = [remaining // count + (1 if i < remaining % count else 0) for i in range(count)]
    return DSMConfig(start_layer=start_layer, hierarchy_depth=depth,
                     stages=tuple(Stage(blocks=b, ratio=r) for b, r in zip(sizes, ratios)),
                     proportional_attention=proportional, model=ModelFingerprint.from_dict(fingerprint))


def trial_figures(drop: float, latency: float, **extra: Any) -> dict[str, Any]:
    """The user attrs TrialEvaluator.evaluate() gives for a measured trial."""
    figures = {
        "metric": "top1", "metric_value": BASELINE_TOP1 - drop, "accuracy_drop": drop, "aborted": False,
        "latency_ms": latency, "latency_iqr_ms": latency * 0.02, "baseline_latency_ms": BASELINE_LATENCY_MS,
        "speedup": BASELINE_LATENCY_MS / latency, "flops_ratio": latency / BASELINE_LATENCY_MS * 0.95,
        "tokens_kept": latency / BASELINE_LATENCY_MS * 0.7, "num_images": 200, "eval_seconds": 1.5,
    }
    figures.update(extra)
    return figures


def spec_dict(name: str, max_drop: float | None = 1.0, **overrides: Any) -> dict[str, Any]:
    spec = {"study": name, "model": "demo", "target": "cpu", "data": "demo-fashion-mnist", "metric": "top1",
            "limit": None, "max_accuracy_drop": max_drop, "trials": 16, "timeout": None, "sampler": "nsga2",
            "space": "search_spaces/demo.yaml", "seed": 0, "workers": 1}
    spec.update(overrides)
    return spec


def create_study(out: Path, name: str, max_drop: float | None = 1.0, fingerprint: dict = DEMO_FINGERPRINT,
                 **spec_overrides: Any) -> tuple[optuna.Study, Path]:
    study_dir = Path(out) / name
    study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{(study_dir / 'study.db').resolve()}",
                                directions=["minimize", "minimize"])
    study.set_user_attr("spec", spec_dict(name, max_drop, **spec_overrides))
    study.set_user_attr("fingerprint", fingerprint)
    study.set_user_attr("baseline", {"metric_value": BASELINE_TOP1, "latency_ms": BASELINE_LATENCY_MS})
    study.set_user_attr("data_fingerprint", "fmnist-demo-0123abcd")
    study.set_user_attr("versions", VERSIONS)
    return study, study_dir


def add_measured(study: optuna.Study, config: DSMConfig, drop: float, latency: float, max_drop: float | None = 1.0,
                 seed_kind: str | None = None, worker: str = "worker-0/cpu",
                 figures: dict | None = None) -> optuna.trial.FrozenTrial:
    """A measured trial; `figures` (a TrialEvaluator.evaluate() result) replaces the synthetic figures."""
    attrs = trial_figures(drop, latency)
    attrs.update(figures or {})
    attrs.update(config=config.replace(model=None).to_dict(), worker=worker,
                 constraint=drop - max_drop if max_drop is not None else drop)
    if seed_kind:
        attrs["seed_kind"] = seed_kind
    return _add(study, optuna.trial.TrialState.COMPLETE, config, attrs, [drop, latency])


def add_failed(study: optuna.Study, config: DSMConfig, reason: str = "RuntimeError: CUDA out of memory"):
    attrs = {"config": config.replace(model=None).to_dict(), "worker": "worker-1/cpu", "fail_reason": reason}
    return _add(study, optuna.trial.TrialState.FAIL, config, attrs, None)


def add_aborted(study: optuna.Study, config: DSMConfig, drop: float = 12.0):
    """Early abort: the drop was hopeless, so latency was never measured."""
    attrs = {"config": config.replace(model=None).to_dict(), "worker": "worker-0/cpu", "metric": "top1",
             "metric_value": BASELINE_TOP1 - drop, "accuracy_drop": drop, "aborted": True,
             "latency_ms": math.nan, "num_images": 40}
    return _add(study, optuna.trial.TrialState.PRUNED, config, attrs, None)


def _add(study, state, config: DSMConfig, attrs: dict, values):
    params = {"start_layer": config.start_layer, "hierarchy_depth": config.hierarchy_depth,
              "stage0_ratio": config.stages[0].ratio}
    distributions = {"start_layer": IntDistribution(0, 5), "hierarchy_depth": IntDistribution(0, 3),
                     "stage0_ratio": FloatDistribution(0.0, 0.5)}
    start = dt.datetime(2026, 1, 1, 12, 0, 0) + dt.timedelta(minutes=len(study.trials))
    trial = optuna.trial.create_trial(
        state=state, values=values, params=params, distributions=distributions, user_attrs=attrs,
        system_attrs={"constraints": [attrs.get("constraint", 0.0)]} if values is not None else {})
    trial.datetime_start, trial.datetime_complete = start, start + dt.timedelta(seconds=40)
    study.add_trial(trial)
    return study.trials[-1]


def populate(study: optuna.Study, n_random: int = 11, max_drop: float | None = 1.0, seed: int = 0) -> None:
    """Dense, ToMe and paper seeds, `n_random` sampled trials, one failed and one aborted trial."""
    add_measured(study, make_config(0, 0, [0.0]), 0.0, BASELINE_LATENCY_MS, max_drop, seed_kind="dense")
    add_measured(study, make_config(0, 0, [0.25]), 2.6, 5.8, max_drop, seed_kind="tome")
    add_measured(study, make_config(2, 1, [0.1, 0.3]), 0.7, 7.4, max_drop, seed_kind="paper")
    rng = random.Random(seed)
    for _ in range(n_random):
        start, depth = rng.randint(0, 3), rng.randint(0, 2)
        ratios = [round(rng.uniform(0.0, 0.5), 3) for _ in range(2)]
        amount = sum(ratios) / 2 * (6 - start) / 6  # how much the config merges, 0..0.5
        latency = round(BASELINE_LATENCY_MS * (1 - 0.9 * amount) + rng.uniform(-0.3, 0.3), 4)
        drop = round(max(0.0, 14 * amount ** 2 - 0.3 * depth * amount + rng.uniform(-0.2, 0.2)), 4)
        add_measured(study, make_config(start, depth, ratios), drop, latency, max_drop)
    add_failed(study, make_config(1, 0, [0.2, 0.2]))
    add_aborted(study, make_config(0, 0, [0.5]))


def expected_front(study: optuna.Study, max_drop: float | None = None) -> list[int]:
    """Brute-force Pareto set (minimise drop and latency) of the measured trials."""
    points = [(t.number, t.user_attrs["accuracy_drop"], t.user_attrs["latency_ms"]) for t in study.trials
              if t.state.name == "COMPLETE" and not t.user_attrs.get("aborted")]
    if max_drop is not None:
        points = [p for p in points if p[1] <= max_drop]
    return sorted(n for n, d, l in points
                  if not any((d2 <= d and l2 <= l) and (d2 < d or l2 < l) for _, d2, l2 in points))
