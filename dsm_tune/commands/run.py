"""`dsm-tune run`: tune DSM for a model on a target device (an Optuna study over Ray workers), or resume one.

    dsm-tune run --model demo --device cpu                      # minutes on a laptop
    dsm-tune run --model vit_large --device a100 --workers 8 --ray-address auto --timeout 36000
    dsm-tune run --study vit_large-a100 --trials 400            # resume with a larger budget
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsm_tune.commands.common import (
    DEFAULT_OUT, add_data_args, add_mlflow_args, add_model_args, add_study_args, add_target_args,
)

# Defaults sized so `dsm-tune run --model demo --device cpu` ends within a few minutes on two cores.
DEFAULT_TRIALS = 24
# One worker per device, and a CPU host is one device: every evaluation on it holds the host's timing lock for the
# whole trial, so a second CPU worker waits rather than adds throughput (README: "Workers").
DEFAULT_WORKERS = 1
DEFAULT_DEMO_LIMIT = 400
DEFAULT_MAX_DROP = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="tune DSM for a model on a target (an Optuna study over Ray workers), or resume a study",
        description="Search DSM settings (delay, hierarchy depth, stages, ratios) that minimise the accuracy drop "
                    "and the measured latency of MODEL on DEVICE. The study lives in OUT/STUDY/ and resumes "
                    "when run again with the same --study (only --study is needed then).")
    add_model_args(parser, required=False)
    add_target_args(parser)
    add_data_args(parser)
    add_study_args(parser, required=False)
    add_mlflow_args(parser)
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--trials", type=int, default=None,
                        help=f"total trial budget, counting earlier runs of the study (default {DEFAULT_TRIALS})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="total wall-clock budget in seconds, counting earlier runs of the study")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"Ray workers, one per device (default {DEFAULT_WORKERS}; CPU workers on one host take "
                             "turns, so more than one adds little there)")
    # Checked by StudySpec (importing the study module here would slow every dsm-tune command down).
    parser.add_argument("--sampler", default=None, metavar="{tpe,nsga2,gp,random}",
                        help="Optuna sampler (default tpe: TPE with the constant liar, made for parallel workers)")
    parser.add_argument("--space", type=Path, default=None,
                        help="search space YAML (default: search_spaces/<family>.yaml chosen by the model name)")
    parser.add_argument("--max-accuracy-drop", type=float, default=None,
                        help=f"feasibility limit on the accuracy drop, in points (default {DEFAULT_MAX_DROP})")
    parser.add_argument("--ray-address", default=None,
                        help="address of a running Ray cluster (default: start a private local Ray on 127.0.0.1)")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (default 0)")
    parser.set_defaults(func=main)


def build_spec(args: argparse.Namespace):
    from dsm_tune.search.study import DEFAULT_SAMPLER, StudyError, StudySpec, resume_spec
    from dsm_tune.search.study.spec import BUDGET

    out = Path(args.out) if args.out is not None else DEFAULT_OUT
    # A resume may change the budget and infrastructure fields (`StudySpec` marks them); --no-mlflow sets `mlflow`.
    changes = {name: getattr(args, name) for name in StudySpec.fields_of(BUDGET) if name != "mlflow"}
    if args.no_mlflow:
        changes["mlflow"] = False
    if args.model is None:
        if args.study is None:
            raise StudyError("give --model (and --device) to start a study, or --study NAME to resume one")
        return resume_spec(out, args.study, **changes)
    from dsm_tune.evaluation.models import is_demo_model

    device = args.device
    workers = args.workers if args.workers is not None else DEFAULT_WORKERS
    limit = args.limit
    if limit is None and args.data is None and is_demo_model(args.model):
        limit = DEFAULT_DEMO_LIMIT
    return StudySpec(
        model=args.model, target=device, batch_size=args.batch_size, dtype=args.dtype, compile=args.compile,
        data=args.data, limit=limit, metric=args.metric,
        checkpoint=str(args.checkpoint) if args.checkpoint is not None else None, pretrained=args.pretrained,
        max_accuracy_drop=args.max_accuracy_drop if args.max_accuracy_drop is not None else DEFAULT_MAX_DROP,
        trials=args.trials if args.trials is not None else DEFAULT_TRIALS, timeout=args.timeout,
        sampler=args.sampler or DEFAULT_SAMPLER, space=str(args.space) if args.space is not None else None,
        seed=args.seed if args.seed is not None else 0, workers=workers, out=out, study=args.study,
        ray_address=args.ray_address, mlflow_uri=args.mlflow_uri, mlflow=not args.no_mlflow)


def main(args: argparse.Namespace) -> int:
    from dsm_tune.search.study import run_study

    spec = build_spec(args)
    result = run_study(spec, stream=sys.stdout)   # SIGTERM, like Ctrl-C, stops it cleanly
    if result.interrupted:
        return 130   # run_study has said what was kept and how to resume
    if result.best_path is not None:
        print(f"Best config (fastest with accuracy drop <= {spec.max_accuracy_drop:g}): trial {result.best_trial} -> "
              f"{result.best_path}")
    return 0
