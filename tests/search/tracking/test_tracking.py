"""MLflow tracking of a study: parent/children matching the trials frame, Pareto tags, artifacts, resume without
duplicates, and a dead tracking server that queues trials and loses nothing."""

from __future__ import annotations

import json
import logging
import math

import mlflow
import pytest
from mlflow import MlflowClient

from dsm_tune.merging import DSMConfig
from dsm_tune.search.plots import write_pareto_plots
from dsm_tune.search.dense_reference import study_reference
from dsm_tune.search.results import load_study, pareto_numbers, trials_frame, write_trials_csv
from dsm_tune.search.select import Rule, freeze_trial, pick_winner
from dsm_tune.search.folder import PENDING_FILE
from dsm_tune.search.tracking import (METRIC_KEYS, PARENT_ATTR, MlflowTracker, NullTracker,
                                      TrackingError, resolve_tracking_uri, trial_record)
from tests.helpers.mlflow_helpers import copy_store, free_port, make_empty_store
from tests.helpers.synthetic_study import add_measured, create_study, make_config, populate

EXPERIMENT = "dsm-tune/dsm_tune_demo_vit/cpu"


@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    return make_empty_store(tmp_path_factory.mktemp("mlflow-template"))


def _finish_like_the_driver(tracker, study, study_dir):
    """What the driver does after the last trial: trials.csv, plots, best.json, artifacts, Pareto tags."""
    df = write_trials_csv(study, study_dir / "trials.csv")
    write_pareto_plots(df, study_dir, 1.0)
    freeze_trial(study, pick_winner(df, Rule(), 1.0)).to_json(study_dir / "best.json")
    (study_dir / "space.yaml").write_text("start_layer: [0, 3]\n")
    tracker.refresh_artifacts(study_dir)
    reference = study_reference(study)   # as the driver's end_tracking: the figures of trials.csv
    tracker.end_study(pareto_numbers(df), [trial_record(t, reference) for t in study.trials])
    return df


