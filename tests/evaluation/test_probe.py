"""The attention probe: statistics checked on tiny ViTs whose weights are set by hand, the convergence rule,
bounded memory (head chunks give the same numbers), and the real pretrained ViT-S on real images."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from torch import nn

from dsm_tune.evaluation import probe as probe_module
from dsm_tune.evaluation.probe import (
    OUTLIER_NORM_RATIO, SINK_TOKENS, ProbeError, ProbeResult, attention_blocks, find_convergence, load_probe,
    probe_model, render_table,
)

from tests.conftest import DINOV2_WEIGHTS, IMAGENET_SAMPLE

GRID = 4
EMBED = 8


def tiny_vit(depth: int = 2, heads: int = 2) -> nn.Module:
    """A 4x4-patch ViT with a class token whose every weight is zero: tokens are their position embeddings."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=GRID * 2, patch_size=2,
                              embed_dim=EMBED, depth=depth, num_heads=heads, num_classes=0, in_chans=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.fill_(1.0)
            else:
                param.zero_()
    return model.eval()


def images(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 1, GRID * 2, GRID * 2)


def tokens() -> int:
    return 1 + GRID * GRID


def run(model: nn.Module, count: int = 3) -> ProbeResult:
    return probe_model(model, [images(count)], model_name="tiny")


def test_uniform_attention_has_entropy_one_and_no_sink():
    # Zero weights: q = k = 0, every score is 0, every query attends uniformly.
    result = run(tiny_vit())
    for stats in result.blocks:
        assert stats.entropy == pytest.approx(1.0, abs=1e-6)
        assert stats.sink_share == pytest.approx(SINK_TOKENS / tokens(), abs=1e-6)


def test_single_sink_takes_all_attention():
    model = tiny_vit(depth=1)
    sink = 6   # token index (prefix 1 + patch 5)
    attention = model.blocks[0].attn
    with torch.no_grad():
        model.pos_embed[0, sink, 0] = 1.0   # only the sink token carries a signal; the rest stay exactly zero
        attention.qkv.bias[:EMBED] = 1.0    # q = 1 for every token
        attention.qkv.weight[EMBED:2 * EMBED, 0] = 50.0   # k = 50 * (normalised channel 0): nonzero only at the sink
    result = run(model)
    stats = result.blocks[0]
    assert stats.sink_tokens[0] == sink
    assert stats.sink_share > 0.999
    assert stats.entropy < 0.01


def test_outlier_token_is_counted_at_its_grid_position():
    model = tiny_vit(depth=2)
    row, col = 2, 3
    with torch.no_grad():
        model.pos_embed[0, 1:, :] = 1.0 + 0.01 * torch.arange(GRID * GRID)[:, None]
        model.pos_embed[0, 1 + row * GRID + col, :] = OUTLIER_NORM_RATIO * 1.5
    result = run(model, count=3)
    for stats in result.blocks:   # zero projections: every block passes its input through unchanged
        assert stats.outlier_count == pytest.approx(1.0)
        assert stats.outlier_tokens == ((row, col, 3),)


def test_no_outlier_just_under_the_ratio():
    model = tiny_vit(depth=1)
    with torch.no_grad():
        model.pos_embed[0, 1:, :] = 1.0
        model.pos_embed[0, 5, :] = OUTLIER_NORM_RATIO * 0.95
    assert run(model).blocks[0].outlier_count == 0.0


def _keys_equal_channel_zero(model: nn.Module) -> None:
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[EMBED:2 * EMBED, 0] = 1.0


def test_checkerboard_keys_are_opposite_to_their_neighbours():
    model = tiny_vit(depth=1)
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    sign = ((rows + cols) % 2 * 2 - 1).flatten().float()
    with torch.no_grad():
        model.pos_embed[0, 1:, 0] = sign
        model.pos_embed[0, 1:, 1] = -sign   # LayerNorm keeps a two-channel signal as +-1, centred per token
    _keys_equal_channel_zero(model)
    assert run(model).blocks[0].neighbour_similarity == pytest.approx(-1.0, abs=1e-5)


