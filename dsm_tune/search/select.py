"""Winner selection on a study's trials, and freezing the chosen trial into the hand-off document.

`pick_winner` works on the trials frame alone (`results.trials_frame`), so `export` and the driver's `best.json`
choose by exactly the same rule; `freeze_trial` reads the study storage (user attrs of "Study storage" in
docs/interfaces.md) and returns the full frozen config of docs/design.md section 3.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd

from dsm_tune.errors import DSMTuneError
from dsm_tune import record as schema
from dsm_tune.record import (
    ABORTED, ACCURACY_DROP, BASELINE_LATENCY_MS, CONFIRMED_DROP, CONFIRMED_DROP_CI_HIGH, CONFIRMED_FIELDS,
    FROZEN_METRIC_KEYS, LATENCY_MS, SPEEDUP, SPEEDUP_NOISY,
)
from dsm_tune.search.dense_reference import study_reference, truthy
from dsm_tune.search.results import confirmed_scores
from dsm_tune.search.text import is_finite_number, json_safe

# The frozen document's metrics are `record.FROZEN_METRIC_KEYS`: latency_ms = baseline_latency_ms (the study's
# dense reference) / speedup; the *_measured_ms are the trial's raw interleaved medians (`search/dense_reference.py`).

# Which drop the limit rules compare: the confirmed drop (images the search never saw; the default), its interval's
# upper bound (`--conservative`), or the search drop (the figure the search optimised, biased low by selection).
BASES = ("confirmed", "conservative", "search")
_BASIS_COLUMN = {"confirmed": CONFIRMED_DROP, "conservative": CONFIRMED_DROP_CI_HIGH, "search": ACCURACY_DROP}


class SelectionError(DSMTuneError):
    """A selection rule or trial reference is malformed."""


class NoWinnerError(SelectionError):
    """No trial satisfies the rule; the message names the closest one and its figures."""

    def __init__(self, message: str, closest: int | None = None):
        super().__init__(message)
        self.closest = closest


# --- reading the trials frame ------------------------------------------------------------------------------
def frame_column(df: pd.DataFrame, key: str) -> pd.Series | None:
    """The column of trial attr `key` in a trials frame (`results.trials_frame` or trials.csv); None if absent."""
    return df[key] if key in df.columns else None


def numeric_column(df: pd.DataFrame, key: str) -> pd.Series:
    column = frame_column(df, key)
    if column is None:
        return pd.Series(math.nan, index=df.index, dtype=float)
    return pd.to_numeric(column, errors="coerce").astype(float)


def _bool_column(df: pd.DataFrame, key: str) -> pd.Series:
    column = frame_column(df, key)
    if column is None:
        return pd.Series(False, index=df.index)
    # A csv round trip turns booleans into the strings "True"/"False".
    return column.map(truthy)


def measured_trials(df: pd.DataFrame) -> pd.DataFrame:
    """COMPLETE, not early-aborted trials with a finite drop and latency: the ones a winner can come from.

    Returns a frame indexed like `df` with the columns number, state, accuracy_drop, latency_ms, speedup, aborted,
    noisy (the speedup is flagged `speedup_noisy`: kept here, left out by the rules and the front).
    """
    if "number" not in df.columns:
        raise SelectionError("the trials frame has no 'number' column: not a dsm-tune trials frame")
    drop = numeric_column(df, ACCURACY_DROP)
    latency = numeric_column(df, LATENCY_MS)
    speedup = numeric_column(df, SPEEDUP)
    baseline = numeric_column(df, BASELINE_LATENCY_MS)
    speedup = speedup.where(speedup.notna(), baseline / latency)
    state = df["state"].astype(str)
    table = pd.DataFrame({"number": df["number"].astype(int), "state": state, ACCURACY_DROP: drop,
                          LATENCY_MS: latency, SPEEDUP: speedup, ABORTED: _bool_column(df, ABORTED),
                          "noisy": _bool_column(df, SPEEDUP_NOISY),
                          **{name: numeric_column(df, name) for name in CONFIRMED_FIELDS}})
    usable = ((table["state"] == "COMPLETE") & ~table[ABORTED]
              & table[ACCURACY_DROP].map(math.isfinite) & table[LATENCY_MS].map(math.isfinite))
    return table[usable]


def _figures(row: Mapping[str, Any]) -> str:
    confirmed = row.get(CONFIRMED_DROP)
    return (f"drop {row[ACCURACY_DROP]:.3g}"
            + (f" (confirmed {confirmed:.3g}, upper bound {row[CONFIRMED_DROP_CI_HIGH]:.3g})"
               if isinstance(confirmed, float) and is_finite_number(confirmed) else "")
            + f", {row[LATENCY_MS]:.4g} ms, speedup {row[SPEEDUP]:.3g}x")


# --- the rule ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """How to choose the exported trial.

    - default: the fastest trial whose accuracy drop is within the study's `max_accuracy_drop`;
    - `max_accuracy_drop=X`: the fastest trial with drop <= X;
    - `min_speedup=Y`: the most accurate trial at least Y times faster than dense (within X when also given);
    - `trial=N`: that trial, whatever its figures.

    `basis` says which drop the limit is compared with (BASES): with "confirmed" or "conservative", only trials
    confirmed on the held-out images compete; a study with no confirmed trial falls back to the search drop
    (`effective_basis` says which was used).

    The rules choose among trials with a trustworthy speedup only: a trial flagged `speedup_noisy` (its interleaved
    pairs disagreed even when timed again) is taken by `trial=N` alone.
    """

    max_accuracy_drop: float | None = None
    min_speedup: float | None = None
    trial: int | None = None
    basis: str = "confirmed"

    def __post_init__(self) -> None:
        if self.basis not in BASES:
            raise SelectionError(f"unknown selection basis {self.basis!r}; choose one of {', '.join(BASES)}")
        if self.trial is not None and (self.max_accuracy_drop is not None or self.min_speedup is not None):
            raise SelectionError("choose a trial either by number (--trial) or by a rule, not both")
        if self.trial is not None and (isinstance(self.trial, bool) or not isinstance(self.trial, int)
                                       or self.trial < 0):
            raise SelectionError(f"--trial must be a trial number >= 0, got {self.trial!r}")
        if self.max_accuracy_drop is not None and not (self.max_accuracy_drop >= 0):
            raise SelectionError(f"--max-accuracy-drop must be >= 0, got {self.max_accuracy_drop}")
        if self.min_speedup is not None and not (self.min_speedup > 0):
            raise SelectionError(f"--min-speedup must be > 0, got {self.min_speedup}")

    def describe(self, study_max_drop: float | None) -> str:
        if self.trial is not None:
            return f"trial {self.trial}"
        limit = self.max_accuracy_drop if self.max_accuracy_drop is not None else (
            None if self.min_speedup is not None else study_max_drop)
        drop = {"confirmed": "confirmed accuracy drop", "conservative": "confirmed drop's 95% upper bound",
                "search": "accuracy drop"}[self.basis] if self.min_speedup is None else "accuracy drop"
        within = f"{drop} <= {limit:g}" if limit is not None else ""
        if self.min_speedup is not None:
            return f"most accurate with speedup >= {self.min_speedup:g}x" + (f" and {within}" if within else "")
        return f"fastest with {within}"


def effective_basis(df: pd.DataFrame, rule: Rule) -> str:
    """The basis `rule` uses on `df`: its own, or "search" when no trial of the study was confirmed (a study made
    with --confirm 0, or before confirmation existed), or for the rules the basis does not apply to."""
    if rule.trial is not None or rule.min_speedup is not None or rule.basis == "search":
        return "search"
    confirmed = numeric_column(df, CONFIRMED_DROP)
    return rule.basis if confirmed.notna().any() else "search"


def pick_winner(df: pd.DataFrame, rule: Rule, study_max_drop: float | None) -> int:
    """The trial number `rule` chooses in `df` (a trials frame); NoWinnerError names the closest trial."""
    if rule.trial is not None:
        return _check_named_trial(df, rule.trial)
    basis = effective_basis(df, rule)
    measured = measured_trials(df)
    noisy = int(measured["noisy"].sum())
    measured = measured[~measured["noisy"]]
    left_out = (f"; {noisy} measured trial(s) with a noisy speedup left out (pick one with --trial N)"
                if noisy else "")
    if measured.empty:
        raise NoWinnerError(f"no trial to choose from: {_state_summary(df)}{left_out}")
    limit = _drop_limit(rule, study_max_drop)
    column = _BASIS_COLUMN[basis]
    if basis != "search":
        unconfirmed = int(measured[column].isna().sum())
        measured = measured[measured[column].notna()]
        if measured.empty:
            raise NoWinnerError(f"no measured trial was confirmed on held-out images{left_out}")
        left_out += (f"; chosen among the {len(measured)} trial(s) confirmed on held-out images "
                     f"({unconfirmed} unconfirmed; --on-search chooses on search figures)")
    within_drop = measured if limit is None else measured[measured[column] <= limit]
    if rule.min_speedup is None:
        if within_drop.empty:
            closest = measured.sort_values([column, LATENCY_MS, "number"]).iloc[0]
            what = {"search": "an accuracy drop", "confirmed": "a confirmed accuracy drop",
                    "conservative": "a confirmed drop whose 95% upper bound is"}[basis]
            raise NoWinnerError(
                f"no trial has {what} <= {limit:g} ({len(measured)} measured); closest: "
                f"trial {int(closest['number'])} ({_figures(closest)}){left_out}", int(closest["number"]))
        best = within_drop.sort_values([LATENCY_MS, ACCURACY_DROP, "number"]).iloc[0]
        return int(best["number"])
    return _most_accurate_fast_enough(measured, within_drop, rule.min_speedup, limit, left_out)


def _drop_limit(rule: Rule, study_max_drop: float | None) -> float | None:
    """The drop limit `rule` applies: its own, else the study's (the default rule), none for a speedup rule."""
    if rule.max_accuracy_drop is not None or rule.min_speedup is not None:
        return rule.max_accuracy_drop
    if study_max_drop is None:
        raise SelectionError("the study has no max_accuracy_drop: give --max-accuracy-drop, --min-speedup "
                             "or --trial")
    return study_max_drop


