"""Hardware target profiles: parsing, overrides, and the errors for unknown or absent devices."""

from __future__ import annotations

import pytest
import torch

from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation.targets import Target, TargetError, available_targets, load_target

GPU_PROFILES = {"a100": "A100", "h100": "H100", "h200": "H200", "l4": "L4", "t4": "T4", "v100": "V100"}


def test_builtin_profiles():
    assert set(available_targets()) >= {"cpu", *GPU_PROFILES}
    cpu = load_target("cpu")
    assert cpu == Target(name="cpu", device="cpu", dtype="float32", batch_size=cpu.batch_size, compile=False,
                         ray_resources={}, num_gpus=0.0)
    assert cpu.batch_size > 0 and cpu.torch_dtype is torch.float32


@pytest.mark.parametrize("name, accelerator", sorted(GPU_PROFILES.items()))
def test_gpu_profiles_place_workers_on_their_accelerator(name, accelerator):
    target = load_target(name, check_available=False)
    assert target.device == "cuda" and target.is_cuda
    assert target.num_gpus == 1
    assert set(target.ray_resources) == {f"accelerator_type:{accelerator}"}
    assert 0 < target.ray_resources[f"accelerator_type:{accelerator}"] < 1
    assert target.dtype in ("float16", "bfloat16")


def test_pre_ampere_profiles_avoid_bfloat16():
    assert load_target("t4", check_available=False).dtype == "float16"
    assert load_target("v100", check_available=False).dtype == "float16"


def test_flag_overrides():
    target = load_target("CPU", batch_size=3, dtype="bfloat16", compile=True)
    assert (target.name, target.batch_size, target.dtype, target.compile) == ("cpu", 3, "bfloat16", True)
    assert target.torch_dtype is torch.bfloat16
    assert load_target("cpu", compile=None).compile is False


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as info:
        load_target("tpu")
    message = str(info.value)
    assert isinstance(info.value, DSMTuneError) and "\n" not in message
    assert "unknown target 'tpu'" in message
    for name in ("cpu", "a100", "h100", "h200", "l4", "t4", "v100"):
        assert name in message


def test_gpu_target_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TargetError, match="needs a CUDA GPU"):
        load_target("a100")
    # Resolving the profile for a remote cluster does not need the GPU here.
    assert load_target("a100", check_available=False).device == "cuda"


def test_missing_gpu_index_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    profile = tmp_path / "box.yaml"
    profile.write_text("box: {device: 'cuda:3', dtype: float16, batch_size: 4, compile: false, "
                       "ray_resources: {}, num_gpus: 1}\n")
    with pytest.raises(TargetError, match="cuda:3 but this machine has 1"):
        load_target(str(profile))


def test_custom_profile_file(tmp_path):
    profile = tmp_path / "edge.yaml"
    profile.write_text("edge-cpu:\n  device: cpu\n  dtype: float32\n  batch_size: 1\n  compile: false\n"
                       "  ray_resources: {edge: 1}\n  num_gpus: 0\n")
    target = load_target(str(profile), batch_size=2)
    assert (target.name, target.batch_size, target.ray_resources) == ("edge-cpu", 2, {"edge": 1})


@pytest.mark.parametrize("body, problem", [
    ("x: {device: cpu, dtype: float64, batch_size: 1, compile: false, ray_resources: {}, num_gpus: 0}", "dtype"),
    ("x: {device: cpu, dtype: float32, batch_size: 0, compile: false, ray_resources: {}, num_gpus: 0}", "batch_size"),
    ("x: {device: tpu, dtype: float32, batch_size: 1, compile: false, ray_resources: {}, num_gpus: 0}", "device"),
    ("x: {device: cpu, dtype: float32, batch_size: 1, compile: 'yes', ray_resources: {}, num_gpus: 0}", "compile"),
    ("x: {device: cpu, dtype: float32, batch_size: 1, compile: false, ray_resources: {a: -1}, num_gpus: 0}",
     "ray_resources"),
    ("x: {device: cuda, dtype: float32, batch_size: 1, compile: false, ray_resources: {}, num_gpus: 0}", "num_gpus"),
    ("x: {device: cpu, dtype: float32, batch_size: 1, compile: false, ray_resources: {}}", "missing num_gpus"),
    ("x: {device: cpu, dtype: float32, batch_size: 1, compile: false, ray_resources: {}, num_gpus: 0, y: 1}",
     "unknown field"),
    ("x: [1, 2]", "mapping"),
    ("x: {device: cpu\n", "cannot read"),
    ("{a: 1, b: 2}", "exactly one profile"),
])
def test_malformed_profiles_name_the_problem(tmp_path, body, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(TargetError, match=problem) as info:
        load_target(str(path), check_available=False)
    assert "\n" not in str(info.value)


def test_override_is_validated():
    with pytest.raises(TargetError, match="batch_size"):
        load_target("cpu", batch_size=-4)


def test_h200_matches_the_other_data_centre_gpus():
    h200 = load_target("h200", check_available=False)
    for other in ("a100", "h100"):
        profile = load_target(other, check_available=False)
        assert (h200.device, h200.dtype, h200.batch_size, h200.compile, h200.num_gpus) == (
            profile.device, profile.dtype, profile.batch_size, profile.compile, profile.num_gpus)
    assert h200.dtype == "bfloat16" and h200.batch_size == 64
    assert h200.describe() == "h200 (cuda, bfloat16, batch 64, eager)"
