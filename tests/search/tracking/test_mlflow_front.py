"""The front where users review it in MLflow 3: the experiment opens on runs (its kind tag and a saved view of
accuracy drop against latency), the parent run holds the front as a rendered table and an image, children carry
the interval and confirmation metrics (confirmations that arrive after a child was logged reach it at
`end_study`), and a study from before these fields still logs."""

from __future__ import annotations

import json
import logging

import pytest
from mlflow import MlflowClient

from dsm_tune.commands.ui import study_route, url_host
from dsm_tune.search.plots import write_pareto_plots
from dsm_tune.search.results import pareto_numbers, trials_frame, write_trials_csv
from dsm_tune.search.select import Rule, freeze_trial, pick_winner
from dsm_tune.search.tracking import PARENT_ATTR, MlflowTracker, trial_record
from dsm_tune.search.tracking.runs import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, FRONT_TABLE, SHARED_VIEW_PREFIX,
                                           front_view_key)
from tests.helpers.mlflow_helpers import copy_store, free_port, make_empty_store
from tests.helpers.synthetic_study import add_measured, create_study, make_config, populate

EXPERIMENT = "dsm-tune/dsm_tune_demo_vit/cpu"


@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    return make_empty_store(tmp_path_factory.mktemp("mlflow-front-template"))


def _with_intervals(study) -> None:
    """Measured trials with the evaluator's paired interval (a band around the drop, as the evaluator sets it)."""
    add_measured(study, make_config(0, 0, [0.0]), 0.0, 10.0, seed_kind="dense",
                 figures={"accuracy_drop_ci_low": 0.0, "accuracy_drop_ci_high": 0.0})
    for i, (drop, latency) in enumerate([(0.3, 8.0), (0.9, 6.5), (2.4, 5.0), (1.5, 7.9)]):
        add_measured(study, make_config(1 + i % 2, i % 2, [0.1 + 0.1 * i, 0.2]), drop, latency,
                     figures={"accuracy_drop_ci_low": drop - 0.4, "accuracy_drop_ci_high": drop + 0.45})


def _finish(tracker, study, study_dir, confirmed: dict[int, dict] | None = None, selection: dict | None = None):
    """The driver's end: trials.csv, plots, best.json, then end_study with every trial's record. `confirmed`:
    figures the driver adds to front candidates after the study ended (after their children were logged)."""
    df = write_trials_csv(study, study_dir / "trials.csv")
    write_pareto_plots(df, study_dir, 1.0)
    best = freeze_trial(study, pick_winner(df, Rule(), 1.0))
    best.to_json(study_dir / "best.json")
    if selection is not None:
        document = json.loads((study_dir / "best.json").read_text())
        document["selection"] = selection
        document["metrics"].update(confirmed_drop=0.41, confirmed_drop_ci_low=0.1, confirmed_drop_ci_high=0.72)
        (study_dir / "best.json").write_text(json.dumps(document))
    records = [trial_record(t) for t in study.trials]
    for record in records:
        record.update((confirmed or {}).get(record["number"], {}))
    tracker.refresh_artifacts(study_dir)
    tracker.end_study(pareto_numbers(df), records)
    return df


def _children(client, parent_id):
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              max_results=1000)
    return {int(r.data.tags["trial_number"]): r for r in runs}


def _table(client, run_id, tmp_path):
    path = client.download_artifacts(run_id, FRONT_TABLE, str(tmp_path))
    split = json.loads(open(path).read())
    return [dict(zip(split["columns"], row)) for row in split["data"]], split["columns"]


def test_a_new_experiment_opens_on_runs_with_the_studys_front_view(tmp_path, store_template):
    uri = copy_store(store_template, tmp_path)
    study, study_dir = create_study(tmp_path, "front.v2-a")   # a dot: not allowed in the view's key
    _with_intervals(study)
    tracker = MlflowTracker(out=tmp_path)
    tracker.start_study(study_dir, study.user_attrs, resumed=False)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

    envelope = json.loads(experiment.tags[SHARED_VIEW_PREFIX + "dsm-tune-front_v2-a"])
    assert envelope["name"] == "dsm-tune front: front.v2-a" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    charts = {c["yaxis"]["key"]: c for c in state["compareRunCharts"]}
    assert charts["accuracy_drop"]["type"] == "SCATTER" and charts["accuracy_drop"]["xaxis"]["key"] == "latency_ms"
    assert "confirmed_drop" in charts and state["runsHiddenMode"] == "SHOW_ALL"
    # The view's filter is one MLflow accepts, and it selects this study's trials (not the parent).
    for trial in study.trials:
        tracker.log_trial(trial_record(trial))
    matched = client.search_runs([experiment.experiment_id], filter_string=state["searchFilter"])
    assert len(matched) == len(study.trials)
    assert {r.data.tags["dsm_tune.role"] for r in matched} == {"trial"}


