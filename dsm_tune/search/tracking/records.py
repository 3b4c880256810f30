"""What MLflow gets for one trial: a finished Optuna trial as a record, and the record as params/metrics/tags."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any, Mapping

from dsm_tune.errors import DSMTuneError
from dsm_tune.search.reference import NOISY_ATTR, DenseReference

# The 95% paired interval of the search drop, set per trial by the evaluator (absent on older studies).
INTERVAL_KEYS = ("accuracy_drop_ci_low", "accuracy_drop_ci_high")
# The confirmation figures: the driver sets them on front candidates after the study ends, i.e. after their
# child runs were logged, so `end_study` brings them to children that exist already (`runs.ChildRuns.log`).
# Unlike the search figures (a child keeps those of its time), a later value of these replaces the logged one.
LATE_METRIC_KEYS = ("confirmed_drop", "confirmed_drop_ci_low", "confirmed_drop_ci_high", "confirmed_num_images")
# Trial attrs logged as child-run metrics (names as in the trials frame, so the two compare 1:1). latency_ms and
# baseline_latency_ms are under the study's dense reference when the record was built (`trial_record`): a child
# logged earlier keeps the figures of its time, the raw medians (*_measured_ms) never change.
METRIC_KEYS = ("metric_value", "accuracy_drop", "latency_ms", "latency_iqr_ms", "baseline_latency_ms",
               "baseline_latency_iqr_ms", "latency_measured_ms", "baseline_measured_ms", "speedup", "speedup_iqr",
               "flops_ratio", "tokens_kept", "num_images", "eval_seconds", "compile_s", "constraint",
               *INTERVAL_KEYS, *LATE_METRIC_KEYS)
# Trial attrs logged as child-run tags (strings a UI filter can match).
TAG_KEYS = ("metric", "worker", "fail_reason", "seed_kind", "aborted", NOISY_ATTR)
TRIAL_TAG = "trial_number"
MAX_TAG_LENGTH = 5000


class TrackingError(DSMTuneError):
    """The tracking configuration is unusable (a malformed URI, a record without a trial number)."""


def trial_record(trial: Any, reference: DenseReference | None = None) -> dict[str, Any]:
    """The record `log_trial` takes, built from an Optuna FrozenTrial of a dsm-tune study.

    Keys: number, state (COMPLETE/FAIL/PRUNED), params (Optuna's), start_ms/end_ms, and every trial user attr
    at the top level (config, metric, accuracy_drop, latency_ms, ..., worker, fail_reason, seed_kind). With
    `reference` (the study's current one), the latency figures are recomputed under it as the trials frame does;
    without, they are as told (under the reference of the trial's tell).
    """
    attrs = reference.figures(trial.user_attrs) if reference is not None else trial.user_attrs
    record: dict[str, Any] = dict(attrs)
    record.update(number=int(trial.number), state=trial.state.name, params=dict(trial.params),
                  start_ms=_ms(trial.datetime_start), end_ms=_ms(trial.datetime_complete))
    return record


def _ms(moment: _dt.datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None


def tag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_TAG_LENGTH]


def finite_metric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if not math.isnan(number) else None


def mlflow_payload(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record (see `trial_record`) as what MLflow gets: JSON-safe params, metrics and tags (also the form a
    record is queued in)."""
    if "number" not in record:
        raise TrackingError(f"trial record without a 'number': {sorted(record)}")
    metrics = {}
    for key in METRIC_KEYS:
        value = finite_metric(record.get(key))
        if value is not None:
            metrics[key] = value
    state = str(record.get("state") or "COMPLETE")
    tags = {TRIAL_TAG: str(int(record["number"])), "state": state}
    for key in TAG_KEYS:
        value = record.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            tags[key] = tag_value(value)
    return {"number": int(record["number"]), "state": state, "params": _params(record), "metrics": metrics,
            "tags": tags, "start_ms": record.get("start_ms"), "end_ms": record.get("end_ms")}


def _params(record: Mapping[str, Any]) -> dict[str, str]:
    config = record.get("config")
    if config is not None:
        from dsm_tune.merging import DSMConfig

        flat = DSMConfig.from_dict(config).merge_params()   # the `config` attr: see `results.config_attr`
        return {k: tag_value(v) for k, v in flat.items()}
    # No config (a trial that failed before its config was built): Optuna's raw parameters.
    return {k: tag_value(v) for k, v in (record.get("params") or {}).items()}
