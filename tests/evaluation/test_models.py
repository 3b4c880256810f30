"""Model names, aliases, construction and strict checkpoint loading."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch

from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation.models import (
    ModelError, build_model, input_size, read_checkpoint, resolve_model_name, weights_digest,
)

from tests.conftest import DINOV2_WEIGHTS


@pytest.mark.parametrize("alias, timm_name", [
    ("vit_tiny", "vit_tiny_patch16_224"),
    ("vit_base", "vit_base_patch16_224"),
    ("vit_large", "vit_large_patch16_224"),
    ("vit_huge", "vit_huge_patch14_224"),
    ("deit_small", "deit_small_patch16_224"),
    ("deit3_base", "deit3_base_patch16_224"),
    ("dinov2_small", "vit_small_patch14_dinov2"),
    ("demo", "dsm_tune_demo_vit"),
    ("vit_small_patch14_reg4_dinov2", "vit_small_patch14_reg4_dinov2"),
    ("vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_dinov2.lvd142m"),
])
def test_aliases_and_timm_names_resolve(alias, timm_name):
    assert resolve_model_name(alias) == timm_name
    assert timm.is_model(resolve_model_name(alias))


def test_unknown_model_is_one_line_with_close_matches():
    with pytest.raises(ModelError) as info:
        resolve_model_name("vit_bsae_patch16_224")
    message = str(info.value)
    assert isinstance(info.value, DSMTuneError)
    assert "\n" not in message and "vit_bsae_patch16_224" in message
    assert "vit_base_patch16_224" in message


def _tiny(**kwargs) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, **kwargs).eval()


def test_checkpoint_of_another_depth_is_refused(tmp_path):
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(_tiny(num_classes=7).state_dict(), str(path))
    with pytest.raises(ModelError, match=r"does not fit vit_tiny_patch16_224: missing keys: blocks\."):
        build_model("vit_tiny", checkpoint=path)  # 12 blocks by default, the checkpoint has 2


def test_checkpoint_sets_input_size_and_classes(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5).eval()
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    model = build_model("vit_tiny", checkpoint=path)
    assert input_size(model) == (3, 32, 32)
    assert model.num_classes == 5
    assert not model.training
    assert weights_digest(model) == weights_digest(source)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), source(x))


def test_torch_checkpoint_wrapped_and_prefixed(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3).eval()
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    model = build_model("vit_tiny_patch16_224", checkpoint=path)
    assert weights_digest(model) == weights_digest(source)


def test_strict_load_names_missing_and_unexpected_keys(tmp_path):
    state = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3).state_dict()
    state.pop("blocks.0.attn.qkv.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(ModelError) as info:
        build_model("vit_tiny", checkpoint=path)
    message = str(info.value)
    assert "missing keys: blocks.0.attn.qkv.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_unreadable_or_absent_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match="weights.pth"):
        build_model("vit_tiny", checkpoint=path)


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ModelError, match="does not hold a state dict"):
        build_model("vit_tiny", checkpoint=path)


class _Config:  # a training script's options object, as commonly saved beside the weights
    lr = 0.1


@pytest.mark.parametrize("contents", ["whole module", "state dict beside an object"])
def test_pickled_python_objects_are_refused_in_our_own_words(tmp_path, contents):
    path = tmp_path / "pickled.pth"
    model = torch.nn.Linear(2, 2)
    torch.save(model if contents == "whole module" else {"state_dict": model.state_dict(), "config": _Config()},
               path)
    with pytest.raises(ModelError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path} contains Python objects, not a plain state dict; refused")
    assert "weights_only" not in message and "\n" not in message


def test_a_corrupt_pickle_does_not_repeat_torchs_advice(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ModelError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"cannot read checkpoint {path}: not a torch state dict file")
    assert "weights_only" not in message and "Python objects" not in message and "\n" not in message


def test_input_size_follows_the_built_model_not_the_pretrained_cfg():
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0, depth=1)
    assert model.pretrained_cfg["input_size"] == (3, 518, 518)
    assert input_size(model) == (3, 224, 224)


def test_weights_digest_tracks_every_weight():
    model = _tiny()
    before = weights_digest(model)
    assert weights_digest(model) == before
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[0] += 1e-3
    assert weights_digest(model) != before


def test_real_dinov2_checkpoint_at_224(shared_assets):
    if not DINOV2_WEIGHTS.is_file():
        pytest.skip(f"{DINOV2_WEIGHTS.name} not in {shared_assets}")
    # timm's default for this architecture is 518 with a 37x37 grid; the checkpoint's 16x16 grid implies 224.
    model = build_model("dinov2_small", checkpoint=DINOV2_WEIGHTS)
    assert input_size(model) == (3, 224, 224)
    assert model.num_classes == 0
    assert tuple(model.patch_embed.grid_size) == (16, 16)
