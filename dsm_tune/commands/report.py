"""`dsm-tune report --study NAME`: the Pareto front as a table, and the plots, from the study storage alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsm_tune import record as schema
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


def main(args: argparse.Namespace) -> int:
    from dsm_tune.search.folder import StudyFolder
    from dsm_tune.search.plots import write_pareto_plots
    from dsm_tune.search.dense_reference import study_reference
    from dsm_tune.search.render import (
        NOISY_LEGEND, default_winner, format_trials, latency_model_summary, pareto_front, trial_table,
    )
    from dsm_tune.search.results import trials_frame
    from dsm_tune.search.select import frame_column

    from dsm_tune.search.confirmation import confirm_stored_study
    from dsm_tune.search.select import Rule, effective_basis

    folder = StudyFolder(Path(args.out), args.study)
    confirm_stored_study(folder, print)
    study = folder.load()
    df = trials_frame(study)
    spec = study.user_attrs.get("spec") or {}
    max_drop = spec.get("max_accuracy_drop")
    table = trial_table(df)
    front_rows = pareto_front(table)
    shown = table.sort_values([schema.LATENCY_MS, schema.ACCURACY_DROP]) if args.all else front_rows
    front = set(front_rows["number"])
    winner = default_winner(df, max_drop)

    states = df["state"].value_counts().to_dict() if len(df) else {}
    metric = frame_column(df, "metric")
    metric_name = next((m for m in metric.dropna() if isinstance(m, str)), "?") if metric is not None else "?"
    print(f"study {args.study}: {spec.get('model')} on {spec.get('target')}, metric {metric_name}, "
          f"accuracy-drop limit {max_drop if max_drop is not None else 'none'}")
    print(f"trials: {len(df)} (" + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + f"), "
          f"{len(table)} measured, {len(front)} on the Pareto front")
    # Every latency below is this reference over the trial's speedup.
    print(f"dense reference: {study_reference(study).describe()}")
    print()
    if len(shown):
        print(format_trials(shown, max_drop, winner, front if args.all else ()))
        print()
        basis = effective_basis(df, Rule())
        legend = ("* = what `dsm-tune export` picks by default (fastest whose "
                  + ("confirmed drop" if basis == "confirmed" else "search drop") + " is within the limit)")
        print(legend + ("; P = on the Pareto front" if args.all else ""))
        if shown["noisy"].any():
            print(NOISY_LEGEND)
    else:
        print("no measured trials yet")
    summary = latency_model_summary(df)
    if summary:
        print(summary)
    paths = write_pareto_plots(df, args.plots_dir or folder.path, max_drop)
    print("plots: " + ", ".join(str(p) for p in paths))
    return 0
