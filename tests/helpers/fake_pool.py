"""A worker pool without Ray and without processes, for unit tests of the study's loop.

`FakePool` has the interface `Loop` uses (`dsm_tune.search.workers.WorkerPool` / `InProcessPool`): idle and busy
slots, `submit`, `pending`, `wait` returning typed events, `replace`, `cancel_all`, `placement`. Its workers are
ready from the start; `wait` runs every submitted config through a plain function, synchronously:

- the function returns a mapping: `TrialDone` with it as the result;
- it raises `WorkerDeath`: `WorkerDied` (the worker process is gone; the loop replaces the slot);
- it raises anything else: `TrialRaised` with the error as `TrialWorker.evaluate` words it.

`interrupt_on_wait=n` makes the n-th `wait` raise KeyboardInterrupt with the submitted trials still running, as a
Ctrl-C during an evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from dsm_tune.merging import DSMConfig
from dsm_tune.search.workers import (
    Placement, PoolEvent, Slot, TrialDone, TrialRaised, WorkerDied, WorkerInfo,
)

Evaluate = Callable[..., Mapping[str, Any]]      # evaluate(cfg, **options) -> result


class WorkerDeath(Exception):
    """Raised by a fake evaluation: the worker process ends while evaluating (a segfault, an OOM kill)."""


@dataclass
class Submitted:
    slot: str
    cfg: DSMConfig
    task: Any
    options: dict[str, Any]


@dataclass
class FakePool:
    evaluate: Evaluate
    size: int = 2
    interrupt_on_wait: int | None = None
    placement: Placement = field(default_factory=Placement)
    slots: list[Slot] = field(init=False)
    submitted: list[Submitted] = field(init=False, default_factory=list)   # every submit, in order
    replaced: list[str] = field(init=False, default_factory=list)          # slot names replaced, in order
    waits: int = field(init=False, default=0)
    cancelled: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.size)]
        for slot in self.slots:
            self._start(slot)
        self._cfgs: dict[int, tuple[DSMConfig, dict[str, Any]]] = {}

    def _start(self, slot: Slot) -> None:
        slot.info = WorkerInfo(name=slot.name, host="fake", pid=0)
        slot.task_ref = slot.task = None
        slot.completed = 0

    def idle_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.idle]

    def busy_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.task_ref is not None]

    def submit(self, slot: Slot, cfg: DSMConfig, task: Any, options: Mapping[str, Any] | None = None) -> None:
        assert slot.idle, f"{slot.name} got a second task while busy"
        slot.task, slot.task_ref = task, "evaluate"
        self._cfgs[slot.index] = (cfg, dict(options or {}))
        self.submitted.append(Submitted(slot.name, cfg, task, dict(options or {})))

    def pending(self) -> bool:
        return bool(self.busy_slots())

    def wait(self, timeout: float) -> list[PoolEvent]:
        self.waits += 1
        if self.interrupt_on_wait is not None and self.waits >= self.interrupt_on_wait:
            raise KeyboardInterrupt
        events: list[PoolEvent] = []
        for slot in self.busy_slots():
            task = slot.task
            cfg, options = self._cfgs.pop(slot.index)
            slot.task_ref = slot.task = None
            try:
                result = dict(self.evaluate(cfg, **options))
            except WorkerDeath as exc:
                slot.info = None   # its process is gone: not idle until replaced
                events.append(WorkerDied(slot, task, str(exc), slot.completed))
                continue
            except Exception as exc:
                slot.completed += 1
                events.append(TrialRaised(slot, task, f"{type(exc).__name__}: {exc}", user_error=False))
                continue
            slot.completed += 1
            events.append(TrialDone(slot, task, result))
        return events

    def replace(self, slot: Slot) -> None:
        self.replaced.append(slot.name)
        slot.generation += 1
        self._start(slot)

    def cancel_all(self) -> list[Any]:
        self.cancelled = True
        running = [s.task for s in self.slots if s.task_ref is not None]
        for slot in self.slots:
            slot.task_ref = slot.task = None
        self._cfgs.clear()
        return running
