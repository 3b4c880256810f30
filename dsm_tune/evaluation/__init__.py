"""Measuring a DSM config: data sets, accuracy metrics against cached dense outputs, latency, hardware targets.

    models   model names/aliases, timm construction, strict checkpoint loading
    targets  hardware target profiles (targets.yaml): device, dtype, batch size, compile, Ray placement
    data     image folders (ImageNet synsets -> 1k index, class folders, unlabeled) and named data sets
    metrics  top1 / agreement / feature against the dense model, disk-cached dense outputs, early abort
    latency  interleaved dense-vs-merged timing, one measurement per device at a time
    trial    TrialEvaluator: what one study worker holds
    demo     the embedded Fashion-MNIST demo model and data slice

Imports torch, timm, torchvision, numpy and yaml only: never optuna, ray or mlflow.
"""

from dsm_tune.evaluation.data import DataError, DataSpec, EvalData, load_data
from dsm_tune.evaluation.latency import LatencyResult, measure_latency
from dsm_tune.evaluation.metrics import AccuracyEvaluator, AccuracyResult, MetricError, default_metric
from dsm_tune.evaluation.models import ModelError, build_model, resolve_model_name
from dsm_tune.evaluation.targets import Target, TargetError, available_targets, load_target
from dsm_tune.evaluation.trial import TrialEvaluator

__all__ = [
    "AccuracyEvaluator", "AccuracyResult", "DataError", "DataSpec", "EvalData", "LatencyResult", "MetricError",
    "ModelError", "Target", "TargetError", "TrialEvaluator", "available_targets", "build_model", "default_metric",
    "load_data", "load_target", "measure_latency", "resolve_model_name",
]
