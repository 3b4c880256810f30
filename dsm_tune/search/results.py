"""Reading a study back: the Optuna storage of one study folder as a pandas frame, and its Pareto front.

Everything that reports on a study (the driver's progress and final table, `dsm-tune report`/`export`, the MLflow
tracker, the plots) reads trials through `trials_frame`, so the columns of `trials.csv` are defined here only.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import optuna
import pandas as pd

from dsm_tune.record import (
    ACCURACY_DROP, CONFIRM_ATTR, CONFIRMED_FIELDS, LATENCY_MS, NUMERIC_ATTRS, OBJECTIVES, PREFERRED_ATTRS,
    SPEEDUP_NOISY,
)
from dsm_tune.search.folder import STORAGE_FILE, StudyError, StudyFolder
from dsm_tune.search.dense_reference import (
    MEASURED_STATES, DenseReference, first_dense_ms, study_reference, trial_dense_ms, truthy,
)
from dsm_tune.search.text import json_safe

# CONFIRM_ATTR, CONFIRMED_FIELDS, OBJECTIVES and json_safe are read from here by older callers.
__all__ = ["CONFIRM_ATTR", "CONFIRMED_FIELDS", "OBJECTIVES", "STORAGE_FILE", "StudyError", "load_study",
           "trials_frame", "write_trials_csv", "pareto_numbers", "front", "json_safe", "config_attr",
           "trial_row", "rows_frame", "TrialsTable"]

# Leading columns of trials.csv, in this order; every trial user attr follows under its own name (the preferred
# ones first: `record.PREFERRED_ATTRS`).
BASE_COLUMNS = ("number", "state", "values_0", "values_1", "datetime_start", "datetime_complete", "duration_s")
NUMERIC_COLUMNS = ("values_0", "values_1", "duration_s") + NUMERIC_ATTRS


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
    return rows_frame([trial_row(t, reference, confirmed) for t in study.get_trials(deepcopy=False)])


def trial_row(trial: optuna.trial.FrozenTrial, reference: DenseReference,
              confirmed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One trial's row of `trials_frame` under `reference` (the study's current one there)."""
    return _row(trial, reference, confirmed)


def rows_frame(rows: list[dict[str, Any]], columns: Iterable[str] = ()) -> pd.DataFrame:
    """The trials frame of `trial_row` rows, in their order; `columns` adds columns the rows may lack."""
    columns = _ordered_columns([c for row in rows for c in row] + list(columns) + list(BASE_COLUMNS))
    frame = pd.DataFrame(rows, columns=columns)
    for name in NUMERIC_COLUMNS:
        if name in frame:
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame


