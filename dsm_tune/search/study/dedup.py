"""The plan cache: configs that compute the same merged model (same `space.plan_key`) are measured once.

A task whose plan was measured already copies that measurement; one whose plan is being measured waits for it;
only the first of a plan goes to a worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import optuna
from optuna.trial import TrialState

from dsm_tune.record import DUPLICATE_OF, PLAN_KEY
from dsm_tune.merging import DSMConfig

SETTLED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class Task:
    """One asked trial on its way to a worker (or to a copy)."""

    trial: optuna.trial.Trial
    cfg: DSMConfig
    key: str                                    # plan key
    seed_kind: str | None
    options: dict[str, Any] = field(default_factory=dict)   # for `evaluator.evaluate(cfg, **options)`
    started: float = field(default_factory=time.monotonic)


class PlanCache:
    def __init__(self, finished: Iterable[optuna.trial.FrozenTrial] = ()):
        self.known: dict[str, optuna.trial.FrozenTrial] = {}   # plan key -> trial holding its measurement
        self.inflight: dict[str, Task] = {}                    # plan key -> task asked for a worker
        self.waiting: dict[str, list[Task]] = {}               # plan key -> duplicates waiting for it
        for trial in finished:
            if trial.state in SETTLED and DUPLICATE_OF not in trial.user_attrs:
                self.remember(trial)

    def remember(self, trial: optuna.trial.FrozenTrial) -> None:
        key = trial.user_attrs.get(PLAN_KEY)
        if key:
            self.known.setdefault(key, trial)

    def outstanding(self) -> int:
        return len(self.inflight) + sum(len(tasks) for tasks in self.waiting.values())

    def measured(self, task: Task) -> optuna.trial.FrozenTrial | None:
        return self.known.get(task.key)

    def claim(self, task: Task) -> bool:
        """True when `task` is the first of its plan (it goes to a worker); otherwise it waits for that one."""
        if task.key in self.inflight:
            self.waiting.setdefault(task.key, []).append(task)
            return False
        self.inflight[task.key] = task
        return True

    def release(self, task: Task) -> list[Task]:
        """`task` ended (measured or not): its plan is no longer in flight; returns the duplicates that waited."""
        self.inflight.pop(task.key, None)
        return self.waiting.pop(task.key, [])

    def drain(self) -> list[Task]:
        """Forget everything in flight (an interrupt); returns the waiting duplicates."""
        waiting = [task for tasks in self.waiting.values() for task in tasks]
        self.inflight.clear()
        self.waiting.clear()
        return waiting
