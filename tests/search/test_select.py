"""Winner selection rules, every refusal, and the frozen document of a chosen trial."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dsm_tune.errors import DSMTuneError
from dsm_tune.merging import DSMConfig, load_config, token_schedule
from dsm_tune.search.results import trials_frame, write_trials_csv
from dsm_tune.search.select import NoWinnerError, Rule, SelectionError, freeze_trial, measured_trials, pick_winner
from tests.helpers.synthetic_study import DEMO_FINGERPRINT, VERSIONS, add_measured, create_study, make_config, populate


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Read-only in these tests, so built once (sqlite study creation costs seconds on a busy machine)."""
    study, _ = create_study(tmp_path_factory.mktemp("select"), "sel")
    populate(study)
    return study


def _measured(study):
    return [t for t in study.trials if t.state.name == "COMPLETE" and not t.user_attrs.get("aborted")]


def test_default_rule_is_fastest_within_the_study_limit(study):
    expected = min((t for t in _measured(study) if t.user_attrs["accuracy_drop"] <= 1.0),
                   key=lambda t: t.user_attrs["latency_ms"]).number
    assert pick_winner(trials_frame(study), Rule(), study_max_drop=1.0) == expected


@pytest.mark.parametrize("limit", [0.3, 0.5, 1.2, 3.0])
def test_max_accuracy_drop_overrides_the_study_limit(study, limit):
    expected = min((t for t in _measured(study) if t.user_attrs["accuracy_drop"] <= limit),
                   key=lambda t: t.user_attrs["latency_ms"]).number
    assert pick_winner(trials_frame(study), Rule(max_accuracy_drop=limit), study_max_drop=1.0) == expected


@pytest.mark.parametrize("speedup", [1.05, 1.3, 1.45])
def test_min_speedup_picks_the_most_accurate_fast_enough_trial(study, speedup):
    fast = [t for t in _measured(study) if t.user_attrs["speedup"] >= speedup]
    expected = min(fast, key=lambda t: (t.user_attrs["accuracy_drop"], t.user_attrs["latency_ms"])).number
    # The study limit does not apply: a speedup rule trades accuracy for speed explicitly.
    assert pick_winner(trials_frame(study), Rule(min_speedup=speedup), study_max_drop=0.1) == expected


def test_min_speedup_with_a_drop_limit_combines_both(study):
    fast = [t for t in _measured(study) if t.user_attrs["speedup"] >= 1.2 and t.user_attrs["accuracy_drop"] <= 0.5]
    expected = min(fast, key=lambda t: t.user_attrs["accuracy_drop"]).number
    assert pick_winner(trials_frame(study), Rule(max_accuracy_drop=0.5, min_speedup=1.2), 1.0) == expected


def test_trial_rule_returns_that_trial(study):
    assert pick_winner(trials_frame(study), Rule(trial=7), 1.0) == 7


def test_selection_reads_trials_csv_round_trip(study, tmp_path):
    write_trials_csv(study, tmp_path / "trials.csv")
    from_csv = pd.read_csv(tmp_path / "trials.csv")
    frame = trials_frame(study)
    for rule in (Rule(), Rule(max_accuracy_drop=0.4), Rule(min_speedup=1.3)):
        assert pick_winner(from_csv, rule, 1.0) == pick_winner(frame, rule, 1.0)
    # The aborted (PRUNED) and failed trials never count as measured, even through the CSV's strings.
    assert set(measured_trials(from_csv)["number"]) == {t.number for t in _measured(study)}


def test_no_trial_within_the_drop_limit_names_the_closest(tmp_path):
    study, _ = create_study(tmp_path, "tight")
    add_measured(study, make_config(1, 0, [0.2, 0.3]), 2.5, 6.0)
    add_measured(study, make_config(2, 1, [0.1, 0.2]), 0.8, 7.5)
    add_measured(study, make_config(0, 0, [0.4]), 3.1, 5.0)
    with pytest.raises(NoWinnerError) as caught:
        pick_winner(trials_frame(study), Rule(max_accuracy_drop=0.5), 1.0)
    message = str(caught.value)
    assert caught.value.closest == 1
    assert "accuracy drop <= 0.5" in message and "closest: trial 1" in message and "drop 0.8" in message
    assert isinstance(caught.value, DSMTuneError) and "\n" not in message


def test_no_trial_fast_enough_names_the_fastest(study):
    fastest = max(_measured(study), key=lambda t: t.user_attrs["speedup"])
    with pytest.raises(NoWinnerError, match=rf"speedup >= 5x .*closest: trial {fastest.number} "):
        pick_winner(trials_frame(study), Rule(min_speedup=5.0), 1.0)


