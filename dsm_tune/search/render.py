"""How trials and configs read as text: one config description and one trial table, used by the driver's front
print, `dsm-tune report`, the plots' hover text and `dsm-tune measure`."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:   # `measure` renders configs without importing the tuner's libraries
    import pandas as pd

NOISY_MARK = "~"
NOISY_LEGEND = "~ = noisy speedup (its interleaved pairs disagreed even when timed again): not on the front"
TABLE_HEADER = ["trial", "seed", "drop", "drop_95ci", "confirmed", "confirmed_95ci", "latency_ms", "iqr_ms", "speedup",
                "flops", "tokens", "feasible", "config"]


def describe_config(config: Any) -> str:
    """Short text of a merge config, e.g. 'd=3 D=1 4x0.10 5xr2 +prop' (start layer, hierarchy depth, one
    blocks x ratio-or-r per stage, proportional attention). Takes a DSMConfig, its document, its JSON text or
    its merge part."""
    if hasattr(config, "merge_dict"):
        config = config.merge_dict()
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            return config
    if not isinstance(config, dict):
        return ""
    merge = config.get("merge", config)
    stages = " ".join(
        f"{s.get('blocks')}x{s['ratio']:.2f}" if s.get("ratio") is not None else f"{s.get('blocks')}xr{s.get('r')}"
        for s in merge.get("stages", []))
    prop = " +prop" if merge.get("proportional_attention") else ""
    return f"d={merge.get('start_layer')} D={merge.get('hierarchy_depth')} {stages}{prop}".strip()


def trial_table(df: pd.DataFrame) -> pd.DataFrame:
    """Measured trials (see `select.measured_trials`) with what the tables and plots show about each one."""
    import pandas as pd

    from dsm_tune.search.select import frame_column, measured_trials, numeric_column

    table = measured_trials(df).copy()
    seed = frame_column(df, "seed_kind")
    table["seed_kind"] = (seed.loc[table.index].map(lambda v: v if isinstance(v, str) else "")
                          if seed is not None else "")
    config = frame_column(df, "config")
    table["config"] = config.loc[table.index].map(describe_config) if config is not None else ""
    for key in ("flops_ratio", "tokens_kept", "latency_iqr_ms", "baseline_latency_ms", "accuracy_drop_ci_low",
                "accuracy_drop_ci_high"):
        table[key] = numeric_column(df, key).loc[table.index]
    duplicate = frame_column(df, "duplicate_of")
    table["duplicate_of"] = (pd.to_numeric(duplicate, errors="coerce").loc[table.index] if duplicate is not None
                             else math.nan)
    return table


def pareto_front(table: pd.DataFrame, max_drop: float | None = None) -> pd.DataFrame:
    """Non-dominated rows of `table` (minimise drop and latency; within `max_drop` when given), by latency."""
    from dsm_tune.search.results import pareto_numbers

    if table.empty:
        return table
    from dsm_tune.search.reference import NOISY_ATTR

    points = table[["number", "state", "accuracy_drop", "latency_ms"]].assign(**{NOISY_ATTR: table["noisy"]})
    front = set(pareto_numbers(points, max_drop))
    return table[table["number"].isin(front)].sort_values(["latency_ms", "accuracy_drop"])


def default_winner(df: pd.DataFrame, max_drop: float | None) -> int | None:
    """The trial `dsm-tune export` picks without options, None when there is none."""
    from dsm_tune.search.select import NoWinnerError, Rule, SelectionError, pick_winner

    try:
        return pick_winner(df, Rule(), max_drop)
    except (NoWinnerError, SelectionError):
        return None


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else "-"


def interval_text(low: Any, high: Any, digits: int = 2) -> str:
    """A 95% interval as '[low, high]', '-' when there is none (a trial from before intervals existed)."""
    if not all(isinstance(v, float) and math.isfinite(v) for v in (low, high)):
        return "-"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def format_table(rows: list[list[str]], header: list[str], left: tuple[int, ...] = ()) -> str:
    """Plain-text table: numbers right-aligned, the columns in `left` (and the last) left-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    last = len(widths) - 1
    lines = ["  ".join(str(cell).ljust(width) if i in left or i == last else str(cell).rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths)))
             for line in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(line.rstrip() for line in lines)


def format_trials(shown: pd.DataFrame, max_drop: float | None, winner: int | None = None,
                  front: Iterable[int] = ()) -> str:
    """The trial table of `report` and of the driver's final print: `*` marks the export default, `P` the
    trials in `front`, `~` a noisy speedup (never on the front, never picked by a rule). `drop_95ci` is the paired
    interval on the search images, `confirmed` the drop on held-out images (front candidates only)."""
    front = set(front)
    rows = []
    for _, row in shown.iterrows():
        number = int(row["number"])
        feasible = max_drop is None or row["accuracy_drop"] <= max_drop
        marks = ("*" if number == winner else "") + ("P" if number in front else "") + (
            NOISY_MARK if row["noisy"] else "")
        rows.append([f"{number}{marks}", row["seed_kind"] or "", _number(row["accuracy_drop"]),
                     interval_text(row.get("accuracy_drop_ci_low"), row.get("accuracy_drop_ci_high")),
                     _number(row.get("confirmed_drop")),
                     interval_text(row.get("confirmed_drop_ci_low"), row.get("confirmed_drop_ci_high")),
                     _number(row["latency_ms"]), _number(row["latency_iqr_ms"]), _number(row["speedup"], 2) + "x",
                     _number(row["flops_ratio"]), _number(row["tokens_kept"]), "yes" if feasible else "no",
                     row["config"]])
    return format_table(rows, TABLE_HEADER)


def latency_model_summary(df: pd.DataFrame) -> str | None:
    """How well the traced search's latency model predicted the speedups it then measured (the prediction is made
    before the trial, so this is out of sample), and how many trials it spared a timing. None for studies
    without predictions (sampled spaces)."""
    from dsm_tune.search.select import frame_column, numeric_column

    if frame_column(df, "speedup_predicted") is None:
        return None
    predicted, measured = numeric_column(df, "speedup_predicted"), numeric_column(df, "speedup")
    both = (predicted > 0) & (measured > 0)
    reasons = frame_column(df, "fail_reason")
    untimed = int(reasons.astype(str).str.startswith("not timed").sum()) if reasons is not None else 0
    if not both.any():
        return f"latency model: no timed trial yet; {untimed} trial(s) not timed"
    errors = (predicted[both] / measured[both] - 1.0).abs()
    return (f"latency model: predicted speedups within {100 * errors.median():.1f}% of the measured ones (median; "
            f"worst {100 * errors.max():.1f}%) over {int(both.sum())} timed trials; {untimed} trial(s) not timed "
            f"(over the limit, screened out, or predicted off the front)")
