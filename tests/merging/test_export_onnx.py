"""ONNX export of the merged model: parity under onnxruntime, the embedded config, refusals in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import timm
import torch

from dsm_tune.evaluation.demo import build_demo_model
from dsm_tune.merging import (
    DSMConfig,
    ModelMismatchError,
    OnnxExportError,
    Stage,
    apply_dsm,
    applied_config,
    export_onnx,
    is_patched,
    read_onnx_config,
)


def ort_outputs(path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.shape == list(x.shape)
    return session.run(None, {graph_input.name: x.numpy()})[0]


DEMO_CONFIGS = {
    "tome_start0_depth0": dict(start_layer=0, hierarchy_depth=0, stages=[Stage(6, ratio=0.25)],
                               proportional_attention=True),
    "delayed_hierarchical": dict(start_layer=1, hierarchy_depth=2,
                                 stages=[Stage(1, ratio=0.5), Stage(2, ratio=0.25), Stage(2, ratio=0.3)],
                                 proportional_attention=True),
    "delayed_hierarchical_no_proportional_attention": dict(
        start_layer=2, hierarchy_depth=1, stages=[Stage(2, ratio=0.4), Stage(2, r=20)],
        proportional_attention=False),
}


@pytest.mark.parametrize("case", sorted(DEMO_CONFIGS))
def test_demo_model_onnx_matches_pytorch(case, tmp_path):
    model = build_demo_model().eval()
    config = DSMConfig.for_model(model, **DEMO_CONFIGS[case])
    path = export_onnx(model, config, tmp_path / "demo.onnx", batch_size=3)
    assert not is_patched(model)  # exporting does not leave the caller's model patched
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        dense = model(x)
        expected = apply_dsm(model, config)(x)
    assert not torch.allclose(expected, dense, atol=1e-3)  # the graph really merges
    np.testing.assert_allclose(ort_outputs(path, x), expected.numpy(), atol=1e-4, rtol=0)
    assert read_onnx_config(path) == config


@pytest.mark.slow
def test_vit_small_onnx_matches_pytorch(tmp_path):
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    config = DSMConfig.for_model(model, start_layer=3, hierarchy_depth=1,
                                 stages=[Stage(3, ratio=0.3), Stage(6, ratio=0.2)], proportional_attention=True)
    path = export_onnx(model, config, tmp_path / "vit_small.onnx", batch_size=1)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = apply_dsm(model, config)(x)
    np.testing.assert_allclose(ort_outputs(path, x), expected.numpy(), atol=1e-4, rtol=0)


def test_export_keeps_the_config_already_applied_and_embeds_it(tmp_path):
    model = build_demo_model().eval()
    applied = DSMConfig.for_model(model, **DEMO_CONFIGS["delayed_hierarchical"])
    apply_dsm(model, applied)
    exported = DSMConfig.for_model(model, **DEMO_CONFIGS["tome_start0_depth0"])
    path = export_onnx(model, exported, tmp_path / "a.onnx")
    assert applied_config(model) == applied
    assert read_onnx_config(path) == exported
    # No config: the model as it is, here the applied one.
    assert read_onnx_config(export_onnx(model, None, tmp_path / "b.onnx")) == applied


def test_dense_export_has_no_config_and_matches_the_model(tmp_path):
    model = build_demo_model().eval()
    path = export_onnx(model, None, tmp_path / "dense.onnx", batch_size=2)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    np.testing.assert_allclose(ort_outputs(path, x), expected.numpy(), atol=1e-4, rtol=0)
    assert read_onnx_config(path) is None


def test_model_the_merger_refuses_is_one_line_and_writes_nothing(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                              global_pool="map").eval()
    config = DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(2, ratio=0.25),))
    with pytest.raises(ModelMismatchError) as refused:
        export_onnx(model, config, tmp_path / "refused.onnx")
    assert "attention-pool" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "refused.onnx").exists()


def test_bad_batch_size_and_unreadable_file_are_one_line(tmp_path):
    model = build_demo_model().eval()
    with pytest.raises(OnnxExportError, match="batch_size must be a positive integer"):
        export_onnx(model, None, tmp_path / "x.onnx", batch_size=0)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(OnnxExportError, match="cannot read ONNX file"):
        read_onnx_config(garbage)
    with pytest.raises(OnnxExportError, match="not found"):
        read_onnx_config(tmp_path / "absent.onnx")


def test_missing_onnx_extra_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` raise ImportError
    with pytest.raises(OnnxExportError, match=r"pip install 'dsm-tune\[onnx\]'"):
        export_onnx(build_demo_model(), None, tmp_path / "x.onnx")


def test_importing_the_merger_loads_no_onnx_package():
    probe = ("import sys, dsm_tune.merging; "
             "print(','.join(m for m in ('onnx', 'onnxscript', 'onnxruntime') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == ""
