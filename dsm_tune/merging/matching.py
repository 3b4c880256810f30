"""Bipartite soft matching inside spatial windows, the size-weighted merge it drives and its variants, and the
attention-ranked pruning of a window's tokens: the operators a stage reduces its tokens with (config.OPERATORS).

Written from the ToMe paper's description (Bolya et al., ICLR 2023): split the tokens into two alternating sets
A and B, give every A token its most similar B token (cosine similarity of head-averaged attention keys), and merge
the r A tokens with the highest similarity into their B partners by size-weighted averaging.

DSM's spatial variant runs that matching independently in each window. Patch tokens are kept grouped by window,
windows in Z-order (Morton order), so a window of level l is a contiguous run of tokens and its four children of
level l+1 are the four runs it consists of: coarsening a level needs no data movement, only a different view.
Merging keeps that invariant because every window keeps the same number of tokens.
"""

from __future__ import annotations

import torch

# Similarities above it count towards a token's redundancy (`_redundancy`); below it they count against, softly.
ENERGY_MARGIN = 0.5
_NORM_EPS = 1e-12


def window_order(grid: tuple[int, int], depth: int) -> torch.Tensor:
    """Permutation from row-major patch order to window-grouped Z-order at hierarchy level `depth`."""
    height, width = grid
    side = 2 ** depth
    window_h, window_w = height // side, width // side
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    window_row, window_col = rows // window_h, cols // window_w
    morton = torch.zeros_like(rows)
    for bit in range(depth):
        morton |= ((window_row >> bit) & 1) << (2 * bit + 1)
        morton |= ((window_col >> bit) & 1) << (2 * bit)
    inside = (rows % window_h) * window_w + (cols % window_w)
    key = morton * (window_h * window_w) + inside
    return torch.argsort(key)