def test_a_reused_experiment_gets_the_kind_too(tmp_path, store_template):
    """An experiment made by an older dsm-tune (or by hand) has no kind tag: a study logging into it sets it; a
    resume through the stored parent run does as well."""
    uri = copy_store(store_template, tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    study, study_dir = create_study(tmp_path, "reused")
    first = MlflowTracker(out=tmp_path)
    parent_id = first.start_study(study_dir, study.user_attrs, resumed=False)
    assert client.get_run(parent_id).info.experiment_id == experiment_id
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    client.delete_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG)
    client.delete_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + front_view_key("reused"))
    second = MlflowTracker(out=tmp_path)
    assert second.start_study(study_dir, {**study.user_attrs, PARENT_ATTR: parent_id}, resumed=True) == parent_id
    tags = client.get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert SHARED_VIEW_PREFIX + front_view_key("reused") in tags


def test_parent_holds_the_front_as_table_and_image_and_children_the_intervals(tmp_path, store_template):
    uri = copy_store(store_template, tmp_path)
    study, study_dir = create_study(tmp_path, "front")
    _with_intervals(study)
    tracker = MlflowTracker(out=tmp_path)
    parent_id = tracker.start_study(study_dir, study.user_attrs, resumed=False)
    for trial in study.trials:
        tracker.log_trial(trial_record(trial))
    df = _finish(tracker, study, study_dir)
    client = MlflowClient(tracking_uri=uri)
    front = sorted(pareto_numbers(df))
    assert len(front) >= 3

    rows, columns = _table(client, parent_id, tmp_path / "dl")
    assert columns[:6] == ["trial", "speedup", "latency_ms", "accuracy_drop", "accuracy_drop_ci_low",
                           "accuracy_drop_ci_high"]
    assert {"within_limit", "start_layer", "hierarchy_depth", "num_stages", "config"} <= set(columns)
    assert not any(c.startswith("confirmed") for c in columns)   # nothing was confirmed in this study
    assert [r["trial"] for r in rows] == sorted(front, key=lambda n: study.trials[n].user_attrs["latency_ms"])
    by_trial = {r["trial"]: r for r in rows}
    for number in front:
        attrs = study.trials[number].user_attrs
        assert by_trial[number]["accuracy_drop_ci_high"] == pytest.approx(attrs["accuracy_drop_ci_high"])
        assert by_trial[number]["within_limit"] == (attrs["accuracy_drop"] <= 1.0)
        assert by_trial[number]["start_layer"] == attrs["config"]["merge"]["start_layer"]
    parent = client.get_run(parent_id)
    assert {"path": FRONT_TABLE, "type": "table"} in json.loads(parent.data.tags["mlflow.loggedArtifacts"])
    assert "pareto.png" in {a.path for a in client.list_artifacts(parent_id)}
    images = [a.path for a in client.list_artifacts(parent_id, "images")]
    assert any(p.startswith(f"images/pareto_front+step+{len(study.trials)}+") and p.endswith(".png")
               for p in images)
    assert "mlflow.loggedImages" in parent.data.tags   # what the run's charts show images by

    children = _children(client, parent_id)
    for number, child in children.items():
        attrs = study.trials[number].user_attrs
        assert child.data.metrics["accuracy_drop_ci_low"] == attrs["accuracy_drop_ci_low"]
        assert child.data.metrics["accuracy_drop_ci_high"] == attrs["accuracy_drop_ci_high"]
        assert {"accuracy_drop", "latency_ms", "speedup"} <= set(child.data.metrics)

    # A second end (`dsm-tune sync`, a resume) replaces the table (MLflow's log_table would append) and adds no
    # image at the same step.
    again = MlflowTracker(out=tmp_path)
    again.start_study(study_dir, {**study.user_attrs, PARENT_ATTR: parent_id}, resumed=True)
    again.end_study(pareto_numbers(df), [trial_record(t) for t in study.trials])
    assert [r["trial"] for r in _table(client, parent_id, tmp_path / "dl2")[0]] == [r["trial"] for r in rows]
    assert sorted(a.path for a in client.list_artifacts(parent_id, "images")) == sorted(images)


