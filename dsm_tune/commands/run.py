"""`dsm-tune run`: tune DSM for a model on a target device (an Optuna study over Ray workers), or resume one.

    dsm-tune run --model demo --device cpu                      # minutes on a laptop
    dsm-tune run --model vit_large --device a100 --workers 8 --ray-address auto --timeout 36000
    dsm-tune run --study vit_large-a100 --trials 400            # resume with a larger budget
    dsm-tune run --model vit_base --device h200 --no-ray        # one device, no Ray installed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsm_tune.commands.common import (
    DEFAULT_OUT, add_data_args, add_mlflow_args, add_model_args, add_study_args, add_target_args,
)
from dsm_tune.search.spec import BUDGET, SAMPLERS, StudySpec

_default = StudySpec.default

# The demo's own defaults (every other default is StudySpec's): sized so `dsm-tune run --model demo --device cpu`
# ends within a few minutes on two cores.
DEFAULT_DEMO_LIMIT = 400
# The demo ViT is tiny (width 64): at the cpu profile's batch 8 the matching and gathers cost more than the blocks
# they shrink (a DSM config that is 1.14x faster at batch 32 is 0.95x at batch 8); batch 32 makes its speedups real
# and times in half the seconds of batch 64 for the same ratios (benchmarks/demo_speedup.py, docs/benchmarks.md).
DEFAULT_DEMO_CPU_BATCH = 32
# `--probe` without a file: probe the study's model here, on its data, before the study starts.
PROBE_HERE = ""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="tune DSM for a model on a target (an Optuna study over Ray workers, or in-process with "
                    "--no-ray), or resume a study",
        description="Search DSM settings (a shape: delay, hierarchy depth, spread over blocks; and a budget of "
                    "tokens merged away) that minimise the accuracy drop "
                    "and the measured latency of MODEL on DEVICE. The study lives in OUT/STUDY/ and resumes "
                    "when run again with the same --study (only --study is needed then).")
    add_model_args(parser, required=False)
    add_target_args(parser)
    add_data_args(parser)
    add_study_args(parser, required=False)
    add_mlflow_args(parser)
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--trials", type=int, default=None,
                        help=f"total trial budget, counting earlier runs of the study (default {_default('trials')})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="total wall-clock budget in seconds, counting earlier runs of the study")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"Ray workers, one per device (default {_default('workers')}; CPU workers on one host "
                             "take turns, so more than one adds little there)")
    # Checked by StudySpec, which names the samplers in its one-line error.
    parser.add_argument("--sampler", default=None, metavar="{" + ",".join(SAMPLERS) + "}",
                        help=f"Optuna sampler (default {_default('sampler')}: TPE with the constant liar, made for "
                             "parallel workers)")
    parser.add_argument("--space", type=Path, default=None,
                        help="search space YAML (default: search_spaces/<family>.yaml chosen by the model name)")
    parser.add_argument("--confirm", type=float, default=None, metavar="FRACTION",
                        help="share of the images the search never sees, kept to confirm the front on when the "
                             f"study ends (default {_default('confirm')}; 0 turns confirmation off); --limit caps both parts; the "
                             "exported config is chosen on confirmed drops")
    parser.add_argument("--data-seed", type=int, default=None,
                        help=f"which images --limit and --confirm draw (default {_default('data_seed')}): another seed, "
                             "another sample")
    parser.add_argument("--confirm-data", type=Path, default=None, metavar="DIR",
                        help="confirm the front on this folder instead (then every --data image is searched)")
    parser.add_argument("--max-accuracy-drop", type=float, default=None,
                        help=f"feasibility limit on the accuracy drop, in points (default "
                             f"{_default('max_accuracy_drop')})")
    parser.add_argument("--ray-address", default=None,
                        help="address of a running Ray cluster (default: start a private local Ray on 127.0.0.1)")
    parser.add_argument("--no-ray", dest="no_ray", action="store_true", default=None,
                        help="evaluate in this process, one trial at a time, without Ray (never imported: for a "
                             "one-device host that has no Ray); same study, storage, resume, MLflow and outputs; "
                             "implies --workers 1. A config that crashes the process costs only its trial: queued "
                             "again once on resume, failed if it crashes the process again. A resume keeps it")
    parser.add_argument("--ray", dest="no_ray", action="store_false",
                        help="resume a study run with --no-ray on Ray workers again")
    parser.add_argument("--seed", type=int, default=None, help=f"sampler seed (default {_default('seed')})")
    parser.add_argument("--probe", nargs="?", const=PROBE_HERE, default=None, metavar="PROBE_JSON",
                        help="narrow the start layers (and the first stage's merge amount) around the block where "
                             "attention converges: a probe.json written by `dsm-tune probe`, or no value to probe "
                             "the model here first (up to 64 of the study's images); what was narrowed and why is "
                             "recorded in spec.json, the study and the MLflow parent run. Measured on the demo and a "
                             "real ViT-S, it restricts the study without saving trials (docs/probe.md)")
    parser.set_defaults(func=main)


def build_spec(args: argparse.Namespace):
    from dsm_tune.search.folder import StudyError
    from dsm_tune.search.spec import resume_spec

    out = Path(args.out) if args.out is not None else DEFAULT_OUT
    # A resume may change the budget and infrastructure fields (`StudySpec` marks them); --no-mlflow sets `mlflow`.
    changes = {name: getattr(args, name) for name in StudySpec.fields_of(BUDGET)
               if name not in ("mlflow", "no_ray", *RAY_FIELDS)}
    if args.no_mlflow:
        changes["mlflow"] = False
    if args.model is None:
        if args.study is None:
            raise StudyError("give --model (and --device) to start a study, or --study NAME to resume one")
        spec = resume_spec(out, args.study, **changes)
        spec = StudySpec.from_dict({**spec.to_dict(), **_resumed_ray_fields(spec, args)})
        if args.probe is not None:
            _apply_probe(spec, args)
        return spec
    from dsm_tune.evaluation.models import is_demo_model

    device = args.device
    limit = args.limit
    if limit is None and args.data is None and is_demo_model(args.model):
        limit = DEFAULT_DEMO_LIMIT
    batch_size = args.batch_size
    if batch_size is None and device == "cpu" and is_demo_model(args.model):
        batch_size = DEFAULT_DEMO_CPU_BATCH
    given = dict(
        model=args.model, target=device, batch_size=batch_size, dtype=args.dtype, compile=args.compile,
        data=args.data, limit=limit, metric=args.metric,
        checkpoint=str(args.checkpoint) if args.checkpoint is not None else None, pretrained=args.pretrained,
        max_accuracy_drop=args.max_accuracy_drop, trials=args.trials, timeout=args.timeout, sampler=args.sampler,
        space=str(args.space) if args.space is not None else None, seed=args.seed, workers=args.workers, out=out,
        study=args.study, ray_address=args.ray_address, mlflow_uri=args.mlflow_uri, mlflow=not args.no_mlflow,
        no_ray=bool(args.no_ray), confirm_data=str(args.confirm_data) if args.confirm_data is not None else None,
        data_seed=args.data_seed,
        # A separate confirmation folder holds nothing out of --data; otherwise StudySpec's default share.
        confirm=args.confirm if args.confirm is not None else 0.0 if args.confirm_data is not None else None)
    # What the user did not give is StudySpec's default.
    spec = StudySpec(**{name: value for name, value in given.items() if value is not None})
    if args.probe is not None:
        _apply_probe(spec, args)
    return spec


# Where the workers run: a resume settles them together (`_resumed_ray_fields`).
RAY_FIELDS = ("workers", "ray_address")


def _resumed_ray_fields(stored, args: argparse.Namespace) -> dict:
    """--no-ray / --ray, --workers and --ray-address on a resume. --no-ray sticks to a study until --ray: a study
    run without Ray (whose host may have none) never starts it unasked."""
    from dsm_tune.search.folder import StudyError

    given = {name: getattr(args, name) for name in RAY_FIELDS if getattr(args, name) is not None}
    if args.no_ray:   # StudySpec refuses --workers N>1 and --ray-address with it, as for a new study
        return {"no_ray": True, "workers": 1, "ray_address": None, **given}
    if args.no_ray is None and stored.no_ray:
        if given.get("workers", 1) != 1 or "ray_address" in given:
            asked = " and ".join(f"--{name.replace('_', '-')} {value}" for name, value in given.items())
            raise StudyError(f"study {stored.study!r} runs without Ray (it was run with --no-ray): give --ray to "
                             f"resume it with {asked}")
        return {}
    return {"no_ray": False, **given}


def _apply_probe(spec, args: argparse.Namespace) -> None:
    """`--probe`: a new study starts from its space narrowed by the probe (search/probe_narrow.py); a resumed one
    keeps the space it was started with."""
    from dsm_tune.record import SPEC
    from dsm_tune.search.probe_narrow import ProbeNarrowError, narrow_study_space

    folder = spec.folder
    if folder.holds_study():
        stored = folder.load().user_attrs[SPEC]
        if not stored.get("probe_narrowing"):
            raise ProbeNarrowError(f"study {spec.study!r} was started without --probe and keeps its space; resume it "
                                   "without --probe, or start a new --study")
        spec.space, spec.probe, spec.probe_narrowing = stored["space"], stored["probe"], stored["probe_narrowing"]
        return
    narrow_study_space(spec, _probe_result(spec, args.probe))


def _probe_result(spec, source: str):
    from dsm_tune.evaluation.probe import DEFAULT_PROBE_IMAGES, load_probe, probe_named_model
    from dsm_tune.evaluation.targets import TargetError, load_target

    if source != PROBE_HERE:
        return load_probe(source)
    try:
        target = load_target(spec.target, batch_size=spec.batch_size, dtype=spec.dtype)
        device, dtype, batch = target.device, target.torch_dtype, target.batch_size
    except TargetError:   # the target's device is elsewhere (a cluster): the statistics do not depend on it
        import torch

        device, dtype, batch = "cpu", torch.float32, 8
    limit = min(spec.limit or DEFAULT_PROBE_IMAGES, DEFAULT_PROBE_IMAGES)
    print(f"dsm-tune: probing {spec.model} on {limit} images ({device}) to narrow the space (--probe)", flush=True)
    return probe_named_model(spec.model, spec.data, checkpoint=spec.checkpoint, pretrained=spec.pretrained,
                             limit=limit, device=device, dtype=dtype, batch_size=batch)


def main(args: argparse.Namespace) -> int:
    from dsm_tune.search.study import run_study

    spec = build_spec(args)
    if spec.probe_narrowing:
        print(f"dsm-tune: --probe: {spec.probe_narrowing['summary']} (space: {spec.space})", flush=True)
    result = run_study(spec, stream=sys.stdout)   # SIGTERM, like Ctrl-C, stops it cleanly
    if result.interrupted:
        return 130   # run_study has said what was kept and how to resume
    if result.best_path is not None:
        from dsm_tune.merging import load_config

        selection = (load_config(result.best_path).metrics or {}).get("selection") or {}
        rule = selection.get("rule") or f"fastest with accuracy drop <= {spec.max_accuracy_drop:g}"
        print(f"Best config ({rule}): trial {result.best_trial} -> {result.best_path}")
    return 0
