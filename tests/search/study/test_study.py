"""The study driver end to end on Ray (loopback), with the fixed-cost stand-in evaluator where the point is the
orchestration: budgets, resume after a kill, worker deaths, Ctrl-C, duplicates, constraints, seeds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.folder import StudyFolder
from dsm_tune.search.results import load_study, pareto_numbers, trials_frame
from dsm_tune.search.space import SPACES_DIR, load_space
from dsm_tune.search.study import StudyError, StudySpec, run_study
from dsm_tune.search.testing import StandInFactory
from dsm_tune.search.workers import start_ray, stop_ray

DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
COST_S = 0.02
SEED_KINDS = {"dense", "tome", "paper"}
# These tests drive the sampled space (Optuna samples every stage's ratio); the traced default space is driven in
# test_traced_study.py.
SAMPLED_DEMO = SPACES_DIR / "sampled" / "demo.yaml"


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    started = start_ray(None, num_cpus=4)
    import ray

    # A private local Ray on loopback only.
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    yield
    stop_ray(started)


class RecordingTracker:
    """Tracker protocol double: records calls; can raise KeyboardInterrupt after N trials (a Ctrl-C)."""

    parent_run_id = None

    def __init__(self, interrupt_after: int | None = None):
        self.started: list[bool] = []
        self.trials: list[dict] = []
        self.ended: list[list[int]] = []
        self.interrupt_after = interrupt_after

    def start_study(self, study_dir, attrs, resumed):
        self.started.append(resumed)

    def log_trial(self, record):
        self.trials.append(dict(record))
        if self.interrupt_after is not None and len(self.trials) == self.interrupt_after:
            raise KeyboardInterrupt

    def refresh_artifacts(self, study_dir):
        pass

    def end_study(self, pareto_trial_numbers, records=()):
        self.ended.append(list(pareto_trial_numbers))


def _spec(tmp_path: Path, **changes) -> StudySpec:
    fields = dict(model="demo", target="cpu", trials=10, workers=2, out=tmp_path, mlflow=False,
                  max_accuracy_drop=0.5, space=str(SAMPLED_DEMO))
    fields.update(changes)
    return StudySpec(**fields)


def _run(spec: StudySpec, factory=None, tracker=None, stream=None):
    return run_study(spec, evaluator_factory=factory or StandInFactory(DEMO, cost_s=COST_S),
                     tracker=tracker or RecordingTracker(), stream=stream or io.StringIO())


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _seed_keys() -> dict[str, str]:
    space = load_space(SAMPLED_DEMO, "demo", DEMO)
    return {seed.config.key(): seed.kind for seed in space.seeds()}


@pytest.mark.slow
def test_study_runs_with_seeds_constraint_and_files(tmp_path):
    tracker = RecordingTracker()
    result = _run(_spec(tmp_path, trials=12), tracker=tracker)
    study = load_study(result.study_dir)
    finished = _finished(study)
    assert len(finished) == 12 and result.trials_done == 12
    # Every seed was measured first, tagged with its kind.
    seeds = _seed_keys()
    seeded = {t.user_attrs["config_key"]: t.user_attrs.get("seed_kind") for t in finished[:len(seeds)]}
    assert seeded == seeds and set(seeds.values()) == SEED_KINDS
    # Study attributes of the contract.
    attrs = study.user_attrs
    assert attrs["spec"]["model"] == "demo" and attrs["spec"]["max_accuracy_drop"] == 0.5
    assert ModelFingerprint.from_dict(attrs["fingerprint"]) == DEMO
    assert attrs["baseline"]["latency_ms"] == 10.0 and attrs["data_fingerprint"] == "stand-in"
    assert set(attrs["versions"]) >= {"dsm_tune", "timm", "torch"}
    # The constraint: drop - limit, in the user attr and in Optuna's own constraint record.
    infeasible = 0
    for trial in finished:
        drop = trial.user_attrs["accuracy_drop"]
        assert trial.user_attrs["constraint"] == pytest.approx(drop - 0.5)
        assert list(trial.constraints.values()) == [pytest.approx(drop - 0.5)]
        infeasible += drop > 0.5
    assert infeasible > 0, "the stand-in's ToMe seeds lose more than 0.5 points: some trials must be infeasible"
    # Optuna's best trials respect the constraint too.
    assert all(t.user_attrs["accuracy_drop"] <= 0.5 for t in study.best_trials)
    # Files: trials.csv has every trial; best.json is the fastest feasible trial and never an infeasible one.
    df = pd.read_csv(result.study_dir / "trials.csv")
    assert len(df) == len(study.trials)
    assert {"params_start_layer", "accuracy_drop", "latency_ms", "constraint", "worker", "seed_kind"} <= set(df)
    best = json.loads((result.study_dir / "best.json").read_text())
    best_trial = study.trials[result.best_trial]
    assert best_trial.user_attrs["accuracy_drop"] <= 0.5
    feasible = [t for t in finished if t.state == TrialState.COMPLETE and t.user_attrs["accuracy_drop"] <= 0.5]
    assert best_trial.user_attrs["latency_ms"] == min(t.user_attrs["latency_ms"] for t in feasible)
    assert best["merge"] == best_trial.user_attrs["config"]["merge"]
    assert result.pareto == pareto_numbers(trials_frame(study), 0.5) and result.best_trial in result.pareto
    # The tracker saw every trial once and the end.
    assert sorted(r["number"] for r in tracker.trials) == [t.number for t in study.trials]
    assert tracker.started == [False] and len(tracker.ended) == 1


@pytest.mark.slow
def test_resume_after_a_kill_adds_only_the_missing_trials(tmp_path):
    first = _run(_spec(tmp_path, trials=6, workers=1))
    before = {t.number: (t.params, t.values, t.state) for t in load_study(first.study_dir).get_trials()}
    # What a killed driver leaves behind: trials asked (params stored) but never told.
    storage = StudyFolder.at(first.study_dir).open_storage()
    study = optuna.load_study(study_name=first.study_name, storage=storage)
    space = load_space(SAMPLED_DEMO, "demo", DEMO)
    orphans = []
    for _ in range(2):
        trial = study.ask()
        space.suggest(trial)
        orphans.append((trial.number, dict(trial.params)))
    storage.remove_session()

    tracker = RecordingTracker()
    second = _run(_spec(tmp_path, trials=10, workers=1), tracker=tracker)
    study = load_study(second.study_dir)
    assert tracker.started == [True]
    assert len(_finished(study)) == 10 and second.trials_measured_now <= 4
    after = {t.number: (t.params, t.values, t.state) for t in study.get_trials()}
    assert all(after[n] == v for n, v in before.items()), "earlier trials must be kept as they were"
    trials = {t.number: t for t in study.get_trials()}
    for number, params in orphans:
        assert trials[number].state == TrialState.FAIL
        assert "ended while this trial was running" in trials[number].user_attrs["fail_reason"]
        redo = [t for t in trials.values() if t.user_attrs.get("requeued_from") == number]
        assert len(redo) == 1 and redo[0].params == params and redo[0].state != TrialState.FAIL
    assert not any(t.state == TrialState.RUNNING for t in study.get_trials())
    # Seeds were queued once, not again at resume.
    kinds = [t.user_attrs.get("seed_kind") for t in study.get_trials()
             if t.user_attrs.get("seed_kind") and "requeued_from" not in t.user_attrs]
    assert len(kinds) == len(_seed_keys())
    # The budget is spent: a third run measures nothing and starts no worker (this one would die at once).
    third = _run(_spec(tmp_path, trials=10, workers=1), factory=StandInFactory(DEMO, die_on_init=True))
    assert third.trials_measured_now == 0 and len(load_study(third.study_dir).trials) == len(study.trials)


@pytest.mark.slow
def test_worker_killed_mid_trial_fails_that_trial_and_the_study_completes(tmp_path):
    victim = next(key for key, kind in _seed_keys().items() if kind == "tome")
    factory = StandInFactory(DEMO, cost_s=COST_S, die_on=(victim,))
    log = io.StringIO()
    result = _run(_spec(tmp_path, trials=10), factory=factory, stream=log)
    study = load_study(result.study_dir)
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["config_key"] == victim
    assert "died mid-trial" in failed[0].user_attrs["fail_reason"]
    assert "ActorDiedError" in failed[0].user_attrs["fail_reason"]
    assert len(_finished(study)) == 10
    # The dead actor was replaced (a fresh one gets a generation suffix: worker-N.1).
    assert "starting a new worker" in log.getvalue() or "replacing it" in log.getvalue()


@pytest.mark.slow
def test_workers_that_never_finish_a_trial_stop_the_study_with_a_clear_error(tmp_path):
    with pytest.raises(StudyError, match=r"workers cannot start \(3 attempts\)"):
        _run(_spec(tmp_path, trials=4, workers=1), factory=StandInFactory(DEMO, die_on_init=True))
    # Evaluations that always raise: stop after a few, keep the storage with the failures and their reasons.
    spec = _spec(tmp_path, trials=20, workers=1, study="always-fails")
    with pytest.raises(StudyError, match="trials all failed in evaluation, last with: RuntimeError: stand-in"):
        _run(spec, factory=StandInFactory(DEMO, fail_on=("*",)))
    study = load_study(spec.study_dir)
    assert [t.state for t in study.get_trials()][:5] == [TrialState.FAIL] * 5
    assert "stand-in failure" in study.trials[0].user_attrs["fail_reason"]


@pytest.mark.slow
def test_ctrl_c_keeps_finished_trials_and_requeues_running_ones(tmp_path):
    spec = _spec(tmp_path, trials=9)
    result = _run(spec, factory=StandInFactory(DEMO, cost_s=0.2), tracker=RecordingTracker(interrupt_after=3))
    assert result.interrupted and result.stopped_by == "interrupt"
    study = load_study(spec.study_dir)
    interrupted = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert interrupted and all("interrupted" in t.user_attrs["fail_reason"] for t in interrupted)
    # Queued again: the interrupted trials (seeds not yet started simply stay queued).
    requeued = [t for t in study.get_trials() if t.state == TrialState.WAITING and "requeued_from" in t.user_attrs]
    assert sorted(t.user_attrs["requeued_from"] for t in requeued) == sorted(t.number for t in interrupted)
    done_before = len(_finished(study))
    assert done_before >= 2
    resumed = _run(spec)
    study = load_study(spec.study_dir)
    assert len(_finished(study)) == 9 and resumed.trials_measured_now <= 9 - done_before + 1
    for trial in study.get_trials():
        if "requeued_from" in trial.user_attrs:   # re-run with the interrupted trial's exact parameters
            assert trial.params == study.trials[trial.user_attrs["requeued_from"]].params
    assert not any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in study.get_trials())


def test_duplicate_configs_are_not_measured_twice(tmp_path):
    space_file = tmp_path / "tiny.yaml"
    # Three distinct ratio-form configs, plus the seeds (the dense seed duplicates ratio 0).
    space_file.write_text("start_layer: 0\nhierarchy_depth: 0\nnum_stages: 1\nstage_ratio: [0.0, 0.02]\n"
                          "proportional_attention: true\n")
    tracker = RecordingTracker()
    result = _run(_spec(tmp_path, trials=11, workers=1, space=str(space_file)), tracker=tracker)
    study = load_study(result.study_dir)
    finished = _finished(study)
    assert len(finished) == 11
    measured = [t for t in finished if "duplicate_of" not in t.user_attrs]
    copies = [t for t in finished if "duplicate_of" in t.user_attrs]
    plan_keys = [t.user_attrs["plan_key"] for t in measured]
    assert len(plan_keys) == len(set(plan_keys)), "each distinct merged model is measured once"
    assert result.trials_measured_now == len(measured) and copies
    by_number = {t.number: t for t in study.get_trials()}
    for copy in copies:
        original = by_number[copy.user_attrs["duplicate_of"]]
        assert copy.user_attrs["plan_key"] == original.user_attrs["plan_key"]
        assert copy.values == original.values
    # Copies are told to the sampler like any trial, and count towards the budget.
    assert len(tracker.trials) == 11


@pytest.mark.slow
def test_timeout_is_a_total_budget_across_resumes(tmp_path):
    spec = _spec(tmp_path, trials=200, timeout=2.0, workers=1)
    first = _run(spec, factory=StandInFactory(DEMO, cost_s=0.25))
    assert first.stopped_by == "timeout" and 0 < first.trials_done < 200
    study = load_study(spec.study_dir)
    assert study.user_attrs["elapsed_s"] >= 2.0
    # Resumed with the same total budget: already spent, nothing runs (a worker would die on start).
    second = _run(spec, factory=StandInFactory(DEMO, die_on_init=True))
    assert second.trials_measured_now == 0 and second.trials_done == first.trials_done


def test_resume_refuses_other_settings_and_malformed_space_fails_before_ray(tmp_path):
    _run(_spec(tmp_path, trials=3, workers=1))
    with pytest.raises(StudyError, match=r"max_accuracy_drop 0.5 \(stored\) vs 2.0 \(now\)"):
        _run(_spec(tmp_path, trials=5, workers=1, max_accuracy_drop=2.0))
    bad = tmp_path / "bad.yaml"
    bad.write_text("start_layer: [0, 2]\nstage_ratio: [0, 0.5]\nratios: oops\n")
    from dsm_tune.search.space import SpaceError

    with pytest.raises(SpaceError, match="bad.yaml: key 'ratios': unknown key"):
        _run(_spec(tmp_path, trials=3, study="bad-space", space=str(bad)))
    assert not (tmp_path / "bad-space" / "study.db").exists()


def test_second_driver_on_the_same_study_is_refused(tmp_path):
    from filelock import FileLock

    spec = _spec(tmp_path, trials=2, workers=1)
    spec.study_dir.mkdir(parents=True)
    with FileLock(str(spec.study_dir / ".lock")):
        with pytest.raises(StudyError, match="being run by another dsm-tune process"):
            _run(spec)


@pytest.mark.slow
def test_dsm_tune_run_on_the_demo_model_writes_a_best_config_that_applies(tmp_path, capsys):
    """The real evaluator end to end through the CLI: demo model, embedded data, one worker, a tiny budget."""
    import torch

    from dsm_tune.cli import main
    from dsm_tune.evaluation.models import build_model
    from dsm_tune.merging import apply_dsm, load_config, token_schedule

    code = main(["run", "--model", "demo", "--device", "cpu", "--trials", "2", "--workers", "1", "--limit", "32",
                 "--out", str(tmp_path), "--no-mlflow"])
    output = capsys.readouterr().out
    assert code == 0, output
    study_dir = tmp_path / "demo-cpu"
    assert "Pareto front" in output and str(study_dir) in output
    study = load_study(study_dir)
    finished = _finished(study)
    assert len(finished) == 2 and {t.user_attrs["seed_kind"] for t in finished} <= SEED_KINDS
    assert all(t.user_attrs["num_images"] == 32 and t.user_attrs["metric"] == "top1" for t in finished)
    config = load_config(study_dir / "best.json")
    assert config.metrics["accuracy_drop"] <= 1.0
    model = build_model("demo")
    apply_dsm(model, config)
    with torch.inference_mode():
        logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10)
    assert len(token_schedule(config)) == len(model.blocks)


def test_latency_objective_cancels_drift_between_trials():
    """Two trials timed while the machine drifted (raw medians 80 ms and 40 ms) but with the same interleaved
    speedup must get the same latency objective: the study's dense reference over the speedup."""
    from dsm_tune.search.dense_reference import DenseReference

    reference = DenseReference.of([50.0])
    assert reference.figures({"latency_ms": 80.0, "speedup": 2.0})["latency_ms"] == 25.0
    assert reference.figures({"latency_ms": 40.0, "speedup": 2.0})["latency_ms"] == 25.0
    # Without a speedup (or a reference) the raw measurement is all there is.
    assert reference.figures({"latency_ms": 80.0, "speedup": None})["latency_ms"] == 80.0
    assert DenseReference.of([]).figures({"latency_ms": 80.0, "speedup": 2.0})["latency_ms"] == 80.0


