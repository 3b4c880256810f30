"""`run --no-ray`: the study driver with its one evaluator in the driver's own process, Ray never imported.

Studies run in subprocesses whose `import ray` fails (the GPU host this is for has no Ray), so that a stray import
anywhere on the driver path fails the test; they are stopped with SIGINT and SIGKILL mid-trial, and a config that
ends the process (the stand-in's `die_on`, an `os._exit`) costs only its own trial.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from dsm_tune.cli import main as cli_main
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.results import load_study
from dsm_tune.search.space import SPACES_DIR, load_space
from dsm_tune.search.strategies import replay_attrs
from dsm_tune.search.study import StudyError, StudySpec, run_study
from dsm_tune.record import IN_PROCESS as IN_PROCESS_ATTR
from dsm_tune.record import KILLED_PROCESS as KILLED_PROCESS_ATTR
from dsm_tune.record import PROCESS_DEATHS as PROCESS_DEATHS_ATTR
from dsm_tune.search.study.tell import EVALUATED, EVALUATING, MAX_PROCESS_DEATHS, recover_stale
from dsm_tune.search.testing import StandInFactory
from tests.helpers.synthetic_study import create_study

DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
SAMPLED_DEMO = SPACES_DIR / "sampled" / "demo.yaml"
SETTLED = (TrialState.COMPLETE, TrialState.PRUNED)

# One study run in a fresh interpreter: argv[1] is {"spec": ..., "factory": ..., "block_ray": ...}. The last line
# says whether Ray got imported (with block_ray, any `import ray` raises instead).
# The driver as a terminal runs it: SIGINT raises KeyboardInterrupt even where the test runner was started with
# SIGINT ignored (a background job, as CI may be), which the child would otherwise inherit and so never stop.
DRIVER = """
import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
args = json.loads(sys.argv[1])
if args["block_ray"]:
    sys.modules["ray"] = None
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.study import StudySpec, run_study
from dsm_tune.search.testing import StandInFactory
factory = StandInFactory(ModelFingerprint.from_dict(args["fingerprint"]), **args["factory"])
result = run_study(StudySpec(**args["spec"]), evaluator_factory=factory, stream=sys.stdout)
print("RESULT " + json.dumps({"ray_imported": sys.modules.get("ray") is not None, "interrupted": result.interrupted,
                              "measured_now": result.trials_measured_now, "done": result.trials_done}), flush=True)