def _most_accurate_fast_enough(measured: pd.DataFrame, within_drop: pd.DataFrame, min_speedup: float,
                               limit: float | None, left_out: str) -> int:
    fast_enough = within_drop[within_drop[SPEEDUP] >= min_speedup]
    if fast_enough.empty:
        pool = within_drop if not within_drop.empty else measured
        closest = pool.sort_values([SPEEDUP, "number"], ascending=[False, True]).iloc[0]
        condition = f"a speedup >= {min_speedup:g}x" + (
            f" with accuracy drop <= {limit:g}" if limit is not None else "")
        raise NoWinnerError(f"no trial reaches {condition} ({len(measured)} measured); closest: "
                            f"trial {int(closest['number'])} ({_figures(closest)}){left_out}",
                            int(closest["number"]))
    best = fast_enough.sort_values([ACCURACY_DROP, LATENCY_MS, "number"]).iloc[0]
    return int(best["number"])


def _state_summary(df: pd.DataFrame) -> str:
    if df.empty:
        return "the study has no trials"
    states = df["state"].astype(str)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in states.value_counts().sort_index().items())
    aborted = int(_bool_column(df, ABORTED).sum())
    return f"{len(df)} trial(s): {counts}" + (f", {aborted} aborted early" if aborted else "")


def _check_named_trial(df: pd.DataFrame, number: int) -> int:
    rows = df[df["number"].astype(int) == number] if "number" in df.columns else df.iloc[0:0]
    if rows.empty:
        known = sorted(df["number"].astype(int)) if "number" in df.columns else []
        span = f"trials {known[0]}..{known[-1]}" if known else "no trials"
        raise NoWinnerError(f"trial {number} does not exist in the study ({span})")
    if number not in set(measured_trials(df)["number"]):
        row = rows.iloc[0]
        state = str(row.get("state", "?"))
        reason = frame_column(rows, schema.FAIL_REASON)
        why = f": {reason.iloc[0]}" if reason is not None and isinstance(reason.iloc[0], str) else ""
        aborted = bool(_bool_column(rows, ABORTED).iloc[0])
        what = "was aborted early (its drop was hopeless)" if aborted else f"has no measured result ({state}{why})"
        raise NoWinnerError(f"trial {number} {what}; pick a completed trial", None)
    return number


