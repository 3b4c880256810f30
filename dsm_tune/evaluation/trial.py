"""What one study worker holds: a model, its data and dense baseline, and the means to score a DSM config.

The dense model and the merged model are two module trees sharing the very same weight tensors: the merged tree is
a structural copy patched with `apply_dsm` per trial and restored with `remove_dsm` after it. Both exist at once so
latency can interleave dense and merged forwards (drift cancels), yet no weights are duplicated and nothing heavy
is copied per trial.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path

import torch

from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation.data import DEFAULT_ORDER, EvalData, cache_root, default_data_spec, load_data
from dsm_tune.evaluation.latency import LatencyResult, measure_latency
from dsm_tune.evaluation.metrics import AccuracyEvaluator, AccuracyResult
from dsm_tune.evaluation.policy import TimingPolicy
from dsm_tune import record as schema
from dsm_tune.evaluation.models import build_model, input_size, resolve_model_name
from dsm_tune.evaluation.targets import DTYPES as DTYPES_BY_NAME
from dsm_tune.evaluation.targets import Target, load_target


class TrialError(DSMTuneError):
    """A trial evaluator that cannot be set up as asked."""


def shared_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree whose parameters and buffers are the original's tensors (no weight memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


@dataclasses.dataclass
class TrialOutcome:
    """Everything measured for one config; `flat()` is the contract's flat dict."""

    config: object  # DSMConfig bound to the model
    accuracy: AccuracyResult | None
    latency: LatencyResult | None       # None when the timing policy said it could not enter the front
    report: dict
    eval_seconds: float
    timing_skipped: str | None = None
    retimed: bool = False               # the first timing was noisy: timed again, the quieter one kept

    def flat(self) -> dict:
        acc, lat = self.accuracy, self.latency
        flat = {
            schema.METRIC: acc.metric if acc else None,
            schema.METRIC_VALUE: acc.value if acc else None,
            schema.ACCURACY_DROP: acc.drop if acc else None,
            schema.ACCURACY_DROP_CI_LOW: acc.ci_low if acc else None,
            schema.ACCURACY_DROP_CI_HIGH: acc.ci_high if acc else None,
            schema.ABORTED: acc.aborted if acc else False,
            schema.LATENCY_MS: lat.candidate_ms if lat else None,
            schema.LATENCY_IQR_MS: lat.candidate_iqr_ms if lat else None,
            schema.BASELINE_LATENCY_MS: lat.baseline_ms if lat else None,
            schema.BASELINE_LATENCY_IQR_MS: lat.baseline_iqr_ms if lat else None,
            schema.SPEEDUP: lat.speedup if lat else None,
            schema.SPEEDUP_IQR: lat.speedup_iqr if lat else None,
            schema.SPEEDUP_NOISY: speedup_noisy(lat) if lat else None,
            schema.COMPILE_S: lat.compile_s if lat else None,
            schema.FLOPS_RATIO: float(self.report["flops_ratio"]),
            schema.TOKENS_KEPT: float(self.report["tokens_kept"]),
            schema.NUM_IMAGES: acc.num_images if acc else 0,
            schema.EVAL_SECONDS: self.eval_seconds,
        }
        if acc is not None and acc.extra.get("screened"):
            flat[schema.SCREENED] = True
        if self.retimed:
            flat[schema.SPEEDUP_RETIMED] = True
        if self.timing_skipped:
            flat[schema.FAIL_REASON] = f"not timed: {self.timing_skipped}"
        return flat


# A speedup whose interleaved dense/merged pairs spread (IQR of the pair ratios) beyond this share of it is timed
# once more; if the quieter of the two timings still does, the trial is flagged `speedup_noisy` and the study keeps
# it off the front. Dense against itself on an idle machine spreads a few percent (benchmarks/dense_self.py).
NOISY_SPEEDUP_SPREAD = 0.15


def relative_spread(latency: LatencyResult) -> float:
    return latency.speedup_iqr / latency.speedup if latency.speedup > 0 else math.inf


def speedup_noisy(latency: LatencyResult) -> bool:
    return relative_spread(latency) > NOISY_SPEEDUP_SPREAD


def timing_skip_reason(accuracy: AccuracyResult | None, policy: TimingPolicy | None) -> str | None:
    """Why timing this config would be wasted under the driver's `policy` (`TimingPolicy.skip_reason`), or None
    to time it; no policy times everything."""
    policy = TimingPolicy.of(policy)
    return policy.skip_reason(accuracy) if policy is not None else None


