"""Accuracy metrics of a merged model against the dense one on the same images (the study's first objective).

- `top1`: labeled data; drop = dense top-1 (%) - merged top-1 (%), in points.
- `agreement`: label-free; drop = 100 - top-1 agreement (%) with the dense predictions (KL reported beside it).
- `feature`: for backbones without a head; drop = 100 * (1 - mean cosine) of the pooled embeddings.

The dense outputs are computed once and cached on disk, keyed by everything they depend on (architecture, weights,
data, precision, device type, library versions), so a trial only runs the merged model. Evaluation goes in chunks
and stops as soon as the drop is certain to exceed the study's limit even if every remaining image came out right.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from dsm_tune.errors import DiskFullError, DSMTuneError, disk_full_code
from dsm_tune.evaluation.data import EvalData, head_classes
from dsm_tune.evaluation.intervals import DropInterval, agreement_interval, mean_interval, top1_interval
from dsm_tune.evaluation.models import model_identity, weights_digest
from dsm_tune.evaluation.targets import DTYPES

METRICS = ("top1", "agreement", "feature")
_CACHE_FORMAT = 1
# Preprocessed inputs are kept in memory between trials (decoding and resizing again each trial would cost more
# than a small model's forward) unless they would take more than this.
DEFAULT_INPUT_CACHE_BYTES = 2 << 30
# Guards the early-abort bound against float round-off in the running sums.
_ABORT_EPSILON = 1e-9
# Multi-fidelity screening: the share of the images a config is scored on before it may be stopped as clearly
# over the limit, and how many standard errors "clearly" means (one-sided, about 2% false stops at 2.0).
SCREEN_FRACTION = 0.25
SCREEN_Z = 2.0

log = logging.getLogger(__name__)


class MetricError(DSMTuneError):
    """A metric that cannot be computed for this model and data (e.g. top1 on unlabeled images)."""


@dataclasses.dataclass(frozen=True)
class AccuracyResult:
    metric: str
    value: float      # merged top-1 (%) / agreement (%) / 100 * (1 - mean cosine)
    baseline: float   # dense top-1 (%) / 100 / 0
    drop: float       # the objective: points lost vs. the dense model (on the evaluated images when aborted)
    aborted: bool     # stopped early: the drop over all images is certain to exceed max_drop
    num_images: int   # images evaluated (fewer than the data's when aborted)
    extra: dict
    ci_low: float | None = None    # 95% paired interval of `drop` on the evaluated images (evaluation/intervals)
    ci_high: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_metric(model: torch.nn.Module, data: EvalData) -> str:
    """feature for a headless backbone, top1 with labels, agreement without."""
    if head_classes(model) == 0:
        return "feature"
    return "top1" if data.labeled else "agreement"


def _check_metric(metric: str, model: torch.nn.Module, data: EvalData) -> None:
    if metric not in METRICS:
        raise MetricError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if metric in ("top1", "agreement") and head_classes(model) == 0:
        raise MetricError(f"metric {metric} needs a classifier head but the model has none (num_classes=0); "
                          "use --metric feature")
    if metric == "top1" and not data.labeled:
        raise MetricError(f"metric top1 needs labeled images but {data.description} has no labels; "
                          "use --metric agreement")


def model_outputs(model: torch.nn.Module, images: torch.Tensor, metric: str) -> torch.Tensor:
    """Logits for the classification metrics, pooled pre-logits embeddings for `feature`."""
    if metric != "feature" or head_classes(model) == 0:
        return model(images)
    return model.forward_head(model.forward_features(images), pre_logits=True)


class AccuracyEvaluator:
    """Holds the dense model's outputs on `data` and scores merged models against them.

    `model` must be the dense (unpatched) model; it is moved to `device`/`dtype` in place.
    `cache_dir=None` keeps the dense outputs in memory only.
    """

    def __init__(self, model: torch.nn.Module, data: EvalData, metric: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32, cache_dir: Path | str | None = None,
                 input_cache_bytes: int = DEFAULT_INPUT_CACHE_BYTES):
        if dtype not in DTYPES:
            raise MetricError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise MetricError(f"batch size must be a positive integer, got {batch_size!r}")
        if data.num_images == 0:
            raise MetricError(f"no images to evaluate in {data.description}")
        self.metric = metric or default_metric(model, data)
        _check_metric(self.metric, model, data)
        self.data = data
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.batch_size = batch_size
        self._input_cache_bytes = input_cache_bytes
        self._inputs: list[torch.Tensor] | None = None
        self.labels = data.labels
        model.to(self.device, self.dtype).eval()
        self.cache_key = self._cache_key(model)
        self.cache_path = Path(cache_dir) / f"dense-{self.cache_key[:40]}.pt" if cache_dir is not None else None
        self.cache_status = "disabled"
        self.dense_outputs = self._load_cached() if self.cache_path is not None else None
        if self.dense_outputs is None:
            self.dense_outputs = self._run(model)
            if self.cache_path is not None:
                self._store()
        if self.metric == "top1":
            self._dense_correct = self.dense_outputs.argmax(1) == self.labels
        self.baseline_value = self._baseline()

    # -- dense outputs and their cache ------------------------------------------------------------------------------

    def _cache_key(self, model: torch.nn.Module) -> str:
        parts = {
            "format": _CACHE_FORMAT,
            "model": model_identity(model),
            "weights": weights_digest(model),
            "data": self.data.fingerprint,
            "num_images": self.data.num_images,
            # top1 and agreement both use logits: they share one cache entry.
            "outputs": "features" if self.metric == "feature" else "logits",
            "dtype": str(self.dtype),
            "device_type": self.device.type,
            "torch": torch.__version__,
            "timm": timm.__version__,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _load_cached(self) -> torch.Tensor | None:
        if not self.cache_path.is_file():
            self.cache_status = "miss"
            return None
        try:
            stored = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            valid = (isinstance(stored, dict) and stored.get("format") == _CACHE_FORMAT
                     and stored.get("key") == self.cache_key and isinstance(stored.get("outputs"), torch.Tensor)
                     and stored["outputs"].shape[0] == self.data.num_images)
        except Exception as exc:  # a truncated or foreign file is recomputed, never trusted
            log.warning("ignoring unreadable dense-output cache %s: %s", self.cache_path, exc)
            valid = False
        if not valid:
            self.cache_status = "invalid"
            return None
        self.cache_status = "hit"
        return stored["outputs"]

    def _store(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader (another worker) never sees a half-written file.
        handle, tmp = tempfile.mkstemp(dir=self.cache_path.parent, prefix=".dense-", suffix=".tmp")
        os.close(handle)
        try:
            # Through a Python file: torch's own writer reports a full disk as an opaque RuntimeError.
            with open(tmp, "wb") as stream:
                torch.save({"format": _CACHE_FORMAT, "key": self.cache_key, "outputs": self.dense_outputs,
                            "metric": self.metric, "data": self.data.description}, stream)
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            if disk_full_code(exc) is None:
                raise
            raise DiskFullError(str(self.cache_path), "the dense-output cache", disk_full_code(exc)) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- running a model --------------------------------------------------------------------------------------------

    def _input_batches(self):
        if self._inputs is not None:
            return iter(self._inputs)
        sample = self.data.dataset[0][0]
        batches = ((images.to(self.device, self.dtype), labels)
                   for images, labels in self.data.batches(self.batch_size))
        if sample.numel() * self.data.num_images * self.dtype.itemsize > self._input_cache_bytes:
            return (images for images, _ in batches)
        self._inputs = [images for images, _ in batches]
        return iter(self._inputs)

    @torch.inference_mode()
    def _run(self, model: torch.nn.Module) -> torch.Tensor:
        outputs = [model_outputs(model, images, self.metric).float().cpu() for images in self._input_batches()]
        return torch.cat(outputs)

    def _baseline(self) -> float:
        if self.metric == "top1":
            return 100.0 * int(self._dense_correct.sum()) / len(self._dense_correct)
        return 100.0 if self.metric == "agreement" else 0.0

    # -- scoring a merged model -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, merged_model: torch.nn.Module, max_drop: float | None = None,
                 screen_drop: float | None = None) -> AccuracyResult:
        """Score `merged_model` chunk by chunk; stop once its drop over all images must exceed `max_drop`.

        With `screen_drop`, evaluation is multi-fidelity: once a stratified prefix of at least `SCREEN_FRACTION`
        of the images is scored, it stops when the drop is above `screen_drop` with confidence (the prefix mean
        minus `SCREEN_Z` standard errors still exceeds it). The result is then an estimate from the prefix,
        marked `aborted` with `extra["screened"]`; configs that could be within the limit are scored on every
        image."""
        merged_model.to(self.device, self.dtype).eval()
        total = self.data.num_images
        tally = _Tally(self.metric, int(self._dense_correct.sum()) if self.metric == "top1" else 0)
        seen = 0
        aborted = screened = False
        for images in self._input_batches():
            count = images.shape[0]
            outputs = model_outputs(merged_model, images, self.metric).float().cpu()
            tally.add(outputs, self.dense_outputs[seen:seen + count], self.labels[seen:seen + count],
                      self._dense_correct[seen:seen + count] if self.metric == "top1" else None)
            seen += count
            if seen >= total:
                break
            if max_drop is not None and tally.certain_drop(total, seen) > max_drop + _ABORT_EPSILON:
                aborted = True
                break
            if screen_drop is not None and seen >= SCREEN_FRACTION * total and \
                    tally.drop_lower_bound(seen, SCREEN_Z) > screen_drop:
                aborted = screened = True
                break
        result = tally.result(self.baseline_value, seen, total, aborted)
        if screened:
            result.extra["screened"] = True
            result.extra["screen_drop"] = float(screen_drop)
        return result


def per_image_losses(evaluator: AccuracyEvaluator, merged_model: torch.nn.Module) -> torch.Tensor:
    """Each image's contribution to the drop (points; the drop is their mean), in the data's order: for paired
    analyses of any subset of the images (benchmarks/confirm_value.py)."""
    merged_model.to(evaluator.device, evaluator.dtype).eval()
    losses, seen = [], 0
    with torch.inference_mode():
        for images in evaluator._input_batches():
            count = images.shape[0]
            merged = model_outputs(merged_model, images, evaluator.metric).float().cpu()
            dense = evaluator.dense_outputs[seen:seen + count]
            if evaluator.metric == "feature":
                losses.append(100.0 * (1.0 - F.cosine_similarity(merged, dense, dim=1).double()))
            elif evaluator.metric == "agreement":
                losses.append(100.0 * (merged.argmax(1) != dense.argmax(1)).double())
            else:
                labels = evaluator.labels[seen:seen + count]
                right = (merged.argmax(1) == labels).double()
                losses.append(100.0 * (evaluator._dense_correct[seen:seen + count].double() - right))
            seen += count
    return torch.cat(losses)


class _Tally:
    """Running sums of one metric over the images evaluated so far."""

    def __init__(self, metric: str, dense_correct_total: int):
        self.metric = metric
        self._dense_correct_total = dense_correct_total
        self.merged_correct = 0
        self.dense_correct = 0
        self.agree = 0
        self.kl_sum = 0.0
        self.distance_sum = 0.0  # sum of (1 - cosine)
        self.min_cosine = 1.0
        # Per-image drop contributions (points), for the standard error of the drop on a prefix.
        self.loss_sum = 0.0
        self.loss_sq_sum = 0.0
        # Discordant images, for the paired intervals: dense right and merged wrong (lost), the reverse (gained).
        self.lost = 0
        self.gained = 0

    def add(self, merged: torch.Tensor, dense: torch.Tensor, labels: torch.Tensor,
            dense_correct: torch.Tensor | None) -> None:
        if self.metric == "feature":
            cosine = F.cosine_similarity(merged, dense, dim=1)
            self.distance_sum += float((1.0 - cosine).sum())
            self.min_cosine = min(self.min_cosine, float(cosine.min()))
            self._add_losses(100.0 * (1.0 - cosine.double()))
            return
        merged_pred = merged.argmax(1)
        agrees = merged_pred == dense.argmax(1)
        self.agree += int(agrees.sum())
        dense_logp, merged_logp = F.log_softmax(dense, 1), F.log_softmax(merged, 1)
        self.kl_sum += float((dense_logp.exp() * (dense_logp - merged_logp)).sum())
        if self.metric == "top1":
            merged_correct = merged_pred == labels
            self.merged_correct += int(merged_correct.sum())
            self.dense_correct += int(dense_correct.sum())
            self._add_losses(100.0 * (dense_correct.double() - merged_correct.double()))
            self.lost += int((dense_correct & ~merged_correct).sum())
            self.gained += int((~dense_correct & merged_correct).sum())
        else:
            self._add_losses(100.0 * (~agrees).double())

    def _add_losses(self, losses: torch.Tensor) -> None:
        self.loss_sum += float(losses.sum())
        self.loss_sq_sum += float((losses * losses).sum())

    def drop_lower_bound(self, seen: int, z: float) -> float:
        """Mean drop on the `seen` images minus `z` standard errors of that mean."""
        mean = self.loss_sum / seen
        variance = max(self.loss_sq_sum / seen - mean * mean, 0.0) * seen / max(seen - 1, 1)
        return mean - z * (variance / seen) ** 0.5

    def interval(self, seen: int) -> DropInterval:
        if self.metric == "top1":
            return top1_interval(seen, self.lost, self.gained)
        if self.metric == "agreement":
            return agreement_interval(seen, seen - self.agree)
        return mean_interval(seen, self.loss_sum, self.loss_sq_sum)

    def certain_drop(self, total: int, seen: int) -> float:
        """The smallest drop over all `total` images still possible after `seen`: every remaining image perfect."""
        remaining = total - seen
        if self.metric == "top1":
            # Dense correct over all images is known; the merged model gets at most every remaining image right.
            return 100.0 * (self._dense_correct_total - self.merged_correct - remaining) / total
        if self.metric == "agreement":
            return 100.0 * (seen - self.agree) / total
        return 100.0 * self.distance_sum / total

    def result(self, baseline: float, seen: int, total: int, aborted: bool) -> AccuracyResult:
        extra: dict = {"total_images": total}
        if self.metric == "feature":
            value = 100.0 * self.distance_sum / seen
            drop = value
            extra.update(mean_cosine=1.0 - self.distance_sum / seen, min_cosine=self.min_cosine)
        else:
            agreement = 100.0 * self.agree / seen
            extra.update(agreement=agreement, kl=self.kl_sum / seen)
            if self.metric == "agreement":
                value, drop = agreement, 100.0 - agreement
            else:
                value = 100.0 * self.merged_correct / seen
                # On an early abort, compare with the dense model on the same (stratified) prefix.
                dense_on_seen = 100.0 * self.dense_correct / seen
                drop = (dense_on_seen if aborted else baseline) - value
                extra["dense_on_evaluated"] = dense_on_seen
        if aborted:
            extra["certain_drop"] = self.certain_drop(total, seen)
        interval = self.interval(seen)
        return AccuracyResult(metric=self.metric, value=value, baseline=baseline, drop=drop, aborted=aborted,
                              num_images=seen, extra=extra, ci_low=interval.low, ci_high=interval.high)
