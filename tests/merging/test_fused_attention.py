"""Proportional attention without a mask: the log-size bias through an extra query/key column equals the masked
path, on the ViT families the merger supports, and keeps SDPA's inputs in the shape the flash kernel takes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from dsm_tune.evaluation.demo import build_demo_model
from dsm_tune.merging import DSMConfig, Stage, apply_dsm
from dsm_tune.merging import patch
from dsm_tune.merging.patch import (
    PROPORTIONAL_ATTENTION_MODES,
    _fused_size_attention,
    proportional_attention_mode,
    set_proportional_attention_mode,
)

PARITY = 1e-5


@pytest.fixture(autouse=True)
def restore_mode():
    previous = proportional_attention_mode()
    yield
    set_proportional_attention_mode(previous)


@pytest.mark.parametrize("head_dim", [64, 80, 63, 32])   # ViT-S/B/L, ViT-H (80), no spare column (63), tiny
def test_bias_columns_equal_the_float_mask(head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(2, 3, 37, head_dim, generator=generator) for _ in range(3))
    log_sizes = torch.rand(2, 37, generator=generator).mul(5.0)   # sizes up to e^5 ~ 150 patches
    scale = head_dim ** -0.5
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=log_sizes[:, None, None, :])
    explicit = ((q @ k.transpose(-2, -1)) * scale + log_sizes[:, None, None, :]).softmax(-1) @ v
    fused = _fused_size_attention(q, k, v, log_sizes, scale, 0.0)
    assert fused.shape == v.shape
    assert (fused - masked).abs().max() < PARITY
    assert (fused - explicit).abs().max() < PARITY
    # The bias matters at these sizes, so equality above is not equality of two unbiased attentions.
    assert (F.scaled_dot_product_attention(q, k, v) - masked).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_columns_in_half_precision_stay_close_to_float32(dtype):
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 6, 50, 64, generator=generator) for _ in range(3))
    log_sizes = torch.rand(2, 50, generator=generator).mul(5.0)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=log_sizes[:, None, None, :])
    low = _fused_size_attention(q.to(dtype), k.to(dtype), v.to(dtype), log_sizes.to(dtype), 64 ** -0.5, 0.0)
    masked_low = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                                attn_mask=log_sizes.to(dtype)[:, None, None, :])
    assert low.dtype == dtype
    # No worse than the masked path at the same precision (both round the bias once).
    fused_error = (low.float() - reference).abs().max().item()
    masked_error = (masked_low.float() - reference).abs().max().item()
    assert fused_error < max(2 * masked_error, 1e-2)


def _random_layer_scale(model):
    # timm initialises DINOv2's LayerScale at 1e-5, which leaves every block almost the identity: attention
    # differences would vanish below any tolerance. Real checkpoints carry gammas of order 0.1-1.
    with torch.no_grad():
        for block in model.blocks:
            for layer_scale in (block.ls1, block.ls2):
                if hasattr(layer_scale, "gamma"):
                    layer_scale.gamma.uniform_(0.5, 1.0)
    return model


MODELS = {
    "vit_small": ("vit_small_patch16_224", {}),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}),
    "dinov2": ("vit_small_patch14_dinov2", {"img_size": 224}),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
}
CONFIGS = {
    "tome": dict(start_layer=0, hierarchy_depth=0, stages=[Stage(12, r=8)]),
    "delayed_hierarchical": dict(start_layer=2, hierarchy_depth=1, stages=[Stage(3, ratio=0.3), Stage(7, ratio=0.2)]),
}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_model_outputs_match_the_masked_path(family, config_name):
    name, kwargs = MODELS[family]
    torch.manual_seed(0)
    model = _random_layer_scale(timm.create_model(name, pretrained=False, **kwargs).eval())
    config = DSMConfig.for_model(model, proportional_attention=True, **CONFIGS[config_name])
    apply_dsm(model, config)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        set_proportional_attention_mode("masked")
        masked = model.forward_features(x)
        set_proportional_attention_mode("fused")
        fused = model.forward_features(x)
        apply_dsm(model, config.replace(proportional_attention=False))
        unweighted = model.forward_features(x)
    assert fused.shape == masked.shape
    assert (fused - masked).abs().max() < PARITY
    assert (unweighted - masked).abs().max() > 1e-2   # proportional attention changes these outputs


def _spy_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append({"mask": attn_mask is not None, "dims": (q.shape[-1], k.shape[-1], v.shape[-1]),
                      "scale": kwargs.get("scale")})
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(patch.F, "scaled_dot_product_attention", spy)
    return calls


def _merged_vit_tiny():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    return apply_dsm(model, DSMConfig.for_model(model, start_layer=1, hierarchy_depth=0, stages=[Stage(3, r=2)],
                                                proportional_attention=True))


def test_fused_mode_passes_no_mask_and_flash_shaped_inputs(monkeypatch):
    model = _merged_vit_tiny()
    calls = _spy_sdpa(monkeypatch)
    set_proportional_attention_mode("fused")
    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64))
    # Blocks 2 and 3 see merged tokens: their attention carries sizes (block 1 merges after its attention).
    sized = [c for c in calls if c["dims"] != (64, 64, 64)]
    assert len(sized) == 2
    for call in sized:
        assert not call["mask"]
        q_dim, k_dim, v_dim = call["dims"]
        assert q_dim == k_dim == v_dim == 72          # flash wants one head dim for q, k, v, a multiple of 8
        assert call["scale"] == pytest.approx(64 ** -0.5)   # the original head dim's scale, not 72's


def test_auto_mode_keeps_the_mask_on_the_cpu(monkeypatch):
    model = _merged_vit_tiny()
    calls = _spy_sdpa(monkeypatch)
    assert proportional_attention_mode() == "auto"
    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64))
    # CPU's flash kernel takes the mask; the extra columns would only add work there.
    assert [c["mask"] for c in calls] == [False, False, True, True]
    assert all(c["dims"] == (64, 64, 64) for c in calls)


def test_auto_mode_picks_the_columns_for_cuda_tensors(monkeypatch):
    # Without a GPU, the choice itself is checked: a CUDA tensor in "auto" goes the mask-free way.
    class CudaLooking:
        is_cuda = True

    assert patch._uses_bias_columns(CudaLooking())
    assert not patch._uses_bias_columns(torch.zeros(1))
    set_proportional_attention_mode("masked")
    assert not patch._uses_bias_columns(CudaLooking())
    set_proportional_attention_mode("fused")
    assert patch._uses_bias_columns(torch.zeros(1))


def test_cpu_sdpa_picks_its_flash_kernel_for_the_padded_inputs():
    q, k, v = (torch.randn(2, 3, 37, 72) for _ in range(3))
    flash = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    assert torch._fused_sdp_choice(q, k, v, scale=0.125) == flash
    # With v left at 64 the CPU falls back to the math kernel: why v is padded as well.
    assert torch._fused_sdp_choice(q, k, v[..., :64], scale=0.125) != flash


def test_bad_mode_is_one_line_and_changes_nothing():
    with pytest.raises(ValueError, match="one of auto, fused, masked") as info:
        set_proportional_attention_mode("flash")
    assert "\n" not in str(info.value)
    assert proportional_attention_mode() == "auto"
    assert set_proportional_attention_mode("masked") == "auto"
    assert set(PROPORTIONAL_ATTENTION_MODES) == {"auto", "fused", "masked"}


def test_fused_mode_compiles_fullgraph():
    torch._dynamo.reset()
    model = build_demo_model().eval()
    apply_dsm(model, DSMConfig.for_model(model, start_layer=1, hierarchy_depth=2,
                                         stages=[Stage(1, ratio=0.5), Stage(2, ratio=0.25), Stage(2, ratio=0.3)],
                                         proportional_attention=True))
    x = torch.randn(2, 1, 32, 32)
    set_proportional_attention_mode("fused")
    try:
        with torch.inference_mode():
            expected = model(x)
            actual = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    finally:
        torch._dynamo.reset()
    assert (actual - expected).abs().max() < PARITY


def test_fused_mode_exports_to_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from dsm_tune.merging import export_onnx

    model = build_demo_model().eval()
    config = DSMConfig.for_model(model, start_layer=0, hierarchy_depth=0, stages=[Stage(6, ratio=0.25)],
                                 proportional_attention=True)
    set_proportional_attention_mode("fused")
    path = export_onnx(model, config, tmp_path / "fused.onnx", batch_size=2)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        set_proportional_attention_mode("masked")
        expected = apply_dsm(model, config)(x)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    np.testing.assert_allclose(session.run(None, {graph_input.name: x.numpy()})[0], expected.numpy(),
                               atol=1e-4, rtol=0)
