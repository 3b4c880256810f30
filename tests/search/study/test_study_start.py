"""Starting and finishing a study without workers: bad inputs fail in the driver before Ray starts and leave no
study folder behind; a study being created reads as busy; queued MLflow records reach MLflow on a resume whose
budget is spent and through `dsm-tune sync`."""

from __future__ import annotations

import io
import json

import pytest
import torch
from filelock import FileLock
from mlflow import MlflowClient

import dsm_tune.search.study.driver as study_module
from dsm_tune.cli import main as cli_main
from dsm_tune.errors import DSMTuneError
from dsm_tune.search.folder import PENDING_FILE
from dsm_tune.search.space import SPACES_DIR
from dsm_tune.search.study import StudyError, StudySpec, resume_spec, run_study
from dsm_tune.search.tracking import PARENT_ATTR, MlflowTracker, trial_record
from tests.helpers.mlflow_helpers import copy_store, free_port, make_empty_store
from tests.helpers.synthetic_study import create_study, populate

SAMPLED_DEMO = SPACES_DIR / "sampled" / "demo.yaml"


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the driver gets as far as starting Ray."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was found")

    monkeypatch.setattr(study_module, "start_ray", refuse)


def _start(tmp_path, **fields):
    log = io.StringIO()
    for out in (tmp_path, tmp_path / "new-out"):
        spec = StudySpec(**{"model": "demo", "target": "cpu", "trials": 2, "out": out, "mlflow": False,
                            "study": "bad", **fields})
        with pytest.raises(DSMTuneError) as caught:
            run_study(spec, stream=log)
    assert "starting study" not in log.getvalue(), "the study was announced before its inputs were checked"
    assert not (tmp_path / "bad").exists(), "a failed start leaves no study folder (not even one with a .lock)"
    assert not (tmp_path / "new-out").exists(), "nor the --out folder it created"
    return str(caught.value)


def test_unknown_model_fails_in_the_driver(tmp_path, no_ray):
    assert "unknown model 'vit_nonexistent'" in _start(tmp_path, model="vit_nonexistent")


def test_unknown_target_fails_in_the_driver(tmp_path, no_ray):
    assert "unknown target 'tpu9'" in _start(tmp_path, target="tpu9")


def test_checkpoint_that_does_not_fit_fails_in_the_driver(tmp_path, no_ray):
    from dsm_tune.evaluation.models import build_model

    checkpoint = tmp_path / "demo.pt"
    torch.save(build_model("demo").state_dict(), checkpoint)
    message = _start(tmp_path, model="vit_tiny", checkpoint=str(checkpoint), data=str(tmp_path))
    assert f"checkpoint {checkpoint} does not fit vit_tiny_patch16_224" in message
    missing = tmp_path / "missing.pt"
    assert f"checkpoint {missing} does not exist" in _start(tmp_path, checkpoint=str(missing))


def test_missing_data_and_no_data_fail_in_the_driver(tmp_path, no_ray):
    assert f"data folder {tmp_path / 'nowhere'} does not exist" in _start(tmp_path, data=str(tmp_path / "nowhere"))
    assert "has no evaluation data" in _start(tmp_path, model="vit_tiny")


def test_space_that_does_not_fit_the_model_fails_in_the_driver(tmp_path, no_ray):
    space = tmp_path / "wide.yaml"
    space.write_text("start_layer: [0, 12]\n")
    assert "leaves no block to merge in this 6-block model" in _start(tmp_path, space=str(space))


def test_a_study_being_created_is_busy_not_missing(tmp_path, capsys):
    folder = tmp_path / "starting"
    folder.mkdir()
    with FileLock(str(folder / ".lock")):   # another process between taking the lock and creating study.db
        with pytest.raises(StudyError, match="is busy: another dsm-tune process is starting it"):
            resume_spec(tmp_path, "starting")
        assert cli_main(["report", "--study", "starting", "--out", str(tmp_path)]) == 2
        assert "is busy" in capsys.readouterr().err
        assert cli_main(["export", "--study", "starting", "--out", str(tmp_path), "-o", str(tmp_path / "x.json")]) == 2
        assert "is busy" in capsys.readouterr().err
    # Once nobody holds the lock, an empty folder is simply no study.
    with pytest.raises(StudyError, match="no study at"):
        resume_spec(tmp_path, "starting")


