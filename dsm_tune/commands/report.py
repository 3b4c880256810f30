"""`dsm-tune report --study NAME`: the Pareto front as a table, and the plots, from the study storage alone."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dsm_tune.commands.common import add_study_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="print a study's Pareto front and redraw its plots",
        description="Print the Pareto front of a study (accuracy drop vs. measured latency) and write "
                    "pareto.html / pareto.png, reading only the study storage under --out.")
    add_study_args(parser)
    parser.add_argument("--all", action="store_true", help="list every measured trial, not only the front")
    parser.add_argument("--plots-dir", type=Path, default=None,
                        help="where to write the plots (default: the study folder)")
    parser.set_defaults(func=main)


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else "-"


def format_table(rows: list[list[str]], header: list[str], left: tuple[int, ...] = ()) -> str:
    """Plain-text table: numbers right-aligned, the columns in `left` (and the last) left-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    last = len(widths) - 1
    lines = ["  ".join(str(cell).ljust(width) if i in left or i == last else str(cell).rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths)))
             for line in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(line.rstrip() for line in lines)


def main(args: argparse.Namespace) -> int:
    from dsm_tune.search.plots import default_winner, pareto_front, plot_table, write_pareto_plots
    from dsm_tune.search.results import load_study, trials_frame
    from dsm_tune.search.select import frame_column

    study_dir = Path(args.out) / args.study
    study = load_study(study_dir)
    df = trials_frame(study)
    spec = study.user_attrs.get("spec") or {}
    max_drop = spec.get("max_accuracy_drop")
    table = plot_table(df)
    shown = table.sort_values(["latency_ms", "accuracy_drop"]) if args.all else pareto_front(table) \
        if len(table) else table
    front = set(pareto_front(table)["number"]) if len(table) else set()
    winner = default_winner(df, max_drop)

    states = df["state"].value_counts().to_dict() if len(df) else {}
    metric = frame_column(df, "metric")
    metric_name = next((m for m in metric.dropna() if isinstance(m, str)), "?") if metric is not None else "?"
    print(f"study {args.study}: {spec.get('model')} on {spec.get('target')}, metric {metric_name}, "
          f"accuracy-drop limit {max_drop if max_drop is not None else 'none'}")
    print(f"trials: {len(df)} (" + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + f"), "
          f"{len(table)} measured, {len(front)} on the Pareto front")
    baseline = table["baseline_latency_ms"].dropna()
    if len(baseline):
        print(f"dense latency: {baseline.median():.3f} ms per batch")
    print()
    rows = []
    for _, row in shown.iterrows():
        number = int(row["number"])
        feasible = max_drop is None or row["accuracy_drop"] <= max_drop
        marks = ("*" if number == winner else "") + ("P" if args.all and number in front else "")
        rows.append([f"{number}{marks}", row["seed_kind"] or "", _number(row["accuracy_drop"]),
                     _number(row["latency_ms"]), _number(row["latency_iqr_ms"]), _number(row["speedup"], 2) + "x",
                     _number(row["flops_ratio"]), _number(row["tokens_kept"]), "yes" if feasible else "no",
                     row["config"]])
    header = ["trial", "seed", "drop", "latency_ms", "iqr_ms", "speedup", "flops", "tokens", "feasible", "config"]
    if rows:
        print(format_table(rows, header))
        print()
        legend = "* = what `dsm-tune export` picks by default (fastest within the limit)"
        print(legend + ("; P = on the Pareto front" if args.all else ""))
    else:
        print("no measured trials yet")
    paths = write_pareto_plots(df, args.plots_dir or study_dir, max_drop)
    print("plots: " + ", ".join(str(p) for p in paths))
    return 0
