"""Reading a study back: the Optuna storage of one study folder as a pandas frame, and its Pareto front.

Everything that reports on a study (the driver's progress and final table, `dsm-tune report`/`export`, the MLflow
tracker, the plots) reads trials through `trials_frame`, so the columns of `trials.csv` are defined here only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import optuna
import pandas as pd

from dsm_tune.evaluation.record import (
    ACCURACY_DROP, CONFIRM_ATTR, CONFIRMED_FIELDS, LATENCY_MS, NUMERIC_ATTRS, OBJECTIVES, PREFERRED_ATTRS,
    SPEEDUP_NOISY,
)
from dsm_tune.search.folder import STORAGE_FILE, StudyError, StudyFolder
from dsm_tune.search.reference import DenseReference, study_reference, truthy
from dsm_tune.search.text import json_safe

# CONFIRM_ATTR, CONFIRMED_FIELDS, OBJECTIVES and json_safe are read from here by older callers.
__all__ = ["CONFIRM_ATTR", "CONFIRMED_FIELDS", "OBJECTIVES", "STORAGE_FILE", "StudyError", "load_study",
           "trials_frame", "write_trials_csv", "pareto_numbers", "front", "front_of", "json_safe", "config_attr"]

# Leading columns of trials.csv, in this order; every trial user attr follows under its own name (the preferred
# ones first: `record.PREFERRED_ATTRS`).
BASE_COLUMNS = ("number", "state", "values_0", "values_1", "datetime_start", "datetime_complete", "duration_s")


def load_study(study_dir: Path) -> optuna.Study:
    """Open an existing dsm-tune study read-mostly; its name is the folder's name."""
    return StudyFolder.at(study_dir).load()


def _cell(value: Any) -> Any:
    """CSV-friendly form of a user attr: nested structures become JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def confirmed_scores(study_attrs: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Confirmed figures by trial number; empty for a study never confirmed."""
    record = study_attrs.get(CONFIRM_ATTR) or {}
    return {int(number): dict(fields) for number, fields in (record.get("scores") or {}).items()}


def _row(trial: optuna.trial.FrozenTrial, reference: DenseReference,
         confirmed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    values = list(trial.values) if trial.values is not None else [math.nan, math.nan]
    duration = trial.duration.total_seconds() if trial.duration is not None else math.nan
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "values_0": values[0],
        "values_1": values[1],
        "datetime_start": trial.datetime_start,
        "datetime_complete": trial.datetime_complete,
        "duration_s": duration,
    }
    for name, value in trial.params.items():
        row[f"params_{name}"] = value
    for name, value in reference.figures(trial.user_attrs).items():
        row[name] = _cell(value)
    row.update(confirmed.get(trial.number, {}))
    return row


def _ordered_columns(columns: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(columns))
    params = sorted(c for c in present if c.startswith("params_"))
    preferred = [c for c in PREFERRED_ATTRS if c in present]
    taken = set(BASE_COLUMNS) | set(params) | set(preferred)
    rest = sorted(c for c in present if c not in taken)
    return list(BASE_COLUMNS) + params + preferred + rest


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, values_0/values_1 (accuracy drop, latency as told to Optuna), params_*,
    user attrs.

    `accuracy_drop`/`latency_ms` are also present as columns of their own, filled for completed trials and for
    pruned ones where the evaluator measured them. `latency_ms` and `baseline_latency_ms` are under the study's
    current dense reference (`reference.study_reference`), not the one of the trial's tell: every row shares one
    dense latency. The raw medians are `latency_measured_ms` / `baseline_measured_ms`.
    """
    reference = study_reference(study)
    confirmed = confirmed_scores(study.user_attrs)
    rows = [_row(t, reference, confirmed) for t in study.get_trials(deepcopy=False)]
    columns = _ordered_columns([c for row in rows for c in row] + list(BASE_COLUMNS))
    frame = pd.DataFrame(rows, columns=columns)
    for name in ("values_0", "values_1", "duration_s") + NUMERIC_ATTRS:
        if name in frame:
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame


def write_trials_csv(study: optuna.Study, path: Path) -> pd.DataFrame:
    """Write trials.csv atomically (a reader never sees half a file) and return the frame."""
    frame = trials_frame(study)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    frame.to_csv(partial, index=False)
    partial.replace(path)
    return frame


def pareto_numbers(df: pd.DataFrame, max_drop: float | None = None) -> list[int]:
    """Trial numbers of the non-dominated COMPLETE trials of a trials frame in (accuracy_drop, latency_ms), fastest
    first (`front`).

    With `max_drop`, only trials within that accuracy drop compete (the front of the feasible set). A trial whose
    speedup is flagged noisy (`speedup_noisy`) is not on the front: noise must not build it.
    """
    if df.empty or "state" not in df:
        return []
    drop_col = ACCURACY_DROP if ACCURACY_DROP in df else "values_0"
    latency_col = LATENCY_MS if LATENCY_MS in df else "values_1"
    done = df[df["state"] == "COMPLETE"]
    if SPEEDUP_NOISY in done:
        done = done[~done[SPEEDUP_NOISY].map(truthy)]
    drops = pd.to_numeric(done[drop_col], errors="coerce")
    latencies = pd.to_numeric(done[latency_col], errors="coerce")
    keep = drops.notna() & latencies.notna()
    if max_drop is not None:
        keep &= drops <= max_drop
    numbers = done.loc[keep, "number"].astype(int).tolist()
    return front(zip(latencies[keep].tolist(), drops[keep].tolist(), numbers))


def front(points: Iterable[tuple[float, float, int]]) -> list[int]:
    """The Pareto front: numbers of the non-dominated (latency, drop, number) points, fastest first; exact ties
    (equal in both objectives) are all kept. Every front of dsm-tune is this one."""
    numbers: list[int] = []
    best_drop = math.inf
    last: tuple[float, float] | None = None
    for latency, drop, number in sorted(points):
        # Sorted by latency then drop: a point is dominated iff an earlier (no slower) point is at least as
        # accurate and strictly better in one objective.
        if drop < best_drop or (last is not None and (latency, drop) == last):
            numbers.append(number)
            if drop < best_drop:
                best_drop = drop
                last = (latency, drop)
    return numbers


# The driver's progress line still calls it by this name.
front_of = front


def config_attr(cfg: Any) -> dict[str, Any]:
    """A trial's `config` user attr: the config document without model, target, metrics and provenance (the
    study holds the model fingerprint once; `freeze_trial` adds the rest)."""
    return cfg.replace(model=None, target=None, metrics=None, provenance=None).to_dict()
