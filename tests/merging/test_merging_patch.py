"""The patched model: identity, ToMe equivalence, windows, prefix protection, token counts, refusals."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from dsm_tune.merging import (
    ConfigError,
    DSMConfig,
    ModelMismatchError,
    Stage,
    apply_dsm,
    check_fits,
    is_patched,
    merge_report,
    remove_dsm,
    token_schedule,
)
from dsm_tune.merging.matching import bipartite_merge, window_order

# Small versions of each supported family: the real architecture code paths with few blocks and a small grid.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=64, depth=4)),
    "vit_avg_pool": ("vit_tiny_patch16_224", dict(img_size=64, depth=4, class_token=False, global_pool="avg")),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=4)),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(img_size=64, depth=4)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56, depth=4)),
    "registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=4)),
    "qk_norm": ("vit_tiny_patch16_224", dict(img_size=64, depth=4, qk_norm=True)),
}


def build(family: str):
    name, kwargs = FAMILIES[family]
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images(model, batch=2):
    height, width = model.patch_embed.img_size
    return torch.randn(batch, 3, height, width)


def token_sequence(model, x):
    """What timm's forward_features feeds the block stack."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_ratios_zero_is_bit_identical(family):
    model = build(family)
    x = images(model, batch=3)
    with torch.inference_mode():
        expected = model(x)
        config = DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                     stages=[Stage(1, ratio=0.0), Stage(2, r=0)], proportional_attention=True)
        apply_dsm(model, config)
        assert is_patched(model)
        actual = model(x)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merging_runs_and_remove_restores(family):
    model = build(family)
    x = images(model)
    state_keys = list(model.state_dict())
    with torch.inference_mode():
        expected = model(x)
        config = DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                     stages=[Stage(1, ratio=0.25), Stage(2, ratio=0.3)])
        apply_dsm(model, config)
        assert list(model.state_dict()) == state_keys  # weights and keys untouched by the patch
        merged = model(x)
        assert merged.shape == expected.shape and torch.isfinite(merged).all()
        assert not torch.equal(merged, expected)
        remove_dsm(model)
        assert not is_patched(model)
        assert torch.equal(model(x), expected)


def _record_block_inputs(model):
    counts = []
    hooks = [block.norm1.register_forward_pre_hook(lambda _m, args: counts.append(args[0].shape[1]))
             for block in model.blocks]
    return counts, hooks


@pytest.mark.parametrize("family", ["vit", "registers", "deit_distilled", "vit_avg_pool"])
def test_token_counts_per_block_match_the_config(family):
    model = build(family)
    prefix = model.num_prefix_tokens
    config = DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                 stages=[Stage(1, ratio=0.5), Stage(2, ratio=0.25)])
    apply_dsm(model, config)
    x = images(model)
    counts, hooks = _record_block_inputs(model)
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    assert counts == [prefix + n for n in token_schedule(config)]
    # Every patch is still represented exactly once: sizes add up to the grid, prefix tokens hold none.
    with torch.inference_mode():
        sizes = model.blocks.merge(token_sequence(model, x)).sizes
    assert sizes.shape == (2, prefix + merge_report(model, config)["final_tokens"])
    assert torch.equal(sizes[:, :prefix], torch.ones(2, prefix))
    assert torch.allclose(sizes[:, prefix:].sum(dim=1), torch.full((2,), 16.0))


@pytest.mark.parametrize("family", ["vit", "registers", "deit_distilled"])
def test_prefix_tokens_are_never_merged(family):
    """Through the first merging block the prefix tokens must come out exactly as in the dense model."""
    model = build(family)
    prefix = model.num_prefix_tokens
    x = images(model)
    captured = {}
    hook = model.blocks[1].register_forward_hook(lambda _m, _a, out: captured.__setitem__("dense", out))
    with torch.inference_mode():
        model(x)
    hook.remove()
    config = DSMConfig.for_model(model, start_layer=1, hierarchy_depth=0, stages=[Stage(3, ratio=0.5)],
                                 proportional_attention=False)
    apply_dsm(model, config)
    hook = model.blocks[2].norm1.register_forward_pre_hook(lambda _m, args: captured.__setitem__("merged", args[0]))
    with torch.inference_mode():
        model(x)
    hook.remove()
    assert captured["merged"].shape[1] == prefix + 8
    assert torch.allclose(captured["merged"][:, :prefix], captured["dense"][:, :prefix], atol=1e-6)


