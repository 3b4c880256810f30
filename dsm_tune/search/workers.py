"""Ray workers: one actor per device of the target, each holding one evaluator (model, data, baselines) for the
whole study and evaluating configs one at a time.

Ray is imported lazily: a local Ray is bound to loopback only if the environment says so before Ray's first
import (see `start_ray`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dsm_tune.errors import DSMTuneError
from dsm_tune.merging import DSMConfig, ModelFingerprint, block_plan

# Ray reads this once, when it is first imported: "0" makes a local Ray resolve its node address to loopback, so
# every Ray server of a local study listens on 127.0.0.1 only (ray.init's `_node_ip_address="127.0.0.1"` alone is
# mapped back to the routable address by Ray 2.x).
_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_RAY_NICENESS_ENV = "RAY_worker_niceness"

# On a CPU host every worker of every study shares the same cores, so the lock is one file per host.
CPU_TIMING_LOCK = Path(tempfile.gettempdir()) / "dsm-tune-cpu-timing.lock"


class WorkerError(DSMTuneError):
    """Ray could not be started or reached, or workers cannot be placed."""


# Ray session -----------------------------------------------------------------------------------------------------

def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address`, or start a private local Ray on loopback. Returns True if this call started it
    (the caller then shuts it down); an already initialised Ray (e.g. in tests) is reused as is."""
    if address is None:
        os.environ.setdefault(_RAY_LOOPBACK_ENV, "0")
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
        raise WorkerError(f"cannot start or reach {where}: {str(exc).splitlines()[0]}") from None
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


def _accepts_guard(evaluate: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(evaluate).parameters
    except (TypeError, ValueError):
        return False
    return "guard" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


# The actor -------------------------------------------------------------------------------------------------------

class TrialWorker:
    """Body of one Ray actor. Construction errors are kept and reported by `describe`, so a user error (missing
    data, unknown model) reaches the driver as itself, not as an anonymous dead actor."""

    def __init__(self, factory: Callable[[], Any], name: str, guard_timing: bool):
        self.name = name
        self.host = socket.gethostname()
        self.pid = os.getpid()
        _restore_normal_priority()
        self.guard = TimingGuard() if guard_timing else None
        self.evaluator = None
        self.init_error: BaseException | None = None
        started = time.perf_counter()
        self.info: dict[str, Any] = {"name": name, "host": self.host, "pid": self.pid}
        # Building the evaluator and reading its baseline measure the dense model (and fill the shared dense-output
        # cache): on a CPU host that is timing too, so workers start one after another.
        startup_guard = self.guard.timing() if self.guard is not None else contextlib.nullcontext()
        try:
            with startup_guard:
                self.evaluator = factory()
                baseline = dict(getattr(self.evaluator, "baseline", {}) or {})
            self.info["fingerprint"] = self.evaluator.fingerprint.to_dict()
            self.info["baseline"] = baseline
            self.info["data_fingerprint"] = (getattr(self.evaluator, "data_fingerprint", None)
                                             or baseline.get("data_fingerprint"))
        except Exception as exc:  # reported by describe(); the driver decides
            self.init_error = exc
            self.info["error"] = exc if isinstance(exc, DSMTuneError) else None
            self.info["error_text"] = f"{type(exc).__name__}: {exc}"
            self.info["trace"] = traceback.format_exc(limit=-3)
        self.info["init_seconds"] = time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        return self.info

    def evaluate(self, cfg: DSMConfig) -> dict[str, Any]:
        """Measure one config. Exceptions come back as {"error": ...} so the actor stays usable."""
        started = time.perf_counter()
        try:
            if self.evaluator is None:
                raise RuntimeError(f"worker {self.name} has no evaluator: {self.init_error}")
            result = self._evaluate(cfg)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "user_error": isinstance(exc, DSMTuneError),
                    "trace": traceback.format_exc(limit=-3), "seconds": time.perf_counter() - started}
        if self.guard is not None:
            result.setdefault("lock_wait_s", round(self.guard.waited_s, 3))
            self.guard.waited_s = 0.0
        return {"result": result, "seconds": time.perf_counter() - started}

    def _evaluate(self, cfg: DSMConfig) -> dict[str, Any]:
        evaluate = self.evaluator.evaluate
        if self.guard is None:
            return dict(evaluate(cfg))
        if _accepts_guard(evaluate):
            return dict(evaluate(cfg, guard=self.guard))
        # The evaluator does not expose its phases: the whole evaluation is one timed section.
        with self.guard.timing():
            return dict(evaluate(cfg))


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
    info: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"worker-{self.index}" + (f".{self.generation}" if self.generation else "")

    @property
    def idle(self) -> bool:
        return self.info is not None and self.task_ref is None


@dataclass
class PoolEvent:
    kind: str                 # "ready" | "done" | "died"
    slot: Slot
    task: Any = None
    payload: dict[str, Any] | None = None
    reason: str = ""