class OneAtATimeProposer:
    """A proposer seam double: Optuna's sampler, but nothing new while a trial runs (the loop must wait, not
    stop), evaluator options on every proposal, and nothing at all after `limit` proposals (exhausted)."""

    def __init__(self, space, limit):
        from dsm_tune.search.strategies import SamplerProposer

        self.inner = SamplerProposer(space)
        self.limit = limit
        self.proposed = 0
        self.observed: list[int] = []
        self.running = 0
        self.returned_none_while_running = 0

    def propose(self, study):
        if self.running:
            self.returned_none_while_running += 1
            return None
        if self.proposed >= self.limit:
            return None
        proposal = self.inner.propose(study)
        self.proposed += 1
        self.running += 1
        return type(proposal)(proposal.trial, proposal.cfg, {"fidelity": 0.5, "tag": f"p{self.proposed}"},
                              invalid=proposal.invalid)

    def observe(self, trial):
        self.observed.append(trial.number)
        if self.running:
            self.running -= 1


def test_injected_proposer_waits_passes_options_and_stops_when_exhausted(tmp_path):
    made = []

    def factory(space, spec):
        made.append(OneAtATimeProposer(space, limit=4))
        return made[0]

    spec = _spec(tmp_path, trials=10, workers=2)
    result = run_study(spec, evaluator_factory=StandInFactory(DEMO, cost_s=COST_S), tracker=RecordingTracker(),
                       stream=io.StringIO(), proposer_factory=factory)
    proposer = made[0]
    study = load_study(spec.study_dir)
    assert result.stopped_by == "exhausted" and proposer.proposed == 4
    assert proposer.returned_none_while_running > 0, "the loop asked again while a trial ran and kept waiting"
    finished = _finished(study)
    told = [t.number for t in study.get_trials() if t.state.is_finished()]
    assert len(finished) == 4 and sorted(proposer.observed) == told
    measured = [t for t in finished if "duplicate_of" not in t.user_attrs]
    assert measured and all(t.user_attrs["options_seen"]["fidelity"] == 0.5 for t in measured)
    assert {t.user_attrs["options_seen"]["tag"] for t in measured} <= {"p1", "p2", "p3", "p4"}
    # A resume replays every finished trial through observe before proposing.
    again = []
    run_study(spec, evaluator_factory=StandInFactory(DEMO, cost_s=COST_S), tracker=RecordingTracker(),
              stream=io.StringIO(), proposer_factory=lambda space, s: again.append(
                  OneAtATimeProposer(space, limit=0)) or again[0])
    assert sorted(again[0].observed) == [t.number for t in finished]
