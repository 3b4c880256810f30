"""`dsm-tune export` (every rule and every refusal) and `dsm-tune verify` (round trip on the demo model)."""

from __future__ import annotations

import json

import pytest

from dsm_tune.cli import main as cli_main
from dsm_tune.merging import load_config
from tests.helpers.synthetic_study import add_measured, create_study, make_config, populate


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    study, _ = create_study(out, "exp")
    populate(study)
    return out, study


def _export(out, *flags, output):
    return cli_main(["export", "--study", "exp", "--out", str(out), "-o", str(output), *flags])


def _measured(study):
    return [t for t in study.trials if t.state.name == "COMPLETE"]


def test_export_default_rule_writes_a_loadable_frozen_config(study_out, tmp_path, capsys):
    out, study = study_out
    expected = min((t for t in _measured(study) if t.user_attrs["accuracy_drop"] <= 1.0),
                   key=lambda t: t.user_attrs["latency_ms"])
    target = tmp_path / "deploy" / "dsm.json"
    assert _export(out, output=target) == 0
    printed = capsys.readouterr().out
    assert f"exported trial {expected.number} of study exp (fastest with accuracy drop <= 1)" in printed
    cfg = load_config(target)
    assert cfg.provenance["trial"] == expected.number
    assert cfg.metrics["speedup"] == expected.user_attrs["speedup"]
    assert cfg.merge_dict() == expected.user_attrs["config"]["merge"]
    assert cfg.model.name == "dsm_tune_demo_vit" and cfg.target["profile"] == "cpu"


@pytest.mark.parametrize("flags, pick", [
    (["--max-accuracy-drop", "0.3"],
     lambda ts: min((t for t in ts if t.user_attrs["accuracy_drop"] <= 0.3), key=lambda t: t.user_attrs["latency_ms"])),
    (["--min-speedup", "1.3"],
     lambda ts: min((t for t in ts if t.user_attrs["speedup"] >= 1.3), key=lambda t: t.user_attrs["accuracy_drop"])),
    (["--trial", "9"], lambda ts: next(t for t in ts if t.number == 9)),
])
def test_export_rules(study_out, tmp_path, flags, pick):
    out, study = study_out
    target = tmp_path / "dsm.json"
    assert _export(out, *flags, output=target) == 0
    assert load_config(target).provenance["trial"] == pick(_measured(study)).number


def test_export_refuses_to_overwrite_without_force(study_out, tmp_path, capsys):
    out, _ = study_out
    target = tmp_path / "dsm.json"
    target.write_text("keep me")
    assert _export(out, output=target) == 2
    assert capsys.readouterr().err.strip() == f"dsm-tune: error: {target} already exists; pass --force to overwrite it"
    assert target.read_text() == "keep me"
    assert _export(out, "--force", output=target) == 0
    assert json.loads(target.read_text())["format"] == "dsm-tune/config"


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsm-tune: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_export_refuses_when_no_trial_fits_naming_the_closest(tmp_path, capsys):
    study, _ = create_study(tmp_path, "exp")
    add_measured(study, make_config(1, 0, [0.2, 0.3]), 2.5, 6.0)
    add_measured(study, make_config(2, 1, [0.1, 0.2]), 1.4, 7.5)
    target = tmp_path / "dsm.json"
    assert _export(tmp_path, output=target) == 2
    err = _error(capsys)
    assert "no trial has an accuracy drop <= 1" in err and "closest: trial 1 (drop 1.4" in err
    assert _export(tmp_path, "--min-speedup", "2", output=target) == 2
    assert "closest: trial 0 (drop 2.5, 6 ms, speedup 1.67x)" in _error(capsys)
    assert not target.exists()


def test_export_refusals_for_bad_rules_and_trials(study_out, tmp_path, capsys):
    out, study = study_out
    target = tmp_path / "dsm.json"
    failed = next(t.number for t in study.trials if t.state.name == "FAIL")
    assert _export(out, "--trial", str(failed), output=target) == 2
    assert f"trial {failed} has no measured result (FAIL" in _error(capsys)
    assert _export(out, "--trial", "77", output=target) == 2
    assert "trial 77 does not exist" in _error(capsys)
    assert _export(out, "--trial", "3", "--max-accuracy-drop", "1", output=target) == 2
    assert "not both" in _error(capsys)
    assert _export(out, "--max-accuracy-drop", "-1", output=target) == 2
    assert "--max-accuracy-drop must be >= 0" in _error(capsys)
    assert cli_main(["export", "--study", "missing", "--out", str(out), "-o", str(target)]) == 2
    assert "no study at" in _error(capsys)
    assert not target.exists()


