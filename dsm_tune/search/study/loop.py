"""The ask/tell loop: get a proposal, settle it without a worker when it can be (invalid, over the space's hard
constraint, a duplicate plan), give it to an idle worker otherwise, and handle one typed pool event at a time.

One trial is asked ahead of need (`ready`) so a worker that finishes gets its next config at once, while the
driver writes the finished trial to the storage; TPE's constant liar treats the asked trial as pending.
"""

from __future__ import annotations

import time
from typing import Callable

import optuna

from dsm_tune.record import (
    ACCURACY_DROP, ACCURACY_DROP_CI_HIGH, ACCURACY_DROP_CI_LOW, CONFIG, CONFIG_KEY, ELAPSED_S, LATENCY_MS, PLAN_KEY,
    SEED_KIND, SPEEDUP, SPEEDUP_NOISY, WORKER,
)
from dsm_tune.search.folder import StudyError
from dsm_tune.search.progress import Progress
from dsm_tune.search.dense_reference import truthy
from dsm_tune.search.results import config_attr
from dsm_tune.search.strategies import FINISHED, Proposal, Proposer, Space, SpaceError, plan_key
from dsm_tune.search.study.dedup import SETTLED, PlanCache, Task
from dsm_tune.search.spec import StudySpec
from dsm_tune.search.study.tell import MAX_PROCESS_DEATHS, Teller, process_killers
from dsm_tune.search.workers import (
    PoolEvent, Slot, TrialDone, TrialRaised, WorkerDied, WorkerFailedToStart, WorkerPool, WorkerReady,
)

MAX_FRESH_DEATHS = 3          # consecutive deaths of actors that never finished a trial -> stop
MAX_CONSECUTIVE_ERRORS = 5    # consecutive trials whose evaluation raised -> stop (a bug, not a bad config)
WAIT_SLICE_S = 0.5


