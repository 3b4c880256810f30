"""Patching a timm VisionTransformer in place so its blocks run the DSM schedule.

The block stack is swapped for `DSMBlockStack`, an `nn.Sequential` holding the very same block modules (so the
state dict keys and weights are untouched), whose forward carries the token sizes from block to block. Blocks that
neither merge nor need size-aware attention run their own, unmodified forward, which is what makes the "every
ratio 0" config bit-identical to the original model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DSMConfig, ModelFingerprint, ModelMismatchError
from .matching import attention_prune, bipartite_merge, window_order
from .schedule import BlockPlan, block_plan

SUPPORTED_POOLS = ("token", "avg")
_PATCH_ATTRIBUTE = "_dsm_patch"


def _timm_vit_classes() -> tuple[type, type, type]:
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    return VisionTransformer, Block, Attention


def _unpatchable_reason(model: nn.Module) -> str | None:
    vit_class, block_class, attention_class = _timm_vit_classes()
    if not isinstance(model, vit_class):
        return (f"{type(model).__name__} is not a timm VisionTransformer (ViT, DeiT, DeiT-III, DINOv2 and "
                f"register variants are supported)")
    for index, block in enumerate(model.blocks):
        if type(block) is not block_class:
            return f"block {index} is a {type(block).__name__}; DSM patches timm's standard pre-norm Block only"
        if type(block.attn) is not attention_class:
            return f"block {index} uses {type(block.attn).__name__}; DSM patches timm's standard Attention only"
    if getattr(model, "attn_pool", None) is not None:
        return "attention-pool heads (global_pool='map') would weigh merged tokens wrongly; not supported"
    if model.global_pool not in SUPPORTED_POOLS:
        return f"global_pool={model.global_pool!r} is not supported (supported: {', '.join(SUPPORTED_POOLS)})"
    if getattr(model.patch_embed, "dynamic_img_size", False) or getattr(model, "dynamic_img_size", False):
        return "dynamic_img_size models change their grid per input; DSM needs the fixed grid the config was tuned for"
    if getattr(model, "grad_checkpointing", False):
        return "gradient checkpointing bypasses the block stack's forward; disable it (inference only)"
    return None


def check_fits(model: nn.Module, config: DSMConfig) -> None:
    """Raise ModelMismatchError, naming the reason, unless `config` can be applied to `model`."""
    reason = _unpatchable_reason(model)
    if reason is not None:
        raise ModelMismatchError(f"cannot apply DSM: {reason}")
    if model.global_pool == "avg" and any(stage.operator == "prune" for stage in config.stages if stage.merges):
        raise ModelMismatchError("cannot apply DSM: a prune stage drops tokens, but this model's average-pool head "
                                 "weighs every patch; use a merge operator for it")
    actual = ModelFingerprint.from_model(model)
    if config.model is not None:
        differences = config.model.differences(actual)
        if differences:
            raise ModelMismatchError(
                f"the config was tuned for {config.model.name}, which differs from this model: "
                + "; ".join(differences))
    else:
        config.replace(model=actual)  # validates stage coverage and depth against this model


# How the proportional-attention bias reaches scaled_dot_product_attention (no field of the frozen config: both
# ways compute the same attention, they differ only in which kernels may run it):
#   "fused"  - the bias rides in an extra query/key column, so no mask is passed. CUDA's flash kernel takes no
#              mask at all, so this is the way a merged model keeps the kernel the dense one runs.
#   "masked" - the bias is a float attn_mask. CPU's flash kernel takes a mask, and on the CPU the extra columns
#              are only more work; on CUDA a mask rules flash out (efficient or math kernel instead).
#   "auto"   - "fused" for CUDA tensors, "masked" elsewhere.
PROPORTIONAL_ATTENTION_MODES = ("auto", "fused", "masked")
_proportional_attention_mode = "auto"
# Flash and the memory-efficient kernels want head dims in multiples of 8 (16-byte rows in half precision).
_HEAD_DIM_ALIGNMENT = 8


def proportional_attention_mode() -> str:
    return _proportional_attention_mode


def set_proportional_attention_mode(mode: str) -> str:
    """Choose how the log-size bias reaches SDPA for every patched model ("auto", "fused", "masked"); returns the
    previous mode. A compiled model recompiles on its next call after a change (dynamo guards the global)."""
    global _proportional_attention_mode
    if mode not in PROPORTIONAL_ATTENTION_MODES:
        raise ValueError(f"proportional attention mode must be one of {', '.join(PROPORTIONAL_ATTENTION_MODES)}, "
                         f"got {mode!r}")
    previous, _proportional_attention_mode = _proportional_attention_mode, mode
    return previous


def _uses_bias_columns(q: torch.Tensor) -> bool:
    mode = _proportional_attention_mode
    return mode == "fused" or (mode == "auto" and q.is_cuda)


def _fused_size_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_sizes: torch.Tensor,
                          scale: float, dropout_p: float) -> torch.Tensor:
    """softmax(q.k * scale + log s) @ v with no mask: q gains a column of ones and k a column of log(s) / scale,
    so q'.k' * scale = q.k * scale + log s exactly; zero columns pad q, k and v to a multiple of 8 (flash needs
    all three at one head dim) and the output is cut back to v's head dim.

    The constant sits on q rather than 1/scale: 1.0 is exact in every dtype, leaving one rounding (of
    log s / scale) as the masked path has one (of log s)."""
    batch, heads, count, head_dim = q.shape
    width = -(-(head_dim + 1) // _HEAD_DIM_ALIGNMENT) * _HEAD_DIM_ALIGNMENT
    spare = width - head_dim - 1
    bias = (log_sizes * (1.0 / scale)).to(k.dtype)[:, None, :, None].expand(batch, heads, count, 1)
    ones = q.new_ones(1, 1, 1, 1).expand(batch, heads, count, 1)
    zeros = q.new_zeros(1, 1, 1, spare).expand(batch, heads, count, spare)
    q = torch.cat([q, ones, zeros], dim=-1)
    k = torch.cat([k, bias, zeros], dim=-1)
    v = F.pad(v, (0, width - head_dim))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)[..., :head_dim]


class Attended(NamedTuple):
    output: torch.Tensor                 # the attention branch's output, as timm's Attention.forward gives it
    keys: torch.Tensor | None            # (B, T, D) head-averaged keys: what bipartite matching compares
    received: torch.Tensor | None        # (B, T) attention each token receives from the prefix tokens (pruning)


def _attention_with_keys(attention: nn.Module, x: torch.Tensor, log_sizes: torch.Tensor | None,
                         want_keys: bool, received_from: int | None = None) -> Attended:
    """timm's Attention.forward, plus the head-averaged keys and an additive log-size bias (see
    PROPORTIONAL_ATTENTION_MODES for how the bias reaches the fused kernels).

    `received_from`: also the attention every token receives from the first `received_from` tokens (the prefix),
    averaged over heads and those queries; with no prefix, from the mean query. Fused kernels do not expose the
    attention matrix, so these few query rows are computed again: O(P * T) per head, not O(T^2)."""
    batch, count, channels = x.shape
    gate = attention.gate(x).sigmoid() if getattr(attention, "gate", None) is not None else None
    qkv = attention.qkv(x).reshape(batch, count, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attention.q_norm(q), attention.k_norm(k)
    received = None if received_from is None else _received_attention(q, k, log_sizes, attention.scale,
                                                                       received_from)
    dropout_p = attention.attn_drop.p if attention.training else 0.0
    if attention.fused_attn and log_sizes is not None and _uses_bias_columns(q):
        x = _fused_size_attention(q, k, v, log_sizes, attention.scale, dropout_p)
    elif attention.fused_attn:
        mask = log_sizes[:, None, None, :] if log_sizes is not None else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    else:
        scores = (q * attention.scale) @ k.transpose(-2, -1)
        if log_sizes is not None:
            scores = scores + log_sizes[:, None, None, :]
        x = attention.attn_drop(scores.softmax(dim=-1)) @ v
    x = x.transpose(1, 2).reshape(batch, count, getattr(attention, "attn_dim", channels))
    x = attention.norm(x)
    if gate is not None:
        x = x * gate
    x = attention.proj_drop(attention.proj(x))
    return Attended(x, k.mean(dim=1) if want_keys else None, received)


def _received_attention(q: torch.Tensor, k: torch.Tensor, log_sizes: torch.Tensor | None, scale: float,
                        num_prefix: int) -> torch.Tensor:
    queries = q[:, :, :num_prefix] if num_prefix else q.mean(dim=2, keepdim=True)
    scores = (queries * scale) @ k.transpose(-2, -1)
    if log_sizes is not None:
        scores = scores + log_sizes[:, None, None, :]
    return scores.softmax(dim=-1).mean(dim=(1, 2))


class MergedTokens(NamedTuple):
    """What the block stack computes, returned rather than stored so concurrent forwards and graph capture
    (torch.compile fullgraph, torch.export, ONNX) see a pure function."""

    tokens: torch.Tensor          # (B, P + n, C): the prefix, then the n patch tokens left after merging
    sizes: torch.Tensor | None    # (B, P + n): patches each token stands for; None when nothing merged
    origin: torch.Tensor | None   # (B, P + N): position in `tokens` of every input token; None: identity/untracked


class DSMBlockStack(nn.Sequential):
    """The model's blocks, run under a DSM schedule. Holds the same block modules as the original stack.

    For average-pooling models the output is expanded back to the input's token count, every merged token
    repeated once per patch it stands for: the model's own norm and pooling then weigh each token by its size
    with no state passed beside the tensor, and `forward_features` keeps the dense shape. Class-token models
    get the merged tokens, as their pooling never looks at the merged ones' sizes.
    """

    def __init__(self, blocks: nn.Sequential, plans: list[BlockPlan], config: DSMConfig,
                 fingerprint: ModelFingerprint, restore_token_count: bool = False) -> None:
        super().__init__(*blocks)
        self.plans = plans
        self.config = config
        self.num_prefix = fingerprint.num_prefix_tokens
        self.num_patches = fingerprint.grid[0] * fingerprint.grid[1]
        self.restore_token_count = restore_token_count
        # ToMe splits the whole sequence alternately with the class token in set A; starting A at the patch
        # position that keeps that parity makes global DSM reproduce ToMe's pairs exactly.
        self.a_starts_at = self.num_prefix % 2
        if config.hierarchy_depth > 0:
            device = next(iter(blocks.parameters())).device
            patch_order = window_order(fingerprint.grid, config.hierarchy_depth) + self.num_prefix
            sequence_order = torch.cat([torch.arange(self.num_prefix), patch_order]).to(device)
            self.register_buffer("window_permutation", sequence_order, persistent=False)
            self.register_buffer("window_inverse", torch.argsort(sequence_order), persistent=False)
        else:
            self.window_permutation = None
            self.window_inverse = None

    def merge(self, x: torch.Tensor, track_origin: bool = False) -> MergedTokens:
        """Run the blocks on the token sequence `x` (B, P + N, C); `track_origin` follows every input token."""
        if x.shape[1] != self.num_prefix + self.num_patches:
            raise RuntimeError(
                f"DSM was configured for {self.num_patches} patch tokens but the blocks received "
                f"{x.shape[1] - self.num_prefix}; feed images of the size the config was tuned for")
        sizes: torch.Tensor | None = None  # None while every token is one patch
        origin: torch.Tensor | None = None
        windows_arranged = False
        for block, plan in zip(self, self.plans):
            size_aware = sizes is not None and self.config.proportional_attention
            if plan.merge_per_window == 0 and not size_aware:
                x = block(x)
                continue
            if not windows_arranged and self.window_permutation is not None:
                x = x.index_select(1, self.window_permutation)
                if sizes is not None:
                    sizes = sizes.index_select(1, self.window_permutation)
                if track_origin:
                    arranged = self.window_inverse.expand(x.shape[0], -1)
                    origin = arranged if origin is None else arranged.gather(1, origin)
                windows_arranged = True
            log_sizes = sizes.log() if size_aware else None
            prunes = plan.merge_per_window > 0 and plan.operator == "prune"
            attended = _attention_with_keys(block.attn, block.norm1(x), log_sizes,
                                            want_keys=plan.merge_per_window > 0 and not prunes,
                                            received_from=self.num_prefix if prunes else None)
            x = x + block.drop_path1(block.ls1(attended.output))
            if plan.merge_per_window > 0:
                if sizes is None:
                    sizes = x.new_ones(x.shape[0], x.shape[1])
                if prunes:
                    if track_origin:
                        raise RuntimeError("a pruned token has no place in the output: origin tracking (and "
                                           "the average-pool heads that need it) cannot follow a prune stage")
                    x, sizes = attention_prune(x, sizes, attended.received, self.num_prefix, plan.windows,
                                               plan.merge_per_window)
                else:
                    x, sizes, destination = bipartite_merge(x, sizes, attended.keys, self.num_prefix,
                                                            plan.windows, plan.merge_per_window,
                                                            self.a_starts_at, with_destination=track_origin,
                                                            operator=plan.operator)
                    if destination is not None:
                        origin = destination if origin is None else destination.gather(1, origin)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return MergedTokens(x, sizes, origin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self.merge(x, track_origin=self.restore_token_count)
        if merged.origin is None:
            return merged.tokens
        channels = merged.tokens.shape[-1]
        return merged.tokens.gather(1, merged.origin[..., None].expand(-1, -1, channels))


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, _PATCH_ATTRIBUTE)


def apply_dsm(model: nn.Module, config: DSMConfig) -> nn.Module:
    """Patch `model` in place to run `config`; a model already patched is re-patched with the new config."""
    if is_patched(model):
        remove_dsm(model)
    check_fits(model, config)
    fingerprint = ModelFingerprint.from_model(model)
    bound = config if config.model is not None else config.replace(model=fingerprint)
    plans = block_plan(bound, fingerprint)
    original_blocks = model.blocks
    model.blocks = DSMBlockStack(original_blocks, plans, bound, fingerprint,
                                 restore_token_count=model.global_pool == "avg")
    object.__setattr__(model, _PATCH_ATTRIBUTE, {"original_blocks": original_blocks, "config": bound})
    return model


def remove_dsm(model: nn.Module) -> nn.Module:
    """Undo `apply_dsm`: the model gets back its original block stack and pooling."""
    patch: dict[str, Any] | None = getattr(model, _PATCH_ATTRIBUTE, None)
    if patch is None:
        return model
    model.blocks = patch["original_blocks"]
    object.__delattr__(model, _PATCH_ATTRIBUTE)
    return model


def applied_config(model: nn.Module) -> DSMConfig | None:
    patch = getattr(model, _PATCH_ATTRIBUTE, None)
    return patch["config"] if patch else None


__all__ = ["apply_dsm", "remove_dsm", "is_patched", "check_fits", "applied_config", "DSMBlockStack", "MergedTokens",
           "PROPORTIONAL_ATTENTION_MODES", "proportional_attention_mode", "set_proportional_attention_mode"]
