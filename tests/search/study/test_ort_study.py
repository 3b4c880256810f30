"""A study tuned for ONNX Runtime end to end: `run --device ort-cpu`, export a merging trial with its ONNX graph,
verify it under ORT."""

from __future__ import annotations

import pytest

from dsm_tune.cli import main
from dsm_tune.merging import load_config, read_onnx_config
from dsm_tune.search.results import load_study


@pytest.mark.slow
def test_demo_study_for_ort_cpu_exports_and_verifies_under_onnxruntime(tmp_path, capsys):
    code = main(["run", "--model", "demo", "--device", "ort-cpu", "--trials", "3", "--workers", "1",
                 "--limit", "32", "--out", str(tmp_path), "--no-mlflow"])
    output = capsys.readouterr().out
    assert code == 0, output
    study_dir = tmp_path / "demo-ort-cpu"
    # best.json needs a trial with a quiet speedup within the limit; on a loaded box every ORT timing may be
    # flagged speedup_noisy, and then the run says why there is none.
    quiet = [t for t in load_study(study_dir).trials if t.state.name == "COMPLETE"
             and t.user_attrs["accuracy_drop"] <= 1.0 and not t.user_attrs.get("speedup_noisy")]
    assert (study_dir / "best.json").exists() == bool(quiet), output
    if not quiet:
        assert "no best.json" in output and "noisy speedup" in output

    # The trial that merges most, so the graph checked under ORT really merges (the best may be the dense seed).
    timed = [t for t in load_study(study_dir).trials if t.user_attrs.get("speedup") is not None]
    assert timed and all(t.user_attrs["speedup"] > 0 for t in timed)
    merging = min(timed, key=lambda t: t.user_attrs["tokens_kept"])
    assert merging.user_attrs["tokens_kept"] < 1
    json_path, onnx_path = tmp_path / "dsm.json", tmp_path / "dsm.onnx"
    code = main(["export", "--study", "demo-ort-cpu", "--out", str(tmp_path), "--trial", str(merging.number),
                 "-o", str(json_path), "--onnx", str(onnx_path)])
    assert code == 0, capsys.readouterr().out
    assert read_onnx_config(onnx_path) == load_config(json_path)
    exported = load_config(json_path)
    assert exported.target["profile"] == "ort-cpu" and exported.target["runtime"] == "onnxruntime"

    # Latency on a shared 2-core machine is not reproducible; the accuracy drop and the graph's outputs are.
    code = main(["verify", str(json_path), "--warmup", "1", "--repeats", "3", "--speedup-tolerance", "0.95",
                 "--drop-tolerance", "0.01"])
    output = capsys.readouterr().out
    assert code == 0, output
    assert "onnxruntime" in output and "PASS" in output
    # The study searched a balanced draw with a fifth held out: verify re-scores exactly those search images.
    assert "the images differ" not in output
    onnx_row = next(line for line in output.splitlines() if line.startswith("ONNX vs PyTorch")).split()
    assert onnx_row[-1] == "yes" and float(onnx_row[-4]) <= 1e-4


def test_export_onnx_flag_writes_the_graph_and_refuses_to_overwrite(tmp_path, capsys):
    from tests.helpers.synthetic_study import create_study, populate

    study, _ = create_study(tmp_path, "exp")
    populate(study)
    json_path, onnx_path = tmp_path / "dsm.json", tmp_path / "dsm.onnx"
    flags = ["export", "--study", "exp", "--out", str(tmp_path), "-o", str(json_path), "--onnx", str(onnx_path)]
    assert main(flags) == 0
    assert f"config embedded) -> {onnx_path}" in capsys.readouterr().out
    frozen = load_config(json_path)
    embedded = read_onnx_config(onnx_path)
    assert embedded == frozen and embedded.metrics == frozen.metrics

    json_path.unlink()
    assert main(flags) == 2  # the ONNX file exists: refused before the JSON is written
    assert "dsm.onnx already exists; pass --force" in capsys.readouterr().err
    assert not json_path.exists()
    assert main([*flags, "--force"]) == 0
