"""`dsm-tune export`: choose the winning trial of a study by a rule and write its frozen JSON config."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsm_tune import record as schema
from dsm_tune.commands.common import add_study_args
from dsm_tune.errors import DSMTuneError


class ExportError(DSMTuneError):
    """The output file cannot be written as asked."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write the chosen trial of a study as a frozen DSM config (JSON)",
        description="Pick a trial of a study (default: the fastest within the study's accuracy-drop limit) and "
                    "write the frozen config deployment applies with dsm_tune.merging.apply_dsm.")
    add_study_args(parser)
    parser.add_argument("--max-accuracy-drop", type=float, default=None, metavar="X",
                        help="the fastest trial with an accuracy drop <= X points")
    parser.add_argument("--min-speedup", type=float, default=None, metavar="Y",
                        help="the most accurate trial at least Y times faster than dense")
    parser.add_argument("--trial", type=int, default=None, metavar="N", help="export trial N as it is")
    basis = parser.add_mutually_exclusive_group()
    basis.add_argument("--conservative", action="store_true",
                       help="the drop limit holds for the upper bound of the confirmed drop's 95%% interval")
    basis.add_argument("--on-search", action="store_true",
                       help="choose on the search drop (biased low: the front was selected on those images) "
                            "instead of the drop confirmed on held-out images (the default)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--onnx", type=Path, default=None, metavar="FILE",
                        help="also write the merged model as an ONNX graph at the target's batch size, the config "
                             "embedded (needs dsm-tune[onnx]; the model gets the study's weights)")
    parser.add_argument("--force", action="store_true", help="overwrite the output file(s) if they exist")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dsm_tune.merging import load_config
    from dsm_tune.search.results import load_study, trials_frame
    from dsm_tune.search.select import Rule, freeze_trial, pick_winner

    output: Path = args.output
    if output.exists() and not args.force:
        raise ExportError(f"{output} already exists; pass --force to overwrite it")
    if output.exists() and not output.is_file():
        raise ExportError(f"{output} is not a file")
    if args.onnx is not None:
        from dsm_tune.merging.export import require_onnx_packages

        require_onnx_packages("onnx", "onnxscript")
        if args.onnx.exists() and not args.force:
            raise ExportError(f"{args.onnx} already exists; pass --force to overwrite it")
    from dsm_tune.search.confirmation import confirm_stored_study
    from dsm_tune.search.folder import StudyFolder
    from dsm_tune.search.select import effective_basis, selection_record

    basis = "conservative" if args.conservative else "search" if args.on_search else "confirmed"
    rule = Rule(max_accuracy_drop=args.max_accuracy_drop, min_speedup=args.min_speedup, trial=args.trial,
                basis=basis)
    if rule.trial is None:
        confirm_stored_study(StudyFolder(Path(args.out), args.study), print)
    study = load_study(Path(args.out) / args.study)
    spec = study.user_attrs.get("spec") or {}
    study_max_drop = spec.get("max_accuracy_drop")
    frame = trials_frame(study)
    number = pick_winner(frame, rule, study_max_drop)
    if basis != "search" and effective_basis(frame, rule) == "search" and rule.trial is None \
            and rule.min_speedup is None:
        print(f"dsm-tune: study {args.study} has no confirmed trial (made with --confirm 0 or before "
              f"confirmation existed): chosen on the search drop")
    frozen = freeze_trial(study, number, selection_record(frame, rule, study_max_drop))
    text = frozen.to_json()
    load_config(text)  # what deployment will load must load: refuse before writing anything else
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with output.open("w" if args.force else "x") as handle:
            handle.write(text)
    except FileExistsError:
        raise ExportError(f"{output} already exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    metrics = frozen.metrics or {}
    confirmed = metrics.get(schema.CONFIRMED_DROP)
    print(f"exported trial {number} of study {args.study} ({metrics['selection']['rule']}): "
          f"accuracy drop {metrics.get(schema.ACCURACY_DROP, float('nan')):.3f}"
          + (f" (confirmed {confirmed:.3f} on {metrics.get(schema.CONFIRMED_NUM_IMAGES)} held-out images)"
             if isinstance(confirmed, (int, float)) else "") + ", "
          f"latency {metrics.get(schema.LATENCY_MS, float('nan')):.3f} ms, "
          f"speedup {metrics.get(schema.SPEEDUP, float('nan')):.2f}x -> {output}")
    if args.onnx is not None:
        from dsm_tune.commands.verify import model_for_config
        from dsm_tune.merging import export_onnx

        batch_size = int((frozen.target or {}).get("batch_size") or 1)
        model = model_for_config(frozen, spec.get("checkpoint"), bool(spec.get("pretrained")))
        print(f"ONNX graph (batch {batch_size}, config embedded) -> {export_onnx(model, frozen, args.onnx, batch_size)}")
    return 0