def _tome_reference_forward(model, x, r):
    """ToMe as the paper states it, written independently of dsm_tune and loop-based: the whole sequence
    (class token included, kept unmergeable) split alternately into A and B, each A token's best B partner by
    cosine similarity of head-averaged keys, the r best edges merged by size-weighted average, proportional
    attention, unmerged A tokens kept in order followed by B."""
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    outputs = []
    for sample in tokens:
        seq = sample[None]
        size = torch.ones(1, seq.shape[1])
        for block in model.blocks:
            attn = block.attn
            h = block.norm1(seq)
            qkv = attn.qkv(h).reshape(1, h.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]
            mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, h.shape[1], -1)
            seq = seq + block.ls1(attn.proj(mixed))
            keys = k.mean(1)[0]
            n = seq.shape[1]
            merges = min(r, (n - 1) // 2)
            a_positions, b_positions = list(range(0, n, 2)), list(range(1, n, 2))
            edges = []
            for a in a_positions:
                if a == 0:
                    continue  # the class token never merges
                sims = [F.cosine_similarity(keys[a], keys[b], dim=0).item() for b in b_positions]
                best = max(range(len(sims)), key=sims.__getitem__)
                edges.append((sims[best], a, b_positions[best]))
            edges.sort(key=lambda e: -e[0])
            merged_away = {a: b for _, a, b in edges[:merges]}
            weighted = (seq[0] * size[0][:, None]).clone()
            new_size = size[0].clone()
            for a, b in merged_away.items():
                weighted[b] += weighted[a]
                new_size[b] += new_size[a]
            keep = [a for a in a_positions if a not in merged_away] + b_positions
            seq = (weighted[keep] / new_size[keep][:, None])[None]
            size = new_size[keep][None]
            seq = seq + block.ls2(block.mlp(block.norm2(seq)))
        outputs.append(model.forward_head(model.norm(seq)))
    return torch.cat(outputs), seq.shape[1]


def test_global_dsm_from_block_zero_is_tome():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4).eval()
    x = torch.randn(2, 3, 64, 64)
    r = 3
    with torch.inference_mode():
        expected, final_tokens = _tome_reference_forward(model, x, r)
        apply_dsm(model, DSMConfig.tome(model, r=r, proportional_attention=True))
        actual = model(x)
    assert final_tokens == 1 + 16 - 4 * r
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)


def _members(tokens: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > 1e-6).flatten().tolist()) for row in tokens]