# --- freezing --------------------------------------------------------------------------------------------------
def _target_document(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The target profile the study was tuned on, resolved to the settings it measured with."""
    from dsm_tune.evaluation.targets import load_target

    profile = load_target(str(spec.get("target")), batch_size=spec.get("batch_size"), dtype=spec.get("dtype"),
                          compile=spec.get("compile"), check_available=False)
    return {"profile": profile.name, "device": profile.device, "dtype": profile.dtype,
            "batch_size": profile.batch_size, "compile": bool(profile.compile), "runtime": profile.runtime}


def _study_trial(study: Any, number: int) -> Any:
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number:
            return trial
    raise NoWinnerError(f"trial {number} does not exist in study {study.study_name!r}")


def selection_record(df: pd.DataFrame, rule: Rule, study_max_drop: float | None) -> dict[str, Any]:
    """What a frozen config records of how it was chosen (metrics `selection`): the rule as applied, its basis."""
    basis = effective_basis(df, rule)
    applied = rule if basis == rule.basis else dataclasses.replace(rule, basis=basis)
    return {"rule": applied.describe(study_max_drop), "basis": basis}


def freeze_trial(study: Any, number: int, selection: Mapping[str, Any] | None = None):
    """The full frozen config for trial `number` of a dsm-tune study: merge, model, target, metrics, provenance.
    `selection` (see `selection_record`) says how it was chosen."""
    from dsm_tune.merging import DSMConfig, token_schedule

    trial = _study_trial(study, number)
    if trial.state.name != "COMPLETE":
        raise NoWinnerError(f"trial {number} is {trial.state.name}, not COMPLETE; only measured trials can be exported")
    study_attrs, reference = study.user_attrs, study_reference(study)
    attrs = {**reference.figures(trial.user_attrs), **confirmed_scores(study.user_attrs).get(number, {})}
    for key, holder, where in ((schema.CONFIG, attrs, f"trial {number}"),
                               (schema.FINGERPRINT, study_attrs, "the study"), (schema.SPEC, study_attrs, "the study")):
        if key not in holder:
            raise SelectionError(f"{where} of {study.study_name!r} has no {key!r} attribute: not a dsm-tune study")
    spec = study_attrs[schema.SPEC]

    document = {**attrs[schema.CONFIG], "model": study_attrs[schema.FINGERPRINT]}   # see `results.config_attr`
    config = DSMConfig.from_dict(document, require_model=True)

    metrics = {key: attrs[key] for key in FROZEN_METRIC_KEYS if key in attrs}
    # The dense record of the study, its latency the reference every figure above is relative to (the first
    # dense timing, possibly taken under load, is kept under its own name).
    dense = {k: v for k, v in (study_attrs.get(schema.BASELINE) or {}).items() if not k.startswith("latency")}
    metrics["baseline"] = {**dense, "latency_ms": reference.latency_ms, "dense_timings": reference.timings,
                           "first_latency_ms": reference.first_ms}
    metrics["max_accuracy_drop"] = spec.get("max_accuracy_drop")
    if selection is not None:
        metrics["selection"] = dict(selection)
    metrics["tokens_per_block"] = list(token_schedule(config))
    provenance = _provenance(study, trial, attrs)
    return config.replace(target=json_safe(_target_document(spec)), metrics=json_safe(metrics),
                          provenance=json_safe(provenance))


def _provenance(study: Any, trial: Any, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Where a frozen trial comes from: study, trial, versions, data, search space, dates."""
    study_attrs = study.user_attrs
    spec = study_attrs[schema.SPEC]
    versions = study_attrs.get(schema.VERSIONS) or {}
    completed = trial.datetime_complete
    return {
        "study": study.study_name,
        "trial": trial.number,
        schema.SEED_KIND: attrs.get(schema.SEED_KIND),
        "dsm_tune": versions.get("dsm_tune"),
        "timm": versions.get("timm"),
        "torch": versions.get("torch"),
        "data": spec.get("data"),
        "limit": spec.get("limit"),
        "data_order": spec.get("data_order", "class-prefix"),
        "data_seed": spec.get("data_seed", 0),
        "confirm": spec.get("confirm", 0.0),
        "confirm_data": spec.get("confirm_data"),
        "data_fingerprint": study_attrs.get(schema.DATA_FINGERPRINT),
        "search_space": spec.get("space"),
        "measured": completed.isoformat(timespec="seconds") if completed else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