class TrialEvaluator:
    """Builds the model and loads the data once, caches the dense outputs and latency, then scores configs.

    Every trial times the dense model again, interleaved with the merged one (that pair gives the speedup).
    `baseline` (the study's record of the dense model) takes the first dense timing: a dense-only measurement when
    read before any trial, else the dense side of the first trial.

    `order` and `holdout` choose the images (`data.select_part`): with `holdout > 0` the trials see only the
    search part, the rest is kept for `HeldOutScorer`.

    `target` is a Target or a profile name; `data_spec=None` uses the model's default data (the embedded slice
    for the demo model) or, when it has none, measures latency only. `cache_dir=None` caches dense outputs under
    the user cache folder.
    """

    def __init__(self, model_name: str, target: Target | str, data_spec: str | None = None,
                 metric: str | None = None, limit: int | None = None, checkpoint: Path | str | None = None,
                 cache_dir: Path | str | None = None, max_drop: float | None = None, *, pretrained: bool = False,
                 img_size: int | None = None, seed: int = 0, warmup: int | None = None,
                 repeats: int | None = None, order: str = DEFAULT_ORDER, holdout: float = 0.0):
        from dsm_tune.merging import ModelFingerprint

        if max_drop is not None and (not isinstance(max_drop, (int, float)) or math.isnan(max_drop)):
            raise TrialError(f"max_drop must be a number of points, got {max_drop!r}")
        self.target = load_target(target) if isinstance(target, str) else target
        self.model_name = resolve_model_name(model_name)
        self.max_drop = max_drop
        self._latency_kwargs = {"warmup": warmup, "repeats": repeats}
        model = build_model(model_name, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size)
        self.input_shape = input_size(model)
        data_spec = data_spec if data_spec is not None else default_data_spec(model_name)
        if data_spec is None and metric is not None:
            raise TrialError(f"--metric {metric} needs --data (model {model_name} has no default data)")
        # With a hold-out share, the search scores only its own part: the confirmation images stay unseen.
        self.data: EvalData | None = load_data(
            data_spec, model, limit=limit, seed=seed, order=order, part="search" if holdout > 0 else "all",
            holdout=holdout) if data_spec else None
        self.model = model.to(self.target.device, self.target.torch_dtype).eval()
        self.fingerprint = ModelFingerprint.from_model(self.model)
        self.accuracy: AccuracyEvaluator | None = None
        if self.data is not None:
            self.accuracy = AccuracyEvaluator(
                self.model, self.data, metric, device=self.target.device, dtype=self.target.dtype,
                batch_size=self.target.batch_size,
                cache_dir=Path(cache_dir) if cache_dir is not None else cache_root() / "dense-outputs")
        self.merged_model = shared_weights_copy(self.model)
        self._baseline: dict | None = None

    @property
    def data_fingerprint(self) -> str | None:
        return self.data.fingerprint if self.data else None

    @property
    def baseline(self) -> dict:
        """Dense metric value and dense latency: measured on first use unless a trial has timed the dense model."""
        if self._baseline is None:
            self._record_baseline(measure_latency(self.model, self.merged_model, self.target, self.input_shape,
                                                  **self._latency_kwargs), dense_only=True)
        return self._baseline

    def _record_baseline(self, latency: LatencyResult, dense_only: bool) -> None:
        self._baseline = {
            "metric": self.accuracy.metric if self.accuracy else None,
            "metric_value": self.accuracy.baseline_value if self.accuracy else None,
            "latency_ms": latency.baseline_ms,
            "latency_iqr_ms": latency.baseline_iqr_ms,
            # The dense model timed against itself: how far from 1.0 noise alone moves the speedup.
            "noise_speedup": latency.speedup if dense_only else None,
            "data_fingerprint": self.data_fingerprint,
            "num_images": self.data.num_images if self.data else 0,
        }

    def bind(self, cfg):
        """The config bound to this model's fingerprint (refused, naming why, if it does not fit)."""
        from dsm_tune.merging import check_fits

        check_fits(self.model, cfg)
        return cfg if cfg.model is not None else cfg.replace(model=self.fingerprint)

    def evaluate_detailed(self, cfg, screen_drop: float | None = None,
                          timing: TimingPolicy | None = None) -> TrialOutcome:
        """Accuracy first, then latency. `screen_drop` turns on the multi-fidelity screen of the accuracy pass
        (`AccuracyEvaluator.evaluate`); `timing` is the driver's policy for skipping the latency measurement of a
        config that cannot enter the front (`TimingPolicy.skip_reason`; its dict form is read too). Without
        either, everything is measured: an infeasible point then still tells a plain sampler what that much
        merging buys."""
        from dsm_tune.merging import apply_dsm, merge_report, remove_dsm

        begin = time.perf_counter()
        cfg = self.bind(cfg)
        report = merge_report(self.model, cfg)
        apply_dsm(self.merged_model, cfg)
        latency, retimed = None, False
        try:
            accuracy = self.accuracy.evaluate(self.merged_model, self.max_drop, screen_drop) \
                if self.accuracy else None
            skipped = timing_skip_reason(accuracy, timing)
            if skipped is None:
                latency = self._timed(attempt=0)
                retimed = speedup_noisy(latency)
                if retimed:
                    latency = min(latency, self._timed(attempt=1), key=relative_spread)
        finally:
            remove_dsm(self.merged_model)
        if self._baseline is None and latency is not None:
            self._record_baseline(latency, dense_only=False)
        return TrialOutcome(config=cfg, accuracy=accuracy, latency=latency, report=report,
                            eval_seconds=time.perf_counter() - begin, timing_skipped=skipped, retimed=retimed)

    def _timed(self, attempt: int) -> LatencyResult:
        return measure_latency(self.model, self.merged_model, self.target, self.input_shape, seed=attempt,
                               **self._latency_kwargs)

    def evaluate(self, cfg, screen_drop: float | None = None, timing: TimingPolicy | None = None) -> dict:
        """Score one DSMConfig: the flat dict of the contract (docs/interfaces.md)."""
        return self.evaluate_detailed(cfg, screen_drop=screen_drop, timing=timing).flat()


