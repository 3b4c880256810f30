"""Ray workers: one actor per device of the target, each holding one evaluator (model, data, baselines) for the
whole study and evaluating configs one at a time; or, for `run --no-ray`, one such worker in the driver's own
process (`InProcessPool`, same interface as `WorkerPool`).

Ray is imported lazily: a local Ray is bound to loopback only if the environment says so before Ray's first
import (see `start_ray`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Union

from dsm_tune.errors import DSMTuneError
from dsm_tune.merging import DSMConfig, ModelFingerprint
from dsm_tune.search.ray_session import RAY_LOOPBACK_ENV

_RAY_NICENESS_ENV = "RAY_worker_niceness"

# On a CPU host every worker of every study shares the same cores, so the lock is one file per host.
CPU_TIMING_LOCK = Path(tempfile.gettempdir()) / "dsm-tune-cpu-timing.lock"


class WorkerError(DSMTuneError):
    """Ray could not be started or reached, or workers cannot be placed."""


# Ray session -----------------------------------------------------------------------------------------------------

def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address`, or start a private local Ray on loopback. Returns True if this call started it
    (the caller then shuts it down); an already initialised Ray (e.g. in tests) is reused as is."""
    from dsm_tune.search.ray_session import connection_hint, prepare_connection

    prepare_connection(address)   # before Ray's import: an explicit address joins in token mode when a token exists
    if address is None:
        os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
        # Ray runs its workers at niceness 15; a worker timing a model must not yield the cores to every other
        # process of the host, or its latency measures their load. The raylet reads this when it starts.
        os.environ.setdefault(_RAY_NICENESS_ENV, "0")
    import ray

    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=True, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise WorkerError(f"cannot start or reach {where}: {str(exc).splitlines()[0]}{connection_hint(address)}") \
            from None
    return True


def stop_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()


# Timing guard ------------------------------------------------------------------------------------------------------

class TimingGuard:
    """Host-wide reader-writer lock around the phases of an evaluation on a CPU host.

    On a CPU host, latency is only honest when nothing else computes while it is timed: another worker's accuracy
    pass competes for the same cores and caches. Accuracy passes may overlap each other (only their speed
    suffers, not their results), so they hold the lock shared and timing holds it exclusive. An OS file lock
    (flock) is used rather than a Ray actor because the kernel releases it when a worker dies mid-measurement,
    so a crash can never leave the host locked. A second "turnstile" lock gives waiting timers priority over new
    accuracy passes, so timing cannot be starved by workers taking turns at accuracy.

    GPU targets need no guard: each actor owns its device, and the target's one-measurement-per-device rule is
    the actor's own sequence of evaluations.
    """

    def __init__(self, path: Path = CPU_TIMING_LOCK):
        self.path = Path(path)
        self.turnstile_path = self.path.with_name(self.path.name + ".turnstile")
        self.waited_s = 0.0

    @contextlib.contextmanager
    def _flock(self, path: Path, mode: int) -> Iterator[None]:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            start = time.perf_counter()
            fcntl.flock(fd, mode)
            self.waited_s += time.perf_counter() - start
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def accuracy(self) -> Iterator[None]:
        import fcntl

        with self._flock(self.turnstile_path, fcntl.LOCK_EX):
            pass
        with self._flock(self.path, fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        import fcntl

        with contextlib.ExitStack() as stack:
            stack.enter_context(self._flock(self.turnstile_path, fcntl.LOCK_EX))
            stack.enter_context(self._flock(self.path, fcntl.LOCK_EX))
            yield


def _restore_normal_priority() -> None:
    """Undo Ray's worker niceness where allowed (a cluster started without RAY_worker_niceness=0)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError):   # not permitted (unprivileged) or not POSIX: measure as placed
        pass


# The actor -------------------------------------------------------------------------------------------------------

class Evaluator(Protocol):
    """What a worker holds: built once per actor by the study's evaluator factory (`TrialEvaluator` in
    production, `dsm_tune.search.testing.StandInEvaluator` in tests and benchmarks)."""

    fingerprint: ModelFingerprint
    baseline: Mapping[str, Any]            # dense metric value and latency (study attr `baseline`)
    data_fingerprint: str | None

    def evaluate(self, cfg: DSMConfig, **options: Any) -> Mapping[str, Any]:
        """Measure one config; the keys become the trial's user attrs (see docs/interfaces.md)."""


