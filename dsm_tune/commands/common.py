"""Flags shared by several commands, defined once so every command spells them the same way."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsm_tune.search.spec import StudySpec

DEFAULT_OUT: Path = StudySpec.default("out")


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required,
                        help="timm model name or alias (vit_tiny, vit_small, vit_base, vit_large, vit_huge, deit_*, demo)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="local weights (.safetensors, or a torch state dict loaded with weights_only=True)")
    parser.add_argument("--pretrained", action="store_true",
                        help="load timm's pretrained weights (needs the weights in the local HF cache or network)")


def add_target_args(parser: argparse.ArgumentParser, compile_flags: bool = True) -> None:
    parser.add_argument("--device", default="cpu",
                        help="hardware target profile: cpu, ort-cpu, a100, h100, l4, t4, v100, ... (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the target's deployment batch size")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="override the target's dtype")
    if not compile_flags:
        return
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="measure with torch.compile")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="measure eagerly")


def add_data_args(parser: argparse.ArgumentParser, metric_flag: bool = True) -> None:
    parser.add_argument("--data", default=None,
                        help="image folder (ImageNet layout, plain class folders or unlabeled) or a named data set "
                             "(fashion-mnist, cifar10, demo-fashion-mnist); default for --model demo: the embedded slice")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on N images (deterministic, class-stratified)")
    if not metric_flag:
        return
    parser.add_argument("--metric", choices=("top1", "agreement", "feature"), default=None,
                        help="accuracy metric (default: top1 with labels, agreement without, feature for headless models)")


def add_study_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--study", required=required, help="study name (a folder under --out)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output root (default: {DEFAULT_OUT}/)")


def add_mlflow_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db)")
