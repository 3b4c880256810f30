"""Bipartite soft matching inside spatial windows, and the size-weighted merge it drives.

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
    tokens: torch.Tensor,
    sizes: torch.Tensor,
    keys: torch.Tensor,
    windows: int,
    merge_per_window: int,
    a_starts_at: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `merge_per_window` tokens in each of `windows` contiguous windows.

    tokens: (B, N, C) patch tokens; sizes: (B, N, 1) patches each token stands for; keys: (B, N, D) matching
    features. Set A holds the positions `a_starts_at, a_starts_at + 2, ...` of each window (0 or 1, chosen by the
    caller so that a single class token in front reproduces ToMe's split). Returns the merged tokens and sizes,
    (B, windows * (T - r), ...), per window the unmerged A tokens in their original order, then the B tokens.
    """
    batch, count, channels = tokens.shape
    per_window = count // windows
    r = merge_per_window
    keys = keys / keys.norm(dim=-1, keepdim=True)
    keys = keys.reshape(batch, windows, per_window, -1)
    b_starts_at = 1 - a_starts_at
    keys_a, keys_b = keys[:, :, a_starts_at::2], keys[:, :, b_starts_at::2]
    scores = keys_a @ keys_b.transpose(-1, -2)
    best_score, best_partner = scores.max(dim=-1)
    ranked = best_score.argsort(dim=-1, descending=True)[..., None]
    kept_a = ranked[:, :, r:].sort(dim=-2).values
    merged_a = ranked[:, :, :r]
    partner = best_partner[..., None].gather(dim=-2, index=merged_a)

    weighted = torch.cat([tokens * sizes, sizes], dim=-1).reshape(batch, windows, per_window, channels + 1)
    side_a, side_b = weighted[:, :, a_starts_at::2], weighted[:, :, b_starts_at::2]
    width = channels + 1
    unmerged = side_a.gather(dim=-2, index=kept_a.expand(-1, -1, -1, width))
    sources = side_a.gather(dim=-2, index=merged_a.expand(-1, -1, -1, width))
    destinations = side_b.scatter_reduce(dim=-2, index=partner.expand(-1, -1, -1, width), src=sources, reduce="sum")
    merged = torch.cat([unmerged, destinations], dim=-2).reshape(batch, windows * (per_window - r), width)
    new_sizes = merged[..., channels:]
    return merged[..., :channels] / new_sizes, new_sizes