def test_a_key_component_shared_by_all_tokens_is_ignored():
    # Softmax cannot see a vector added to every key; the checkerboard stays opposite under a large shared part.
    model = tiny_vit(depth=1)
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    sign = ((rows + cols) % 2 * 2 - 1).flatten().float()
    with torch.no_grad():
        model.pos_embed[0, 1:, 0] = 1.0
        model.pos_embed[0, 1:, 1] = 0.3 * sign
        model.pos_embed[0, 1:, 2] = -1.0 - 0.3 * sign
        model.blocks[0].attn.qkv.weight[EMBED:2 * EMBED, :] = torch.eye(EMBED)
    patches = model.blocks[0].norm1(model.pos_embed[0, 1:]).detach()
    raw = torch.nn.functional.cosine_similarity(patches[:-1], patches[1:]).mean()
    assert raw > 0.5   # uncentred, the shared part makes every neighbour look alike
    assert run(model).blocks[0].neighbour_similarity < -0.9


def test_stripes_are_alike_along_and_opposite_across():
    model = tiny_vit(depth=1)
    cols = torch.arange(GRID).repeat(GRID)
    sign = (cols % 2 * 2 - 1).float()   # vertical stripes: rows alike (+1), columns alternate (-1)
    with torch.no_grad():
        model.pos_embed[0, 1:, 0] = sign
        model.pos_embed[0, 1:, 1] = -sign
    _keys_equal_channel_zero(model)
    # 12 vertical pairs at +1, 12 horizontal pairs at -1
    assert run(model).blocks[0].neighbour_similarity == pytest.approx(0.0, abs=1e-5)


def test_similarity_change_is_the_difference_of_consecutive_blocks():
    result = run(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=16,
                                   depth=4, num_heads=2, num_classes=0, in_chans=1).eval())
    assert result.blocks[0].similarity_change is None
    for before, after in zip(result.blocks, result.blocks[1:]):
        assert after.similarity_change == pytest.approx(after.neighbour_similarity - before.neighbour_similarity)


@pytest.mark.parametrize("curve, expected", [
    ([0.1, 0.5, 0.6, 0.62, 0.61, 0.62], 1),      # block 1 makes the last big move (limit 0.2: 0.1 is within)
    ([0.5, 0.5, 0.5, 0.5], 0),                    # flat: converged from the start
    ([0.1, 0.12, 0.14, 0.9], None),               # the largest move is the last block: never converged
    ([0.3, 0.6, 0.35, 0.62, 0.6, 0.61], 3),       # oscillation early, settled after block 3
    ([0.4], 0),
])
def test_convergence_rule(curve, expected):
    assert find_convergence(curve) == expected


def test_convergence_tolerance_is_relative_to_the_largest_change():
    curve = [0.0, 1.0, 1.3, 1.35]   # changes 1.0, 0.3, 0.05
    assert find_convergence(curve, tolerance=0.5) == 1
    assert find_convergence(curve, tolerance=0.2) == 2


def test_head_chunks_give_the_same_statistics(monkeypatch):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=16,
                              depth=3, num_heads=4, num_classes=0, in_chans=1).eval()
    batch = images(4)
    whole = probe_model(model, [batch])
    monkeypatch.setattr(probe_module, "ATTENTION_CHUNK_BYTES", 1)   # one head at a time
    chunked = probe_model(model, [batch[:2], batch[2:]])
    for a, b in zip(whole.blocks, chunked.blocks):
        assert b.entropy == pytest.approx(a.entropy, rel=1e-5)
        assert b.sink_share == pytest.approx(a.sink_share, rel=1e-5)
        assert b.neighbour_similarity == pytest.approx(a.neighbour_similarity, rel=1e-5, abs=1e-6)
    assert chunked.num_images == 4


def test_probe_leaves_the_model_as_it_was():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=16,
                              depth=2, num_heads=2, num_classes=0, in_chans=1).eval()
    batch = images(2)
    with torch.no_grad():
        before = model(batch)
    fused = [block.attn.fused_attn for block in model.blocks]
    probe_model(model, [batch])
    assert [block.attn.fused_attn for block in model.blocks] == fused
    assert all(not block.attn.qkv._forward_hooks and not block._forward_hooks for block in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(batch), before)


def test_model_without_attention_blocks_is_refused():
    with pytest.raises(ProbeError, match="no transformer blocks"):
        attention_blocks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ProbeError, match="block 0 has"):
        attention_blocks(timm.create_model("mixer_s16_224", pretrained=False, num_classes=0))


def test_no_images_is_refused():
    with pytest.raises(ProbeError, match="no images"):
        probe_model(tiny_vit(), [])