sys.exit(130 if result.interrupted else 0)
"""


def _spec(tmp_path: Path, **changes) -> dict:
    fields = dict(model="demo", target="cpu", trials=10, workers=1, out=str(tmp_path), mlflow=False,
                  max_accuracy_drop=0.5, space=str(SAMPLED_DEMO), no_ray=True, study="inproc")
    fields.update(changes)
    return fields


def _start(spec: dict, block_ray: bool = True, **factory) -> subprocess.Popen:
    args = json.dumps({"spec": spec, "factory": factory, "block_ray": block_ray, "fingerprint": DEMO.to_dict()})
    log = open(Path(spec["out"]) / f"driver-{time.monotonic_ns()}.log", "w+")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen([sys.executable, "-c", DRIVER, args], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=spec["out"])
    process.log = log
    return process


def _finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, dict | None]:
    code = process.wait(timeout=timeout)
    process.log.seek(0)
    output = process.log.read()
    process.log.close()
    results = [line for line in output.splitlines() if line.startswith("RESULT ")]
    return code, output, json.loads(results[-1][len("RESULT "):]) if results else None


def _run(spec: dict, block_ray: bool = True, **factory) -> tuple[int, str, dict | None]:
    return _finish(_start(spec, block_ray, **factory))


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, "the study ended before it could be stopped mid-trial"
        time.sleep(0.05)
    raise AssertionError(f"{path} never got {count} lines")


def _study(spec: dict) -> optuna.Study:
    return load_study(Path(spec["out"]) / spec["study"])


def _kept(study: optuna.Study) -> dict[int, tuple]:
    return {t.number: (t.params, t.values, t.state) for t in study.get_trials() if t.state in SETTLED}


def _seed_key(kind: str) -> str:
    space = load_space(SAMPLED_DEMO, "demo", DEMO)
    return next(seed.config.key() for seed in space.seeds() if seed.kind == kind)


@pytest.mark.slow
def test_a_no_ray_study_gives_what_a_ray_study_gives_without_importing_ray(tmp_path):
    # Without the import blocked: nothing on the --no-ray path even tries to import Ray.
    spec = _spec(tmp_path, trials=8)
    code, output, result = _run(spec, block_ray=False, cost_s=0.01)
    assert code == 0, output
    assert result == {"ray_imported": False, "interrupted": False, "measured_now": result["measured_now"],
                      "done": 8}
    assert "in-process, no Ray" in output
    # The same study on Ray (one worker, same seed): the same trials, figures and files.
    from dsm_tune.search.workers import start_ray, stop_ray

    started = start_ray(None, num_cpus=2)
    try:
        on_ray = run_study(StudySpec(**{**spec, "no_ray": False, "study": "onray"}),
                           evaluator_factory=StandInFactory(DEMO, cost_s=0.01), stream=io.StringIO())
    finally:
        stop_ray(started)
    inproc_dir, ray_dir = tmp_path / "inproc", on_ray.study_dir
    def files(folder):   # SQLite's journal files exist while this process still holds the storage open
        return {p.name for p in folder.iterdir() if not p.name.startswith("study.db-")}

    assert files(inproc_dir) == files(ray_dir)
    assert {"study.db", "trials.csv", "best.json", "spec.json", "space.yaml"} <= {p.name for p in inproc_dir.iterdir()}
    inproc, ray = _study(spec), load_study(ray_dir)

    def trials(study):
        return [(t.number, t.state, t.params, t.values, t.user_attrs.get("accuracy_drop"),
                 t.user_attrs.get("speedup"), t.user_attrs.get("worker")) for t in study.get_trials()]

    assert trials(inproc) == trials(ray)
    assert len([t for t in inproc.get_trials() if t.state in SETTLED]) == 8
    measured = [t for t in inproc.get_trials() if t.state in SETTLED and "duplicate_of" not in t.user_attrs]
    assert measured and all(t.user_attrs[IN_PROCESS_ATTR] == EVALUATED for t in measured)
    assert not any(IN_PROCESS_ATTR in t.user_attrs for t in ray.get_trials())
    assert inproc.user_attrs["spec"]["no_ray"] is True and ray.user_attrs["spec"]["no_ray"] is False
    columns = set(pd.read_csv(inproc_dir / "trials.csv").columns) - set(pd.read_csv(ray_dir / "trials.csv").columns)
    assert columns == {IN_PROCESS_ATTR}
    best = [json.loads((d / "best.json").read_text()) for d in (inproc_dir, ray_dir)]
    assert best[0]["merge"] == best[1]["merge"] and best[0]["metrics"]["speedup"] == best[1]["metrics"]["speedup"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "kill-9"])
def test_resume_after_the_process_is_stopped_mid_trial_loses_no_finished_trial(tmp_path, stop):
    spec = _spec(tmp_path)
    started = tmp_path / "started.log"
    process = _start(spec, cost_s=0.4, started_log=str(started))
    _wait_for_lines(started, 4, process)   # the 4th evaluation is running
    time.sleep(0.1)
    process.send_signal(stop)
    code, output, result = _finish(process)
    study = _study(spec)
    before = _kept(study)
    assert len(before) >= 3
    stopped = [t for t in study.get_trials() if t.user_attrs.get("config_key") == started.read_text().split()[-1]
               and t.state not in SETTLED]
    assert len(stopped) == 1 and stopped[0].user_attrs[IN_PROCESS_ATTR] == EVALUATING
    if stop == signal.SIGINT:
        # As with Ray: the running trial failed and queued again, the outputs written, exit code 130.
        assert code == 130 and result["interrupted"] and result["ray_imported"] is False, output
        assert stopped[0].state == TrialState.FAIL and "interrupted" in stopped[0].user_attrs["fail_reason"]
        # The running trial and the one asked ahead for it; only the running one was being evaluated.
        assert "2 unfinished trial(s) marked failed and queued again" in output
        unfinished = [t for t in study.get_trials() if t.state == TrialState.FAIL]
        assert len(unfinished) == 2 and [t.user_attrs.get(IN_PROCESS_ATTR) for t in unfinished].count(EVALUATING) == 1
        assert len(pd.read_csv(tmp_path / "inproc" / "trials.csv")) == len(study.trials)
    else:
        assert code == -signal.SIGKILL and result is None
        assert stopped[0].state == TrialState.RUNNING   # nothing could tell it

    code, output, result = _run(spec, cost_s=0.01)
    assert code == 0 and result["ray_imported"] is False, output
    study = _study(spec)
    after = _kept(study)
    assert len(after) == 10 and all(after[n] == v for n, v in before.items())
    assert result["measured_now"] <= 10 - len(before)
    # The stopped trial cost nothing: its config was measured on resume.
    redo = [t for t in study.get_trials() if t.user_attrs.get("requeued_from") == stopped[0].number]
    assert len(redo) == 1 and redo[0].state in SETTLED and redo[0].params == stopped[0].params
    # A user's kill -9 looks like a crash to the resume: counted once, but not held against the config yet.
    expected_deaths = 1 if stop == signal.SIGKILL else None
    assert redo[0].user_attrs.get(PROCESS_DEATHS_ATTR) == expected_deaths
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in study.get_trials())


@pytest.mark.slow
def test_a_config_that_ends_the_process_costs_only_its_trial(tmp_path):
    victim = _seed_key("tome")
    spec = _spec(tmp_path, trials=8)
    started = tmp_path / "started.log"
    factory = dict(cost_s=0.01, die_on=(victim,), started_log=str(started))
    code, output, _ = _run(spec, **factory)
    assert code == 1, output   # the stand-in's os._exit(1) took the driver along
    before = _kept(_study(spec))
    # Resumed: a plain kill -9 cannot be told from a crash, so the config is tried once more; it ends the process
    # again, and the third run fails it for good and completes the budget.
    code, output, _ = _run(spec, **factory)
    assert code == 1, output
    code, output, result = _run(spec, **factory)
    assert code == 0 and result["ray_imported"] is False, output
    assert "failed, not measured again" in output
    assert started.read_text().split().count(victim) == MAX_PROCESS_DEATHS
    study = _study(spec)
    after = _kept(study)
    assert len(after) == 8 and all(after[n] == v for n, v in before.items())
    tried = [t for t in study.get_trials() if t.user_attrs.get("config_key") == victim]
    assert [t.state for t in tried] == [TrialState.FAIL] * MAX_PROCESS_DEATHS
    assert [t.user_attrs[PROCESS_DEATHS_ATTR] for t in tried] == [1, 2]
    assert tried[0].user_attrs.get("queued_again") and not tried[1].user_attrs.get("queued_again")
    assert tried[1].user_attrs[KILLED_PROCESS_ATTR] is True
    assert "ended 2 times while evaluating this config in-process" in tried[1].user_attrs["fail_reason"]
    # The other failures are the trials asked ahead of each crash (never evaluated): queued again until measured.
    victims = {t.number for t in tried}
    others = [t for t in study.get_trials() if t.state == TrialState.FAIL and t.number not in victims]
    assert len(others) <= 2 and all(IN_PROCESS_ATTR not in t.user_attrs for t in others)
    copy_of = {t.user_attrs["requeued_from"]: t for t in study.get_trials() if "requeued_from" in t.user_attrs}
    for trial in others:
        while trial.state == TrialState.FAIL:
            trial = copy_of[trial.number]
        assert trial.state in SETTLED
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in study.get_trials())

    # The sampler proposing the same plan again (here: queued by hand) is not evaluated again (it would crash
    # the study once per proposal): it is settled as not measured.
    study.enqueue_trial(dict(tried[0].params), user_attrs=replay_attrs(tried[0].params))
    code, output, result = _run({**spec, "trials": 9}, **factory)
    assert code == 0, output
    again = [t for t in _study(spec).get_trials() if t.user_attrs.get("config_key") == victim][-1]
    assert again.state == TrialState.PRUNED and f"same plan as trial {tried[1].number}" in again.user_attrs[
        "fail_reason"]
    assert started.read_text().split().count(victim) == MAX_PROCESS_DEATHS


def test_recover_stale_requeues_once_then_fails_a_config_that_ended_the_process():
    study = optuna.create_study(directions=["minimize", "minimize"])
    storage = study._storage
    plain, marked, marked_again, unmarked_after_death, evaluated = (study.ask() for _ in range(5))
    for number, trial in enumerate((plain, marked, marked_again, unmarked_after_death, evaluated)):
        trial.suggest_int("start_layer", number, number)
    marked.set_user_attr(IN_PROCESS_ATTR, EVALUATING)
    marked_again.set_user_attr(IN_PROCESS_ATTR, EVALUATING)
    marked_again.set_user_attr(PROCESS_DEATHS_ATTR, 1)
    unmarked_after_death.set_user_attr(PROCESS_DEATHS_ATTR, 1)   # asked ahead, never evaluated: no new death
    evaluated.set_user_attr(IN_PROCESS_ATTR, EVALUATED)   # stopped between its evaluation and its tell
    assert recover_stale(study, storage) == 4
    trials = study.get_trials()
    assert [t.state for t in trials[:5]] == [TrialState.FAIL] * 5
    assert trials[2].user_attrs[KILLED_PROCESS_ATTR] is True and PROCESS_DEATHS_ATTR not in trials[0].user_attrs
    assert "ended 2 times" in trials[2].user_attrs["fail_reason"]
    queued = {t.user_attrs["requeued_from"]: t for t in trials[5:]}
    assert sorted(queued) == [0, 1, 3, 4] and all(t.state == TrialState.WAITING for t in queued.values())
    assert [queued[n].user_attrs.get(PROCESS_DEATHS_ATTR) for n in (0, 1, 3, 4)] == [None, 1, 1, None]
    assert queued[1].system_attrs["fixed_params"] == {"start_layer": 1}


def test_the_flag_and_its_errors(tmp_path, capsys):
    for extra, message in ((["--workers", "2"], "--no-ray evaluates in the driver's own process, one trial at a "
                                                "time: it cannot run --workers 2 (several workers need Ray)"),
                           (["--ray-address", "auto"], "--no-ray runs without Ray: it cannot join the Ray cluster "
                                                       "at --ray-address auto")):
        code = cli_main(["run", "--model", "demo", "--no-ray", "--out", str(tmp_path), "--no-mlflow", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err == f"dsm-tune: error: {message}\n"
        assert not (tmp_path / "demo-cpu").exists()
    with pytest.raises(StudyError, match="cannot run --workers 3"):
        StudySpec(model="demo", no_ray=True, workers=3)
    from dsm_tune.commands.run import build_spec
    from dsm_tune.cli import build_parser

    def spec_of(*argv):
        return build_spec(build_parser().parse_args(["run", "--out", str(tmp_path), *argv]))

    assert spec_of("--model", "demo").no_ray is False
    fresh = spec_of("--model", "demo", "--no-ray")
    assert fresh.no_ray is True and fresh.workers == 1
    # Resumes: --no-ray is a budget field; it sticks to the study until --ray.
    create_study(tmp_path, "on-ray", workers=2, ray_address="auto")
    resumed = spec_of("--study", "on-ray", "--no-ray")
    assert (resumed.no_ray, resumed.workers, resumed.ray_address) == (True, 1, None)
    create_study(tmp_path, "no-ray", no_ray=True)
    assert spec_of("--study", "no-ray").no_ray is True
    assert spec_of("--study", "no-ray", "--workers", "1").no_ray is True
    with pytest.raises(StudyError, match=r"^study 'no-ray' runs without Ray \(it was run with --no-ray\): give --ray "
                                         r"to resume it with --workers 3$"):
        spec_of("--study", "no-ray", "--workers", "3")
    back = spec_of("--study", "no-ray", "--ray", "--workers", "3")
    assert (back.no_ray, back.workers) == (False, 3)
    with pytest.raises(StudyError, match="cannot run --workers 2"):
        spec_of("--study", "on-ray", "--no-ray", "--workers", "2")
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    assert "--no-ray" in capsys.readouterr().out


@pytest.mark.slow
def test_dsm_tune_run_no_ray_on_the_demo_model(tmp_path):
    """The real evaluator in-process through the CLI, in an interpreter that cannot import Ray."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from dsm_tune.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "run", "--model", "demo", "--device", "cpu", "--trials", "3",
                           "--no-ray", "--no-mlflow", "--limit", "32", "--batch-size", "8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    study = load_study(tmp_path / "demo-cpu")
    finished = [t for t in study.get_trials() if t.state in SETTLED]
    assert len(finished) == 3 and study.user_attrs["spec"]["no_ray"] is True
    measured = [t for t in finished if "duplicate_of" not in t.user_attrs]
    assert all(t.user_attrs[IN_PROCESS_ATTR] == EVALUATED and t.user_attrs["num_images"] == 32 for t in measured)
    from dsm_tune.merging import load_config

    assert len(pd.read_csv(tmp_path / "demo-cpu" / "trials.csv")) == len(study.trials)
    # best.json is the default rule's winner; there may be none (a loaded host flags every timing noisy).
    from dsm_tune.search.results import trials_frame
    from dsm_tune.search.select import NoWinnerError, Rule, pick_winner

    try:
        winner = pick_winner(trials_frame(study), Rule(), 1.0)
    except NoWinnerError:
        assert not (tmp_path / "demo-cpu" / "best.json").exists()
    else:
        best = load_config(tmp_path / "demo-cpu" / "best.json")
        assert best.provenance["trial"] == winner and best.metrics["accuracy_drop"] <= 1.0
