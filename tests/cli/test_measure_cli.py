"""`dsm-tune measure` end to end: the JSON document, the table, and one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dsm_tune.cli import main
from dsm_tune.merging import DSMConfig, Stage, token_schedule

from tests.conftest import IMAGENET_SAMPLE

SUBSET_WNIDS = ("n01440764", "n01530575", "n02085620", "n02123045", "n02504458", "n03000134", "n03594945",
                "n04037443", "n07753592", "n15075141")
FAST = ["--repeats", "3", "--warmup", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Several engineers' tests share two cores; an oversubscribed OpenMP pool is orders of magnitude slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def imagenet_subset(shared_assets, tmp_path):
    root = tmp_path / "val"
    root.mkdir()
    for wnid in SUBSET_WNIDS:
        os.symlink(IMAGENET_SAMPLE / wnid, root / wnid)
    return root


def merge_document(start_layer=2, stages=((4, 0.25), (6, 0.3)), depth=1) -> dict:
    return {"format": "dsm-tune/config", "version": 1,
            "merge": {"start_layer": start_layer, "hierarchy_depth": depth,
                      "stages": [{"blocks": b, "ratio": r} for b, r in stages], "proportional_attention": True}}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_document_end_to_end(capsys, tmp_path, imagenet_subset):
    config = tmp_path / "dsm.json"
    config.write_text(json.dumps(merge_document()))
    code, out, err = run_cli(capsys, "measure", "--model", "vit_tiny", "--img-size", "64", "--device", "cpu",
                             "--data", str(imagenet_subset), "--limit", "6", "--metric", "agreement",
                             "--config", str(config), "--cache-dir", str(tmp_path / "cache"), "--json", *FAST)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"]["name"] == "vit_tiny_patch16_224" and doc["model"]["grid"] == [4, 4]
    assert doc["target"]["name"] == "cpu" and doc["target"]["batch_size"] == 8
    assert doc["data"]["num_images"] == 6 and doc["metric"] == "agreement"
    assert doc["dense"]["metric_value"] == 100.0
    assert doc["accuracy_drop"] == pytest.approx(100.0 - doc["merged"]["metric_value"])
    assert doc["num_images"] == 6
    for side in ("dense", "merged"):
        assert doc[side]["latency_ms"] > 0 and doc[side]["latency_iqr_ms"] >= 0
    assert doc["speedup"] == pytest.approx(doc["dense"]["latency_ms"] / doc["merged"]["latency_ms"])
    bound = DSMConfig.from_dict({**merge_document(), "model": {k: doc["model"][k] for k in (
        "name", "num_blocks", "grid", "num_prefix_tokens", "img_size", "embed_dim")}})
    assert doc["merged"]["tokens_per_block"] == token_schedule(bound)
    assert doc["dense"]["tokens_per_block"] == [16] * 12
    assert doc["merged"]["tokens_per_block"][-1] < 16 and doc["tokens_kept"] < 1
    assert doc["config"] == merge_document()["merge"]
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())


def test_table_and_latency_only(capsys):
    code, out, err = run_cli(capsys, "measure", "--model", "vit_tiny", "--img-size", "64",
                             "--config", json.dumps(merge_document()), *FAST)
    assert code == 0, err
    assert "speedup" in out and "none (latency only)" in out
    assert "merged  16 16 16 12" in out


def test_dense_only_without_config(capsys):
    code, out, err = run_cli(capsys, "measure", "--model", "vit_tiny", "--img-size", "32", "--json", *FAST)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["merged"] is None and doc["config"] is None and doc["dense"]["tokens_per_block"] == [4] * 12


@pytest.mark.parametrize("argv, message", [
    (["--model", "vit_tiny", "--device", "tpu"], "unknown target 'tpu'"),
    (["--model", "vit_tinny"], "unknown model 'vit_tinny'"),
    (["--model", "vit_tiny", "--config", "/nonexistent/dsm.json"], "config file not found"),
    (["--model", "vit_tiny", "--data", "/nonexistent/images"], "does not exist"),
    (["--model", "vit_tiny", "--img-size", "32", "--metric", "top1"], "needs --data"),
])
def test_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, "measure", *argv, *FAST)
    assert code == 2 and out == ""
    assert err.startswith("dsm-tune: error: ") and message in err and err.count("\n") == 1


def test_gpu_target_without_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, "measure", "--model", "vit_tiny", "--device", "a100")
    assert code == 2 and "needs a CUDA GPU" in err


def test_config_that_does_not_fit_the_model(capsys):
    too_deep = merge_document(depth=2)  # a 2x2 grid has no 4x4 windows
    code, _, err = run_cli(capsys, "measure", "--model", "vit_tiny", "--img-size", "32",
                           "--config", json.dumps(too_deep), *FAST)
    assert code == 2 and "hierarchy_depth" in err and err.count("\n") == 1


def _demo_ready() -> bool:
    from dsm_tune.evaluation import demo
    return demo.DEMO_WEIGHTS_PATH.is_file() and demo.DEMO_SLICE_PATH.is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _demo_ready(), reason="the demo model's weights are not committed yet")
@pytest.mark.parametrize("data", [None, "fashion-mnist"])
def test_demo_model_end_to_end(capsys, tmp_path, data):
    if data == "fashion-mnist" and not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    document = merge_document(start_layer=1, stages=((2, 0.25), (3, 0.25)), depth=1)
    config = tmp_path / "demo.json"
    config.write_text(json.dumps(document))
    argv = ["measure", "--model", "demo", "--device", "cpu", "--config", str(config), "--json", "--limit", "100",
            "--cache-dir", str(tmp_path), *FAST] + (["--data", data] if data else [])
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["metric"] == "top1" and doc["num_images"] == 100
    assert doc["dense"]["metric_value"] > 40.0  # a trained model, far above the 10 % of chance
    assert doc["accuracy_drop"] == pytest.approx(doc["dense"]["metric_value"] - doc["merged"]["metric_value"])
    assert doc["merged"]["tokens_per_block"][0] == 256 and doc["merged"]["tokens_per_block"][-1] < 256
    assert ("slice" in doc["data"]["description"]) == (data is None)


# -- the trial evaluator behind `measure` (and behind every study worker) ---------------------------------------

CONTRACT_KEYS = {"metric", "metric_value", "accuracy_drop", "aborted", "latency_ms", "latency_iqr_ms",
                 "baseline_latency_ms", "speedup", "flops_ratio", "tokens_kept", "num_images", "eval_seconds"}


def test_trial_evaluator_scores_configs_on_a_shared_weight_copy(tmp_path, imagenet_subset):
    from dsm_tune.evaluation.trial import TrialEvaluator
    from dsm_tune.merging import is_patched

    from dsm_tune.evaluation.targets import load_target

    evaluator = TrialEvaluator("vit_tiny", load_target("cpu", batch_size=2), str(imagenet_subset), metric="agreement", limit=8,
                               cache_dir=tmp_path, img_size=64, warmup=1, repeats=3)
    model, merged = evaluator.model, evaluator.merged_model
    assert merged is not model and merged.head.weight is model.head.weight  # no weight copy
    assert evaluator.fingerprint.grid == (4, 4) and evaluator.input_shape == (3, 64, 64)

    identity = evaluator.evaluate(DSMConfig.dense(model))
    assert CONTRACT_KEYS <= set(identity)
    assert identity["accuracy_drop"] == 0.0 and identity["flops_ratio"] == 1.0 and identity["tokens_kept"] == 1.0
    assert not is_patched(merged) and not is_patched(model)

    cfg = DSMConfig.for_model(model, start_layer=2, hierarchy_depth=1, stages=[Stage(4, ratio=0.5), Stage(6, r=2)])
    result = evaluator.evaluate(cfg)
    assert result["tokens_kept"] < 0.5 and result["flops_ratio"] < 1.0 and result["num_images"] == 8
    assert result["speedup"] == pytest.approx(result["baseline_latency_ms"] / result["latency_ms"])
    assert not is_patched(merged)
    assert evaluator.baseline["metric_value"] == 100.0 and evaluator.baseline["latency_ms"] > 0

    # A trial whose drop is certain to exceed the limit stops early but still reports both objectives.
    evaluator.max_drop = -1.0  # "must beat the dense model": certain to fail after the first chunk
    aborted = evaluator.evaluate(cfg)
    assert aborted["aborted"] and aborted["num_images"] == 2 and aborted["accuracy_drop"] > -1.0
    assert aborted["latency_ms"] > 0 and not is_patched(merged)

    # A config for another model is refused, naming the mismatch.
    from dsm_tune.merging import ModelMismatchError
    other = DSMConfig.from_dict({**merge_document(), "model": {"name": "vit_tiny_patch16_224", "num_blocks": 12,
                                 "grid": [14, 14], "num_prefix_tokens": 1, "img_size": [224, 224],
                                 "embed_dim": 192}})
    with pytest.raises(ModelMismatchError, match="grid"):
        evaluator.evaluate(other)