class WorkerPool:
    """The driver's view of the actors: start, submit, wait for whatever finishes, replace the dead."""

    def __init__(self, factory: Callable[[], Any], size: int, placement: Placement):
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

    def submit(self, slot: Slot, cfg: DSMConfig, task: Any) -> None:
        slot.task = task
        slot.task_ref = slot.actor.evaluate.remote(cfg)

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
                events.append(PoolEvent("ready", slot, payload=value))
            else:
                task = slot.task
                slot.task_ref = slot.task = None
                slot.completed += 1
                events.append(PoolEvent("done", slot, task=task, payload=value))
        return events

    def _died(self, slot: Slot, exc: BaseException, during_start: bool) -> PoolEvent:
        task = slot.task
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = type(exc).__name__
        if isinstance(exc, self._ray.exceptions.OutOfMemoryError) or "running low on memory" in str(exc):
            what = f"out of memory, {what}"
        reason = f"{slot.name} died {'while starting' if during_start else 'mid-trial'} ({what}: {first})"
        slot.ready_ref = slot.task_ref = slot.task = None
        slot.info = None
        return PoolEvent("died", slot, task=task, reason=reason, payload={"during_start": during_start,
                                                                          "completed": slot.completed})

    def cancel_all(self) -> list[Any]:
        """Kill every actor; returns the tasks that were running."""
        running = [s.task for s in self.slots if s.task_ref is not None]
        for slot in self.slots:
            with contextlib.suppress(Exception):
                self._ray.kill(slot.actor, no_restart=True)
            slot.ready_ref = slot.task_ref = slot.task = None
            slot.info = None
        return running


# A stand-in evaluator --------------------------------------------------------------------------------------------

class StandInEvaluator:
    """A fixed-cost evaluator with deterministic metrics computed from the token schedule, for tests and
    benchmarks of the orchestration (no model, no data).

    Latency follows the tokens each block processes; accuracy drop grows with tokens merged early and with global
    matching, and shrinks with proportional attention, so the search has a real trade-off to find. A config whose
    key is in `die_on` ends the worker process abruptly (as a crash or OOM kill would); `fail_on` raises instead
    (`"*"`: every config).
    """

    def __init__(self, fingerprint: ModelFingerprint, cost_s: float = 0.0, die_on: tuple[str, ...] = (),
                 fail_on: tuple[str, ...] = (), die_on_init: bool = False, baseline_latency_ms: float = 10.0,
                 die_marker: str | None = None):
        if die_on_init:
            os._exit(3)
        self.fingerprint = fingerprint
        self.cost_s = cost_s
        self.die_on = set(die_on)
        self.fail_on = set(fail_on)
        self.die_marker = die_marker
        self.baseline_latency_ms = baseline_latency_ms
        self.baseline = {"metric": "top1", "metric_value": 90.0, "latency_ms": baseline_latency_ms,
                         "data_fingerprint": "stand-in"}
        self.data_fingerprint = "stand-in"

    def evaluate(self, cfg: DSMConfig, guard: TimingGuard | None = None) -> dict[str, Any]:
        key = cfg.key()
        if key in self.die_on:
            # Die only once per marker file when one is given, so a re-run of the same config can succeed.
            if self.die_marker is None or not Path(self.die_marker).exists():
                if self.die_marker is not None:
                    Path(self.die_marker).write_text(key)
                os._exit(1)
        if key in self.fail_on or "*" in self.fail_on:
            raise RuntimeError(f"stand-in failure for {key}")
        guard_accuracy = guard.accuracy() if guard is not None else contextlib.nullcontext()
        guard_timing = guard.timing() if guard is not None else contextlib.nullcontext()
        started = time.perf_counter()
        with guard_accuracy:
            time.sleep(self.cost_s * 0.8)
            plans = block_plan(cfg, self.fingerprint)
            initial = self.fingerprint.grid[0] * self.fingerprint.grid[1]
            blocks = len(plans)
            drop = 0.0
            for index, plan in enumerate(plans):
                lateness = (index + 1) / blocks
                penalty = 1.0 if plan.windows == 1 else 0.6   # local matching loses less
                drop += 5.0 * (plan.merged / initial) * penalty * (1.5 - lateness) ** 2
            if cfg.proportional_attention:
                drop *= 0.85
        with guard_timing:
            time.sleep(self.cost_s * 0.2)
            mean_tokens = sum(p.tokens_in + p.tokens_out for p in plans) / (2 * blocks * initial)
            latency = self.baseline_latency_ms * (0.08 + 0.92 * mean_tokens)
        final = plans[-1].tokens_out / initial if plans else 1.0
        return {
            "metric": "top1", "metric_value": 90.0 - drop, "accuracy_drop": round(drop, 6), "aborted": False,
            "latency_ms": round(latency, 6), "latency_iqr_ms": 0.0, "baseline_latency_ms": self.baseline_latency_ms,
            "speedup": round(self.baseline_latency_ms / latency, 6), "flops_ratio": round(mean_tokens, 6),
            "tokens_kept": round(final, 6), "num_images": 100, "eval_seconds": time.perf_counter() - started,
        }


@dataclass(frozen=True)
class StandInFactory:
    """Picklable factory of `StandInEvaluator` for Ray actors."""

    fingerprint: ModelFingerprint
    cost_s: float = 0.0
    die_on: tuple[str, ...] = ()
    fail_on: tuple[str, ...] = ()
    die_on_init: bool = False
    die_marker: str | None = None

    def __call__(self) -> StandInEvaluator:
        return StandInEvaluator(self.fingerprint, cost_s=self.cost_s, die_on=self.die_on, fail_on=self.fail_on,
                                die_on_init=self.die_on_init, die_marker=self.die_marker)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