class HeldOutScorer:
    """Scores configs on the confirmation images the search never saw: accuracy only (latency was measured on the
    device during the study), every image, no early abort.

    The images are the hold-out part of the study's data (`holdout`), or all of `confirm_data` when the user keeps
    a separate folder; `limit` caps them like the search part. Runs on the target's device when this machine has
    it, else on the CPU in float32 (`device_note` says so): the drop then carries the CPU's numerics, not bf16's.
    """

    def __init__(self, model_name: str, target: Target | str, data_spec: str | None, metric: str | None = None,
                 limit: int | None = None, checkpoint: Path | str | None = None, cache_dir: Path | str | None = None,
                 *, pretrained: bool = False, seed: int = 0, order: str = DEFAULT_ORDER, holdout: float = 0.0,
                 confirm_data: str | None = None):
        from dsm_tune.evaluation.targets import TargetError

        if confirm_data is None and not holdout > 0:
            raise TrialError("no confirmation images: give a hold-out share (--confirm) or --confirm-data")
        try:
            resolved = load_target(target) if isinstance(target, str) else target
            device, dtype, batch = resolved.device, resolved.dtype, resolved.batch_size
            self.device_note = None
        except TargetError as exc:
            device, dtype, batch = "cpu", "float32", 32
            self.device_note = f"confirming on the CPU in float32 ({exc})"
        model = build_model(model_name, checkpoint=checkpoint, pretrained=pretrained)
        data_spec = data_spec if data_spec is not None else default_data_spec(model_name)
        if confirm_data is not None:
            self.data = load_data(confirm_data, model, limit=limit, seed=seed, order=order)
        elif data_spec is None:
            raise TrialError(f"model {model_name} has no data to hold out for confirmation: give --data")
        else:
            self.data = load_data(data_spec, model, limit=limit, seed=seed, order=order, part="confirm",
                                  holdout=holdout)
        self.model = model.to(device, DTYPES_BY_NAME[dtype]).eval()
        self.accuracy = AccuracyEvaluator(
            self.model, self.data, metric, device=device, dtype=dtype, batch_size=batch,
            cache_dir=Path(cache_dir) if cache_dir is not None else cache_root() / "dense-outputs")
        self.merged_model = shared_weights_copy(self.model)

    @property
    def data_fingerprint(self) -> str:
        return self.data.fingerprint

    @property
    def num_images(self) -> int:
        return self.data.num_images

    def score(self, cfg) -> AccuracyResult:
        from dsm_tune.merging import apply_dsm, check_fits, remove_dsm

        check_fits(self.model, cfg)
        apply_dsm(self.merged_model, cfg)
        try:
            return self.accuracy.evaluate(self.merged_model)
        finally:
            remove_dsm(self.merged_model)