def _runs(client, experiment_name=EXPERIMENT):
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("dsm_tune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("dsm_tune.role") == "trial"]
    return parents, children


@pytest.fixture(scope="module")
def logged(tmp_path_factory, store_template):
    """One study of 16 trials logged through the tracker protocol into a fresh sqlite store."""
    out = tmp_path_factory.mktemp("tracked")
    uri = copy_store(store_template, out)
    study, study_dir = create_study(out, "demo-cpu")
    populate(study)
    tracker = MlflowTracker(out=out)
    assert tracker.uri == uri  # the default store is <out>/mlflow.db
    parent_id = tracker.start_study(study_dir, study.user_attrs, resumed=False)
    reference = study_reference(study)
    for trial in study.trials:
        tracker.log_trial(trial_record(trial, reference))
    df = _finish_like_the_driver(tracker, study, study_dir)
    return {"out": out, "uri": uri, "study": study, "dir": study_dir, "df": df, "parent_id": parent_id}


def test_one_parent_and_one_child_per_trial_with_the_frames_metrics(logged):
    client = MlflowClient(tracking_uri=logged["uri"])
    parents, children = _runs(client)
    assert len(parents) == 1 and parents[0].info.run_id == logged["parent_id"]
    assert len(children) == 16
    assert all(c.data.tags["mlflow.parentRunId"] == logged["parent_id"] for c in children)

    rows = logged["df"].set_index("number")
    compared = 0
    for child in children:
        number = int(child.data.tags["trial_number"])
        row = rows.loc[number]
        assert child.data.tags["state"] == row["state"]
        for key in METRIC_KEYS:
            value = row.get(key)
            if isinstance(value, float) and math.isfinite(value):
                assert child.data.metrics[key] == value, (number, key)
                compared += 1
            else:
                assert key not in child.data.metrics or math.isnan(float(value)), (number, key)
        config = DSMConfig.from_dict(json.loads(row["config"]))
        assert child.data.params == {k: str(v).lower() if isinstance(v, bool) else str(v)
                                     for k, v in config.merge_params().items()}
    assert compared >= 14 * 10  # every measured trial's figures really were compared


def test_child_tags_and_statuses(logged):
    client = MlflowClient(tracking_uri=logged["uri"])
    _, children = _runs(client)
    by_number = {int(c.data.tags["trial_number"]): c for c in children}
    failed = next(t.number for t in logged["study"].trials if t.state.name == "FAIL")
    aborted = next(t.number for t in logged["study"].trials if t.user_attrs.get("aborted"))
    assert by_number[failed].info.status == "FAILED"
    assert by_number[failed].data.tags["fail_reason"].startswith("RuntimeError: CUDA out of memory")
    assert by_number[aborted].info.status == "KILLED" and by_number[aborted].data.tags["aborted"] == "true"
    assert by_number[0].info.status == "FINISHED" and by_number[0].data.tags["seed_kind"] == "dense"
    assert by_number[1].data.tags["seed_kind"] == "tome"
    assert by_number[5].data.tags["worker"] == "worker-0/cpu" and by_number[5].data.tags["metric"] == "top1"
    assert by_number[5].info.run_name == "trial-0005"


def test_pareto_children_are_tagged_for_the_ui_filter(logged):
    client = MlflowClient(tracking_uri=logged["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    tagged = client.search_runs([experiment.experiment_id], filter_string="tags.pareto = 'true'")
    assert sorted(int(r.data.tags["trial_number"]) for r in tagged) == sorted(pareto_numbers(logged["df"]))
    others = client.search_runs([experiment.experiment_id], filter_string="tags.pareto = 'false'")
    assert len(tagged) + len(others) == 16


def test_parent_run_tags_artifacts_and_study_attr(logged):
    client = MlflowClient(tracking_uri=logged["uri"])
    parent = client.get_run(logged["parent_id"])
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and parent.info.run_name == "demo-cpu"
    assert tags["model"] == "dsm_tune_demo_vit" and tags["target"] == "cpu"
    assert tags["versions.timm"] == "1.0.31" and tags["versions.torch"] == "2.14.1"
    assert tags["sampler"] == "nsga2" and tags["search_space"] == "search_spaces/demo.yaml"
    assert tags["data_fingerprint"] == "fmnist-demo-0123abcd"
    assert tags["pareto_trials"] == ",".join(str(n) for n in sorted(pareto_numbers(logged["df"])))
    best = json.loads((logged["dir"] / "best.json").read_text())
    assert parent.data.metrics["best_speedup"] == best["metrics"]["speedup"]
    assert parent.data.metrics["dense_reference_ms"] == best["metrics"]["baseline_latency_ms"] == 10.0
    assert tags["best_trial"] == str(best["provenance"]["trial"])
    names = {a.path for a in client.list_artifacts(logged["parent_id"])}
    assert {"pareto.html", "pareto.png", "trials.csv", "best.json", "space.yaml"} <= names
    # Artifacts sit next to the database, not in ./mlruns of whatever folder the study ran from.
    assert list((logged["out"] / "mlartifacts").rglob("pareto.png"))
    # A pure consumer: the driver, not the tracker, keeps the run id in the study (test_study checks it).
    assert PARENT_ATTR not in logged["study"].user_attrs
    assert mlflow.active_run() is None  # explicit run ids only


def test_resume_reuses_the_parent_and_never_duplicates(tmp_path, store_template):
    uri = copy_store(store_template, tmp_path)
    study, study_dir = create_study(tmp_path, "resumed")
    populate(study)
    first = MlflowTracker(out=tmp_path)
    parent_id = first.start_study(study_dir, study.user_attrs, resumed=False)
    for trial in study.trials[:10]:
        first.log_trial(trial_record(trial))
    # The first driver dies here: no end_study. It had also created trial 10's run without finishing it.
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    client.create_run(experiment_id, tags={"mlflow.parentRunId": parent_id, "trial_number": "10",
                                           "dsm_tune.role": "trial"})

    second = MlflowTracker(out=tmp_path)
    # What the driver stored from the first run's `parent_run_id`.
    stored = {**study.user_attrs, PARENT_ATTR: first.parent_run_id}
    assert second.start_study(study_dir, stored, resumed=True) == parent_id
    assert client.get_run(parent_id).info.status == "RUNNING"
    for trial in study.trials:  # a resumed driver may log old trials again
        second.log_trial(trial_record(trial))
    second.log_trial(trial_record(study.trials[3]))
    _finish_like_the_driver(second, study, study_dir)

    parents, children = _runs(client)
    numbers = sorted(int(c.data.tags["trial_number"]) for c in children)
    assert len(parents) == 1 and numbers == list(range(16))
    assert all(c.info.status in ("FINISHED", "FAILED", "KILLED") for c in children)
    trial_10 = next(c for c in children if c.data.tags["trial_number"] == "10")
    assert trial_10.data.metrics["latency_ms"] == study.trials[10].user_attrs["latency_ms"]
    assert len(client.get_metric_history(trial_10.info.run_id, "latency_ms")) == 1


def test_dead_server_queues_trials_and_a_resume_logs_them(tmp_path, store_template, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once instead of after backoff
    study, study_dir = create_study(tmp_path, "offline")
    populate(study)
    dead = MlflowTracker(uri=f"http://127.0.0.1:{free_port()}", out=tmp_path, retry_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="dsm_tune.search.tracking"):
        assert dead.start_study(study_dir, study.user_attrs, resumed=False) is None
        for trial in study.trials[:5]:
            dead.log_trial(trial_record(trial))  # must not raise
        dead.refresh_artifacts(study_dir)
        dead.end_study([0, 2])
    warnings = [r for r in caplog.records if r.name == "dsm_tune.search.tracking"]
    assert warnings and all(r.exc_info is None and "\n" not in r.getMessage() for r in warnings)
    assert sum("failed while" in r.getMessage() for r in warnings) == 1  # one line per outage, not per trial
    assert "stay queued" in warnings[-1].getMessage()
    spooled = [json.loads(line) for line in (study_dir / PENDING_FILE).read_text().splitlines()]
    assert [p["number"] for p in spooled] == [0, 1, 2, 3, 4]
    assert spooled[2]["metrics"]["latency_ms"] == study.trials[2].user_attrs["latency_ms"]
    assert PARENT_ATTR not in study.user_attrs

    # The next run of the study (here against a reachable store) logs what was queued as soon as it starts.
    uri = copy_store(store_template, tmp_path / "store")
    live = MlflowTracker(uri=uri, out=tmp_path)
    parent_id = live.start_study(study_dir, study.user_attrs, resumed=True)
    assert parent_id is not None and not (study_dir / PENDING_FILE).exists()
    client = MlflowClient(tracking_uri=uri)
    _, children = _runs(client)
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [0, 1, 2, 3, 4]
    # end_study also logs the finished trials MLflow lacks (measured while nobody listened).
    live.end_study(pareto_numbers(trials_frame(study)), [trial_record(t) for t in study.trials])
    _, children = _runs(client)
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == list(range(16))
    assert live.parent_run_id == parent_id and PARENT_ATTR not in study.user_attrs


def test_experiment_name_override_and_uri_resolution(tmp_path, store_template, monkeypatch):
    uri = copy_store(store_template, tmp_path)
    study, study_dir = create_study(tmp_path, "named")
    tracker = MlflowTracker(out=tmp_path, experiment="team/vit-speedups")
    tracker.start_study(study_dir, study.user_attrs, resumed=False)
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("team/vit-speedups") is not None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"
    with pytest.raises(TrackingError, match="is not a URI"):
        MlflowTracker(uri="runs/mlflow.db", out=tmp_path)
    with pytest.raises(TrackingError, match="start_study must be called"):
        MlflowTracker(out=tmp_path).log_trial({"number": 0})


def test_null_tracker_does_nothing(tmp_path):
    tracker = NullTracker()
    assert tracker.start_study(tmp_path, {}, resumed=False) is None
    tracker.log_trial({"number": 0})
    tracker.refresh_artifacts(tmp_path)
    tracker.end_study([0])
    assert list(tmp_path.iterdir()) == []


def test_plots_are_refreshed_while_trials_come_in(tmp_path, store_template):
    """The driver's live outputs redraw the plots from the trials it told and have the tracker upload them."""
    from dsm_tune.search.folder import StudyFolder
    from dsm_tune.search.study.outputs import LiveOutputs

    uri = copy_store(store_template, tmp_path)
    study, study_dir = create_study(tmp_path, "live")
    tracker = MlflowTracker(out=tmp_path)
    parent_id = tracker.start_study(study_dir, study.user_attrs, resumed=False)
    outputs = LiveOutputs(StudyFolder.at(study_dir), 1.0, tracker, interval_s=0)
    for i, (drop, latency) in enumerate([(0.0, 10.0), (0.4, 8.0), (2.0, 6.0)]):
        trial = add_measured(study, make_config(i, 0, [0.1 * i]), drop, latency)
        outputs.trial_told(study)
        tracker.log_trial(trial_record(trial))
        html = (study_dir / "pareto.html").read_text()
        assert f"{i + 1} measured of {i + 1} trials" in html
    client = MlflowClient(tracking_uri=uri)
    assert {"pareto.html", "pareto.png"} <= {a.path for a in client.list_artifacts(parent_id)}
    assert client.get_run(parent_id).info.status == "RUNNING"  # before end_study


@pytest.mark.slow
def test_driver_run_leaves_one_parent_with_a_child_per_trial_equal_to_trials_csv(tmp_path):
    """`run_study` with its default tracker (MLflow at <out>/mlflow.db), on Ray, with the stand-in evaluator."""
    import io

    import pandas as pd

    from dsm_tune.merging import ModelFingerprint
    from dsm_tune.search.study import StudySpec, run_study
    from dsm_tune.search.testing import StandInFactory

    fingerprint = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
    spec = StudySpec(model="demo", target="cpu", trials=16, workers=1, out=tmp_path, max_accuracy_drop=0.5)
    run_study(spec, evaluator_factory=StandInFactory(fingerprint, cost_s=0.01), stream=io.StringIO())

    study_dir = tmp_path / spec.study
    csv = pd.read_csv(study_dir / "trials.csv")
    finished = csv[csv["state"].isin(["COMPLETE", "PRUNED", "FAIL"])].set_index("number")
    assert int(csv["state"].isin(["COMPLETE", "PRUNED"]).sum()) == 16
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, children = _runs(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == sorted(finished.index)
    for child in children:
        row = finished.loc[int(child.data.tags["trial_number"])]
        for key in ("accuracy_drop", "latency_ms", "speedup", "flops_ratio", "tokens_kept", "metric_value"):
            if key in row and pd.notna(row[key]):
                assert child.data.metrics[key] == pytest.approx(float(row[key]), rel=1e-12), key
    front = {int(r.data.tags["trial_number"]) for r in children if r.data.tags.get("pareto") == "true"}
    assert front == set(pareto_numbers(csv))
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"pareto.html", "pareto.png", "trials.csv", "best.json", "spec.json"} <= artifacts
    assert load_study(study_dir).user_attrs[PARENT_ATTR] == parents[0].info.run_id


@pytest.mark.slow
def test_the_study_s_confirmed_figures_reach_its_children_through_the_driver(tmp_path):
    """The confirmation runs after every trial was logged, and its figures live on the study, not on the frozen
    trials: the driver's end must still give each confirmed child its confirmed_drop and interval."""
    import dataclasses
    import io
    from types import SimpleNamespace

    import pandas as pd

    from dsm_tune.merging import ModelFingerprint
    from dsm_tune.search.results import CONFIRM_ATTR
    from dsm_tune.search.study import StudySpec, run_study
    from dsm_tune.search.testing import StandInFactory

    class HeldOut:
        """Each config scored gets a figure of its own, so a child given another's figures shows."""
        data_fingerprint, num_images = "held-out", 100

        def __init__(self):
            self.calls = 0

        def score(self, cfg):
            self.calls += 1
            drop = 0.3 + 0.01 * self.calls
            return SimpleNamespace(drop=drop, ci_low=drop - 0.2, ci_high=drop + 0.2, num_images=100)

    @dataclasses.dataclass(frozen=True)
    class ConfirmingFactory(StandInFactory):
        @property
        def confirmer(self):
            return HeldOut

    fingerprint = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
    spec = StudySpec(model="demo", target="cpu", trials=10, workers=1, no_ray=True, out=tmp_path,
                     max_accuracy_drop=0.5, confirm=0.2)
    run_study(spec, evaluator_factory=ConfirmingFactory(fingerprint), stream=io.StringIO())

    scores = load_study(tmp_path / spec.study).user_attrs[CONFIRM_ATTR]["scores"]
    assert scores
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, children = _runs(client)
    by_number = {int(c.data.tags["trial_number"]): c.data.metrics for c in children}
    for number, figures in scores.items():
        for key in ("confirmed_drop", "confirmed_drop_ci_low", "confirmed_drop_ci_high", "confirmed_num_images"):
            assert by_number[int(number)][key] == pytest.approx(figures[key]), (number, key)
    unconfirmed = set(by_number) - {int(n) for n in scores}
    assert unconfirmed and not any("confirmed_drop" in by_number[n] for n in unconfirmed)
    csv = pd.read_csv(tmp_path / spec.study / "trials.csv").set_index("number")
    assert {int(n) for n in scores} == set(csv.index[csv["confirmed_drop"].notna()])