class TrialsTable:
    """trials.csv kept by the driver one told trial at a time, without reading the storage again.

    `load` reads the study once; `told` adds (or replaces) a trial's row; `write` appends the rows told since the
    last write when that gives the very text a whole rewrite would (same columns, same dense reference, each
    column's type and timestamp precision unchanged), and rewrites the file from the rows kept here otherwise.
    Appended rows follow in the order they were told; a rewrite orders every row by number, as `trials_frame`.

    The dense reference moves with nearly every measured trial, and every row shows it: a rewrite for each move
    would cost the whole table per trial again. Rows are appended under the reference the file was last
    written with (one reference for every row, as always) and the file is rewritten under the current one once
    `reference_interval_s` has passed since (0: at once; the driver's end rewrites it from the storage anyway).
    """

    def __init__(self, reference_interval_s: float = 0.0):
        self.reference_interval_s = reference_interval_s
        self.trials: dict[int, optuna.trial.FrozenTrial] = {}
        self.confirmed: dict[int, dict[str, Any]] = {}
        self.first_ms: Any = None
        self.timings: dict[int, float] = {}
        self.reference = DenseReference.of([])
        self._written_reference: DenseReference | None = None   # None: the file needs a whole rewrite
        self._rows: dict[int, dict[str, Any]] = {}              # under `_written_reference`
        self._pending: list[int] = []                           # told since the last write, in order
        self._columns: list[str] = []
        self._dtypes: dict[str, Any] = {}
        self._precision: dict[str, int] = {}
        self._filled: set[str] = set()                           # columns holding a value
        self._rewritten = 0.0

    def load(self, study: optuna.Study) -> None:
        self.first_ms = first_dense_ms(study.user_attrs)
        self.confirmed = confirmed_scores(study.user_attrs)
        for trial in study.get_trials(deepcopy=False):
            self._add(trial)
        self.reference = DenseReference.of(list(self.timings.values()), self.first_ms)
        self._written_reference = None

    def told(self, trial: optuna.trial.FrozenTrial) -> None:
        replaced = trial.number in self.trials
        self._add(trial)
        if replaced:
            self._written_reference = None
        else:
            self._pending.append(trial.number)

    def _add(self, trial: optuna.trial.FrozenTrial) -> None:
        self.trials[trial.number] = trial
        timing = trial_dense_ms(trial.user_attrs) if trial.state.name in MEASURED_STATES else None
        if timing is not None:
            self.timings[trial.number] = timing
        else:
            self.timings.pop(trial.number, None)
        self.reference = DenseReference.of(list(self.timings.values()), self.first_ms)

    def frame(self) -> pd.DataFrame:
        """What `trials_frame` gives for the trials told (and loaded) so far."""
        return rows_frame([trial_row(self.trials[n], self.reference, self.confirmed) for n in sorted(self.trials)])

    def write(self, path: Path, replace: Callable[[Path, Callable[[Path], None]], Any]) -> None:
        """Bring `path` up to date through `replace(path, fill)`, which swaps in whole the temporary file that
        `fill(temporary)` writes (`diskspace.write_atomically`): a reader never sees half a row. Appending rows
        copies the file as it is and adds them (bytes, not the table again)."""
        # Rows show the reference's latency only (not how many timings it is the median of).
        stale = self._written_reference is not None and \
            self.reference.latency_ms != self._written_reference.latency_ms and \
            time.monotonic() - self._rewritten >= self.reference_interval_s
        if self._written_reference is None or stale or not path.exists():
            self._rewrite(path, replace)
            return
        if not self._pending:
            return
        added = self._as_written(rows_frame([self._row_of(n) for n in self._pending], self._columns))
        if added is None:
            self._rewrite(path, replace)
            return

        def fill(temporary: Path) -> None:
            shutil.copyfile(path, temporary)
            with open(temporary, "a", newline="") as handle:
                added.to_csv(handle, index=False, header=False)

        replace(path, fill)
        self._pending = []

    def _row_of(self, number: int) -> dict[str, Any]:
        row = trial_row(self.trials[number], self._written_reference, self.confirmed)
        self._rows[number] = row
        return row

    def _rewrite(self, path: Path, replace: Callable[[Path, Callable[[Path], None]], Any]) -> None:
        self._written_reference = None   # until the new file is whole
        self._rows = {n: trial_row(self.trials[n], self.reference, self.confirmed) for n in sorted(self.trials)}
        frame = rows_frame(list(self._rows.values()))
        replace(path, lambda temporary: frame.to_csv(temporary, index=False))
        self._columns = list(frame.columns)
        self._dtypes = dict(frame.dtypes)
        self._precision = {c: _timestamp_precision(frame[c]) for c in self._columns
                           if pd.api.types.is_datetime64_any_dtype(frame[c])}
        self._filled = {c for c in self._columns if frame[c].notna().any()}
        self._written_reference, self._pending, self._rewritten = self.reference, [], time.monotonic()

    def _as_written(self, added: pd.DataFrame) -> pd.DataFrame | None:
        """`added` with each column in the type the whole table gives it, or None when these rows would change a
        column's type (and so the text of rows already written): pandas writes a value by its column's type (3 in
        an integer column, 3.0 in a float one), and timestamps to the finest precision any of them has."""
        if list(added.columns) != self._columns:
            return None
        cast: dict[str, Any] = {}
        for name in self._columns:
            column, dtype = added[name], self._dtypes[name]
            if column.isna().all():
                # A missing value turns integers into floats and booleans into objects.
                if pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
                    return None
            elif pd.api.types.is_float_dtype(dtype):
                if not (pd.api.types.is_float_dtype(column.dtype) or pd.api.types.is_integer_dtype(column.dtype)):
                    return None
            elif dtype == object:
                if name not in self._filled:   # missing values only so far: the first value sets the type
                    return None
            elif column.dtype != dtype:
                return None
            elif name in self._precision and _timestamp_precision(column) != self._precision[name]:
                return None
            if column.dtype != dtype:
                cast[name] = dtype
        self._filled |= {name for name in self._columns if added[name].notna().any()}
        return added.astype(cast) if cast else added


def _timestamp_precision(column: pd.Series) -> int:
    """The sub-second digits pandas writes for a column of timestamps (0, 3, 6 or 9)."""
    values = column.dropna()
    if values.empty:
        return -1
    if (values.dt.nanosecond != 0).any():
        return 9
    micro = values.dt.microsecond
    if (micro % 1000 != 0).any():
        return 6
    return 3 if (micro != 0).any() else 0


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


def config_attr(cfg: Any) -> dict[str, Any]:
    """A trial's `config` user attr: the config document without model, target, metrics and provenance (the
    study holds the model fingerprint once; `freeze_trial` adds the rest)."""
    return cfg.replace(model=None, target=None, metrics=None, provenance=None).to_dict()
