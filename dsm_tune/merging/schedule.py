"""How many tokens each block merges, in which windows: the one place the schedule is computed.

Both the patched forward pass and the reports (token counts, FLOPs) read this plan, so what is reported is what
runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_OPERATOR, ConfigError, DSMConfig, ModelFingerprint

# Guards floor(ratio * tokens) against ratios like 0.3 that are not exact in binary floating point.
_RATIO_EPS = 1e-9


@dataclass(frozen=True)
class BlockPlan:
    tokens_in: int        # patch tokens entering the block (prefix tokens excluded)
    windows: int          # 4**level windows the patch tokens are grouped in; 1 = global matching
    merge_per_window: int  # tokens merged away in each window, between attention and MLP
    operator: str = DEFAULT_OPERATOR   # how they go (config.OPERATORS)

    @property
    def merged(self) -> int:
        return self.windows * self.merge_per_window

    @property
    def tokens_out(self) -> int:
        return self.tokens_in - self.merged


def _merges_in_window(stage_ratio: float | None, stage_r: int | None, windows: int, tokens_per_window: int) -> int:
    if stage_ratio is not None:
        wanted = math.floor(stage_ratio * tokens_per_window + _RATIO_EPS)
    else:
        wanted = stage_r // windows
    # Bipartite matching can merge at most one side of the split into the other.
    return max(0, min(wanted, tokens_per_window // 2))


def block_plan(config: DSMConfig, fingerprint: ModelFingerprint | None = None) -> list[BlockPlan]:
    fingerprint = fingerprint or config.model
    if fingerprint is None:
        raise ConfigError("the config has no model fingerprint: build it with DSMConfig.for_model(model, ...)")
    config.replace(model=fingerprint)  # validates the config against this model's blocks and grid
    tokens = fingerprint.grid[0] * fingerprint.grid[1]
    plans = [BlockPlan(tokens, 1, 0) for _ in range(config.start_layer)]
    for stage_index, stage in enumerate(config.stages):
        level = max(config.hierarchy_depth - stage_index, 0)
        windows = 4 ** level
        for _ in range(stage.blocks):
            per_window = _merges_in_window(stage.ratio, stage.r, windows, tokens // windows)
            plan = BlockPlan(tokens, windows, per_window, stage.operator)
            plans.append(plan)
            tokens = plan.tokens_out
    return plans


def token_schedule(config: DSMConfig) -> list[int]:
    """Patch tokens entering each block (prefix tokens excluded)."""
    return [plan.tokens_in for plan in block_plan(config)]


def _block_flops(tokens_attn: int, tokens_mlp: int, dim: int, mlp_hidden: int, heads: int) -> float:
    qkv = 2 * tokens_attn * dim * 3 * dim
    scores_and_mix = 2 * 2 * tokens_attn * tokens_attn * dim
    proj = 2 * tokens_attn * dim * dim
    mlp = 2 * 2 * tokens_mlp * dim * mlp_hidden
    return float(qkv + scores_and_mix + proj + mlp)


def _matching_flops(plan: BlockPlan, dim: int, heads: int) -> float:
    if plan.merge_per_window == 0:
        return 0.0
    per_window = plan.tokens_in // plan.windows
    head_dim = dim // heads
    return float(plan.windows * 2 * (per_window // 2) * ((per_window + 1) // 2) * head_dim)


def merge_report(model: Any, config: DSMConfig) -> dict[str, Any]:
    """Tokens per block and estimated FLOPs of the transformer blocks, dense vs. merged.

    FLOPs are reported for insight only; the tuner's latency objective is always measured.
    """
    fingerprint = config.model or ModelFingerprint.from_model(model)
    plans = block_plan(config, fingerprint)
    prefix = fingerprint.num_prefix_tokens
    dense_tokens = fingerprint.grid[0] * fingerprint.grid[1] + prefix
    flops_dense = flops_merged = 0.0
    for block, plan in zip(model.blocks, plans):
        dim = fingerprint.embed_dim
        heads = int(getattr(block.attn, "num_heads", 1))
        hidden = int(block.mlp.fc1.out_features) if hasattr(block.mlp, "fc1") else 4 * dim
        flops_dense += _block_flops(dense_tokens, dense_tokens, dim, hidden, heads)
        flops_merged += _block_flops(plan.tokens_in + prefix, plan.tokens_out + prefix, dim, hidden, heads)
        flops_merged += _matching_flops(plan, dim, heads)
    initial = fingerprint.grid[0] * fingerprint.grid[1]
    return {
        "tokens_per_block": [plan.tokens_in for plan in plans],
        "merged_per_block": [plan.merged for plan in plans],
        "windows_per_block": [plan.windows for plan in plans],
        "final_tokens": plans[-1].tokens_out if plans else initial,
        "tokens_kept": (plans[-1].tokens_out if plans else initial) / initial,
        "flops_dense": flops_dense,
        "flops_merged": flops_merged,
        "flops_ratio": flops_merged / flops_dense if flops_dense else 1.0,
    }
