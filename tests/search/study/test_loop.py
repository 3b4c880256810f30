"""The ask/tell loop (`search/study/loop.py`) on a fake worker pool: no Ray, no processes, an in-memory study.

Each test drives `Loop.run` the way the driver does (`driver._run_workers`), with a scripted proposer and an
evaluator that is a plain function, and checks what the study holds afterwards."""

from __future__ import annotations

import dataclasses
import io
import itertools
from typing import Any, Iterable

import optuna
import pytest
from optuna.trial import TrialState

from dsm_tune.merging import DSMConfig, ModelFingerprint
from dsm_tune.search.folder import StudyError
from dsm_tune.search.progress import Progress
from dsm_tune.search.space import SPACES_DIR, load_space
from dsm_tune.search.strategies import FINISHED, Proposal, plan_key
from dsm_tune.search.study.loop import MAX_CONSECUTIVE_ERRORS, MAX_FRESH_DEATHS, Loop
from dsm_tune.search.spec import StudySpec
from tests.helpers.fake_pool import FakePool, WorkerDeath

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The demo model's fingerprint (what `ModelFingerprint.from_model(build_model("demo"))` gives).
DEMO = ModelFingerprint("dsm_tune_demo_vit", 6, (16, 16), 1, (32, 32), 64)
SPACE = load_space(SPACES_DIR / "sampled" / "demo.yaml", "demo", DEMO)
DENSE_MS = 10.0


def params(ratio: float, proportional: bool = True) -> dict[str, Any]:
    """One-stage merging from block 0 at `ratio` (distinct ratios are distinct plans)."""
    return dict(start_layer=0, hierarchy_depth=0, num_stages=1, proportional_attention=proportional,
                stage0_ratio=ratio)


def distinct(start: int = 1) -> Iterable[dict[str, Any]]:
    return (params(i / 100) for i in itertools.count(start))


class Invalid:
    """A scripted proposal whose parameters give no config."""

    def __init__(self, why: str):
        self.why = why


class ScriptedProposer:
    """Proposes the scripted parameter sets in order (an `Invalid` as an invalid proposal, FINISHED or None as
    themselves); `end` (FINISHED) once the script is used up. Counts every call and every observed trial."""

    def __init__(self, script: Iterable[Any], options: dict[str, Any] | None = None, end: Any = FINISHED):
        self.script = iter(script)
        self.end = end
        self.options = options or {}
        self.calls = 0
        self.observed: list[int] = []

    def propose(self, study: optuna.Study):
        self.calls += 1
        item = next(self.script, self.end)
        if item is FINISHED or item is None:
            return item
        if isinstance(item, Invalid):
            return Proposal(study.ask(), None, invalid=item.why)
        study.enqueue_trial(item)
        trial = study.ask()
        return Proposal(trial, SPACE.suggest(trial), dict(self.options))

    def observe(self, trial: optuna.trial.FrozenTrial) -> None:
        self.observed.append(trial.number)


class Evaluator:
    """The fake pool's evaluation: figures derived from the config; records every config it was given."""

    def __init__(self, die_on: Iterable[float] = (), raise_every: int = 0, always: type[Exception] | None = None):
        self.seen: list[tuple[DSMConfig, dict[str, Any]]] = []
        self.die_on = set(die_on)
        self.raise_every = raise_every
        self.always = always

    def __call__(self, cfg: DSMConfig, **options: Any) -> dict[str, Any]:
        self.seen.append((cfg, options))
        ratio = cfg.stages[0].ratio
        if self.always is not None:
            raise self.always("boom")
        if ratio in self.die_on:
            self.die_on.discard(ratio)     # dies once; the config is fine afterwards
            raise WorkerDeath(f"the worker died evaluating ratio {ratio}")
        if self.raise_every and len(self.seen) % self.raise_every == 0:
            raise RuntimeError(f"evaluation {len(self.seen)} raised")
        speedup = 1.0 + ratio * 4
        return {"metric": "top1", "accuracy_drop": round(ratio * 2, 6), "aborted": False,
                "latency_ms": round(DENSE_MS / speedup, 6), "baseline_latency_ms": DENSE_MS,
                "speedup": speedup, "options_seen": dict(options)}


def make_loop(tmp_path, proposer, evaluate, trials: int, workers: int = 2, **pool_args):
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="unit", directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("baseline", {"latency_ms": DENSE_MS})
    spec = StudySpec(model="demo", trials=trials, workers=workers, out=tmp_path, study="unit", mlflow=False,
                     max_accuracy_drop=1.0)
    pool = FakePool(evaluate, size=workers, **pool_args)
    told: list[optuna.trial.FrozenTrial] = []
    progress = Progress(total=trials, max_drop=spec.max_accuracy_drop, stream=io.StringIO())
    loop = Loop(spec, study, storage, SPACE, proposer, pool, progress, 0.0, told.append)
    return loop, study, pool, told


def states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


# --- the budget ---------------------------------------------------------------------------------------------------

