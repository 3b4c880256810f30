"""Target runtimes in the latency harness: ONNX Runtime sessions timed interleaved, and the TensorRT seam."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from dsm_tune.evaluation import latency
from dsm_tune.evaluation.demo import build_demo_model
from dsm_tune.evaluation.latency import LatencyError, measure_latency
from dsm_tune.evaluation.targets import TargetError, load_target
from dsm_tune.evaluation.trial import shared_weights_copy
from dsm_tune.merging import ONNX_CONFIG_KEY, DSMConfig, Stage, apply_dsm


def test_ort_cpu_profile():
    target = load_target("ort-cpu")
    assert (target.runtime, target.device, target.dtype, target.compile) == ("onnxruntime", "cpu", "float32", False)
    assert "onnxruntime" in target.describe()
    assert load_target("cpu").runtime == "torch"


@pytest.mark.parametrize("overrides, message", [
    (dict(compile=True), "compile applies to the torch runtime only"),
    (dict(dtype="bfloat16"), "float32 graphs on the CPU"),
])
def test_ort_cpu_refuses_settings_it_cannot_time(overrides, message):
    with pytest.raises(TargetError, match=message):
        load_target("ort-cpu", **overrides)


@pytest.mark.parametrize("fields, message", [
    (dict(runtime="tvm"), "runtime must be one of torch, onnxruntime, tensorrt"),
    (dict(runtime="tensorrt"), "tensorrt runtime needs a cuda device"),
])
def test_profile_file_runtime_is_validated(tmp_path, fields, message):
    profile = {"device": "cpu", "dtype": "float32", "batch_size": 2, "compile": False, "ray_resources": {},
               "num_gpus": 0, **fields}
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps({"mine": profile}))  # JSON is YAML
    with pytest.raises(TargetError, match=message):
        load_target(str(path))


def test_ort_target_without_the_onnx_extra_is_refused_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(TargetError, match=r"target 'ort-cpu' times ONNX Runtime, but onnxruntime is not installed"):
        load_target("ort-cpu")
    assert load_target("ort-cpu", check_available=False).runtime == "onnxruntime"


def test_ort_runtime_times_exported_dense_and_merged_sessions_interleaved(monkeypatch):
    dense = build_demo_model().eval()
    merged = shared_weights_copy(dense)
    config = DSMConfig.for_model(dense, start_layer=1, hierarchy_depth=1,
                                 stages=[Stage(2, ratio=0.5), Stage(3, ratio=0.3)])
    apply_dsm(merged, config)
    order: list[str] = []
    built = []

    def recording_session(path):
        session = real_session(path)
        metadata = session.get_modelmeta().custom_metadata_map
        kind = "merged" if ONNX_CONFIG_KEY in metadata else "dense"
        built.append((kind, metadata.get(ONNX_CONFIG_KEY)))

        class Recorder:
            def run(self, *args):
                order.append(kind)
                return session.run(*args)

        return Recorder()

    real_session = latency.onnxruntime_session
    monkeypatch.setattr(latency, "onnxruntime_session", recording_session)
    target = dataclasses.replace(load_target("ort-cpu"), batch_size=2)
    result = measure_latency(dense, merged, target, (1, 32, 32), warmup=1, repeats=4, min_sample_ms=0)
    assert [kind for kind, _ in built] == ["dense", "merged"]
    assert DSMConfig.from_dict(json.loads(built[1][1])) == config
    assert result.runtime == "onnxruntime" and result.compile_s > 0
    assert result.runs_per_sample == 1
    # warm-up pair, one probe each, then four timed pairs alternating who goes first
    timed = order[4:]
    assert timed == ["dense", "merged", "merged", "dense", "dense", "merged", "merged", "dense"]
    assert result.speedup > 0 and result.baseline_ms > 0


def test_tensorrt_runtime_refuses_in_one_line():
    dense = build_demo_model().eval()
    target = dataclasses.replace(load_target("cpu"), name="trt", runtime="tensorrt")
    with pytest.raises(LatencyError, match="TensorRT") as refused:
        measure_latency(dense, dense, target, (1, 32, 32), warmup=0, repeats=1)
    assert "\n" not in str(refused.value)


def test_unknown_runtime_on_a_hand_built_target_is_refused():
    target = dataclasses.replace(load_target("cpu"), runtime="tvm")
    with pytest.raises(LatencyError, match="runtime 'tvm'"):
        measure_latency(torch.nn.Identity(), torch.nn.Identity(), target, (1, 4, 4), warmup=0, repeats=1)
