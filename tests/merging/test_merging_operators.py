"""The per-stage operators beyond ToMe's merge (config.OPERATORS): each checked against a loop-based statement of
its algorithm, identity at ratio 0, exact undo, static shapes (fullgraph compile, torch.export, ONNX Runtime), and
the versioned config that carries them."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import timm
import torch

from dsm_tune.evaluation.demo import build_demo_model
from dsm_tune.merging import (
    ConfigError,
    DSMConfig,
    ModelMismatchError,
    Stage,
    apply_dsm,
    block_plan,
    export_onnx,
    load_config,
    remove_dsm,
)
from dsm_tune.merging.config import OPERATORS
from dsm_tune.merging.matching import ENERGY_MARGIN, attention_prune, bipartite_merge
from dsm_tune.merging.patch import _attention_with_keys
from dsm_tune.search.strategies import plan_key

VARIANTS = [op for op in OPERATORS if op != "merge"]


def tiny_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, **kwargs).eval()


def delayed(model, operator, proportional=True):
    return DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                               stages=[Stage(1, ratio=0.5, operator=operator), Stage(2, ratio=0.25, operator=operator)],
                               proportional_attention=proportional)


def _inputs(batch=2, windows=2, per_window=8, channels=6, prefix=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = prefix + windows * per_window
    x = torch.randn(batch, total, channels, generator=generator)
    keys = torch.randn(batch, total, 5, generator=generator)
    sizes = torch.randint(1, 4, (batch, total), generator=generator).float()
    sizes[:, :prefix] = 1.0
    return x, sizes, keys


# ------------------------------------------------------------------------------------------------------------------
# The operators against loop-based statements of their algorithms

def _pairs(keys, prefix, windows, r, a_starts_at, rank_by_energy):
    """Per (image, window): the merged A positions and their B partners, by loops over python lists."""
    batch, total, _ = keys.shape
    per_window = (total - prefix) // windows
    result = []
    for b in range(batch):
        for w in range(windows):
            start = prefix + w * per_window
            positions = list(range(start, start + per_window))
            unit = {p: keys[b, p] / keys[b, p].norm() for p in positions}
            a_side, b_side = positions[a_starts_at::2], positions[1 - a_starts_at::2]
            best = {a: max(b_side, key=lambda q: float(unit[a] @ unit[q])) for a in a_side}
            if rank_by_energy:
                def energy(a):
                    values = [float(unit[a] @ unit[q]) - ENERGY_MARGIN for q in positions]
                    return sum(v if v > 0 else math.expm1(v) for v in values) / len(values)
                order = sorted(a_side, key=energy, reverse=True)
            else:
                order = sorted(a_side, key=lambda a: float(unit[a] @ unit[best[a]]), reverse=True)
            result.append((b, [(a, best[a]) for a in order[:r]]))
    return result


@pytest.mark.parametrize("operator", ["merge", "merge_norm", "merge_energy"])
def test_merge_variants_follow_their_algorithm(operator):
    x, sizes, keys = _inputs()
    prefix, windows, r = 1, 2, 3
    merged, merged_sizes, destination = bipartite_merge(x, sizes, keys, prefix, windows, r, a_starts_at=1,
                                                        with_destination=True, operator=operator)
    assert merged.shape == (2, prefix + windows * (8 - r), 6)
    for b, pairs in _pairs(keys, prefix, windows, r, 1, rank_by_energy=operator == "merge_energy"):
        for a, partner in pairs:
            group = [p for p, _ in pairs if _ == partner] + [partner]
            out = int(destination[b, partner])
            assert int(destination[b, a]) == out   # merged into its most similar B token
            weights = sizes[b, group]
            average = (x[b, group] * weights[:, None]).sum(0) / weights.sum()
            assert torch.isclose(merged_sizes[b, out], weights.sum())
            if operator == "merge_norm":
                wanted = (x[b, group].norm(dim=-1) * weights).sum() / weights.sum()
                expected = average / average.norm() * wanted
            else:
                expected = average
            torch.testing.assert_close(merged[b, out], expected, atol=1e-5, rtol=1e-5)


def test_merge_energy_picks_other_tokens_than_merge():
    x, sizes, keys = _inputs(seed=3)
    plain = _pairs(keys, 1, 2, 3, 1, rank_by_energy=False)
    energy = _pairs(keys, 1, 2, 3, 1, rank_by_energy=True)
    assert plain != energy   # the test above would not tell the two rankings apart otherwise


def test_merge_norm_keeps_the_norm_that_averaging_shrinks():
    x, sizes, keys = _inputs(seed=1)
    averaged, _, _ = bipartite_merge(x, sizes, keys, 1, 2, 3, a_starts_at=1)
    kept, _, _ = bipartite_merge(x, sizes, keys, 1, 2, 3, a_starts_at=1, operator="merge_norm")
    assert (kept.norm(dim=-1) >= averaged.norm(dim=-1) - 1e-5).all()
    assert (kept.norm(dim=-1) > averaged.norm(dim=-1) + 1e-3).any()


def test_prune_drops_the_least_attended_tokens_of_each_window():
    x, sizes, _ = _inputs()
    attention = torch.rand(2, x.shape[1], generator=torch.Generator().manual_seed(7))
    pruned, pruned_sizes = attention_prune(x, sizes, attention, 1, 2, 3)
    for b in range(2):
        expected = [0]
        for w in range(2):
            positions = list(range(1 + 8 * w, 9 + 8 * w))
            dropped = sorted(positions, key=lambda p: float(attention[b, p]))[:3]
            expected += [p for p in positions if p not in dropped]
        torch.testing.assert_close(pruned[b], x[b, expected], rtol=0, atol=0)   # the model's own tokens
        torch.testing.assert_close(pruned_sizes[b], sizes[b, expected], rtol=0, atol=0)


@pytest.mark.parametrize("num_prefix", [1, 0])
def test_received_attention_is_the_prefix_rows_of_the_attention_matrix(num_prefix):
    model = tiny_vit(class_token=num_prefix == 1, global_pool="token" if num_prefix else "avg")
    attention = model.blocks[0].attn
    x = torch.randn(2, 16 + num_prefix, 192)
    log_sizes = torch.rand(2, 16 + num_prefix).log1p()
    with torch.inference_mode():
        attended = _attention_with_keys(attention, x, log_sizes, want_keys=False, received_from=num_prefix)
        q, k, _ = attention.qkv(x).reshape(2, -1, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
        matrix = ((q * attention.scale) @ k.transpose(-2, -1) + log_sizes[:, None, None, :]).softmax(-1)
        if num_prefix:
            expected = matrix[:, :, 0].mean(dim=1)
        else:   # the mean query's row
            mean_q = q.mean(dim=2, keepdim=True)
            expected = ((mean_q * attention.scale) @ k.transpose(-2, -1) + log_sizes[:, None, None, :]) \
                .softmax(-1).mean(dim=(1, 2))
    torch.testing.assert_close(attended.received, expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# On models

@pytest.mark.parametrize("operator", OPERATORS)
def test_ratio_zero_is_the_model_for_every_operator(operator):
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        apply_dsm(model, DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                             stages=[Stage(3, ratio=0.0, operator=operator)]))
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("operator", VARIANTS)
def test_each_operator_reduces_tokens_and_undoes_exactly(operator):
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        dense = model(x)
        merge_out = apply_dsm(model, delayed(model, "merge"))(x)
        out = apply_dsm(model, delayed(model, operator))(x)
        sequence = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        tokens = model.blocks.merge(sequence).tokens
        remove_dsm(model)
        assert torch.equal(model(x), dense)
    assert tokens.shape[1] == 1 + block_plan(delayed(model, operator))[-1].tokens_out == 1 + 5   # 16 -> 8 -> 6 -> 5
    assert torch.isfinite(out).all() and out.shape == dense.shape
    assert not torch.allclose(out, merge_out)


def test_operator_stages_keep_merge_s_token_counts():
    model = tiny_vit()
    x = torch.randn(1, 3, 64, 64)
    counts = {}
    with torch.inference_mode():
        sequence = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for operator in OPERATORS:
            apply_dsm(model, delayed(model, operator))
            counts[operator] = model.blocks.merge(sequence).tokens.shape[1]
            remove_dsm(model)
    assert len(set(counts.values())) == 1


def test_prune_refuses_an_average_pool_head():
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ModelMismatchError, match="prune stage drops tokens.*average-pool"):
        apply_dsm(model, delayed(model, "prune"))
    apply_dsm(model, delayed(model, "merge_energy"))   # the merge variants keep every patch's weight


@pytest.mark.parametrize("operator", VARIANTS)
def test_operators_compile_whole_and_export(operator):
    torch._dynamo.reset()
    model = build_demo_model().eval()
    apply_dsm(model, DSMConfig.for_model(model, start_layer=1, hierarchy_depth=2,
                                         stages=[Stage(1, ratio=0.5, operator=operator), Stage(2, ratio=0.25),
                                                 Stage(2, ratio=0.3, operator=operator)]))
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    assert [str(w.message) for w in caught] == []
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)
    program = torch.export.export(model, (x,))
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("operator", ["prune", "merge_norm"])
def test_operators_run_in_onnx_runtime(operator, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = build_demo_model().eval()
    config = DSMConfig.for_model(model, start_layer=1, hierarchy_depth=1,
                                 stages=[Stage(2, ratio=0.4, operator=operator), Stage(3, ratio=0.25)])
    path = export_onnx(model, config, tmp_path / "demo.onnx", batch_size=2)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        expected = apply_dsm(model, config)(x)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# The versioned config

def test_a_merge_only_config_is_still_version_1_and_its_key_unchanged():
    model = tiny_vit()
    config = delayed(model, "merge")
    document = config.to_dict()
    assert document["version"] == 1
    assert all("operator" not in stage for stage in document["merge"]["stages"])
    assert config.key() == json.dumps({"hierarchy_depth": 1, "proportional_attention": True, "stages": [
        {"blocks": 1, "ratio": 0.5}, {"blocks": 2, "ratio": 0.25}], "start_layer": 1}, sort_keys=True,
        separators=(",", ":"))


def test_an_operator_config_is_version_2_and_round_trips(tmp_path):
    model = tiny_vit()
    config = delayed(model, "prune")
    path = tmp_path / "dsm.json"
    config.to_json(path)
    document = json.loads(path.read_text())
    assert document["version"] == 2 and document["merge"]["stages"][0]["operator"] == "prune"
    loaded = load_config(path)
    assert loaded == config and loaded.key() != delayed(model, "merge").key()
    assert loaded.merge_params()["stage0_operator"] == "prune"


def test_a_version_1_document_cannot_name_an_operator(tmp_path):
    model = tiny_vit()
    document = delayed(model, "prune").to_dict()
    document["version"] = 1
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'operator' in merge.stages\[0\]") as refused:
        DSMConfig.from_dict(document)
    assert "operators need config version 2, this document is version 1" in str(refused.value)


def test_an_unknown_operator_is_named():
    with pytest.raises(ConfigError, match="stages\\[0\\].operator 'drop' is not one of merge, merge_norm"):
        DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(4, ratio=0.1, operator="drop"),))


def test_plan_keys_tell_operators_apart_and_keep_merge_s():
    model = tiny_vit()
    keys = {operator: plan_key(delayed(model, operator)) for operator in OPERATORS}
    assert len(set(keys.values())) == len(OPERATORS)
    assert json.loads(keys["merge"])["blocks"][1] == [4, 2]   # the pre-operator form: [windows, merged]