def test_runs_to_the_trial_budget_on_two_workers(tmp_path):
    proposer, evaluate = ScriptedProposer(distinct(), options={"limit": 8}), Evaluator()
    loop, study, pool, told = make_loop(tmp_path, proposer, evaluate, trials=6)
    loop.run()
    assert loop.stopped_by == "trials"
    assert states(study) == {"COMPLETE": 6}
    assert loop.measured_now == 6 and loop.teller.used == 6
    assert len(pool.submitted) == len(evaluate.seen) == 6
    assert {s.slot for s in pool.submitted} == {"worker-0", "worker-1"}
    assert all(options == {"limit": 8} for _, options in evaluate.seen)
    assert not pool.busy_slots() and loop.ready is None and loop.cache.outstanding() == 0
    assert [t.number for t in told] == sorted(t.number for t in told) == list(range(6))
    assert proposer.observed == list(range(6))
    for trial in study.get_trials():
        ratio = trial.params["stage0_ratio"]
        assert trial.values == pytest.approx([ratio * 2, DENSE_MS / (1 + ratio * 4)])
        assert trial.user_attrs["worker"] in {"worker-0", "worker-1"}
        assert trial.user_attrs["plan_key"] == plan_key(SPACE.config_from_params(trial.params))
        assert trial.user_attrs["options_seen"] == {"limit": 8}


def test_an_invalid_proposal_fails_without_reaching_the_pool(tmp_path):
    script = [params(0.1), Invalid("stage0_ratio makes no config"), params(0.2), params(0.3)]
    proposer, evaluate = ScriptedProposer(script), Evaluator()
    loop, study, pool, _ = make_loop(tmp_path, proposer, evaluate, trials=3)
    loop.run()
    trials = study.get_trials()
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs["fail_reason"] == "stage0_ratio makes no config"
    assert "config" not in trials[1].user_attrs
    assert len(pool.submitted) == 3 and all(s.task.trial.number != 1 for s in pool.submitted)
    assert loop.teller.used == 3    # a FAILed trial does not spend the budget


def test_a_config_over_the_hard_constraint_is_pruned_without_reaching_the_pool(tmp_path):
    # Ratio 0.5 on every block keeps 4/256 tokens, under the demo space's min_tokens_kept 0.02.
    proposer, evaluate = ScriptedProposer([params(0.5), params(0.1)]), Evaluator()
    loop, study, pool, _ = make_loop(tmp_path, proposer, evaluate, trials=2)
    loop.run()
    first, second = study.get_trials()
    assert first.state == TrialState.PRUNED and "min_tokens_kept" in first.user_attrs["fail_reason"]
    assert second.state == TrialState.COMPLETE
    assert [s.task.trial.number for s in pool.submitted] == [1]


# --- duplicates ---------------------------------------------------------------------------------------------------

def test_the_same_plan_is_evaluated_once(tmp_path):
    # Trial 1 has trial 0's plan while 0 is running (it waits); trial 3 has a plan that differs only in
    # proportional attention with nothing merged (the dense plan, as trial 2's).
    script = [params(0.1), params(0.1), params(0.0, proportional=True), params(0.0, proportional=False)]
    proposer, evaluate = ScriptedProposer(script), Evaluator()
    loop, study, pool, _ = make_loop(tmp_path, proposer, evaluate, trials=4)
    loop.run()
    trials = study.get_trials()
    assert states(study) == {"COMPLETE": 4}
    assert len(evaluate.seen) == 2 and loop.measured_now == 2
    assert sorted(s.task.trial.number for s in pool.submitted) == [0, 2]
    assert "duplicate_of" not in trials[0].user_attrs and "duplicate_of" not in trials[2].user_attrs
    assert trials[1].user_attrs["duplicate_of"] == 0 and trials[3].user_attrs["duplicate_of"] == 2
    assert trials[1].values == trials[0].values and trials[3].values == trials[2].values
    assert trials[1].user_attrs["worker"] == trials[0].user_attrs["worker"]
    assert trials[3].user_attrs["config_key"] != trials[2].user_attrs["config_key"]
    assert trials[3].user_attrs["plan_key"] == trials[2].user_attrs["plan_key"]


def test_a_plan_measured_in_an_earlier_session_is_copied(tmp_path):
    proposer, evaluate = ScriptedProposer([params(0.1)]), Evaluator()
    loop, study, pool, _ = make_loop(tmp_path, proposer, evaluate, trials=1)
    loop.run()
    # A resume: a new loop on the same study, whose cache starts from the finished trials.
    again = ScriptedProposer([params(0.1)])
    resumed = Loop(dataclasses.replace(loop.spec, trials=2), study, loop.teller.storage, SPACE, again, pool,
                   loop.progress, 0.0, lambda frozen: None)
    assert resumed.teller.used == 1 and again.observed == [0]
    resumed.run()
    copy = study.get_trials()[1]
    assert copy.state == TrialState.COMPLETE and copy.user_attrs["duplicate_of"] == 0
    assert len(evaluate.seen) == 1 and resumed.measured_now == 0


# --- pool events --------------------------------------------------------------------------------------------------

