"""Telling the study what became of a trial: measured (COMPLETE), not measured to the end (PRUNED), failed
(FAIL, queued again when it never finished), and the latency objective that goes into Optuna.

The latency objective is the study's dense reference (`dsm_tune.search.dense_reference`: the median of every dense
timing so far, this trial's included) over the trial's interleaved speedup. Optuna keeps the value as told; a
finished trial cannot be told again, so later reference updates reach the surfaces (which recompute from the
speedup when they read the study) but not Optuna's stored `values_1`."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState

from dsm_tune.record import (
    ABORTED, ACCURACY_DROP, BASELINE_LATENCY_MS, BASELINE_MEASURED_MS, CONSTRAINT, DRIVER_ATTRS, DUPLICATE_OF,
    FAIL_REASON, IN_PROCESS, KILLED_PROCESS, LATENCY_MEASURED_MS, LATENCY_MS, PLAN_KEY, PROCESS_DEATHS, QUEUED_AGAIN,
    REFERENCE_ATTR, REQUEUED_FROM, RUN_ATTRS, SEED_KIND, WALL_SECONDS, WORKER,
)
from dsm_tune.search.dense_reference import MEASURED_STATES, DenseReference, first_dense_ms, trial_dense_ms
from dsm_tune.search.strategies import replay_attrs
from dsm_tune.search.study.dedup import Task
from dsm_tune.search.text import is_finite_number, json_safe

DIRECTIONS = ("minimize", "minimize")            # accuracy_drop, latency_ms
CONSTRAINT_NAME = ACCURACY_DROP                  # Optuna constraint: accuracy_drop - max_accuracy_drop <= 0
# Early abort: a trial is only evaluated to the end while its drop may still be under this many times the limit,
# so near-misses are fully measured (the plots show the boundary) and hopeless configs cost little.
ABORT_FACTOR = 2.0

# `run --no-ray` evaluates in the driver's process, so a config that crashes it (segfault, OOM kill, os._exit)
# takes the driver along. The trial is marked "evaluating" before its evaluation starts and "evaluated" once it
# returned; a resume that finds a trial still RUNNING and "evaluating" cannot tell that config from a user's kill
# -9, so it queues it again once, counting the death on the copy; a config whose evaluation ended the process
# MAX_PROCESS_DEATHS times is FAILed for good, and later proposals of the same plan are not measured (the loop
# prunes them). A Ctrl-C between the evaluation and its tell leaves the trial RUNNING but "evaluated": no death.
EVALUATING, EVALUATED = "evaluating", "evaluated"
MAX_PROCESS_DEATHS = 2



def copied_result(earlier: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """What a duplicate takes over from the trial that measured its plan."""
    result = {k: v for k, v in earlier.user_attrs.items() if k not in DRIVER_ATTRS | RUN_ATTRS}
    if earlier.state == TrialState.PRUNED:
        result[FAIL_REASON] = earlier.user_attrs.get(FAIL_REASON) or "pruned"
        result.setdefault(ABORTED, True)
    return result


class Teller:
    """Writes outcomes into the study; `on_told(frozen_trial)` runs after every tell. `used` counts the
    trials that spend the budget (COMPLETE + PRUNED)."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage, max_drop: float,
                 on_told: Callable[[optuna.trial.FrozenTrial], None], used: int = 0):
        self.study = study
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.max_drop = max_drop
        self.first_dense_ms = first_dense_ms(study.user_attrs)
        timings = [trial_dense_ms(t.user_attrs) for t in study.get_trials(deepcopy=False)
                   if t.state.name in MEASURED_STATES]
        self.dense_timings = [t for t in timings if t is not None]
        self.reference = DenseReference.of(self.dense_timings, self.first_dense_ms)
        self.on_told = on_told
        self.used = used

    def _told(self, frozen: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        # `study.tell` already gives the trial as stored: reading it again would cost a storage round trip per tell.
        self.on_told(frozen)
        return frozen

    def result(self, task: Task, result: Mapping[str, Any], worker: str, duplicate_of: int | None = None,
               wall_s: float | None = None) -> optuna.trial.FrozenTrial:
        trial = task.trial
        for key, value in result.items():
            if key not in DRIVER_ATTRS:
                trial.set_user_attr(key, json_safe(value))
        trial.set_user_attr(WORKER, worker)
        if wall_s is not None:
            trial.set_user_attr(WALL_SECONDS, round(wall_s, 3))
        if duplicate_of is not None:
            trial.set_user_attr(DUPLICATE_OF, duplicate_of)
        figures = self._with_reference(result, duplicate_of)
        for key in (LATENCY_MEASURED_MS, BASELINE_MEASURED_MS, BASELINE_LATENCY_MS, LATENCY_MS):
            if key in figures:
                trial.set_user_attr(key, json_safe(figures[key]))
        drop, latency = result.get(ACCURACY_DROP), figures.get(LATENCY_MS)
        if is_finite_number(drop):
            constraint = float(drop) - self.max_drop
            trial.set_user_attr(CONSTRAINT, constraint)
            trial.set_constraint(CONSTRAINT_NAME, constraint)
        if is_finite_number(drop) and is_finite_number(latency) and not result.get(ABORTED):
            frozen = self.study.tell(trial, [float(drop), float(latency)])
        else:
            reason = result.get(FAIL_REASON) or (
                f"aborted early: the accuracy drop could not stay within {ABORT_FACTOR:g}x the limit"
                if result.get(ABORTED) else "no accuracy drop/latency measured")
            trial.set_user_attr(FAIL_REASON, reason)
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
        self.used += 1
        return self._told(frozen)

    def _with_reference(self, result: Mapping[str, Any], duplicate_of: int | None) -> dict[str, Any]:
        """The result's latency figures under the reference updated with its own dense timing (a duplicate's
        is a copy: it does not count again)."""
        timing = trial_dense_ms({**result, DUPLICATE_OF: duplicate_of})
        if timing is not None:
            self.dense_timings.append(timing)
            self.reference = DenseReference.of(self.dense_timings, self.first_dense_ms)
            self.study.set_user_attr(REFERENCE_ATTR, self.reference.to_attr())
        return self.reference.figures(result)

    def copy(self, task: Task, earlier: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        """Settle a duplicate with the earlier measurement instead of measuring again."""
        return self.result(task, copied_result(earlier), worker=str(earlier.user_attrs.get(WORKER, "")),
                           duplicate_of=earlier.number)

    def prune(self, trial: optuna.trial.Trial, reason: str) -> None:
        """Not measured on purpose (the space's hard constraint); counts towards the budget."""
        trial.set_user_attr(FAIL_REASON, reason)
        frozen = self.study.tell(trial, state=TrialState.PRUNED)
        self.used += 1
        self._told(frozen)

    def fail(self, trial: optuna.trial.Trial, reason: str, worker: str | None = None) -> None:
        trial.set_user_attr(FAIL_REASON, reason[:2000])
        if worker is not None:
            trial.set_user_attr(WORKER, worker)
        self._told(self.study.tell(trial, state=TrialState.FAIL))

    def requeue(self, task: Task, reason: str) -> None:
        """FAIL the trial (it never finished) and queue its parameters again for the next run."""
        task.trial.set_user_attr(QUEUED_AGAIN, True)
        self.fail(task.trial, reason)
        enqueue_again(self.study, dict(task.trial.params), task.trial.number, task.seed_kind)


def enqueue_again(study: optuna.Study, params: dict[str, Any], number: int, seed_kind: str | None,
                  process_deaths: int = 0) -> None:
    user_attrs: dict[str, Any] = {**replay_attrs(params), REQUEUED_FROM: number}
    if seed_kind:
        user_attrs[SEED_KIND] = seed_kind
    if process_deaths:
        user_attrs[PROCESS_DEATHS] = process_deaths
    study.enqueue_trial(params, user_attrs=user_attrs)


def mark_in_process(trial: optuna.trial.Trial, done: bool = False) -> None:
    """Just before (`done` False) and after the driver's own process evaluates `trial` (see IN_PROCESS)."""
    trial.set_user_attr(IN_PROCESS, EVALUATED if done else EVALUATING)


def recover_stale(study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
    """Trials left RUNNING by a process that died: FAIL them and queue their parameters again, except a config
    that was being evaluated in-process each of MAX_PROCESS_DEATHS times the process ended (see IN_PROCESS):
    FAILed for good. Returns how many were queued again."""
    study_id = storage.get_study_id_from_name(study.study_name)
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        deaths = int(trial.user_attrs.get(PROCESS_DEATHS) or 0)
        if trial.user_attrs.get(IN_PROCESS) == EVALUATING:
            deaths += 1
            storage.set_trial_user_attr(trial_id, PROCESS_DEATHS, deaths)
        if deaths >= MAX_PROCESS_DEATHS:
            storage.set_trial_user_attr(trial_id, FAIL_REASON, (
                f"the study's process ended {deaths} times while evaluating this config in-process (--no-ray): "
                f"it crashes the process (a segfault, an out-of-memory kill or an exit in the evaluator); not "
                f"queued again"))
            storage.set_trial_user_attr(trial_id, KILLED_PROCESS, True)
            study.tell(trial.number, state=TrialState.FAIL)
            continue
        storage.set_trial_user_attr(trial_id, FAIL_REASON, "the process running the study ended while this trial "
                                                             "was running; queued again")
        storage.set_trial_user_attr(trial_id, QUEUED_AGAIN, True)
        study.tell(trial.number, state=TrialState.FAIL)
        enqueue_again(study, dict(trial.params), trial.number, trial.user_attrs.get(SEED_KIND), deaths)
        count += 1
    return count


def process_killers(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """Plan key -> number of the trial FAILed because its config ended the process (see IN_PROCESS)."""
    return {t.user_attrs[PLAN_KEY]: t.number for t in trials
            if t.state == TrialState.FAIL and t.user_attrs.get(KILLED_PROCESS) and t.user_attrs.get(PLAN_KEY)}