def test_confirmed_figures_posted_at_the_end_reach_children_logged_before(tmp_path, store_template):
    uri = copy_store(store_template, tmp_path)
    study, study_dir = create_study(tmp_path, "confirmed")
    _with_intervals(study)
    tracker = MlflowTracker(out=tmp_path)
    parent_id = tracker.start_study(study_dir, study.user_attrs, resumed=False)
    for trial in study.trials:
        tracker.log_trial(trial_record(trial))
    client = MlflowClient(tracking_uri=uri)
    assert not any("confirmed_drop" in c.data.metrics for c in _children(client, parent_id).values())

    confirmed = {1: {"confirmed_drop": 0.52, "confirmed_drop_ci_low": 0.2, "confirmed_drop_ci_high": 0.84,
                     "confirmed_num_images": 1600.0},
                 2: {"confirmed_drop": 1.31, "confirmed_drop_ci_low": 0.9, "confirmed_drop_ci_high": 1.7,
                     "confirmed_num_images": 1600.0}}
    selection = {"rule": "confirmed", "max_accuracy_drop": 1.0}
    _finish(tracker, study, study_dir, confirmed=confirmed, selection=selection)
    children = _children(client, parent_id)
    for number, figures in confirmed.items():
        for key, value in figures.items():
            assert children[number].data.metrics[key] == value, (number, key)
        # The search figures the child had stay as logged: one history point each.
        assert len(client.get_metric_history(children[number].info.run_id, "latency_ms")) == 1
    assert not any("confirmed_drop" in children[n].data.metrics for n in children if n not in confirmed)
    rows, columns = _table(client, parent_id, tmp_path / "dl")
    assert "confirmed_drop" in columns and "confirmed_num_images" in columns
    parent = client.get_run(parent_id)
    assert parent.data.tags["best_selection"] == "confirmed"
    assert parent.data.metrics["best_confirmed_drop"] == 0.41
    assert parent.data.metrics["best_confirmed_drop_ci_high"] == 0.72

    # A later confirmation of the same trial (a resumed study confirming again) becomes the child's latest value.
    again = MlflowTracker(out=tmp_path)
    again.start_study(study_dir, {**study.user_attrs, PARENT_ATTR: parent_id}, resumed=True)
    records = [trial_record(t) for t in study.trials]
    for record in records:
        record.update(confirmed.get(record["number"], {}))
    records[1]["confirmed_drop"] = 0.47
    again.end_study(pareto_numbers(trials_frame(study)), records)
    child = client.get_run(children[1].info.run_id)
    assert child.data.metrics["confirmed_drop"] == 0.47
    assert child.data.metrics["confirmed_drop_ci_low"] == 0.2


def test_confirmations_held_back_by_an_outage_reach_the_children_on_resume(tmp_path, store_template,
                                                                            monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = copy_store(store_template, tmp_path / "store")
    study, study_dir = create_study(tmp_path, "late")
    _with_intervals(study)
    live = MlflowTracker(uri=uri, out=tmp_path)
    parent_id = live.start_study(study_dir, study.user_attrs, resumed=False)
    for trial in study.trials:
        live.log_trial(trial_record(trial))
    # The store goes away before the study ends: the confirmation is queued with every record.
    dead = MlflowTracker(uri=f"http://127.0.0.1:{free_port()}", out=tmp_path, retry_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="dsm_tune.search.tracking"):
        dead.start_study(study_dir, {**study.user_attrs, PARENT_ATTR: parent_id}, resumed=True)
        records = [trial_record(t) for t in study.trials]
        records[2].update(confirmed_drop=0.95, confirmed_num_images=800.0)
        dead.end_study([0, 1, 2], records)
    resumed = MlflowTracker(uri=uri, out=tmp_path)
    resumed.start_study(study_dir, {**study.user_attrs, PARENT_ATTR: parent_id}, resumed=True)
    child = _children(MlflowClient(tracking_uri=uri), parent_id)[2]
    assert child.data.metrics["confirmed_drop"] == 0.95 and child.data.metrics["confirmed_num_images"] == 800.0


def test_an_old_study_without_the_new_fields_logs_as_before(tmp_path, store_template):
    uri = copy_store(store_template, tmp_path)
    study, study_dir = create_study(tmp_path, "old")
    populate(study)   # no intervals, no confirmation, best.json without `selection`
    tracker = MlflowTracker(out=tmp_path)
    parent_id = tracker.start_study(study_dir, study.user_attrs, resumed=False)
    for trial in study.trials:
        tracker.log_trial(trial_record(trial))
    df = _finish(tracker, study, study_dir)
    client = MlflowClient(tracking_uri=uri)
    children = _children(client, parent_id)
    assert len(children) == len(study.trials)
    assert not any(k.endswith(("_ci_low", "_ci_high")) or k.startswith("confirmed")
                   for c in children.values() for k in c.data.metrics)
    rows, columns = _table(client, parent_id, tmp_path / "dl")
    assert columns[:4] == ["trial", "speedup", "latency_ms", "accuracy_drop"]
    assert not any("ci_" in c or c.startswith("confirmed") for c in columns)
    assert sorted(r["trial"] for r in rows) == sorted(pareto_numbers(df))
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and "best_selection" not in parent.data.tags
    assert "best_speedup" in parent.data.metrics


def test_ui_prints_the_route_of_the_studys_runs_and_charts(tmp_path, store_template):
    uri = copy_store(store_template, tmp_path)
    for name in ("first", "second"):
        study, study_dir = create_study(tmp_path, name)
        MlflowTracker(out=tmp_path).start_study(study_dir, study.user_attrs, resumed=False)
    experiment_id = MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT).experiment_id
    route = study_route(uri, None)   # the latest study
    assert route == (f"/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"
                     f"&viewStateShareKey={front_view_key('second')}")
    assert study_route(uri, "first").endswith(f"viewStateShareKey={front_view_key('first')}")
    assert study_route(uri, "nowhere") == study_route(uri, "it's") == "/"
    empty = copy_store(store_template, tmp_path / "empty")
    assert study_route(empty, None) == "/"
    assert url_host("0.0.0.0") == "127.0.0.1" and url_host("127.0.0.1") == "127.0.0.1"
