"""`dsm-tune sync --study NAME`: deliver the MLflow records a study queued while its tracking server was down,
without running anything (a resume delivers them too, but there may be nothing left to run)."""

from __future__ import annotations

import argparse

from dsm_tune.commands.common import add_mlflow_args, add_study_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sync", help="log a study's queued trials (mlflow_pending.jsonl) into MLflow",
        description="Log into MLflow the trials a study queued while MLflow was unreachable, and any finished trial "
                    "MLflow lacks; then close the study's run. Uses the study's tracking URI unless --mlflow-uri "
                    "is given.")
    add_study_args(parser)
    add_mlflow_args(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dsm_tune.search.study import sync_tracking

    queued = sync_tracking(args.out, args.study, mlflow_uri=args.mlflow_uri)
    if queued:
        print(f"MLflow is still unreachable: {queued} trial(s) of study {args.study} stay queued; run "
              f"`dsm-tune sync --study {args.study}` again when it answers")
        return 1
    print(f"study {args.study}: every finished trial is in MLflow")
    return 0