def test_named_trial_refusals(study):
    frame = trials_frame(study)
    failed = next(t.number for t in study.trials if t.state.name == "FAIL")
    aborted = next(t.number for t in study.trials if t.user_attrs.get("aborted"))
    with pytest.raises(NoWinnerError, match=r"trial 99 does not exist .*trials 0\.\.15"):
        pick_winner(frame, Rule(trial=99), 1.0)
    with pytest.raises(NoWinnerError, match=rf"trial {failed} has no measured result \(FAIL: RuntimeError"):
        pick_winner(frame, Rule(trial=failed), 1.0)
    with pytest.raises(NoWinnerError, match=rf"trial {aborted} was aborted early"):
        pick_winner(frame, Rule(trial=aborted), 1.0)


def test_empty_or_unmeasured_study_is_refused(tmp_path):
    study, _ = create_study(tmp_path, "empty")
    with pytest.raises(NoWinnerError, match="the study has no trials"):
        pick_winner(trials_frame(study), Rule(), 1.0)


def test_default_rule_needs_a_limit(study):
    with pytest.raises(SelectionError, match="no max_accuracy_drop"):
        pick_winner(trials_frame(study), Rule(), study_max_drop=None)


@pytest.mark.parametrize("kwargs, message", [
    ({"trial": 3, "max_accuracy_drop": 1.0}, "not both"),
    ({"trial": -1}, "trial number >= 0"),
    ({"max_accuracy_drop": -0.5}, "must be >= 0"),
    ({"min_speedup": 0.0}, "must be > 0"),
])
def test_malformed_rules(kwargs, message):
    with pytest.raises(SelectionError, match=message):
        Rule(**kwargs)


def test_freeze_trial_is_the_full_frozen_document(study):
    trial = study.trials[2]
    frozen = freeze_trial(study, 2)
    document = json.loads(frozen.to_json())
    assert set(document) == {"format", "version", "model", "merge", "target", "metrics", "provenance"}
    assert document["model"] == DEMO_FINGERPRINT
    assert document["merge"] == trial.user_attrs["config"]["merge"]
    assert document["target"] == {"profile": "cpu", "device": "cpu", "dtype": "float32", "batch_size": 8,
                                  "compile": False, "runtime": "torch"}
    for key in ("metric", "metric_value", "accuracy_drop", "latency_ms", "latency_iqr_ms", "baseline_latency_ms",
                "speedup", "flops_ratio", "tokens_kept", "num_images"):
        assert document["metrics"][key] == trial.user_attrs[key], key
    assert document["metrics"]["tokens_per_block"] == token_schedule(frozen)
    assert len(document["metrics"]["tokens_per_block"]) == DEMO_FINGERPRINT["num_blocks"]
    assert document["metrics"]["max_accuracy_drop"] == 1.0
    provenance = document["provenance"]
    assert provenance["study"] == "sel" and provenance["trial"] == 2 and provenance["seed_kind"] == "paper"
    assert {k: provenance[k] for k in VERSIONS} == VERSIONS
    assert provenance["data_fingerprint"] == "fmnist-demo-0123abcd" and provenance["data"] == "demo-fashion-mnist"
    assert provenance["measured"].startswith("2026-01-01T12:02")
    # What deployment loads is the same config.
    loaded = load_config(frozen.to_json())
    assert loaded == frozen and loaded.metrics == frozen.metrics and loaded.provenance == frozen.provenance


def test_freeze_trial_with_a_target_override_in_the_spec(tmp_path):
    study, _ = create_study(tmp_path, "bs", batch_size=32, dtype="bfloat16")
    add_measured(study, make_config(2, 1, [0.1, 0.3]), 0.4, 7.0)
    target = freeze_trial(study, 0).target
    assert target["batch_size"] == 32 and target["dtype"] == "bfloat16" and target["device"] == "cpu"


def test_freeze_refuses_unfinished_and_foreign_trials(study, tmp_path):
    failed = next(t.number for t in study.trials if t.state.name == "FAIL")
    with pytest.raises(NoWinnerError, match=f"trial {failed} is FAIL"):
        freeze_trial(study, failed)
    with pytest.raises(NoWinnerError, match="trial 404 does not exist"):
        freeze_trial(study, 404)
    import optuna

    foreign = optuna.create_study(directions=["minimize", "minimize"])
    foreign.set_user_attr("spec", {"target": "cpu"})
    foreign.set_user_attr("fingerprint", DEMO_FINGERPRINT)
    foreign.add_trial(optuna.trial.create_trial(values=[0.1, 1.0]))
    with pytest.raises(SelectionError, match="trial 0 .* has no 'config' attribute"):
        freeze_trial(foreign, 0)


def test_frozen_config_is_a_dsm_config(study):
    assert isinstance(freeze_trial(study, 0), DSMConfig)
