"""Which batch makes the demo's speedups real on a CPU? (at a small batch the demo's fronts were timing noise)

For each batch size, in one run, with the latency harness the tuner uses (interleaved dense/merged samples):
- the dense model timed against itself, several rounds: a speedup that should be 1.0x, and how far it strays;
- two merge configs of the demo ViT (ToMe r=20 from block 0; a delayed, local-then-global schedule keeping about a
  fifth of the tokens): their speedups, with the spread across rounds;
- the seconds one timing costs (what a study pays per timed trial).

    python benchmarks/demo_speedup.py                      # batches 8 16 32 64 128, 4 rounds
    python benchmarks/demo_speedup.py --batches 8 64 --rounds 6

Run it on idle cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dsm_tune.evaluation.latency import measure_latency
from dsm_tune.evaluation.models import build_model, input_size
from dsm_tune.evaluation.targets import load_target
from dsm_tune.evaluation.trial import shared_weights_copy
from dsm_tune.merging import DSMConfig, Stage, apply_dsm, remove_dsm, token_schedule


def configs(model) -> dict[str, DSMConfig]:
    return {
        "dense vs dense": DSMConfig.dense(model),
        "ToMe r=20": DSMConfig.for_model(model, start_layer=0, hierarchy_depth=0, stages=[Stage(6, r=20)]),
        "delay 1, local then global": DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                                          stages=[Stage(2, r=48), Stage(3, r=24)]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)

    model = build_model("demo").eval()
    merged = shared_weights_copy(model)
    shape = input_size(model)
    print(f"demo ViT, CPU, {torch.get_num_threads()} threads, {args.rounds} rounds per cell; speedup median "
          f"[min, max] over rounds; seconds per timing")
    print(f"| batch | {' | '.join(configs(model))} | s / timing |")
    print("|---|" + "---|" * (len(configs(model)) + 1))
    for batch in args.batches:
        target = load_target("cpu", batch_size=batch)
        cells, seconds = [], []
        for name, cfg in configs(model).items():
            apply_dsm(merged, cfg)
            values = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                values.append(measure_latency(model, merged, target, shape).speedup)
                seconds.append(time.perf_counter() - started)
            remove_dsm(merged)
            kept = token_schedule(cfg)[-1] / token_schedule(cfg)[0]
            label = f"{statistics.median(values):.3f}x [{min(values):.3f}, {max(values):.3f}]"
            cells.append(label if name == "dense vs dense" else f"{label} ({kept:.0%} tokens in the last block)")
        print(f"| {batch} | {' | '.join(cells)} | {statistics.median(seconds):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