@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    return make_empty_store(tmp_path_factory.mktemp("mlflow-template"))


def _study_logged_while_mlflow_was_down(tmp_path, monkeypatch, name):
    """A finished study (budget spent) whose trials the tracker could only queue."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    study, study_dir = create_study(tmp_path, name, trials=10, space=str(SAMPLED_DEMO), batch_size=None, dtype=None,
                                    compile=None, checkpoint=None, pretrained=False)
    populate(study)
    (study_dir / "space.yaml").write_text(SAMPLED_DEMO.read_text())
    dead = MlflowTracker(uri=f"http://127.0.0.1:{free_port()}", out=tmp_path, retry_interval_s=0)
    dead.start_study(study_dir, study.user_attrs, resumed=False)
    for trial in study.trials:
        dead.log_trial(trial_record(trial))
    queued = [json.loads(line)["number"] for line in (study_dir / PENDING_FILE).read_text().splitlines()]
    assert queued == [t.number for t in study.trials]
    return study, study_dir


def _children(uri):
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("dsm-tune/dsm_tune_demo_vit/cpu")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return sorted(int(r.data.tags["trial_number"]) for r in runs if r.data.tags.get("dsm_tune.role") == "trial"), \
        [r for r in runs if r.data.tags.get("dsm_tune.role") == "study"]


def test_a_resume_with_the_budget_spent_delivers_the_queue(tmp_path, monkeypatch, store_template, no_ray):
    study, study_dir = _study_logged_while_mlflow_was_down(tmp_path, monkeypatch, "spent")
    uri = copy_store(store_template, tmp_path / "store")
    log = io.StringIO()
    result = run_study(resume_spec(tmp_path, "spent"), tracker=MlflowTracker(uri=uri, out=tmp_path), stream=log)
    assert result.trials_measured_now == 0 and "already spent" in log.getvalue()
    numbers, parents = _children(uri)
    assert numbers == [t.number for t in study.trials] and not (study_dir / PENDING_FILE).exists()
    # The driver, the storage's only writer, kept the run the tracker opened.
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    from dsm_tune.search.results import load_study

    assert load_study(study_dir).user_attrs[PARENT_ATTR] == parents[0].info.run_id


def test_sync_delivers_the_queue_without_running_anything(tmp_path, monkeypatch, store_template, capsys):
    study, study_dir = _study_logged_while_mlflow_was_down(tmp_path, monkeypatch, "synced")
    dead_uri = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["sync", "--study", "synced", "--out", str(tmp_path), "--mlflow-uri", dead_uri]) == 1
    assert "stay queued" in capsys.readouterr().out and (study_dir / PENDING_FILE).exists()
    uri = copy_store(store_template, tmp_path / "store")
    assert cli_main(["sync", "--study", "synced", "--out", str(tmp_path), "--mlflow-uri", uri]) == 0
    numbers, parents = _children(uri)
    assert numbers == [t.number for t in study.trials] and not (study_dir / PENDING_FILE).exists()
    assert len(parents) == 1


@pytest.mark.slow
def test_library_notices_go_to_the_study_log_not_the_terminal(tmp_path, capfd):
    """MLflow's database migrations (a fresh store) and Ray's token notice stay out of the user's terminal."""
    from dsm_tune.merging import ModelFingerprint
    from dsm_tune.search.testing import StandInFactory
    from dsm_tune.search.workers import stop_ray

    import ray

    assert not ray.is_initialized()   # this run starts (and stops) its own Ray, as `dsm-tune run` does
    fingerprint = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
    spec = StudySpec(model="demo", target="cpu", trials=2, workers=1, out=tmp_path, study="quiet",
                     space=str(SAMPLED_DEMO), mlflow_uri=f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}")
    (tmp_path / "fresh").mkdir()
    try:
        run_study(spec, evaluator_factory=StandInFactory(fingerprint), stream=io.StringIO())
    finally:
        stop_ray(ray.is_initialized())
    terminal = capfd.readouterr()
    said = terminal.out + terminal.err
    log = (tmp_path / "quiet" / "run.log").read_text()
    assert "Creating initial MLflow database tables" in log and "Creating initial MLflow" not in said
    assert "Token authentication is enabled" not in said
