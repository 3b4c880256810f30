"""Speed of the runtime merger on CPU: dense vs. DSM, and the merger's own overhead vs. an oracle.

The oracle runs the very same blocks on the very same token counts as the merged model, but gets there by
slicing the token tensor instead of matching and merging. `merged / oracle - 1` is therefore the cost of the
merger itself (similarity, argsort, gather/scatter, proportional-attention mask), and `dense / merged` the speedup
a user sees. Every operator (`merging.config.OPERATORS`) runs each config's schedule on every stage: the same token
counts, so the same oracle; an operator that costs more than the tokens it removes save shows here. All variants
are timed round-robin in one process so machine drift hits them alike; latency is independent of weight values,
so random weights are fine.

    python benchmarks/merger_speed.py                      # vit_small and vit_base at 224, batch 8
    python benchmarks/merger_speed.py --models vit_small_patch16_224 --batch-size 1 --repeats 15
    python benchmarks/merger_speed.py --operators merge prune   # only these operators

Targets: overhead <= 10% of the oracle's time at batch 8; >= 1.4x speedup for a config that halves the
tokens by mid-depth.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch import nn

import dataclasses

from dsm_tune.merging import DSMConfig, Stage, apply_dsm, block_plan, remove_dsm, token_schedule
from dsm_tune.merging.config import OPERATORS


class OracleStack(nn.Module):
    """Same blocks, same per-block token counts as a DSM plan, tokens dropped by slicing: no matching at all."""

    def __init__(self, blocks: nn.Sequential, config: DSMConfig, num_prefix: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.plans = block_plan(config)
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, plan in zip(self.blocks, self.plans):
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            if plan.merged:
                x = x[:, : self.num_prefix + plan.tokens_out]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x


def configs_for(model: nn.Module) -> dict[str, DSMConfig]:
    depth = len(model.blocks)
    half = depth // 2
    return {
        # ToMe's constant-r schedule, r chosen so the final count is about a quarter of the grid.
        "tome_r": DSMConfig.tome(model, r=max(1, (3 * model.patch_embed.num_patches // 4) // depth)),
        # Halves the tokens by mid-depth: two dense blocks, then a local stage and a global stage.
        "dsm_half_by_mid": DSMConfig.for_model(
            model, start_layer=2, hierarchy_depth=1,
            stages=[Stage(half - 2, ratio=0.16), Stage(depth - half, ratio=0.12)]),
        "dsm_aggressive": DSMConfig.for_model(
            model, start_layer=1, hierarchy_depth=1,
            stages=[Stage(2, ratio=0.25), Stage(depth - 3, ratio=0.2)]),
    }


def time_round_robin(variants: dict[str, callable], repeats: int, warmup: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(warmup):
        for run in variants.values():
            run()
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    return timings


def median_iqr(samples: list[float]) -> tuple[float, float]:
    quartiles = statistics.quantiles(samples, n=4)
    return statistics.median(samples), quartiles[2] - quartiles[0]


def with_operator(config: DSMConfig, operator: str) -> DSMConfig:
    return config.replace(stages=tuple(dataclasses.replace(stage, operator=operator) for stage in config.stages))


def benchmark_model(name: str, batch_size: int, repeats: int, warmup: int, operators: list[str]) -> None:
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch_size, 3, *model.patch_embed.img_size)
    prefix = model.num_prefix_tokens
    print(f"\n{name}  batch {batch_size}  {len(model.blocks)} blocks  {model.patch_embed.num_patches} patch tokens"
          f"  threads {torch.get_num_threads()}")
    for config_name, config in configs_for(model).items():
        merged = {}
        for operator in operators:
            merged[operator] = apply_dsm(timm.create_model(name, pretrained=False).eval(),
                                         with_operator(config, operator))
            merged[operator].load_state_dict(model.state_dict())
        oracle_stack = OracleStack(model.blocks, config, prefix)

        def oracle():
            features = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
            return model.forward_head(model.norm(oracle_stack(features)))

        variants = {"dense": lambda: model(x), "oracle": oracle}
        variants.update({operator: (lambda m=m: m(x)) for operator, m in merged.items()})
        with torch.inference_mode():
            timings = time_round_robin(variants, repeats, warmup)
        medians = {name: median_iqr(samples) for name, samples in timings.items()}
        dense_s, oracle_s = medians["dense"][0], medians["oracle"][0]
        schedule = token_schedule(config)
        print(f"  {config_name:17s} tokens {schedule[0]}->{schedule[len(schedule) // 2]}(mid)->{schedule[-1]}"
              f"  dense {dense_s * 1e3:7.1f} ms (IQR {medians['dense'][1] * 1e3:.1f})"
              f"  oracle {oracle_s * 1e3:7.1f} ms (IQR {medians['oracle'][1] * 1e3:.1f})"
              f"  oracle speedup {dense_s / oracle_s:.2f}x")
        for operator in operators:
            dsm_s, dsm_iqr = medians[operator]
            print(f"  {'':17s} {operator:13s} {dsm_s * 1e3:7.1f} ms (IQR {dsm_iqr * 1e3:.1f})  speedup dense/dsm "
                  f"{dense_s / dsm_s:.2f}x   merger overhead dsm/oracle-1 {100 * (dsm_s / oracle_s - 1):+.1f}%")
            remove_dsm(merged[operator])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--operators", nargs="+", choices=OPERATORS, default=list(OPERATORS))
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.models:
        benchmark_model(name, args.batch_size, args.repeats, args.warmup, args.operators)


if __name__ == "__main__":
    main()