@dataclass(frozen=True)
class WorkerInfo:
    """What a started actor reports: who it is and what it loaded, or why it could not start."""

    name: str
    host: str
    pid: int
    fingerprint: dict[str, Any] | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    error: DSMTuneError | None = None       # a user error (missing data, unknown model): raised by the driver
    error_text: str | None = None           # any construction failure, as one line

    @property
    def started(self) -> bool:
        return self.error_text is None


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's answer: the evaluator's figures, or the error it raised (the actor stays usable)."""

    result: dict[str, Any] | None = None
    error: str | None = None
    user_error: bool = False


class TrialWorker:
    """Body of one Ray actor. Construction errors are kept and reported by `describe`, so a user error (missing
    data, unknown model) reaches the driver as itself, not as an anonymous dead actor."""

    def __init__(self, factory: Callable[[], Evaluator], name: str, guard_timing: bool, in_process: bool = False):
        self.name = name
        if not in_process:   # the driver's own process keeps the priority its user gave it
            _restore_normal_priority()
        self.guard = TimingGuard() if guard_timing else None
        self.evaluator: Evaluator | None = None
        self.init_error: BaseException | None = None
        identity = dict(name=name, host=socket.gethostname(), pid=os.getpid())
        # Building the evaluator and reading its baseline measure the dense model (and fill the shared dense-output
        # cache): on a CPU host that is timing too, so workers start one after another.
        try:
            with self._timed():
                self.evaluator = factory()
                baseline = dict(self.evaluator.baseline)
            self.info = WorkerInfo(**identity, fingerprint=self.evaluator.fingerprint.to_dict(), baseline=baseline,
                                   data_fingerprint=self.evaluator.data_fingerprint)
        except Exception as exc:  # reported by describe(); the driver decides
            self.init_error = exc
            self.info = WorkerInfo(**identity, error=exc if isinstance(exc, DSMTuneError) else None,
                                   error_text=f"{type(exc).__name__}: {exc}")

    def _timed(self) -> contextlib.AbstractContextManager:
        return self.guard.timing() if self.guard is not None else contextlib.nullcontext()

    def describe(self) -> WorkerInfo:
        return self.info

    def evaluate(self, cfg: DSMConfig, options: Mapping[str, Any] | None = None) -> Evaluation:
        """Measure one config with the evaluator's `options`. On a CPU host with several workers the whole
        evaluation holds the host's timing lock (see `TimingGuard`)."""
        try:
            if self.evaluator is None:
                raise RuntimeError(f"worker {self.name} has no evaluator: {self.init_error}")
            with self._timed():
                result = dict(self.evaluator.evaluate(cfg, **dict(options or {})))
        except Exception as exc:
            return Evaluation(error=f"{type(exc).__name__}: {exc}", user_error=isinstance(exc, DSMTuneError))
        if self.guard is not None:
            result.setdefault("lock_wait_s", round(self.guard.waited_s, 3))
            self.guard.waited_s = 0.0
        return Evaluation(result=result)


