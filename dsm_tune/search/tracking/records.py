"""What MLflow gets for one trial: a finished Optuna trial as a record, and the record as params/metrics/tags."""

from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any, Mapping

from dsm_tune.errors import DSMTuneError
from dsm_tune.record import CONFIG, INTERVAL_KEYS, LATE_METRIC_KEYS, METRIC_KEYS, TAG_KEYS
from dsm_tune.search.dense_reference import DenseReference

# What a child run logs is `record.METRIC_KEYS` / `record.TAG_KEYS`: latency_ms and baseline_latency_ms are under
# the study's dense reference when the record was built (`trial_record`), so a child logged earlier keeps the
# figures of its time; the raw medians (*_measured_ms) never change. The confirmation figures
# (`record.LATE_METRIC_KEYS`) are set after the children were logged: `end_study` brings them to children that
# exist already (`runs.ChildRuns.log`), a later value replacing the logged one.
__all__ = ["INTERVAL_KEYS", "LATE_METRIC_KEYS", "METRIC_KEYS", "TAG_KEYS", "TrackingError", "finite_metric",
           "mlflow_payload", "tag_value", "trial_record"]

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
    config = record.get(CONFIG)
    if config is not None:
        from dsm_tune.merging import DSMConfig

        flat = DSMConfig.from_dict(config).merge_params()   # the `config` attr: see `results.config_attr`
        return {k: tag_value(v) for k, v in flat.items()}
    # No config (a trial that failed before its config was built): Optuna's raw parameters.
    return {k: tag_value(v) for k, v in (record.get("params") or {}).items()}
