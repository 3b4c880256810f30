"""How a study's trials read: the trial table of the driver's front print, `dsm-tune report` and the plots.

The helpers the base-install commands need without pandas are in `search/text.py`.
"""

from __future__ import annotations

import math
from typing import Iterable

import pandas as pd

from dsm_tune import record as schema
from dsm_tune.search.results import pareto_numbers
from dsm_tune.search.select import NoWinnerError, Rule, SelectionError, frame_column, measured_trials, \
    numeric_column, pick_winner
from dsm_tune.search.text import describe_config, format_table, interval_text, number_text

NOISY_MARK = "~"
NOISY_LEGEND = "~ = noisy speedup (its interleaved pairs disagreed even when timed again): not on the front"
TABLE_HEADER = ["trial", "seed", "drop", "drop_95ci", "confirmed", "confirmed_95ci", "latency_ms", "iqr_ms", "speedup",
                "flops", "tokens", "feasible", "config"]


def trial_table(df: pd.DataFrame) -> pd.DataFrame:
    """Measured trials (see `select.measured_trials`) with what the tables and plots show about each one."""
    table = measured_trials(df).copy()
    seed = frame_column(df, schema.SEED_KIND)
    table[schema.SEED_KIND] = (seed.loc[table.index].map(lambda v: v if isinstance(v, str) else "")
                          if seed is not None else "")
    config = frame_column(df, schema.CONFIG)
    table[schema.CONFIG] = config.loc[table.index].map(describe_config) if config is not None else ""
    for key in (schema.FLOPS_RATIO, schema.TOKENS_KEPT, schema.LATENCY_IQR_MS, schema.BASELINE_LATENCY_MS,
                *schema.INTERVAL_KEYS):
        table[key] = numeric_column(df, key).loc[table.index]
    duplicate = frame_column(df, schema.DUPLICATE_OF)
    table[schema.DUPLICATE_OF] = (pd.to_numeric(duplicate, errors="coerce").loc[table.index] if duplicate is not None
                             else math.nan)
    return table


def pareto_front(table: pd.DataFrame, max_drop: float | None = None) -> pd.DataFrame:
    """Non-dominated rows of `table` (minimise drop and latency; within `max_drop` when given), by latency."""
    if table.empty:
        return table
    points = table[["number", "state", *schema.OBJECTIVES]].assign(**{schema.SPEEDUP_NOISY: table["noisy"]})
    front = set(pareto_numbers(points, max_drop))
    return table[table["number"].isin(front)].sort_values([schema.LATENCY_MS, schema.ACCURACY_DROP])


def default_winner(df: pd.DataFrame, max_drop: float | None) -> int | None:
    """The trial `dsm-tune export` picks without options, None when there is none."""
    try:
        return pick_winner(df, Rule(), max_drop)
    except (NoWinnerError, SelectionError):
        return None


def format_trials(shown: pd.DataFrame, max_drop: float | None, winner: int | None = None,
                  front: Iterable[int] = ()) -> str:
    """The trial table of `report` and of the driver's final print: `*` marks the export default, `P` the
    trials in `front`, `~` a noisy speedup (never on the front, never picked by a rule). `drop_95ci` is the paired
    interval on the search images, `confirmed` the drop on held-out images (front candidates only)."""
    front = set(front)
    rows = []
    for _, row in shown.iterrows():
        number = int(row["number"])
        feasible = max_drop is None or row[schema.ACCURACY_DROP] <= max_drop
        marks = ("*" if number == winner else "") + ("P" if number in front else "") + (
            NOISY_MARK if row["noisy"] else "")
        rows.append([f"{number}{marks}", row[schema.SEED_KIND] or "", number_text(row[schema.ACCURACY_DROP]),
                     interval_text(*(row.get(k) for k in schema.INTERVAL_KEYS)),
                     number_text(row.get(schema.CONFIRMED_DROP)),
                     interval_text(row.get(schema.CONFIRMED_DROP_CI_LOW), row.get(schema.CONFIRMED_DROP_CI_HIGH)),
                     number_text(row[schema.LATENCY_MS]), number_text(row[schema.LATENCY_IQR_MS]),
                     number_text(row[schema.SPEEDUP], 2) + "x", number_text(row[schema.FLOPS_RATIO]),
                     number_text(row[schema.TOKENS_KEPT]), "yes" if feasible else "no", row[schema.CONFIG]])
    return format_table(rows, TABLE_HEADER)


def latency_model_summary(df: pd.DataFrame) -> str | None:
    """How well the traced search's latency model predicted the speedups it then measured (the prediction is made
    before the trial, so this is out of sample), and how many trials it spared a timing. None for studies
    without predictions (sampled spaces)."""
    if frame_column(df, schema.SPEEDUP_PREDICTED) is None:
        return None
    predicted, measured = numeric_column(df, schema.SPEEDUP_PREDICTED), numeric_column(df, schema.SPEEDUP)
    both = (predicted > 0) & (measured > 0)
    reasons = frame_column(df, schema.FAIL_REASON)
    untimed = int(reasons.astype(str).str.startswith("not timed").sum()) if reasons is not None else 0
    if not both.any():
        return f"latency model: no timed trial yet; {untimed} trial(s) not timed"
    errors = (predicted[both] / measured[both] - 1.0).abs()
    return (f"latency model: predicted speedups within {100 * errors.median():.1f}% of the measured ones (median; "
            f"worst {100 * errors.max():.1f}%) over {int(both.sum())} timed trials; {untimed} trial(s) not timed "
            f"(over the limit, screened out, or predicted off the front)")