@dataclass
class Placement:
    """Ray resources of one worker actor, from the target profile."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    guard_timing: bool = False

    @classmethod
    def for_target(cls, target: Any, workers: int) -> "Placement":
        num_gpus = float(getattr(target, "num_gpus", 0) or 0)
        resources = {str(k): float(v) for k, v in (getattr(target, "ray_resources", None) or {}).items()}
        on_cpu = str(getattr(target, "device", "cpu")).startswith("cpu")
        return cls(num_cpus=1.0, num_gpus=num_gpus, resources=resources, guard_timing=on_cpu and workers > 1)


@dataclass
class Slot:
    """One worker position in the pool; its actor is replaced when it dies."""

    index: int
    generation: int = 0
    actor: Any = None
    ready_ref: Any = None
    task_ref: Any = None
    task: Any = None          # what the driver asked for (its own trial context)
    completed: int = 0        # evaluations finished by the current actor
    info: WorkerInfo | None = None

    @property
    def name(self) -> str:
        return f"worker-{self.index}" + (f".{self.generation}" if self.generation else "")

    @property
    def idle(self) -> bool:
        return self.info is not None and self.task_ref is None


# What `WorkerPool.wait` reports, one type per kind of happening; `task` is whatever the driver submitted.

@dataclass
class WorkerReady:
    slot: Slot
    info: WorkerInfo


@dataclass
class WorkerFailedToStart:
    """The actor runs but its evaluator could not be built (`info.error_text` says why)."""

    slot: Slot
    info: WorkerInfo


@dataclass
class TrialDone:
    slot: Slot
    task: Any
    result: dict[str, Any]


@dataclass
class TrialRaised:
    slot: Slot
    task: Any
    error: str
    user_error: bool


@dataclass
class WorkerDied:
    """The actor process is gone; `task` (None while starting) never finished."""

    slot: Slot
    task: Any
    reason: str
    completed: int            # evaluations the actor finished before dying


PoolEvent = Union[WorkerReady, WorkerFailedToStart, TrialDone, TrialRaised, WorkerDied]


class WorkerPool:
    """The driver's view of the actors: start, submit, wait for whatever finishes, replace the dead."""

    def __init__(self, factory: Callable[[], Evaluator], size: int, placement: Placement):
        import ray

        self._ray = ray
        self.factory = factory
        self.placement = placement
        options: dict[str, Any] = {"num_cpus": placement.num_cpus, "max_restarts": 0, "max_task_retries": 0}
        if placement.num_gpus:
            options["num_gpus"] = placement.num_gpus
        if placement.resources:
            options["resources"] = placement.resources
        self._actor_cls = ray.remote(**options)(TrialWorker)
        self.slots = [Slot(i) for i in range(size)]
        for slot in self.slots:
            self._launch(slot)

    def _launch(self, slot: Slot) -> None:
        slot.info = None
        slot.task_ref = slot.task = None
        slot.completed = 0
        slot.actor = self._actor_cls.options(name=None).remote(self.factory, slot.name, self.placement.guard_timing)
        slot.ready_ref = slot.actor.describe.remote()

    def replace(self, slot: Slot) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(slot.actor, no_restart=True)
        slot.generation += 1
        self._launch(slot)

    def idle_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.idle]

    def busy_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.task_ref is not None]

    def submit(self, slot: Slot, cfg: DSMConfig, task: Any, options: Mapping[str, Any] | None = None) -> None:
        """Evaluate `cfg` on the slot's actor as `evaluator.evaluate(cfg, **options)` (options: plain data)."""
        slot.task = task
        slot.task_ref = slot.actor.evaluate.remote(cfg, dict(options or {}))

    def pending(self) -> bool:
        return any(s.ready_ref is not None or s.task_ref is not None for s in self.slots)

    def wait(self, timeout: float) -> list[PoolEvent]:
        """Events for the refs that resolved within `timeout` seconds (possibly none)."""
        by_ref = {}
        for slot in self.slots:
            if slot.ready_ref is not None:
                by_ref[slot.ready_ref] = slot
            if slot.task_ref is not None:
                by_ref[slot.task_ref] = slot
        if not by_ref:
            return []
        done, rest = self._ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if done and rest:
            more, _ = self._ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        events = []
        for ref in done:
            slot = by_ref[ref]
            is_ready = ref is slot.ready_ref or ref == slot.ready_ref
            try:
                value = self._ray.get(ref)
            except self._ray.exceptions.RayError as exc:
                # The actor process is gone (crash, os._exit, OOM kill, node death) or unreachable.
                events.append(self._died(slot, exc, during_start=is_ready))
                continue
            if is_ready:
                slot.ready_ref = None
                slot.info = value
                events.append(WorkerReady(slot, value) if value.started else WorkerFailedToStart(slot, value))
                continue
            task = slot.task
            slot.task_ref = slot.task = None
            slot.completed += 1
            if value.error is not None:
                events.append(TrialRaised(slot, task, value.error, value.user_error))
            else:
                events.append(TrialDone(slot, task, value.result))
        return events

    def _died(self, slot: Slot, exc: BaseException, during_start: bool) -> WorkerDied:
        task = slot.task
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = type(exc).__name__
        if isinstance(exc, self._ray.exceptions.OutOfMemoryError) or "running low on memory" in str(exc):
            what = f"out of memory, {what}"
        reason = f"{slot.name} died {'while starting' if during_start else 'mid-trial'} ({what}: {first})"
        slot.ready_ref = slot.task_ref = slot.task = None
        slot.info = None
        return WorkerDied(slot, task, reason, slot.completed)

    def cancel_all(self) -> list[Any]:
        """Kill every actor; returns the tasks that were running."""
        running = [s.task for s in self.slots if s.task_ref is not None]
        for slot in self.slots:
            with contextlib.suppress(Exception):
                self._ray.kill(slot.actor, no_restart=True)
            slot.ready_ref = slot.task_ref = slot.task = None
            slot.info = None
        return running