def test_window_merging_never_pairs_across_windows():
    """Tokens carry one-hot identities; every merged token's members must share a window at every level."""
    grid, depth = (8, 8), 2
    count = grid[0] * grid[1]
    permutation = window_order(grid, depth)
    tokens = torch.eye(count)[permutation][None]  # row i: one-hot of the patch now at position i
    sizes = torch.ones(1, count)
    # Random keys per patch: the best partner overall is usually in another window.
    patch_keys = torch.randn(count, 16)
    expected_count = count
    for level, per_window in [(2, 2), (1, 3), (0, 10)]:
        windows = 4 ** level
        keys = tokens @ patch_keys  # a merged token's key: the mean of its members' keys
        tokens, sizes, _ = bipartite_merge(tokens, sizes, keys, 0, windows, per_window, a_starts_at=1)
        expected_count -= windows * per_window
        assert tokens.shape[1] == expected_count
        side = 2 ** level
        for members in _members(tokens[0]):
            window_ids = {((p // grid[1]) // (grid[0] // side), (p % grid[1]) // (grid[1] // side))
                          for p in members}
            assert len(window_ids) == 1, f"tokens from windows {window_ids} merged at level {level}"
    assert math.isclose(sizes.sum().item(), count)
    # Membership stays a partition of all patches: every patch exactly once.
    all_members = sorted(m for members in _members(tokens[0]) for m in members)
    assert all_members == list(range(count))


def test_window_order_groups_windows_in_z_order():
    order = window_order((4, 4), 1).tolist()
    assert order == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert window_order((4, 4), 0).tolist() == list(range(16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_close_to_float32(dtype):
    model = build("deit3_layerscale")
    x = images(model, batch=4)
    config = DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                 stages=[Stage(1, ratio=0.25), Stage(2, ratio=0.25)])
    apply_dsm(model, config)
    with torch.inference_mode():
        reference = model(x)
        low = model.to(dtype)(x.to(dtype)).float()
    assert torch.isfinite(low).all()
    assert F.cosine_similarity(low, reference).min() > 0.98


@pytest.mark.parametrize("batch", [1, 5])
def test_batch_sizes_agree_with_single_images(batch):
    model = build("vit")
    apply_dsm(model, DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                         stages=[Stage(1, ratio=0.5), Stage(2, ratio=0.25)]))
    x = images(model, batch=batch)
    with torch.inference_mode():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(batch)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_size_weighted_average_pooling():
    """An average-pooling model pools every merged token by the number of patches it stands for."""
    model = build("vit_avg_pool")
    dense_features_shape = model.forward_features(images(model)).shape
    apply_dsm(model, DSMConfig.for_model(model, start_layer=0, hierarchy_depth=1,
                                         stages=[Stage(1, ratio=0.5), Stage(3, ratio=0.25)]))
    x = images(model)
    with torch.inference_mode():
        merged = model.blocks.merge(token_sequence(model, x))
        weights = merged.sizes[..., None]  # no prefix tokens in this model
        pooled = (model.norm(merged.tokens) * weights).sum(dim=1) / weights.sum(dim=1)
        expected = model.head(model.fc_norm(pooled))
        actual = model(x)
        features_shape = model.forward_features(x).shape
    assert merged.tokens.shape[1] < 16 and not torch.all(merged.sizes == merged.sizes[0, 0])
    assert torch.allclose(actual, expected, atol=1e-5)
    assert features_shape == dense_features_shape


def test_mismatched_model_is_refused():
    tuned_on = build("vit")
    config = DSMConfig.for_model(tuned_on, start_layer=1, hierarchy_depth=0, stages=[Stage(3, ratio=0.2)])
    other_grid = timm.create_model("vit_tiny_patch16_224", img_size=128, depth=4).eval()
    with pytest.raises(ModelMismatchError, match=r"grid \(4, 4\) \(config\) vs \(8, 8\) \(model\)"):
        apply_dsm(other_grid, config)
    other_family = build("deit3_layerscale")
    with pytest.raises(ModelMismatchError, match="tuned for vit_tiny_patch16_224"):
        check_fits(other_family, config)
    assert not is_patched(other_grid)


def test_unpatchable_models_are_refused_with_the_reason():
    map_pool = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, global_pool="map").eval()
    config = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(2, ratio=0.1),))
    with pytest.raises(ModelMismatchError, match="attention-pool"):
        apply_dsm(map_pool, config)
    with pytest.raises(ModelMismatchError, match="not a timm VisionTransformer"):
        apply_dsm(timm.create_model("resnet18"), config)
    post_norm = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2,
                                  block_fn=timm.models.vision_transformer.ResPostBlock).eval()
    with pytest.raises(ModelMismatchError, match="block 0 is a ResPostBlock"):
        apply_dsm(post_norm, config)


def test_config_without_fingerprint_is_checked_against_the_model():
    model = build("vit")
    with pytest.raises(ConfigError, match="stages cover 2 blocks"):
        apply_dsm(model, DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(2, ratio=0.1),)))


def test_wrong_input_size_is_a_clear_runtime_error():
    model = build("vit")
    apply_dsm(model, DSMConfig.for_model(model, start_layer=0, hierarchy_depth=0, stages=[Stage(4, ratio=0.1)]))
    # timm's own position embedding already rejects other image sizes; the stack guards direct callers.
    with pytest.raises(RuntimeError, match="configured for 16 patch tokens but the blocks received 63"):
        model.blocks(torch.randn(1, 64, model.embed_dim))


def test_merge_report_counts_tokens_and_flops():
    model = build("vit")
    dense = merge_report(model, DSMConfig.dense(model))
    assert dense["flops_ratio"] == pytest.approx(1.0)
    config = DSMConfig.for_model(model, start_layer=2, hierarchy_depth=0, stages=[Stage(2, ratio=0.5)])
    report = merge_report(model, config)
    assert report["tokens_per_block"] == [16, 16, 16, 8]
    assert report["final_tokens"] == 4 and report["tokens_kept"] == 0.25
    assert 0.5 < report["flops_ratio"] < 1.0


def test_reapplying_replaces_the_previous_config():
    model = build("vit")
    x = images(model)
    first = DSMConfig.for_model(model, start_layer=0, hierarchy_depth=0, stages=[Stage(4, ratio=0.5)])
    second = DSMConfig.for_model(model, start_layer=2, hierarchy_depth=0, stages=[Stage(2, ratio=0.25)])
    with torch.inference_mode():
        apply_dsm(model, second)
        expected = model(x)
        apply_dsm(model, first)
        apply_dsm(model, second)
        assert torch.equal(model(x), expected)
