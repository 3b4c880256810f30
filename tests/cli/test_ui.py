"""`dsm-tune ui`: the MLflow server over the project's store on loopback, queried through its REST API; and a
tracking server that comes back after being down receives everything that was queued."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dsm_tune.cli import main as cli_main
from dsm_tune.commands.ui import ui_command
from dsm_tune.search.results import pareto_numbers, trials_frame
from dsm_tune.search.folder import PENDING_FILE
from dsm_tune.search.tracking import MlflowTracker, trial_record
from tests.helpers.mlflow_helpers import free_port, make_empty_store, rest, running_server
from tests.helpers.synthetic_study import create_study, populate


def test_ui_command_is_an_argument_list_bound_to_loopback(tmp_path):
    command = ui_command(f"sqlite:///{tmp_path}/mlflow.db", "127.0.0.1", 5123)
    assert command[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5123"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert command[command.index("--artifacts-destination") + 1] == (tmp_path / "mlartifacts").as_uri()
    assert "--artifacts-destination" not in ui_command("postgresql://db/mlflow", "127.0.0.1", 5000)


# `dsm-tune ui` as a terminal or a supervisor runs it: SIGINT raises KeyboardInterrupt even where the test runner
# was started with SIGINT ignored (a background job), which the child would otherwise inherit.
_DSM_TUNE = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from dsm_tune.cli import main; sys.exit(main(sys.argv[1:]))")


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT leftovers do not count
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_ui_takes_the_server_down_and_frees_the_port(tmp_path, stop_signal):
    """A signal to the `dsm-tune ui` process alone (a supervisor's kill, a container stop) stops `mlflow ui` and
    its uvicorn worker too."""
    make_empty_store(tmp_path / "runs")
    port = free_port()
    on_port = f"--port {port} "   # in the command lines of dsm-tune ui, mlflow ui and uvicorn alike
    command = [sys.executable, "-c", _DSM_TUNE, "ui", "--out", str(tmp_path / "runs"), "--port", str(port)]
    try:
        with running_server(command, port, tmp_path / "ui.log") as ui:
            servers = set(_processes_mentioning(on_port)) - {ui.pid}
            assert len(servers) >= 2   # mlflow ui and its uvicorn, beside dsm-tune ui
            ui.send_signal(stop_signal)
            assert ui.wait(timeout=60) == 0
        assert not _listening(port)
        assert set(_processes_mentioning(on_port)) & servers == set()
    finally:
        for pid in _processes_mentioning(on_port):   # only what this test started, should it have failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_ui_refusals_and_remote_store(tmp_path, capsys):
    assert cli_main(["ui", "--out", str(tmp_path)]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert cli_main(["ui", "--out", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    assert cli_main(["ui", "--mlflow-uri", "http://127.0.0.1:5555"]) == 0
    assert "serves its own UI" in capsys.readouterr().out


@pytest.mark.slow
def test_ui_serves_the_studies_over_rest(tmp_path):
    """A real `mlflow ui` (as `dsm-tune ui` starts it) over a store the tracker wrote."""
    uri = f"sqlite:///{make_empty_store(tmp_path / 'runs').resolve()}"  # where the tracker's default store is
    study, study_dir = create_study(tmp_path / "runs", "served")
    populate(study)
    tracker = MlflowTracker(out=tmp_path / "runs")
    parent_id = tracker.start_study(study_dir, study.user_attrs, resumed=False)
    for trial in study.trials:
        tracker.log_trial(trial_record(trial))
    df = trials_frame(study)
    tracker.end_study(pareto_numbers(df))

    port = free_port()
    with running_server(ui_command(uri, "127.0.0.1", port), port, tmp_path / "server.log"):
        experiments = rest(port, "experiments/search", {"max_results": 100})["experiments"]
        ours = [e for e in experiments if e["name"] == "dsm-tune/dsm_tune_demo_vit/cpu"]
        assert len(ours) == 1
        experiment_id = ours[0]["experiment_id"]
        runs = rest(port, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})["runs"]
        assert len(runs) == 1 + len(study.trials)
        front = rest(port, "runs/search", {"experiment_ids": [experiment_id],
                                           "filter": "tags.pareto = 'true'"})["runs"]
        numbers = sorted(int(next(t["value"] for t in r["data"]["tags"] if t["key"] == "trial_number"))
                         for r in front)
        assert numbers == sorted(pareto_numbers(df))
        parent = rest(port, f"runs/get?run_id={parent_id}")["run"]
        assert parent["info"]["status"] == "FINISHED"


@pytest.mark.slow
def test_a_server_that_comes_back_receives_the_queued_trials(tmp_path, monkeypatch, caplog):
    """Trials measured while the team's tracking server is down are logged once it answers again."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    study, study_dir = create_study(tmp_path, "outage")
    populate(study)
    port = free_port()
    tracker = MlflowTracker(uri=f"http://127.0.0.1:{port}", out=tmp_path, retry_interval_s=0)
    with caplog.at_level(logging.WARNING, logger="dsm_tune.search.tracking"):
        assert tracker.start_study(study_dir, study.user_attrs, resumed=False) is None
        for trial in study.trials[:6]:
            tracker.log_trial(trial_record(trial))
    assert len((study_dir / PENDING_FILE).read_text().splitlines()) == 6

    server_store = f"sqlite:///{tmp_path / 'server.db'}"  # the server creates it
    with running_server(ui_command(server_store, "127.0.0.1", port), port, tmp_path / "server.log"):
        for trial in study.trials[6:]:
            tracker.log_trial(trial_record(trial))  # the first of these flushes the queue
        assert not (study_dir / PENDING_FILE).exists()
        (study_dir / "trials.csv").write_text("number\n0\n")
        tracker.end_study(pareto_numbers(trials_frame(study)))

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("dsm-tune/dsm_tune_demo_vit/cpu")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        children = [r for r in runs if r.data.tags.get("dsm_tune.role") == "trial"]
        assert sorted(int(r.data.tags["trial_number"]) for r in children) == list(range(len(study.trials)))
        by_number = {int(r.data.tags["trial_number"]): r for r in children}
        assert by_number[2].data.metrics["latency_ms"] == study.trials[2].user_attrs["latency_ms"]
        parent = client.get_run(tracker.parent_run_id)
        assert parent.info.status == "FINISHED"
        # Artifacts go through the server's proxy into its own artifact folder.
        assert "trials.csv" in {a.path for a in client.list_artifacts(tracker.parent_run_id)}
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    # The run id is the driver's to store (a pure consumer never writes the study storage).
    assert isinstance(tracker.parent_run_id, str) and "mlflow_parent_run_id" not in study.user_attrs