# --- verify ------------------------------------------------------------------------------------------------------
LIMIT = 64  # images: enough for a non-trivial drop, cheap on a busy 2-core CI machine
@pytest.fixture(scope="module")
def measured_export(tmp_path_factory):
    """A study whose one trial is a real measurement of the demo model on this CPU, exported."""
    from dsm_tune.evaluation.trial import TrialEvaluator
    from dsm_tune.merging import ModelFingerprint

    out = tmp_path_factory.mktemp("verify")
    evaluator = TrialEvaluator("demo", "cpu", None, limit=LIMIT, warmup=1, repeats=3)
    fingerprint = evaluator.fingerprint.to_dict()
    # The spec records how the evaluator drew its images (balanced order, seed 0, nothing held out), as a
    # study's does: verify draws the same ones from it.
    study, _ = create_study(out, "exp", max_drop=5.0, fingerprint=fingerprint, data="demo-fashion-mnist",
                            limit=LIMIT, data_order="balanced", data_seed=0, confirm=0.0)
    study.set_user_attr("data_fingerprint", evaluator.baseline["data_fingerprint"])
    cfg = make_config(1, 1, [0.2, 0.3], fingerprint=fingerprint)
    figures = evaluator.evaluate(cfg)
    add_measured(study, cfg, figures["accuracy_drop"], figures["latency_ms"], max_drop=5.0, figures=figures)
    assert ModelFingerprint.from_dict(fingerprint).name == "dsm_tune_demo_vit"
    path = out / "demo-dsm.json"
    # By number: 3 samples on a loaded box may well be flagged speedup_noisy, which the rules do not pick.
    assert cli_main(["export", "--study", "exp", "--out", str(out), "--trial", "0", "-o", str(path)]) == 0
    return path


def _verify(path, *flags):
    return cli_main(["verify", str(path), "--warmup", "1", "--repeats", "3", *flags])


@pytest.mark.slow
def test_verify_round_trip_passes_on_the_machine_that_measured_it(measured_export, capsys):
    recorded = load_config(measured_export).metrics
    # The drop is deterministic (same weights, images, device); latency on a shared 2-core box is not, so the
    # speedup check is loose here (how close it comes is the benchmarks' business, not a test's).
    assert _verify(measured_export, "--speedup-tolerance", "0.9", "--drop-tolerance", "0.01") == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "note: the images differ" not in out
    row = next(line for line in out.splitlines() if line.startswith("accuracy drop"))
    recorded_cell, measured_cell = row.split()[2:4]
    assert float(recorded_cell) == pytest.approx(recorded["accuracy_drop"], abs=1e-3)
    assert float(measured_cell) == pytest.approx(recorded["accuracy_drop"], abs=1e-3)
    speedup_row = next(line for line in out.splitlines() if line.startswith("speedup"))
    assert float(speedup_row.split()[3]) > 0 and speedup_row.split()[-1] == "yes"


@pytest.mark.slow
def test_verify_fails_when_the_file_promises_more_than_is_measured(measured_export, tmp_path, capsys):
    document = json.loads(measured_export.read_text())
    document["metrics"]["speedup"] = 1000.0
    document["metrics"]["accuracy_drop"] = document["metrics"]["accuracy_drop"] - 3.0
    inflated = tmp_path / "inflated.json"
    inflated.write_text(json.dumps(document))
    assert _verify(inflated) == 1
    out = capsys.readouterr().out
    assert "FAIL: accuracy drop, speedup (x) outside tolerance" in out
    assert "NO" in next(line for line in out.splitlines() if line.startswith("speedup"))


def test_verify_refusals(study_out, tmp_path, capsys):
    """Each refused before anything is measured (the file is a synthetic study's export)."""
    out, _ = study_out
    exported = tmp_path / "dsm.json"
    assert _export(out, output=exported) == 0
    capsys.readouterr()
    assert _verify(tmp_path / "absent.json") == 2
    assert "config file not found" in _error(capsys)

    document = json.loads(exported.read_text())
    del document["metrics"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(document))
    assert _verify(bare) == 2
    assert "records no 'accuracy_drop'" in _error(capsys)

    document = json.loads(exported.read_text())
    document["model"]["embed_dim"] = 768
    other = tmp_path / "other-model.json"
    other.write_text(json.dumps(document))
    assert _verify(other) == 2
    assert "embed_dim" in _error(capsys)

    assert _verify(exported, "--speedup-tolerance", "1.5") == 2
    assert "--speedup-tolerance must be in [0, 1)" in _error(capsys)
    assert _verify(exported, "--device", "a100") == 2
    assert "a100" in _error(capsys)