class InProcessPool:
    """`WorkerPool`'s interface over one `TrialWorker` in the driver's own process (`run --no-ray`): no Ray is
    imported. The worker is built, and each trial evaluated, synchronously inside `wait`, so the driver's loop is
    the same as with Ray. A Ctrl-C during an evaluation propagates from `wait` (the loop requeues the trial); a
    config that ends the process ends the driver with it, which is why `on_evaluate(task, False)` runs first and
    `on_evaluate(task, True)` once the evaluation returned: the driver marks the trial so that a resume knows
    which config was being evaluated when the process ended (`tell.recover_stale`)."""

    def __init__(self, factory: Callable[[], Evaluator], placement: Placement,
                 on_evaluate: Callable[[Any, bool], None] | None = None):
        self.factory = factory
        self.placement = placement
        self.on_evaluate = on_evaluate
        self.slots = [Slot(0)]
        self._workers: dict[int, TrialWorker] = {}
        self._options: dict[int, dict[str, Any]] = {}
        self._cfgs: dict[int, DSMConfig] = {}
        for slot in self.slots:
            self._launch(slot)

    def _launch(self, slot: Slot) -> None:
        slot.info = None
        slot.task_ref = slot.task = None
        slot.completed = 0
        self._workers.pop(slot.index, None)
        slot.ready_ref = "start"   # built at the next `wait`

    def replace(self, slot: Slot) -> None:
        slot.generation += 1
        self._launch(slot)

    def idle_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.idle]

    def busy_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.task_ref is not None]

    def submit(self, slot: Slot, cfg: DSMConfig, task: Any, options: Mapping[str, Any] | None = None) -> None:
        """Queue `cfg` for the slot's worker; it is evaluated by the next `wait`."""
        slot.task = task
        slot.task_ref = "evaluate"
        self._cfgs[slot.index] = cfg
        self._options[slot.index] = dict(options or {})

    def pending(self) -> bool:
        return any(s.ready_ref is not None or s.task_ref is not None for s in self.slots)

    def wait(self, timeout: float) -> list[PoolEvent]:
        """Start a worker that is due, else run the submitted evaluations; `timeout` does not bound either (an
        evaluation takes what it takes, as the Ray pool's remote one does)."""
        events: list[PoolEvent] = []
        for slot in self.slots:
            if slot.ready_ref is not None:
                worker = TrialWorker(self.factory, slot.name, self.placement.guard_timing, in_process=True)
                slot.ready_ref = None
                slot.info = worker.describe()
                if slot.info.started:
                    self._workers[slot.index] = worker
                    events.append(WorkerReady(slot, slot.info))
                else:
                    events.append(WorkerFailedToStart(slot, slot.info))
                return events   # as with Ray: the driver sees the worker ready before it submits to it
        for slot in self.busy_slots():
            task, cfg, options = slot.task, self._cfgs.pop(slot.index), self._options.pop(slot.index)
            if self.on_evaluate is not None:
                self.on_evaluate(task, False)
            value = self._workers[slot.index].evaluate(cfg, options)
            if self.on_evaluate is not None:
                self.on_evaluate(task, True)
            slot.task_ref = slot.task = None
            slot.completed += 1
            if value.error is not None:
                events.append(TrialRaised(slot, task, value.error, value.user_error))
            else:
                events.append(TrialDone(slot, task, value.result))
        return events

    def cancel_all(self) -> list[Any]:
        """Drop the worker (its evaluator is freed); returns the tasks that were submitted or running."""
        running = [s.task for s in self.slots if s.task_ref is not None]
        for slot in self.slots:
            slot.ready_ref = slot.task_ref = slot.task = None
            slot.info = None
        self._workers.clear()
        self._cfgs.clear()
        self._options.clear()
        return running