def test_result_round_trips_through_json(tmp_path):
    result = run(tiny_vit())
    result.to_json(tmp_path / "probe.json")
    assert load_probe(tmp_path) == result
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ProbeError, match="not a dsm-tune probe result"):
        load_probe(tmp_path / "bad.json")
    with pytest.raises(ProbeError, match="does not exist"):
        load_probe(tmp_path / "missing.json")


def test_table_names_the_rule():
    result = run(tiny_vit())
    table = render_table(result)
    assert result.rule in table
    assert len([line for line in table.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2


@pytest.mark.slow
def test_real_vit_small_converges_after_the_first_blocks():
    if not DINOV2_WEIGHTS.is_file() or not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"real-weights asset absent: {DINOV2_WEIGHTS} / {IMAGENET_SAMPLE}")
    from dsm_tune.evaluation.data import load_data
    from dsm_tune.evaluation.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model("vit_small_patch14_dinov2", checkpoint=DINOV2_WEIGHTS)
        data = load_data(IMAGENET_SAMPLE, model, limit=16)
        result = probe_model(model, data.batches(8, threads=1), "vit_small_patch14_dinov2", data.description)
    finally:
        torch.set_num_threads(threads)
    assert result.num_images == 16 and result.grid == (16, 16) and result.num_tokens == 257
    # A pretrained ViT's class token draws the most attention in every block.
    assert all(stats.sink_tokens[0] == 0 for stats in result.blocks)
    # The first blocks move the redundancy most; it settles well before the end.
    assert result.convergence_block is not None and 1 <= result.convergence_block <= 6
    similarity = result.curve("neighbour_similarity")
    assert similarity[-1] > similarity[0] + 0.1
    assert all(0.0 < stats.entropy < 1.0 for stats in result.blocks)
    assert math.isclose(sum(1 for _ in result.blocks), 12)


# `dsm-tune probe` end to end --------------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from dsm_tune.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def one_thread():
    # Several engineers' tests share two cores; an oversubscribed OpenMP pool is far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_probes_the_demo_model(capsys, tmp_path, one_thread):
    code, out, err = run_cli(capsys, "probe", "--model", "demo", "--limit", "16", "--out", str(tmp_path))
    assert code == 0, err
    result = load_probe(tmp_path / "probe.json")
    assert result.num_images == 16 and result.num_blocks == 6 and result.grid == (16, 16)
    assert "Fashion-MNIST" in result.data
    table_rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d\.\d{3}\s", line)]
    assert [int(row[0]) for row in table_rows] == list(range(6))
    assert [float(row[1]) for row in table_rows] == pytest.approx(result.curve("entropy"), abs=6e-4)
    assert result.rule in out
    assert result.describe_convergence() in out
    png, html = tmp_path / "probe.png", tmp_path / "probe.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "plotly" in html.read_text()[:200_000].lower()


@pytest.mark.slow
def test_cli_probes_the_real_vit_small(capsys, tmp_path, shared_assets, one_thread):
    if not DINOV2_WEIGHTS.is_file() or not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"real-weights asset absent: {DINOV2_WEIGHTS} / {IMAGENET_SAMPLE}")
    code, out, err = run_cli(capsys, "probe", "--model", "vit_small_patch14_dinov2", "--checkpoint",
                             str(DINOV2_WEIGHTS), "--data", str(IMAGENET_SAMPLE), "--limit", "16",
                             "--out", str(tmp_path))
    assert code == 0, err
    result = load_probe(tmp_path / "probe.json")
    assert result.num_images == 16 and result.num_blocks == 12 and result.num_tokens == 257
    assert f"convergence block {result.convergence_block} (rule: " in out


def test_cli_refuses_a_model_without_attention_blocks(capsys, tmp_path):
    code, out, err = run_cli(capsys, "probe", "--model", "mixer_s16_224", "--data", str(tmp_path))
    assert code == 2
    assert err.startswith("dsm-tune: error: MlpMixer block 0 has") and err.count("\n") == 1


def test_cli_refuses_an_empty_image_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "probe", "--model", "demo", "--data", str(tmp_path / "empty"),
                             "--out", str(tmp_path / "out"))
    assert code == 2
    assert "holds no images" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "probe.json").exists()


def test_cli_needs_data_for_a_model_without_a_default(capsys):
    code, out, err = run_cli(capsys, "probe", "--model", "vit_tiny")
    assert code == 2 and "give --data" in err and err.count("\n") == 1
