"""`Teller` (`search/study/tell.py`) on an in-memory study: what each outcome writes into the trial and the
study, and what reaches `on_told`."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from dsm_tune.search.dense_reference import REFERENCE_ATTR
from dsm_tune.search.strategies import plan_key
from dsm_tune.search.study.dedup import Task
from dsm_tune.search.study.tell import CONSTRAINT_NAME, Teller
from tests.search.study.test_loop import DENSE_MS, SPACE, params

optuna.logging.set_verbosity(optuna.logging.WARNING)

MAX_DROP = 1.0


@pytest.fixture
def teller():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="tell", directions=["minimize", "minimize"])
    study.set_user_attr("baseline", {"latency_ms": DENSE_MS})
    told: list[optuna.trial.FrozenTrial] = []
    teller = Teller(study, storage, MAX_DROP, told.append)
    teller.told_trials = told
    return teller


def ask(teller: Teller, ratio: float, seed_kind: str | None = None) -> Task:
    teller.study.enqueue_trial(params(ratio))
    trial = teller.study.ask()
    cfg = SPACE.suggest(trial)
    return Task(trial, cfg, plan_key(cfg), seed_kind)


def measured(drop: float = 0.4, speedup: float = 2.0, dense_ms: float = 12.0, **extra) -> dict:
    return {"metric": "top1", "metric_value": 89.6, "accuracy_drop": drop, "aborted": False,
            "latency_ms": dense_ms / speedup, "baseline_latency_ms": dense_ms, "speedup": speedup,
            "flops_ratio": 0.5, **extra}


def stored(teller: Teller, number: int) -> optuna.trial.FrozenTrial:
    return teller.study.get_trials()[number]


def test_a_result_is_told_complete_with_its_objectives(teller):
    task = ask(teller, 0.1)
    frozen = teller.result(task, measured(wall_seconds=99.0, worker="ignored"), worker="worker-0", wall_s=1.23456)
    trial = stored(teller, 0)
    assert trial.state == TrialState.COMPLETE and frozen.state == TrialState.COMPLETE
    # The latency objective is the dense reference (the median of the dense timings: this trial's 12 ms) over the
    # speedup; the raw medians are kept as *_measured_ms.
    assert trial.values == [0.4, pytest.approx(12.0 / 2.0)]
    attrs = trial.user_attrs
    assert attrs["accuracy_drop"] == 0.4 and attrs["flops_ratio"] == 0.5 and attrs["speedup"] == 2.0
    assert attrs["baseline_latency_ms"] == 12.0 and attrs["baseline_measured_ms"] == 12.0
    assert attrs["latency_measured_ms"] == 6.0 and attrs["latency_ms"] == 6.0
    assert attrs["worker"] == "worker-0"            # a driver attr in the result does not override it
    assert attrs["wall_seconds"] == 1.235
    assert attrs["constraint"] == pytest.approx(0.4 - MAX_DROP)
    assert trial.constraints == {CONSTRAINT_NAME: pytest.approx(0.4 - MAX_DROP)}
    assert teller.used == 1
    assert [t.number for t in teller.told_trials] == [0]
    assert teller.told_trials[0].state == TrialState.COMPLETE
    assert teller.told_trials[0].user_attrs["accuracy_drop"] == 0.4
    assert teller.study.user_attrs[REFERENCE_ATTR] == {"latency_ms": 12.0, "timings": 1, "first_ms": DENSE_MS}


def test_the_reference_is_the_median_of_the_dense_timings(teller):
    teller.result(ask(teller, 0.1), measured(dense_ms=10.0, speedup=2.0), worker="w")
    teller.result(ask(teller, 0.2), measured(dense_ms=14.0, speedup=2.0), worker="w")
    assert teller.reference.latency_ms == 12.0 and teller.reference.timings == 2
    assert stored(teller, 0).values[1] == pytest.approx(5.0)     # told under the reference of its own time
    assert stored(teller, 1).values[1] == pytest.approx(6.0)


@pytest.mark.parametrize("result, reason", [
    (measured(aborted=True), "aborted early: the accuracy drop could not stay within 2x the limit"),
    (measured(aborted=True, fail_reason="stopped at 40 images"), "stopped at 40 images"),
    ({"metric": "top1", "accuracy_drop": float("nan")}, "no accuracy drop/latency measured"),
])
def test_a_result_without_both_objectives_is_pruned(teller, result, reason):
    teller.result(ask(teller, 0.1), result, worker="worker-1")
    trial = stored(teller, 0)
    assert trial.state == TrialState.PRUNED and trial.values is None
    assert trial.user_attrs["fail_reason"] == reason
    assert teller.used == 1 and teller.told_trials[0].state == TrialState.PRUNED


def test_fail_sets_the_reason_and_spends_no_budget(teller):
    teller.fail(ask(teller, 0.1).trial, "x" * 3000, worker="worker-3")
    trial = stored(teller, 0)
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "x" * 2000
    assert trial.user_attrs["worker"] == "worker-3"
    assert teller.used == 0 and teller.told_trials[0].state == TrialState.FAIL


def test_prune_sets_the_reason_and_spends_budget(teller):
    teller.prune(ask(teller, 0.1).trial, "not measured: too few tokens")
    trial = stored(teller, 0)
    assert trial.state == TrialState.PRUNED and trial.user_attrs["fail_reason"] == "not measured: too few tokens"
    assert teller.used == 1


def test_copy_takes_over_the_measured_attrs(teller):
    first = teller.result(ask(teller, 0.1), measured(lock_wait_s=0.5), worker="worker-0", wall_s=2.0)
    earlier = stored(teller, 0)
    task = ask(teller, 0.1)
    teller.copy(task, earlier)
    copy = stored(teller, 1)
    assert copy.state == TrialState.COMPLETE and copy.values == earlier.values == first.values
    assert copy.user_attrs["duplicate_of"] == 0
    assert copy.user_attrs["worker"] == "worker-0"
    for key in ("accuracy_drop", "metric_value", "speedup", "flops_ratio", "latency_ms", "baseline_latency_ms"):
        assert copy.user_attrs[key] == earlier.user_attrs[key], key
    # About one run, not about the config: not copied.
    assert "wall_seconds" not in copy.user_attrs and "lock_wait_s" not in copy.user_attrs
    # The copy's dense timing is the earlier one's: it does not count again.
    assert teller.reference.timings == 1 and teller.used == 2


def test_copy_of_a_pruned_trial_is_pruned_with_its_reason(teller):
    teller.result(ask(teller, 0.1), measured(aborted=True, fail_reason="hopeless"), worker="worker-0")
    teller.copy(ask(teller, 0.1), stored(teller, 0))
    copy = stored(teller, 1)
    assert copy.state == TrialState.PRUNED
    assert copy.user_attrs["fail_reason"] == "hopeless" and copy.user_attrs["duplicate_of"] == 0


def test_requeue_fails_the_trial_and_enqueues_its_params_again(teller):
    task = ask(teller, 0.3, seed_kind="paper")
    teller.requeue(task, "interrupted; queued again")
    trials = teller.study.get_trials()
    failed, queued = trials
    assert failed.state == TrialState.FAIL and failed.user_attrs["queued_again"] is True
    assert failed.user_attrs["fail_reason"] == "interrupted; queued again"
    assert queued.state == TrialState.WAITING
    assert queued.system_attrs["fixed_params"] == failed.params == params(0.3)
    assert queued.user_attrs["requeued_from"] == 0 and queued.user_attrs["seed_kind"] == "paper"
    assert teller.used == 0
    # The next ask takes the queued parameters: the same config.
    again = teller.study.ask()
    assert SPACE.suggest(again).key() == task.cfg.key() and again.number == queued.number
