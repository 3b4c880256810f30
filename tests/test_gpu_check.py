"""benchmarks/gpu_check.py runs end to end on the CPU (--quick) and writes the JSON and Markdown it promises; its
small parts (kernel names, the Pareto front, the image sample, bad arguments) behave."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "out"
    # The budget only guards a loaded machine; on an idle one the quick run takes well under a minute.
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out),
                           "--budget-s", "400", "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((out / "gpu_check.json").read_text())
    sections = document["sections"]
    assert list(sections) == ["environment", "latency_eager", "kernels", "bf16", "latency_compiled", "cli", "study"]
    optuna_here = importlib.util.find_spec("optuna") is not None
    for name, entry in sections.items():
        if name == "study" and not optuna_here:
            assert entry["status"].startswith("skipped: optuna not installed")
        else:
            assert entry["status"] == "ok", (name, entry.get("traceback", entry["status"]))

    eager = sections["latency_eager"]["result"]["rows"]
    # Per batch: dense, and ToMe / delayed hierarchical without proportional attention, masked and fused.
    keys = {(r["batch"], r["config"], r["attention"]) for r in eager}
    assert keys == {(b, c, a) for b in (2, 1) for c, a in
                    [("dense", "-")] + [(c, a) for c in ("tome", "dsm") for a in ("off", "masked", "fused")]}
    assert all(r["ms"] > 0 for r in eager)
    assert all(r["speedup"] > 0 for r in eager if r["config"] != "dense")

    kernels = sections["kernels"]["result"]["rows"]
    assert kernels and all(r["families"] == ["flash"] for r in kernels)   # CPU's flash kernel, masked or not

    bf16 = sections["bf16"]["result"]["rows"]
    assert {(r["config"], r["attention"]) for r in bf16} >= {("dense", "-"), ("dsm", "fused"), ("tome", "masked")}
    assert all(r["cosine"] > 0.99 for r in bf16)

    compiled = sections["latency_compiled"]["result"]["rows"]
    measured = [r for r in compiled if r["status"] == "ok"]
    assert {(r["config"], r["attention"]) for r in measured} == {("dense", "-"), ("dsm", "fused")}
    assert any(r["status"].startswith("skipped: CUDA graphs") for r in compiled)   # reduce-overhead on a CPU

    cli = sections["cli"]["result"]
    assert cli["measure"]["returncode"] == 0 and cli["measure"]["speedup"] > 0
    assert cli["verify"]["returncode"] in (0, 1) and "speedup" in cli["verify"]["table"]
    if optuna_here:
        study = sections["study"]["result"]
        assert study["returncode"] == 0
        assert len(study["trials"]) >= 3 and study["front"]
        assert (out / "study_trials.csv").exists()

    markdown = (out / "gpu_check.md").read_text()
    for heading in ("## Sections", "## Latency", "## bf16 against fp32", "## dsm-tune measure / verify"):
        assert heading in markdown
    assert "| vit_tiny_patch16_224 | 2 | eager | dsm | fused |" in markdown


def test_kernel_names_are_classified():
    classify = _module().classify_kernels
    assert classify({"aten::_scaled_dot_product_flash_attention",
                     "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>"})["families"] == ["flash"]
    assert classify({"aten::_scaled_dot_product_efficient_attention",
                     "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"})["families"] == ["efficient"]
    # cuDNN's kernel names carry "flash": they must still count as cuDNN.
    assert classify({"aten::_scaled_dot_product_cudnn_attention",
                     "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16"})["families"] == ["cudnn"]
    assert classify({"aten::_scaled_dot_product_attention_math", "aten::_safe_softmax"})["families"] == ["math"]
    # A softmax beside a fused kernel is not the math path.
    assert classify({"aten::_scaled_dot_product_flash_attention", "softmax_warp_forward"})["families"] == ["flash"]
    assert classify({"cudaGraphLaunch"})["cuda_graph"]


def test_pareto_front_keeps_the_undominated_measured_trials():
    front = _module().pareto_front([
        {"number": 0, "state": "COMPLETE", "accuracy_drop": 0.0, "speedup": 1.0},
        {"number": 1, "state": "COMPLETE", "accuracy_drop": 0.5, "speedup": 1.5},
        {"number": 2, "state": "COMPLETE", "accuracy_drop": 0.6, "speedup": 1.4},   # dominated by 1
        {"number": 3, "state": "PRUNED", "accuracy_drop": 0.1, "speedup": 3.0},     # not measured to the end
        {"number": 4, "state": "COMPLETE", "accuracy_drop": None, "speedup": 2.0},
    ])
    assert [t["number"] for t in front] == [0, 1]


def test_make_sample_spreads_over_classes_and_refuses_a_full_folder(tmp_path):
    source = tmp_path / "src"
    for i in range(10):
        (source / f"n{i:08d}").mkdir(parents=True)
        (source / f"n{i:08d}" / f"n{i:08d}_x.JPEG").write_bytes(b"jpeg")
    module = _module()
    dest = tmp_path / "sample"
    assert module.make_sample(5, dest, source) == 0
    assert sorted(p.name for p in dest.iterdir()) == [f"n{i:08d}" for i in (0, 2, 4, 6, 8)]
    with pytest.raises(SystemExit, match="not empty"):
        module.make_sample(5, dest, source)
    with pytest.raises(SystemExit, match="not a folder"):
        module.make_sample(5, tmp_path / "other", tmp_path / "absent")


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], "--out is required"),
    (["--device", "cpu", "--out", "x", "--sections", "latency,bf16"], "unknown section(s) latency"),
    (["--make-sample", "many", "dir"], "N must be a whole number"),
])
def test_bad_arguments_are_one_line(argv, message, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