class Loop:
    """Runs one session of the study to its budget. `on_told(frozen_trial)` runs after every tell (outputs,
    tracking); `stopped_by` says why `run` returned: trials | timeout | exhausted (the proposer had no more)."""

    def __init__(self, spec: StudySpec, study: optuna.Study, storage: optuna.storages.BaseStorage,
                 space: Space, proposer: Proposer, pool: WorkerPool, progress: Progress,
                 elapsed_before: float, on_told: Callable[[optuna.trial.FrozenTrial], None]):
        self.spec, self.study, self.space, self.proposer = spec, study, space, proposer
        self.pool, self.progress, self.on_told = pool, progress, on_told
        self.elapsed_before, self.session_start = elapsed_before, time.monotonic()
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        self.cache = PlanCache(finished)
        self.teller = Teller(study, storage, spec.max_accuracy_drop, self.told,
                             used=sum(t.state in SETTLED for t in finished))
        self.ready: Task | None = None
        self.exhausted = self.finished = False   # finished: FINISHED said, never ask again
        self.measured_now = self.fresh_deaths = self.consecutive_errors = 0
        self.stopped_by = "trials"
        self._handlers = {WorkerReady: lambda event: None, WorkerFailedToStart: self._on_start_failed,
                          TrialDone: self._on_done, TrialRaised: self._on_raised, WorkerDied: self._on_died}
        for trial in finished:
            record_progress(self.progress, trial, self.teller.reference.latency_ms, earlier=True)
            proposer.observe(trial)
        # Plans whose config ended the driver's process when evaluated in-process (tell.IN_PROCESS_ATTR): never
        # evaluated again, or a sampler that proposes them anew would crash the study once per proposal.
        self.killers = _announce_killers(process_killers(finished), progress)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.session_start)

    def budget_left(self) -> bool:
        return self.teller.used + self.cache.outstanding() < self.spec.trials

    def timed_out(self) -> bool:
        return self.spec.timeout is not None and self.elapsed() >= self.spec.timeout

    def told(self, frozen: optuna.trial.FrozenTrial) -> None:
        record_progress(self.progress, frozen, self.teller.reference.latency_ms)
        self.study.set_user_attr(ELAPSED_S, round(self.elapsed(), 3))
        self.on_told(frozen)
        note = self.proposer.observe(frozen)
        if note:
            self.progress.message(f"dsm-tune: {note}")
        self.progress.update(force=True)

    def _admit(self, proposal: Proposal) -> Task | None:
        """The task for a worker, or None when the proposal was settled here."""
        trial = proposal.trial
        try:
            if proposal.cfg is None:
                raise SpaceError(proposal.invalid or "the proposer gave no config")
            cfg, key = proposal.cfg, plan_key(proposal.cfg)
        except (SpaceError, ValueError) as exc:   # ConfigError is a ValueError
            self.teller.fail(trial, proposal.invalid or f"no valid config from these parameters: {exc}")
            return None
        trial.set_user_attr(CONFIG, config_attr(cfg))
        trial.set_user_attr(CONFIG_KEY, cfg.key())
        trial.set_user_attr(PLAN_KEY, key)
        if proposal.seed_kind:
            trial.set_user_attr(SEED_KIND, proposal.seed_kind)
        task = Task(trial, cfg, key, trial.user_attrs.get(SEED_KIND), dict(proposal.options))
        if key in self.killers:
            self.teller.prune(trial, f"not measured: the same plan as trial {self.killers[key]}, whose config ended "
                                     f"the process when evaluated in-process")
            return None
        violation = self.space.violation(cfg)
        if violation is not None:
            self.teller.prune(trial, f"not measured: {violation}")
            return None
        earlier = self.cache.measured(task)
        if earlier is not None:
            self.teller.copy(task, earlier)
            return None
        return task if self.cache.claim(task) else None

    def _next_task(self) -> Task | None:
        self.exhausted = self.finished
        while self.ready is None and not self.finished and not self.timed_out() and self.budget_left():
            proposal = self.proposer.propose(self.study)
            if proposal is None or proposal is FINISHED:
                self.exhausted, self.finished = True, proposal is FINISHED
                break
            self.ready = self._admit(proposal)
        return self.ready

    def dispatch(self, prefetch: bool = True) -> None:
        """Give every idle worker a trial; then, if `prefetch`, ask the next one in advance."""
        for slot in self.pool.idle_slots():
            task = self._next_task()
            if task is None:
                break
            self.ready = None
            task.started = time.monotonic()
            task.trial.set_user_attr(WORKER, slot.name)
            self.pool.submit(slot, task.cfg, task, task.options)
        if prefetch and self.pool.pending():
            self._next_task()

    def handle(self, event: PoolEvent) -> None:
        self._handlers[type(event)](event)

    def _settle(self, waiters: list[Task], finished: optuna.trial.FrozenTrial | None) -> None:
        for waiter in waiters:
            if finished is not None and finished.state in SETTLED:
                self.teller.copy(waiter, finished)
            else:   # the original did not finish: this one is measured itself in a later run
                self.teller.requeue(waiter, "the trial it duplicated did not finish; queued again")


    def _on_died(self, event: WorkerDied) -> None:
        if event.task is not None:
            waiters = self.cache.release(event.task)
            self.teller.fail(event.task.trial, event.reason, worker=event.slot.name)
            self._settle(waiters, None)
        if event.completed:
            self.fresh_deaths = 0
            self.progress.message(f"dsm-tune: {event.reason}; replacing it")
            self.pool.replace(event.slot)
        else:
            self._count_fresh_death(event.slot, event.reason)

    def _on_raised(self, event: TrialRaised) -> None:
        waiters = self.cache.release(event.task)
        self.fresh_deaths = 0
        self.consecutive_errors += 1
        self.teller.fail(event.task.trial, f"evaluation failed: {event.error}", worker=event.slot.name)
        self._settle(waiters, None)
        if self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
            raise StudyError(f"the last {self.consecutive_errors} trials all failed in evaluation, last with: "
                             f"{event.error}; the study is kept in {self.spec.study_dir}")

    def _on_done(self, event: TrialDone) -> None:
        task = event.task
        waiters = self.cache.release(task)
        self.fresh_deaths = self.consecutive_errors = 0
        self.measured_now += 1
        finished = self.teller.result(task, event.result, worker=event.slot.name,
                                      wall_s=time.monotonic() - task.started)
        self.cache.remember(finished)
        self._settle(waiters, finished)

    def _on_start_failed(self, event: WorkerFailedToStart) -> None:
        if event.info.error is not None:
            raise event.info.error   # a user error (missing data, unknown model): as itself, at once
        self._count_fresh_death(event.slot, f"{event.slot.name} could not start: {event.info.error_text}")

    def _count_fresh_death(self, slot: Slot, reason: str) -> None:
        self.fresh_deaths += 1
        if self.fresh_deaths >= MAX_FRESH_DEATHS:
            raise StudyError(f"workers keep dying before finishing a trial ({self.fresh_deaths} in a row), last: "
                             f"{reason}; finished trials are kept in {self.spec.folder.storage_file}")
        self.progress.message(f"dsm-tune: {reason}; starting a new worker")
        self.pool.replace(slot)

    def run(self) -> None:
        while True:
            if self.timed_out() and self.stopped_by != "timeout":
                self.stopped_by = "timeout"
                if self.ready is not None:
                    self._release_ready("the time budget ran out before it started; queued again")
                if self.pool.busy_slots():
                    self.progress.message("dsm-tune: time budget reached; waiting for the running trials")
            self.dispatch()
            if not self.pool.busy_slots() and self.ready is None:
                if not self.budget_left() or self.timed_out():
                    return
                if self.exhausted:
                    self.stopped_by = "exhausted"
                    self.progress.message("dsm-tune: the proposer has no more configs to try")
                    return
            self.progress.running = len(self.pool.busy_slots())
            events = self.pool.wait(WAIT_SLICE_S)
            if events:
                # Freed workers get their next trial before the driver spends time writing results.
                self.dispatch(prefetch=False)
            for event in events:
                self.handle(event)
            self.progress.running = len(self.pool.busy_slots())
            self.progress.update()

    def _release_ready(self, reason: str) -> None:
        task, self.ready = self.ready, None
        if task is not None:
            waiters = self.cache.release(task)
            self.teller.requeue(task, reason)
            self._settle(waiters, None)

    def interrupt(self) -> int:
        """Ctrl-C: stop the workers; trials not finished are FAILed and queued again for the next run."""
        running = [t for t in self.pool.cancel_all() if t is not None]
        if self.ready is not None:
            running.append(self.ready)
            self.ready = None
        unfinished = running + self.cache.drain()
        for task in unfinished:
            self.teller.requeue(task, "interrupted before it finished; queued again for the next run")
        return len(unfinished)


def record_progress(progress: Progress, trial: optuna.trial.FrozenTrial, reference_ms: float | None,
                    earlier: bool = False) -> None:
    attrs = trial.user_attrs
    progress.reference_ms = reference_ms
    progress.record(trial.state.name, attrs.get(ACCURACY_DROP), attrs.get(LATENCY_MS), attrs.get(SPEEDUP),
                    trial.number, earlier=earlier, noisy=truthy(attrs.get(SPEEDUP_NOISY)),
                    drop_interval=(attrs.get(ACCURACY_DROP_CI_LOW), attrs.get(ACCURACY_DROP_CI_HIGH)))


def _announce_killers(killers: dict[str, int], progress: Progress) -> dict[str, int]:
    for number in sorted(killers.values()):
        progress.message(f"dsm-tune: trial {number}'s config ended the process each of the {MAX_PROCESS_DEATHS} "
                         f"times it was evaluated in-process: failed, not measured again")
    return killers