def bipartite_merge(
    x: torch.Tensor,
    sizes: torch.Tensor,
    keys: torch.Tensor,
    num_prefix: int,
    windows: int,
    merge_per_window: int,
    a_starts_at: int,
    with_destination: bool = False,
    operator: str = "merge",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge `merge_per_window` patch tokens in each of `windows` contiguous windows; prefix tokens stay as they are.

    x: (B, P + N, C) the whole sequence, P protected prefix tokens first; sizes: (B, P + N) patches each token
    stands for (1 for prefix tokens); keys: (B, P + N, D) matching features. Set A holds the positions
    `a_starts_at, a_starts_at + 2, ...` of each window (0 or 1, chosen by the caller so that a single class token in
    front reproduces ToMe's split). Returns the sequence and sizes with `windows * merge_per_window` fewer tokens:
    the prefix, then per window its unmerged A tokens in their original order followed by its B tokens.
    With `with_destination`, also the (B, P + N) output position every input token went to (its own, or its
    partner's when merged away), so a caller can follow the original patches through the merges.

    `operator`: "merge" (ToMe's), "merge_norm" (the average rescaled to the size-weighted mean norm of what it
    merges) or "merge_energy" (the A tokens merged are the most redundant ones, `_redundancy`, each into its most
    similar B token); see config.OPERATORS.

    The token tensor is read once by a single gather; only the merged tokens and their partners are touched
    again. On small models the merge is memory-bound, so passes over the whole sequence are what it costs.
    """
    batch, total, channels = x.shape
    per_window = (total - num_prefix) // windows
    r = merge_per_window
    device = x.device
    b_starts_at = 1 - a_starts_at

    patch_keys = keys[:, num_prefix:]
    patch_keys = (patch_keys / patch_keys.norm(dim=-1, keepdim=True)).reshape(batch, windows, per_window, -1)
    scores = patch_keys[:, :, a_starts_at::2] @ patch_keys[:, :, b_starts_at::2].transpose(-1, -2)
    count_a, count_b = scores.shape[-2], scores.shape[-1]
    best_score, best_partner = scores.max(dim=-1)
    merge_first = _redundancy(patch_keys, a_starts_at) if operator == "merge_energy" else best_score
    ranked = merge_first.argsort(dim=-1, descending=True)
    kept_a = ranked[..., r:].sort(dim=-1).values
    merged_a = ranked[..., :r]
    partner = best_partner.gather(dim=-1, index=merged_a)

    window_start = num_prefix + torch.arange(windows, device=device)[:, None] * per_window
    kept_a_positions = window_start + a_starts_at + 2 * kept_a
    b_positions = (window_start + b_starts_at + 2 * torch.arange(count_b, device=device)).expand(batch, -1, -1)
    prefix_positions = torch.arange(num_prefix, device=device).expand(batch, -1)
    keep = torch.cat([prefix_positions, torch.cat([kept_a_positions, b_positions], dim=-1).reshape(batch, -1)], 1)
    merged = x.gather(1, keep[..., None].expand(-1, -1, channels))
    merged_sizes = sizes.gather(1, keep)

    source_positions = (window_start + a_starts_at + 2 * merged_a).reshape(batch, -1)
    new_window_start = num_prefix + torch.arange(windows, device=device)[:, None] * (per_window - r)
    partner_positions = (new_window_start + (count_a - r) + partner).reshape(batch, -1)
    source_sizes = sizes.gather(1, source_positions)
    weighted_sources = x.gather(1, source_positions[..., None].expand(-1, -1, channels)) * source_sizes[..., None]
    partner_index = partner_positions[..., None].expand(-1, -1, channels)
    # A partner may receive several sources; the rewrites below write equal values for repeated indices.
    partner_sizes = merged_sizes.gather(1, partner_positions)
    if operator == "merge_norm":
        norm_sums = _weighted_norm_sums(merged, x, partner_index, source_positions, partner_sizes, source_sizes)
    merged.scatter_(1, partner_index, merged.gather(1, partner_index) * partner_sizes[..., None])
    merged.scatter_add_(1, partner_index, weighted_sources)
    merged_sizes.scatter_add_(1, partner_positions, source_sizes)
    total_sizes = merged_sizes.gather(1, partner_positions)
    averaged = merged.gather(1, partner_index) / total_sizes[..., None]
    if operator == "merge_norm":
        wanted_norm = norm_sums.gather(1, partner_positions) / total_sizes
        averaged = averaged * (wanted_norm / averaged.norm(dim=-1).clamp_min(_NORM_EPS))[..., None]
    merged.scatter_(1, partner_index, averaged)
    if not with_destination:
        return merged, merged_sizes, None
    destination = torch.zeros_like(sizes, dtype=torch.long)
    destination.scatter_(1, keep, torch.arange(keep.shape[1], device=device).expand(batch, -1))
    destination.scatter_(1, source_positions, partner_positions)
    return merged, merged_sizes, destination


def _redundancy(unit_keys: torch.Tensor, a_starts_at: int) -> torch.Tensor:
    """(B, W, A) how redundant each A token is in its window: the mean over the window's tokens of its cosine
    similarity past ENERGY_MARGIN, below it an exponentially flattened penalty (an energy in the sense of PiToMe,
    Tran et al. 2024): a token like many others is merged before one like few, which keeps informative ones."""
    similarity = unit_keys[:, :, a_starts_at::2] @ unit_keys.transpose(-1, -2)
    above = similarity - ENERGY_MARGIN
    return torch.where(above > 0, above, torch.expm1(above)).mean(dim=-1)


def _weighted_norm_sums(merged: torch.Tensor, x: torch.Tensor, partner_index: torch.Tensor,
                        source_positions: torch.Tensor, partner_sizes: torch.Tensor,
                        source_sizes: torch.Tensor) -> torch.Tensor:
    """(B, T') at every partner position, the size-weighted sum of the norms of the tokens merged into it, itself
    included (read before the merge writes it)."""
    channels = x.shape[-1]
    partner_positions = partner_index[..., 0]
    sums = merged.new_zeros(merged.shape[:2])
    sums.scatter_(1, partner_positions, merged.gather(1, partner_index).norm(dim=-1) * partner_sizes)
    source_norms = x.gather(1, source_positions[..., None].expand(-1, -1, channels)).norm(dim=-1)
    return sums.scatter_add(1, partner_positions, source_norms * source_sizes)


def attention_prune(
    x: torch.Tensor,
    sizes: torch.Tensor,
    attention: torch.Tensor,
    num_prefix: int,
    windows: int,
    prune_per_window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the `prune_per_window` least-attended patch tokens of each of `windows` contiguous windows.

    attention: (B, P + N) the attention each token receives (`patch._attention_with_keys`). The kept tokens keep
    their order, their features and their sizes: nothing is averaged, so a pruned model runs the model's own
    tokens, and each window keeps the same count (static shapes)."""
    batch, total, channels = x.shape
    per_window = (total - num_prefix) // windows
    device = x.device
    received = attention[:, num_prefix:].reshape(batch, windows, per_window)
    kept = received.argsort(dim=-1, descending=True)[..., :per_window - prune_per_window].sort(dim=-1).values
    window_start = num_prefix + torch.arange(windows, device=device)[:, None] * per_window
    prefix_positions = torch.arange(num_prefix, device=device).expand(batch, -1)
    keep = torch.cat([prefix_positions, (window_start + kept).reshape(batch, -1)], dim=1)
    return x.gather(1, keep[..., None].expand(-1, -1, channels)), sizes.gather(1, keep)