def test_a_dead_worker_fails_its_trial_and_is_replaced(tmp_path):
    proposer, evaluate = ScriptedProposer(distinct()), Evaluator(die_on=[0.02])
    loop, study, pool, _ = make_loop(tmp_path, proposer, evaluate, trials=3)
    loop.run()
    trials = study.get_trials()
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}
    dead = trials[1]
    assert dead.state == TrialState.FAIL and dead.params["stage0_ratio"] == 0.02
    assert dead.user_attrs["fail_reason"] == "the worker died evaluating ratio 0.02"
    assert dead.user_attrs["worker"] == "worker-1"
    assert pool.replaced == ["worker-1"] and pool.slots[1].generation == 1
    assert "worker-1.1" in {t.user_attrs.get("worker") for t in trials}   # the replacement got work
    assert loop.fresh_deaths == 0      # reset by the trials finished after it


def test_workers_that_keep_dying_stop_the_study(tmp_path):
    loop, study, pool, _ = make_loop(tmp_path, ScriptedProposer(distinct()), Evaluator(always=WorkerDeath),
                                     trials=10)
    with pytest.raises(StudyError, match=f"workers keep dying before finishing a trial \\({MAX_FRESH_DEATHS} in"):
        loop.run()
    assert states(study).get("FAIL") == MAX_FRESH_DEATHS and "COMPLETE" not in states(study)
    assert len(pool.replaced) == MAX_FRESH_DEATHS - 1


def test_consecutive_evaluation_errors_stop_the_study(tmp_path):
    evaluate = Evaluator(always=RuntimeError)
    loop, study, _, _ = make_loop(tmp_path, ScriptedProposer(distinct()), evaluate, trials=10)
    with pytest.raises(StudyError, match=f"the last {MAX_CONSECUTIVE_ERRORS} trials all failed in evaluation, "
                                         f"last with: RuntimeError: boom"):
        loop.run()
    failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(failed) == MAX_CONSECUTIVE_ERRORS == loop.consecutive_errors
    assert all(t.user_attrs["fail_reason"] == "evaluation failed: RuntimeError: boom" for t in failed)
    assert "COMPLETE" not in states(study)


def test_errors_between_successes_do_not_stop_the_study(tmp_path):
    evaluate = Evaluator(raise_every=2)      # every second evaluation raises, forever
    loop, study, _, _ = make_loop(tmp_path, ScriptedProposer(distinct()), evaluate, trials=8)
    loop.run()
    assert states(study)["COMPLETE"] == 8 and states(study)["FAIL"] >= 7
    assert loop.consecutive_errors < MAX_CONSECUTIVE_ERRORS


# --- the proposer says it is finished -----------------------------------------------------------------------------

def test_finished_stops_the_loop_and_is_not_asked_again(tmp_path):
    proposer, evaluate = ScriptedProposer([params(0.1), params(0.2), FINISHED, params(0.3)]), Evaluator()
    loop, study, _, _ = make_loop(tmp_path, proposer, evaluate, trials=10)
    loop.run()
    assert loop.stopped_by == "exhausted"
    assert states(study) == {"COMPLETE": 2}
    assert proposer.calls == 3            # the two proposals and the FINISHED; never after it
    assert loop.finished and loop.exhausted
    assert "no more configs" in loop.progress.stream.getvalue()


def test_nothing_to_propose_now_is_asked_again_while_trials_run(tmp_path):
    # None: nothing ready now; with a trial running the loop asks again later (unlike FINISHED).
    proposer, evaluate = ScriptedProposer([params(0.1), None, params(0.2)], end=None), Evaluator()
    loop, study, _, _ = make_loop(tmp_path, proposer, evaluate, trials=10, workers=1)
    loop.run()
    assert states(study) == {"COMPLETE": 2}     # the proposal after the None was evaluated
    assert proposer.calls >= 4 and loop.stopped_by == "exhausted" and not loop.finished


# --- Ctrl-C -------------------------------------------------------------------------------------------------------

def test_interrupt_requeues_the_running_the_waiting_and_the_asked_trials(tmp_path):
    # Workers take trials 0 and 1; trial 2 duplicates 0's plan (it waits); trial 3 is asked ahead of need.
    script = [params(0.1), params(0.2), params(0.1), params(0.3)]
    proposer, evaluate = ScriptedProposer(script), Evaluator()
    loop, study, pool, told = make_loop(tmp_path, proposer, evaluate, trials=5, interrupt_on_wait=1)
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert loop.ready is not None and loop.ready.trial.number == 3
    assert loop.interrupt() == 4
    assert pool.cancelled and not evaluate.seen
    trials = study.get_trials()
    assert [t.state for t in trials[:4]] == [TrialState.FAIL] * 4
    for trial in trials[:4]:
        assert trial.user_attrs["queued_again"] is True
        assert trial.user_attrs["fail_reason"].startswith("interrupted before it finished")
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["requeued_from"] for t in queued) == [0, 1, 2, 3]
    by_origin = {t.user_attrs["requeued_from"]: t for t in queued}
    for number in range(4):
        assert by_origin[number].system_attrs["fixed_params"] == trials[number].params
    assert loop.ready is None and loop.cache.outstanding() == 0
    assert sorted(t.number for t in told) == [0, 1, 2, 3]
