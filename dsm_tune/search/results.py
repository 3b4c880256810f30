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

from dsm_tune.errors import DSMTuneError

STORAGE_FILE = "study.db"
OBJECTIVES = ("accuracy_drop", "latency_ms")

# Leading columns of trials.csv, in this order; every trial user attr follows under its own name.
BASE_COLUMNS = ("number", "state", "values_0", "values_1", "datetime_start", "datetime_complete", "duration_s")
# Read first when present so the CSV is easy to scan; the rest follow alphabetically.
PREFERRED_ATTRS = (
    "seed_kind", "accuracy_drop", "latency_ms", "speedup", "constraint", "metric", "metric_value", "aborted",
    "latency_iqr_ms", "baseline_latency_ms", "flops_ratio", "tokens_kept", "num_images", "eval_seconds", "worker",
    "fail_reason", "duplicate_of", "config_key", "config",
)


class StudyError(DSMTuneError):
    """A study folder is missing, unreadable, not a dsm-tune study, or cannot go on."""


def storage_url(study_dir: Path) -> str:
    return f"sqlite:///{Path(study_dir).resolve() / STORAGE_FILE}"


def open_storage(study_dir: Path) -> optuna.storages.RDBStorage:
    """The study's storage for writing (the driver). SQLite in WAL mode with synchronous=NORMAL: a commit no
    longer waits for the disk (a trial writes a dozen attributes, each its own commit, which took ~40 ms apiece
    with the default journal), and a crash of the process still loses nothing committed; only a power cut can
    drop the last commits. WAL needs a local file system (not NFS) for the study folder."""
    import sqlite3

    path = str(Path(study_dir).resolve() / STORAGE_FILE)

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(path, timeout=60, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return optuna.storages.RDBStorage(storage_url(study_dir), engine_kwargs={"creator": connect})


def load_study(study_dir: Path) -> optuna.Study:
    """Open an existing dsm-tune study read-mostly; its name is the folder's name."""
    study_dir = Path(study_dir)
    db = study_dir / STORAGE_FILE
    if not db.is_file():
        raise StudyError(f"no study at {study_dir}: {db} does not exist (run `dsm-tune run` first, or check --out)")
    name = study_dir.name
    try:
        study = optuna.load_study(study_name=name, storage=storage_url(study_dir))
    except KeyError:
        raise StudyError(f"{db} holds no study named {name!r}: the folder name must be the study name") from None
    except Exception as exc:  # sqlite/SQLAlchemy errors of a corrupt or foreign file
        raise StudyError(f"cannot read the study storage {db}: {type(exc).__name__}: {exc}") from None
    if "spec" not in study.user_attrs:
        raise StudyError(f"{db} is an Optuna study but not a dsm-tune study (no 'spec' user attribute)")
    return study


def _cell(value: Any) -> Any:
    """CSV-friendly form of a user attr: nested structures become JSON text."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def _row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
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
    for name, value in trial.user_attrs.items():
        row[name] = _cell(value)
    return row


def _ordered_columns(columns: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(columns))
    params = sorted(c for c in present if c.startswith("params_"))
    preferred = [c for c in PREFERRED_ATTRS if c in present]
    taken = set(BASE_COLUMNS) | set(params) | set(preferred)
    rest = sorted(c for c in present if c not in taken)
    return list(BASE_COLUMNS) + params + preferred + rest


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, values_0/values_1 (accuracy drop, latency), params_*, user attrs.

    `accuracy_drop`/`latency_ms` are also present as columns of their own (the user attrs), filled for completed
    trials and for pruned ones where the evaluator measured them.
    """
    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    columns = _ordered_columns([c for row in rows for c in row] + list(BASE_COLUMNS))
    frame = pd.DataFrame(rows, columns=columns)
    for name in ("values_0", "values_1", "duration_s") + OBJECTIVES + ("constraint", "speedup"):
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
    """Trial numbers of the non-dominated COMPLETE trials in (accuracy_drop, latency_ms), fastest first.

    With `max_drop`, only trials within that accuracy drop compete (the front of the feasible set). Ties (equal in
    both objectives) are all kept.
    """
    if df.empty or "state" not in df:
        return []
    drop_col = "accuracy_drop" if "accuracy_drop" in df else "values_0"
    latency_col = "latency_ms" if "latency_ms" in df else "values_1"
    done = df[df["state"] == "COMPLETE"]
    drops = pd.to_numeric(done[drop_col], errors="coerce")
    latencies = pd.to_numeric(done[latency_col], errors="coerce")
    keep = drops.notna() & latencies.notna()
    if max_drop is not None:
        keep &= drops <= max_drop
    points = sorted(
        zip(latencies[keep].tolist(), drops[keep].tolist(), done.loc[keep, "number"].astype(int).tolist()))
    front: list[int] = []
    best_drop = math.inf
    last: tuple[float, float] | None = None
    for latency, drop, number in points:
        # Sorted by latency then drop: a point is dominated iff an earlier (no slower) point is at least as
        # accurate and strictly better in one objective.
        if drop < best_drop or (last is not None and (latency, drop) == last):
            front.append(number)
            if drop < best_drop:
                best_drop = drop
                last = (latency, drop)
    return front


def json_safe(value: Any) -> Any:
    """A JSON-safe copy for study attrs and frozen configs: NaN/inf become null (strict JSON forbids them),
    tuples become lists, numpy/torch scalars become Python numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return json_safe(value.item())
    return value
