"""`dsm-tune measure`: one DSM config against the dense model, on the target device: accuracy and latency."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsm_tune.commands.common import add_data_args, add_model_args, add_target_args

DESCRIPTION = """\
Build a model, apply a DSM config (if given) and report, against the dense model on the same images and device:
the accuracy metric (top1 drop in points, agreement or feature distance), latency median and IQR of both
(interleaved runs), the speedup, and the patch tokens entering each block. Without --config only the dense model
is measured. `--model demo` runs anywhere: it uses the embedded model and its Fashion-MNIST slice."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("measure", help="measure a DSM config against the dense model",
                                   description=DESCRIPTION)
    add_model_args(parser)
    add_target_args(parser)
    add_data_args(parser)
    parser.add_argument("--config", default=None,
                        help="DSM config: a JSON file or JSON text (without a 'model' part it is bound to --model)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="build the model at this input size (default: the model's own, or the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit selection (default: 0)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default: per device)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per model (default: per device)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where dense outputs are cached (default: $DSM_TUNE_CACHE or ~/.cache/dsm-tune)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.set_defaults(func=main)


def _json_document(source: str):
    try:
        return json.loads(source if source.lstrip().startswith("{") else Path(source).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_config(source: str):
    """A DSM config from a file or JSON text; a hand-written one may leave out `model` (then bound to --model)."""
    from dsm_tune.merging import ConfigError, DSMConfig, load_config

    try:
        return load_config(source)
    except ConfigError:
        document = _json_document(source)
        if not isinstance(document, dict) or "model" in document:
            raise  # load_config's message names the problem
    origin = "the config text" if source.lstrip().startswith("{") else source
    try:
        return DSMConfig.from_dict(document)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def measure(args: argparse.Namespace) -> dict:
    """Run the measurement and return the JSON document."""
    from dsm_tune.evaluation.targets import load_target
    from dsm_tune.evaluation.trial import TrialEvaluator
    from dsm_tune.merging import DSMConfig, merge_report

    cfg = read_config(args.config) if args.config is not None else None
    target = load_target(args.device, batch_size=args.batch_size, dtype=args.dtype, compile=args.compile)
    evaluator = TrialEvaluator(
        args.model, target, args.data, metric=args.metric, limit=args.limit, checkpoint=args.checkpoint,
        cache_dir=args.cache_dir, pretrained=args.pretrained, img_size=args.img_size, seed=args.seed,
        warmup=args.warmup, repeats=args.repeats)
    model = evaluator.model
    scorer = evaluator.accuracy
    dense_report = merge_report(model, DSMConfig.dense(model))
    document: dict = {
        "model": {"name": evaluator.model_name, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                  **evaluator.fingerprint.to_dict()},
        "target": target.to_dict(),
        "data": ({"description": evaluator.data.description, "fingerprint": evaluator.data.fingerprint,
                  "num_images": evaluator.data.num_images} if evaluator.data else None),
        "metric": scorer.metric if scorer else None,
        "config": None,
        "dense": {"metric_value": scorer.baseline_value if scorer else None,
                  "tokens_per_block": dense_report["tokens_per_block"], "flops": dense_report["flops_dense"]},
        "merged": None,
    }
    if cfg is None:
        baseline = evaluator.baseline  # dense latency alone
        document["dense"].update(latency_ms=baseline["latency_ms"], latency_iqr_ms=baseline["latency_iqr_ms"])
        return document

    outcome = evaluator.evaluate_detailed(cfg)
    accuracy, latency, report = outcome.accuracy, outcome.latency, outcome.report
    document["config"] = outcome.config.merge_dict()
    # Dense latency from the same interleaved run as the merged one: the pair the speedup is computed from.
    document["dense"].update(latency_ms=latency.baseline_ms, latency_iqr_ms=latency.baseline_iqr_ms)
    document["merged"] = {
        "metric_value": accuracy.value if accuracy else None,
        "latency_ms": latency.candidate_ms, "latency_iqr_ms": latency.candidate_iqr_ms,
        "tokens_per_block": report["tokens_per_block"], "flops": report["flops_merged"],
    }
    document.update(
        accuracy_drop=accuracy.drop if accuracy else None,
        accuracy_details=accuracy.extra if accuracy else None,
        num_images=accuracy.num_images if accuracy else 0,
        speedup=latency.speedup, speedup_iqr=latency.speedup_iqr, compile_s=latency.compile_s,
        latency_repeats=latency.repeats, flops_ratio=report["flops_ratio"], tokens_kept=report["tokens_kept"],
        eval_seconds=outcome.eval_seconds,
    )
    return document


def _fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render_table(doc: dict) -> str:
    model, target, data = doc["model"], doc["target"], doc["data"]
    grid = "x".join(str(v) for v in model["grid"])
    lines = [
        f"model    {model['name']}  ({model['num_blocks']} blocks, {grid} patch grid, "
        f"{model['num_prefix_tokens']} prefix token{'' if model['num_prefix_tokens'] == 1 else 's'}, "
        f"input {model['img_size'][0]}x{model['img_size'][1]})",
        f"target   {target['name']}: {target['device']}, {target['dtype']}, batch {target['batch_size']}, "
        f"{'compiled' if target['compile'] else 'eager'}",
        f"data     {data['description'] if data else 'none (latency only)'}",
    ]
    if doc["config"] is not None:
        from dsm_tune.search.text import describe_config

        lines.append(f"config   {describe_config(doc['config'])}  (start layer d, hierarchy depth D, "
                     f"blocks x ratio per stage)")
    dense, merged = doc["dense"], doc["merged"]
    lines.append("")
    lines.append(f"{'':24}{'dense':>18}{'merged':>18}")
    if doc["metric"] is not None:
        lines.append(f"{doc['metric'] + ' (metric)':24}{_fmt(dense['metric_value']):>18}"
                     f"{_fmt(merged['metric_value'] if merged else None):>18}")
    latency = lambda side: f"{side['latency_ms']:.2f} ± {side['latency_iqr_ms']:.2f}"  # noqa: E731
    lines.append(f"{'latency ms (IQR)':24}{latency(dense):>18}{latency(merged) if merged else '-':>18}")
    lines.append(f"{'GFLOPs (blocks, est.)':24}{dense['flops'] / 1e9:>18.3f}"
                 f"{_fmt(merged['flops'] / 1e9 if merged else None, '.3f'):>18}")
    if merged:
        lines.append("")
        if doc["metric"] is not None:
            lines.append(f"accuracy drop   {doc['accuracy_drop']:.2f} points ({doc['metric']}, "
                         f"{doc['num_images']} images)")
            details = doc["accuracy_details"] or {}
            if "kl" in details:
                lines.append(f"agreement       {details['agreement']:.2f} %, KL {details['kl']:.4f}")
            if "mean_cosine" in details:
                lines.append(f"cosine          mean {details['mean_cosine']:.4f}, min {details['min_cosine']:.4f}")
        lines.append(f"speedup         {doc['speedup']:.3f}x (IQR of per-pair ratios {doc['speedup_iqr']:.3f}, "
                     f"{doc['latency_repeats']} pairs)")
        if doc["compile_s"] is not None:
            lines.append(f"prepare time    {doc['compile_s']:.1f} s (compile, or ONNX export + sessions; "
                         "not in the latency)")
        lines.append(f"tokens kept     {doc['tokens_kept']:.3f}, FLOPs ratio {doc['flops_ratio']:.3f}")
    lines.append("")
    lines.append("patch tokens entering each block")
    lines.append(f"  dense   {' '.join(str(t) for t in dense['tokens_per_block'])}")
    if merged:
        lines.append(f"  merged  {' '.join(str(t) for t in merged['tokens_per_block'])}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    document = measure(args)
    if args.json:
        json.dump(document, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(render_table(document))
    return 0
