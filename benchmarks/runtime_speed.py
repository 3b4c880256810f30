"""Does DSM's speedup carry over from PyTorch eager to torch.compile and to ONNX Runtime? CPU, random weights.

For each model and each runtime, the dense and the merged model are timed interleaved by the project's own latency
harness (`dsm_tune.evaluation.latency.measure_latency`, the one a study uses), all in one process so machine drift
hits every runtime alike. Reported per runtime: dense and merged latency, DSM's speedup (dense / merged), how much of
the eager speedup survives (speedup / eager speedup), and how fast the runtime runs the dense model (eager dense /
runtime dense). With `--operators`, the same schedule runs with each named operator on every stage
(`merging.config.OPERATORS`), so an operator that loses its speed in a runtime shows. Latency does not depend on
weight values, so random weights are fine.

    python benchmarks/runtime_speed.py                 # vit_small and vit_base at 224, batch 8, all runtimes
    python benchmarks/runtime_speed.py --quick         # a smoke run: vit_small at 64 px, batch 1, few repeats
    python benchmarks/runtime_speed.py --models vit_small_patch16_224 --operators merge prune merge_norm merge_energy

Needs the ONNX extra for the onnxruntime rows: pip install 'dsm-tune[onnx]'.
"""

from __future__ import annotations

import argparse
import dataclasses

import timm
import torch

from dsm_tune.evaluation.latency import LatencyResult, measure_latency
from dsm_tune.evaluation.targets import load_target
from dsm_tune.evaluation.trial import shared_weights_copy
from dsm_tune.merging import DSMConfig, Stage, apply_dsm, token_schedule
from dsm_tune.merging.config import OPERATORS

# Runtime name -> the target profile and flags that time it.
RUNTIME_TARGETS = {
    "eager": ("cpu", {"compile": False}),
    "compiled": ("cpu", {"compile": True}),
    "onnxruntime": ("ort-cpu", {}),
}


def dsm_config(model: torch.nn.Module, operator: str = "merge") -> DSMConfig:
    """Two dense blocks, a local stage, then global merging: about half the tokens left by mid-depth."""
    depth = len(model.blocks)
    half = depth // 2
    return DSMConfig.for_model(model, start_layer=2, hierarchy_depth=1,
                               stages=[Stage(half - 2, ratio=0.16, operator=operator),
                                       Stage(depth - half, ratio=0.12, operator=operator)])


def benchmark_model(name: str, img_size: int | None, batch_size: int, runtimes: list[str], warmup: int,
                    repeats: int, compile_backend: str, operator: str = "merge") -> None:
    kwargs = {"img_size": img_size} if img_size else {}
    dense = timm.create_model(name, pretrained=False, **kwargs).eval()
    merged = apply_dsm(shared_weights_copy(dense), dsm_config(dense, operator))
    schedule = token_schedule(dsm_config(dense))
    height, width = dense.patch_embed.img_size
    print(f"\n{name}  {height}x{width}  batch {batch_size}  operator {operator}  tokens {schedule[0]}->"
          f"{schedule[len(schedule) // 2]}(mid)->{schedule[-1]}  threads {torch.get_num_threads()}")
    print(f"  {'runtime':12s} {'dense ms':>16s} {'merged ms':>16s} {'speedup':>16s} {'vs eager':>9s} "
          f"{'dense vs eager':>15s} {'prepare s':>10s}")
    results: dict[str, LatencyResult] = {}
    for runtime in runtimes:
        profile, flags = RUNTIME_TARGETS[runtime]
        target = dataclasses.replace(load_target(profile, **flags), batch_size=batch_size)
        result = measure_latency(dense, merged, target, (3, height, width), warmup=warmup, repeats=repeats,
                                 compile_backend=compile_backend)
        results[runtime] = result
        eager = results.get("eager")
        carried = f"{result.speedup / eager.speedup:8.2f}x" if eager else f"{'-':>9s}"
        dense_ratio = f"{eager.baseline_ms / result.baseline_ms:14.2f}x" if eager else f"{'-':>15s}"
        prepare = f"{result.compile_s:10.1f}" if result.compile_s is not None else f"{'-':>10s}"
        print(f"  {runtime:12s} {result.baseline_ms:9.2f} ({result.baseline_iqr_ms:4.2f}) "
              f"{result.candidate_ms:9.2f} ({result.candidate_iqr_ms:4.2f}) "
              f"{result.speedup:8.2f}x ({result.speedup_iqr:4.2f}) {carried} {dense_ratio} {prepare}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--img-size", type=int, default=None, help="build the models at this size (default: 224)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runtimes", nargs="+", choices=sorted(RUNTIME_TARGETS), default=list(RUNTIME_TARGETS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--operators", nargs="+", choices=OPERATORS, default=["merge"],
                        help="the operators to time the schedule with (default: merge)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: vit_small at 64 px, batch 1, 1 warm-up, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.models, args.img_size, args.batch_size, args.warmup, args.repeats = (
            ["vit_small_patch16_224"], 64, 1, 1, 3)
    torch.manual_seed(0)
    for name in args.models:
        for operator in args.operators:
            benchmark_model(name, args.img_size, args.batch_size, args.runtimes, args.warmup, args.repeats,
                            args.compile_backend, operator)


if __name__ == "__main__":
    main()
