"""The study driver: an Optuna multi-objective study (accuracy drop, latency) run by ask/tell over Ray workers.

The driver is the only writer of `<out>/<study>/study.db`; workers only evaluate configs. Everything a later run
needs to resume is in that storage: the spec, the model fingerprint and baseline (study user attrs), every trial's
config and measurements (trial user attrs), the wall time spent so far (`elapsed_s`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import optuna
from optuna.trial import TrialState

from dsm_tune.merging import DSMConfig, ModelFingerprint
from dsm_tune.search.progress import Progress, format_duration
from dsm_tune.search.results import (
    STORAGE_FILE, StudyError, json_safe, open_storage, pareto_numbers, storage_url, write_trials_csv,
)
from dsm_tune.search.space import (
    SearchSpace, SpaceError, parse_space, plan_key, precheck_space, replay_attrs,
)
from dsm_tune.search.tracking import trial_record
from dsm_tune.search.workers import Placement, PoolEvent, Slot, WorkerPool, is_finite_number, start_ray, stop_ray

__all__ = ["StudySpec", "StudyResult", "StudyError", "run_study", "resume_spec", "SAMPLERS", "DEFAULT_SAMPLER"]

SAMPLERS = ("tpe", "nsga2", "gp", "random")
# TPE with the constant liar: trials still running count as bad results when the next one is asked, so parallel
# workers are steered apart instead of all sampling the same promising point. It is useful from a handful of
# trials on (NSGA-II needs whole generations of ~50 trials before selection starts; the GP sampler refits a
# Gaussian process on every ask and has no notion of pending trials).
DEFAULT_SAMPLER = "tpe"
DIRECTIONS = ("minimize", "minimize")            # accuracy_drop, latency_ms
CONSTRAINT_NAME = "accuracy_drop"                # Optuna constraint: accuracy_drop - max_accuracy_drop <= 0
SPEC_FILE, SPACE_COPY, CSV_FILE, BEST_FILE, LOCK_FILE = "spec.json", "space.yaml", "trials.csv", "best.json", ".lock"
# Early abort: a trial is only evaluated to the end while its drop may still be under this many times the limit,
# so near-misses are fully measured (the plots show the boundary) and hopeless configs cost little.
ABORT_FACTOR = 2.0
MAX_FRESH_DEATHS = 3          # consecutive deaths of actors that never finished a trial -> stop
MAX_CONSECUTIVE_ERRORS = 5    # consecutive trials whose evaluation raised -> stop (a bug, not a bad config)
WAIT_SLICE_S = 0.5
STARTUP_NOTICE_S = 120.0      # a worker not up by then probably cannot be placed: say what it needs

# Fields that define what a study measures: a resume must not change them.
IDENTITY_FIELDS = ("model", "target", "batch_size", "dtype", "compile", "data", "limit", "metric", "checkpoint",
                   "pretrained", "max_accuracy_drop")


def default_study_name(model: str, target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{target}")


@dataclass
class StudySpec:
    """What to tune and how long: everything `dsm-tune run` takes, stored in the study as the `spec` attr."""

    model: str
    target: str = "cpu"
    batch_size: int | None = None
    dtype: str | None = None
    compile: bool | None = None
    data: str | None = None
    limit: int | None = None
    metric: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    max_accuracy_drop: float = 1.0
    trials: int = 24
    timeout: float | None = None
    sampler: str = DEFAULT_SAMPLER
    space: str | None = None
    seed: int = 0
    workers: int = 1
    out: Path = Path("runs")
    study: str | None = None
    ray_address: str | None = None
    mlflow_uri: str | None = None
    mlflow: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.checkpoint is not None:
            self.checkpoint = str(self.checkpoint)
        if self.space is not None:
            self.space = str(self.space)
        if self.study is None:
            self.study = default_study_name(self.model, self.target)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.study) or self.study in (".", ".."):
            raise StudyError(f"study name {self.study!r} must use letters, digits, '.', '_' or '-' only")
        if self.sampler not in SAMPLERS:
            raise StudyError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise StudyError(f"--trials must be a positive integer, got {self.trials!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise StudyError(f"--workers must be a positive integer, got {self.workers!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise StudyError(f"--timeout must be a positive number of seconds, got {self.timeout!r}")
        if not (isinstance(self.max_accuracy_drop, (int, float)) and math.isfinite(self.max_accuracy_drop)
                and self.max_accuracy_drop >= 0):
            raise StudyError(f"--max-accuracy-drop must be a number >= 0, got {self.max_accuracy_drop!r}")
        self.max_accuracy_drop = float(self.max_accuracy_drop)
        if self.limit is not None and self.limit < 1:
            raise StudyError(f"--limit must be a positive number of images, got {self.limit!r}")

    @property
    def study_dir(self) -> Path:
        return self.out / str(self.study)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudySpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class StudyResult:
    study_dir: Path
    study_name: str
    trials_done: int                  # COMPLETE + PRUNED trials in the storage
    trials_measured_now: int          # evaluated by workers in this run
    pareto: list[int]                 # feasible Pareto front (trial numbers), fastest first
    best_trial: int | None
    best_path: Path | None
    files: list[Path] = field(default_factory=list)
    interrupted: bool = False
    stopped_by: str = "trials"        # trials | timeout | interrupt


# Study opening -----------------------------------------------------------------------------------------------------

def make_sampler(name: str, seed: int, workers: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # Multivariate + group: the stage count makes the space conditional; grouping models each subspace
            # jointly instead of falling back to independent sampling.
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True, group=True,
                                              n_startup_trials=max(10, 2 * workers))
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(16, 4 * workers))
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


def _versions() -> dict[str, str]:
    found = {}
    for name, dist in (("dsm_tune", "dsm-tune"), ("timm", "timm"), ("torch", "torch"), ("optuna", "optuna"),
                       ("ray", "ray")):
        try:
            found[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def _study_exists(study_dir: Path, name: str) -> bool:
    if not (study_dir / STORAGE_FILE).is_file():
        return False   # do not create an empty storage just by looking
    storage = optuna.storages.RDBStorage(storage_url(study_dir))
    try:
        return name in {s.study_name for s in storage.get_all_studies()}
    finally:
        storage.remove_session()


def resume_spec(out: Path, study: str, **changes: Any) -> StudySpec:
    """The stored spec of an existing study, with budget/infrastructure `changes` (None values ignored)."""
    study_dir = Path(out) / study
    if not (study_dir / STORAGE_FILE).is_file():
        raise StudyError(f"no study {study!r} under {out} to resume: give --model (and --device) to start one")
    from dsm_tune.search.results import load_study

    stored = dict(load_study(study_dir).user_attrs["spec"])
    stored.update({k: v for k, v in changes.items() if v is not None})
    stored["out"], stored["study"] = str(out), study
    return StudySpec.from_dict(stored)


def _check_same_study(stored: Mapping[str, Any], spec: StudySpec) -> None:
    asked = spec.to_dict()
    differences = [f"{key} {stored.get(key)!r} (stored) vs {asked.get(key)!r} (now)"
                   for key in IDENTITY_FIELDS if stored.get(key) != asked.get(key)]
    if differences:
        raise StudyError(f"study {spec.study!r} in {spec.out} was started with other settings: "
                         f"{'; '.join(differences)}; resume it with the same settings or choose a new --study name")


# Default evaluator -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DefaultEvaluatorFactory:
    """Builds the real `TrialEvaluator` inside a Ray actor (picklable: plain data only)."""

    model: str
    target: str
    batch_size: int | None
    dtype: str | None
    compile: bool | None
    data: str | None
    metric: str | None
    limit: int | None
    checkpoint: str | None
    pretrained: bool
    max_drop: float | None
    cache_dir: str | None

    @classmethod
    def from_spec(cls, spec: StudySpec) -> "DefaultEvaluatorFactory":
        local = spec.ray_address is None
        return cls(model=spec.model, target=spec.target, batch_size=spec.batch_size, dtype=spec.dtype,
                   compile=spec.compile, data=spec.data, metric=spec.metric, limit=spec.limit,
                   checkpoint=spec.checkpoint, pretrained=spec.pretrained,
                   max_drop=ABORT_FACTOR * spec.max_accuracy_drop if spec.max_accuracy_drop > 0 else None,
                   # The dense-output cache is on the driver's disk: only local workers can share it.
                   cache_dir=str((spec.out / "cache").resolve()) if local else None)

    def __call__(self) -> Any:
        import torch

        from dsm_tune.evaluation.targets import load_target
        from dsm_tune.evaluation.trial import TrialEvaluator

        target = load_target(self.target, batch_size=self.batch_size, dtype=self.dtype, compile=self.compile)
        if target.device == "cpu":
            # Ray sets each actor to one thread (its CPU share); a CPU target is timed on the whole host, which
            # the timing guard gives to one worker at a time.
            torch.set_num_threads(os.cpu_count() or 1)
        kwargs: dict[str, Any] = {"metric": self.metric, "limit": self.limit, "checkpoint": self.checkpoint,
                                  "cache_dir": Path(self.cache_dir) if self.cache_dir else None,
                                  "max_drop": self.max_drop}
        if self.pretrained and "pretrained" in inspect.signature(TrialEvaluator).parameters:
            kwargs["pretrained"] = True
        return TrialEvaluator(self.model, target, self.data, **kwargs)


def _resolve_target(spec: StudySpec) -> Any:
    from dsm_tune.evaluation.targets import load_target

    # A remote cluster has the devices, this machine may not: only resolve the profile then.
    return load_target(spec.target, batch_size=spec.batch_size, dtype=spec.dtype, compile=spec.compile,
                       check_available=spec.ray_address is None)


def _make_tracker(spec: StudySpec) -> Any:
    from dsm_tune.search.tracking import MlflowTracker, NullTracker

    if not spec.mlflow:
        return NullTracker()
    return MlflowTracker(uri=spec.mlflow_uri, out=spec.out)


# The driver loop ---------------------------------------------------------------------------------------------------

@dataclass
class _Task:
    trial: optuna.trial.Trial
    cfg: DSMConfig
    key: str
    seed_kind: str | None
    started: float = field(default_factory=time.monotonic)


# Trial user attrs the driver owns; everything else a trial holds came from its evaluator.
DRIVER_ATTRS = frozenset({"worker", "duplicate_of", "config", "config_key", "plan_key", "seed_kind", "constraint",
                          "requeued_from", "merge_form", "fail_reason"})
# Attrs about one particular evaluation run, not about the config: not copied onto a duplicate.
RUN_ATTRS = frozenset({"wall_seconds", "lock_wait_s"})


class _Driver:
    """The ask/tell loop. Duplicates are settled by plan key (`space.plan_key`): a config that computes the same
    merged model as one already measured (or being measured) reuses that measurement.

    One trial is asked ahead of need (`ready`) so a worker that finishes gets its next config at once, while the
    driver writes the finished trial to the storage; TPE's constant liar treats the asked trial as pending."""

    def __init__(self, spec: StudySpec, study: optuna.Study, storage: optuna.storages.RDBStorage,
                 space: SearchSpace, pool: WorkerPool, tracker: Any, progress: Progress, elapsed_before: float):
        self.spec = spec
        self.study = study
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.space = space
        self.pool = pool
        self.tracker = tracker
        self.progress = progress
        self.elapsed_before = elapsed_before
        self.session_start = time.monotonic()
        self.known: dict[str, optuna.trial.FrozenTrial] = {}
        self.inflight: dict[str, _Task] = {}       # plan key -> task asked for a worker (submitted or ready)
        self.waiting: dict[str, list[_Task]] = {}  # plan key -> duplicates waiting for that task
        self.ready: _Task | None = None
        self.used = 0
        self.measured_now = 0
        self.fresh_deaths = 0
        self.consecutive_errors = 0
        self.stopped_by = "trials"
        self.csv_path = spec.study_dir / CSV_FILE
        baseline = study.user_attrs.get("baseline") or {}
        self.reference_latency_ms = baseline.get("latency_ms")
        for trial in study.get_trials(deepcopy=False):
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self.used += 1
                key = trial.user_attrs.get("plan_key")
                if key and "duplicate_of" not in trial.user_attrs:
                    self.known.setdefault(key, trial)
            if trial.state.is_finished():
                self._record_progress(trial, earlier=True)

    # bookkeeping -----------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.session_start)

    def outstanding(self) -> int:
        return len(self.inflight) + sum(len(v) for v in self.waiting.values())

    def budget_left(self) -> bool:
        return self.used + self.outstanding() < self.spec.trials

    def timed_out(self) -> bool:
        return self.spec.timeout is not None and self.elapsed() >= self.spec.timeout

    def _record_progress(self, trial: optuna.trial.FrozenTrial, earlier: bool = False) -> None:
        attrs = trial.user_attrs
        self.progress.record(trial.state.name, attrs.get("accuracy_drop"), attrs.get("latency_ms"),
                             attrs.get("speedup"), trial.number, earlier=earlier)

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self.storage.get_trial(trial_id)

    def _after_tell(self, number: int) -> None:
        frozen = self._frozen(number)
        self._record_progress(frozen)
        self.study.set_user_attr("elapsed_s", round(self.elapsed(), 3))
        write_trials_csv(self.study, self.csv_path)
        self.tracker.log_trial(trial_record(frozen))
        self.progress.update(force=True)

    # telling ---------------------------------------------------------------------------------------------------
    def _tell_result(self, task: _Task, result: Mapping[str, Any], worker: str, duplicate_of: int | None = None,
                     wall_s: float | None = None) -> None:
        trial = task.trial
        for key, value in result.items():
            if key not in DRIVER_ATTRS:
                trial.set_user_attr(key, json_safe(value))
        trial.set_user_attr("worker", worker)
        if wall_s is not None:
            trial.set_user_attr("wall_seconds", round(wall_s, 3))
        if duplicate_of is not None:
            trial.set_user_attr("duplicate_of", duplicate_of)
        drop, latency = result.get("accuracy_drop"), self._objective_latency(result)
        if latency is not None and latency != result.get("latency_ms"):
            trial.set_user_attr("latency_measured_ms", json_safe(result.get("latency_ms")))
            trial.set_user_attr("latency_ms", latency)
        if is_finite_number(drop):
            constraint = float(drop) - self.spec.max_accuracy_drop
            trial.set_user_attr("constraint", constraint)
            trial.set_constraint(CONSTRAINT_NAME, constraint)
        measured = is_finite_number(drop) and is_finite_number(latency) and not result.get("aborted")
        if measured:
            self.study.tell(trial, [float(drop), float(latency)])
        else:
            reason = result.get("fail_reason") or (
                f"aborted early: the accuracy drop could not stay within {ABORT_FACTOR:g}x the limit"
                if result.get("aborted") else "no accuracy drop/latency measured")
            trial.set_user_attr("fail_reason", reason)
            self.study.tell(trial, state=TrialState.PRUNED)
        self.used += 1
        self._after_tell(trial.number)

    def _objective_latency(self, result: Mapping[str, Any]) -> Any:
        """The latency objective: the study's one dense reference latency divided by the trial's speedup.

        The speedup comes from dense and merged runs interleaved within the trial, so machine drift between
        trials (other jobs, thermal state, a neighbour worker's accuracy pass) cancels in it, while a trial's raw
        median latency carries that drift straight into the Pareto front. The raw figure stays in the trial as
        `latency_measured_ms`."""
        speedup, raw = result.get("speedup"), result.get("latency_ms")
        if is_finite_number(speedup) and float(speedup) > 0 and is_finite_number(self.reference_latency_ms):
            return round(float(self.reference_latency_ms) / float(speedup), 6)
        return raw

    def _tell_fail(self, task: _Task, reason: str, worker: str | None = None) -> None:
        task.trial.set_user_attr("fail_reason", reason[:2000])
        if worker is not None:
            task.trial.set_user_attr("worker", worker)
        self.study.tell(task.trial, state=TrialState.FAIL)
        self._after_tell(task.trial.number)

    def _requeue(self, task: _Task, reason: str) -> None:
        """FAIL the trial (it never finished) and queue its parameters again for the next run."""
        self._tell_fail(task, reason)
        _enqueue_again(self.study, dict(task.trial.params), task.trial.number, task.seed_kind)

    # asking ----------------------------------------------------------------------------------------------------
    def _ask_one(self) -> _Task | None:
        """Ask a trial; settle it at once when it needs no worker (space violation, duplicate)."""
        trial = self.study.ask()
        seed_kind = trial.user_attrs.get("seed_kind")
        try:
            cfg = self.space.suggest(trial)
            key = plan_key(cfg)
        except (SpaceError, ValueError) as exc:   # ConfigError is a ValueError
            task = _Task(trial, None, "", seed_kind)  # type: ignore[arg-type]
            self._tell_fail(task, f"no valid config from these parameters: {exc}")
            return None
        config_doc = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "target", "metrics", "provenance")}
        trial.set_user_attr("config", config_doc)
        trial.set_user_attr("config_key", cfg.key())
        trial.set_user_attr("plan_key", key)
        task = _Task(trial, cfg, key, seed_kind)
        violation = self.space.violation(cfg)
        if violation is not None:
            trial.set_user_attr("fail_reason", f"not measured: {violation}")
            self.study.tell(trial, state=TrialState.PRUNED)
            self.used += 1
            self._after_tell(trial.number)
            return None
        if key in self.known:
            self._copy_from(task, self.known[key])
            return None
        if key in self.inflight:
            self.waiting.setdefault(key, []).append(task)
            return None
        self.inflight[key] = task
        return task

    def _copy_from(self, task: _Task, earlier: optuna.trial.FrozenTrial) -> None:
        """Settle a duplicate with the earlier measurement instead of measuring again."""
        result = {k: v for k, v in earlier.user_attrs.items() if k not in DRIVER_ATTRS | RUN_ATTRS}
        if earlier.state == TrialState.PRUNED:
            result["fail_reason"] = earlier.user_attrs.get("fail_reason") or "pruned"
            result.setdefault("aborted", True)
        self._tell_result(task, result, worker=str(earlier.user_attrs.get("worker", "")),
                          duplicate_of=earlier.number)

    def _next_task(self) -> _Task | None:
        while self.ready is None and not self.timed_out() and self.budget_left():
            self.ready = self._ask_one()
        return self.ready

    def dispatch(self, prefetch: bool = True) -> None:
        """Give every idle worker a trial; then, if `prefetch`, ask the next one in advance."""
        for slot in self.pool.idle_slots():
            task = self._next_task()
            if task is None:
                break
            self.ready = None
            task.started = time.monotonic()
            task.trial.set_user_attr("worker", slot.name)
            self.pool.submit(slot, task.cfg, task)
        if prefetch and self.pool.pending():
            self._next_task()

    # events ----------------------------------------------------------------------------------------------------
    def _settle_waiters(self, key: str, finished: optuna.trial.FrozenTrial | None) -> None:
        for waiter in self.waiting.pop(key, []):
            if finished is not None and finished.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self._copy_from(waiter, finished)
            else:
                # The original did not finish: this one is measured itself in a later run.
                self._requeue(waiter, "the trial it duplicated did not finish; queued again")

    def handle(self, event: PoolEvent) -> None:
        if event.kind == "ready":
            info = event.payload or {}
            if "error_text" in info:
                if isinstance(info.get("error"), Exception):
                    raise info["error"]
                self._count_fresh_death(event.slot, f"{event.slot.name} could not start: {info['error_text']}")
            return
        if event.kind == "died":
            task: _Task | None = event.task
            if task is not None:
                self.inflight.pop(task.key, None)
                self._tell_fail(task, event.reason, worker=event.slot.name)
                self._settle_waiters(task.key, None)
            if event.payload and event.payload.get("completed"):
                self.fresh_deaths = 0
                self.progress.message(f"dsm-tune: {event.reason}; replacing it")
                self.pool.replace(event.slot)
            else:
                self._count_fresh_death(event.slot, event.reason)
            return
        # A finished evaluation.
        task = event.task
        self.inflight.pop(task.key, None)
        self.fresh_deaths = 0
        payload = event.payload or {}
        wall = time.monotonic() - task.started
        if "error" in payload:
            self.consecutive_errors += 1
            self._tell_fail(task, f"evaluation failed: {payload['error']}", worker=event.slot.name)
            self._settle_waiters(task.key, None)
            if self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                raise StudyError(f"the last {self.consecutive_errors} trials all failed in evaluation, last with: "
                                 f"{payload['error']}; the study is kept in {self.spec.study_dir}")
            return
        self.consecutive_errors = 0
        self.measured_now += 1
        self._tell_result(task, payload["result"], worker=event.slot.name, wall_s=wall)
        finished = self._frozen(task.trial.number)
        self.known.setdefault(task.key, finished)
        self._settle_waiters(task.key, finished)

    def _count_fresh_death(self, slot: Slot, reason: str) -> None:
        self.fresh_deaths += 1
        if self.fresh_deaths >= MAX_FRESH_DEATHS:
            raise StudyError(f"workers keep dying before finishing a trial ({self.fresh_deaths} in a row), last: "
                             f"{reason}; finished trials are kept in {self.spec.study_dir / STORAGE_FILE}")
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
            self.inflight.pop(task.key, None)
            self._requeue(task, reason)
            self._settle_waiters(task.key, None)

    def interrupt(self) -> int:
        """Ctrl-C: stop the workers; trials not finished are FAILed and queued again for the next run."""
        running = [t for t in self.pool.cancel_all() if t is not None]
        if self.ready is not None:
            running.append(self.ready)
            self.ready = None
        waiting = [t for tasks in self.waiting.values() for t in tasks]
        self.inflight.clear()
        self.waiting.clear()
        for task in running + waiting:
            self._requeue(task, "interrupted before it finished; queued again for the next run")
        return len(running) + len(waiting)


# Entry point -------------------------------------------------------------------------------------------------------

def _recover_stale(study: optuna.Study, storage: optuna.storages.RDBStorage) -> int:
    """Trials left RUNNING by a process that died: FAIL them and queue their parameters again."""
    study_id = storage.get_study_id_from_name(study.study_name)
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "fail_reason", "the process running the study ended while this trial "
                                                             "was running; queued again")
        study.tell(trial.number, state=TrialState.FAIL)
        _enqueue_again(study, dict(trial.params), trial.number, trial.user_attrs.get("seed_kind"))
        count += 1
    return count


def _enqueue_again(study: optuna.Study, params: dict[str, Any], number: int, seed_kind: str | None) -> None:
    user_attrs: dict[str, Any] = {**replay_attrs(params), "requeued_from": number}
    if seed_kind:
        user_attrs["seed_kind"] = seed_kind
    study.enqueue_trial(params, user_attrs=user_attrs)


def _enqueue_seeds(study: optuna.Study, space: SearchSpace) -> int:
    if study.user_attrs.get("seeded"):
        return 0
    seeds = space.seeds()
    for seed in seeds:
        params = space.params_for(seed.config)
        study.enqueue_trial(params, user_attrs={**replay_attrs(params), "seed_kind": seed.kind})
    study.set_user_attr("seeded", True)
    return len(seeds)


def _wait_first_worker(pool: WorkerPool, progress: Progress) -> dict[str, Any]:
    """Block until one worker has loaded the model (its fingerprint and baselines set up the study)."""
    started = time.monotonic()
    warned = False
    failures = 0
    while True:
        if not warned and time.monotonic() - started > STARTUP_NOTICE_S:
            placement = pool.placement
            progress.message(f"dsm-tune: still waiting for a worker to start (each needs {placement.num_cpus:g} CPU"
                             f"{f', {placement.num_gpus:g} GPU' if placement.num_gpus else ''}"
                             f"{', ' + str(placement.resources) if placement.resources else ''}); "
                             f"check that the cluster has such a node (`ray status`)")
            warned = True
        for event in pool.wait(WAIT_SLICE_S):
            info = event.payload or {}
            if event.kind == "ready" and "error_text" not in info:
                return info
            if isinstance(info.get("error"), Exception):
                raise info["error"]   # a user error (missing data, unknown model): as itself, at once
            reason = info.get("error_text") or event.reason
            failures += 1
            if failures >= MAX_FRESH_DEATHS:
                raise StudyError(f"workers cannot start ({failures} attempts), last: {reason}")
            progress.message(f"dsm-tune: a worker failed to start: {reason}; retrying")
            pool.replace(event.slot)


def _print_front(df: Any, front: list[int], spec: StudySpec, stream: TextIO) -> None:
    if not front:
        stream.write(f"No measured trial is within the accuracy-drop limit of {spec.max_accuracy_drop:g} points.\n")
        return
    rows = df.set_index("number").loc[front]
    if "duplicate_of" in rows:
        # A duplicate is the same measurement as the trial it copies: show the point once.
        rows = rows[rows["duplicate_of"].isna()]
    stream.write(f"Pareto front (accuracy drop <= {spec.max_accuracy_drop:g}), fastest first:\n")
    header = f"{'trial':>5}  {'seed':<6} {'drop':>7} {'latency ms':>11} {'speedup':>8} {'kept':>6}  config"
    stream.write(header + "\n")
    for number, row in rows.iterrows():
        config = row.get("config")
        try:
            merge = json.loads(config)["merge"] if isinstance(config, str) else {}
        except (ValueError, KeyError, TypeError):
            merge = {}
        stages = " ".join(f"{s['blocks']}x{('r' + str(s['r'])) if 'r' in s else format(s['ratio'], '.2f')}"
                          for s in merge.get("stages", []))
        described = (f"start {merge.get('start_layer')} depth {merge.get('hierarchy_depth')} [{stages}]"
                     f"{' prop' if merge.get('proportional_attention') else ''}") if merge else ""
        seed = row.get("seed_kind") if isinstance(row.get("seed_kind"), str) else ""
        def num(name: str, fmt: str) -> str:
            value = row.get(name)
            return format(float(value), fmt) if value is not None and is_finite_number(float(value)) else "-"
        stream.write(f"{number:>5}  {seed:<6} {num('accuracy_drop', '7.3f')} {num('latency_ms', '11.3f')} "
                     f"{num('speedup', '7.2f')}x {num('tokens_kept', '6.2f')}  {described}\n")


def _finish_outputs(study: optuna.Study, spec: StudySpec,
                    progress: Progress) -> tuple[Any, list[int], int | None, Path | None, list[Path]]:
    """trials.csv, best.json (fastest trial within the drop limit) and the Pareto plots."""
    from dsm_tune.search.plots import write_pareto_plots
    from dsm_tune.search.select import NoWinnerError, Rule, freeze_trial, pick_winner

    study_dir = spec.study_dir
    df = write_trials_csv(study, study_dir / CSV_FILE)
    files = [study_dir / STORAGE_FILE, study_dir / CSV_FILE]
    front = pareto_numbers(df, spec.max_accuracy_drop)
    best_number: int | None = None
    best_path: Path | None = None
    try:
        best_number = pick_winner(df, Rule(), spec.max_accuracy_drop)
    except NoWinnerError as exc:
        progress.message(f"dsm-tune: no best.json: {exc}")
    if best_number is not None:
        best_path = study_dir / BEST_FILE
        freeze_trial(study, best_number).to_json(best_path)
        files.append(best_path)
    files += list(write_pareto_plots(df, study_dir, spec.max_accuracy_drop))
    return df, front, best_number, best_path, files


def run_study(spec: StudySpec, evaluator_factory: Callable[[], Any] | None = None, tracker: Any = None,
              stream: TextIO | None = None) -> StudyResult:
    """Run (or resume) the study of `spec` to its trial/time budget; see the module docstring.

    `evaluator_factory` builds one evaluator per worker (default: the real `TrialEvaluator` for the spec);
    `tracker` receives the trials (default: MLflow unless `spec.mlflow` is False).
    """
    from filelock import FileLock, Timeout

    stream = stream or sys.stderr
    study_dir = spec.study_dir
    study_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(study_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StudyError(f"study {spec.study!r} is being run by another dsm-tune process ({study_dir / LOCK_FILE} is "
                         f"locked)") from None
    try:
        return _run_locked(spec, evaluator_factory, tracker, stream)
    finally:
        lock.release()


def _run_locked(spec: StudySpec, evaluator_factory: Callable[[], Any] | None, tracker: Any,
                stream: TextIO) -> StudyResult:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir = spec.study_dir
    resumed = _study_exists(study_dir, str(spec.study))
    if resumed:
        from dsm_tune.search.results import load_study

        _check_same_study(load_study(study_dir).user_attrs["spec"], spec)
    # Read the space before any worker starts so a malformed file fails fast; the fingerprint check comes later.
    space_text, space_source = _space_text(spec, study_dir, resumed)
    precheck_space(space_text, space_source)
    progress = Progress(total=spec.trials, max_drop=spec.max_accuracy_drop, stream=stream)
    progress.message(f"dsm-tune: {'resuming' if resumed else 'starting'} study {spec.study!r} in {study_dir} "
                     f"({spec.model} on {spec.target}, {spec.workers} worker(s), sampler {spec.sampler})")
    tracker = tracker if tracker is not None else _make_tracker(spec)
    session = _Session(spec, progress, tracker, resumed)
    if resumed:
        session.open_study()
        if session.budget_spent():
            # Nothing to measure: no workers, no Ray; refresh the outputs from the storage.
            return session.finish(stream)
    factory = evaluator_factory or DefaultEvaluatorFactory.from_spec(spec)
    target = _resolve_target(spec) if evaluator_factory is None else None
    placement = Placement.for_target(target, spec.workers) if target is not None else Placement()
    started_ray = start_ray(spec.ray_address, num_cpus=max(os.cpu_count() or 1, spec.workers)
                            if spec.ray_address is None else None)
    # Ray installs a fatal-signal handler for SIGTERM that ends the process on the spot; a `kill` should stop the
    # study as cleanly as Ctrl-C does (running trials failed and queued again), so take SIGTERM back.
    restore_sigterm = _sigterm_as_interrupt()
    pool: WorkerPool | None = None
    try:
        pool = WorkerPool(factory, spec.workers, placement)
        info = _wait_first_worker(pool, progress)
        if (info.get("baseline") or {}).get("metric") is None:
            raise StudyError(f"model {spec.model} has no evaluation data, so no accuracy can be measured: give "
                             f"--data (an image folder or a named data set)")
        fingerprint = ModelFingerprint.from_dict(info["fingerprint"])
        space = parse_space(space_text, fingerprint, space_source)
        session.open_study()
        session.record_setup(info, fingerprint, space_text)
        session.prepare(space)
        session.run(space, pool)
    finally:
        if pool is not None:
            pool.cancel_all()
        stop_ray(started_ray)
        restore_sigterm()
    return session.finish(stream)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt (main thread only); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


class _Session:
    """One run of the driver over a study: opening, setup attrs, the loop, and the final outputs."""

    def __init__(self, spec: StudySpec, progress: Progress, tracker: Any, resumed: bool):
        self.spec = spec
        self.progress = progress
        self.tracker = tracker
        self.resumed = resumed
        self.study: optuna.Study | None = None
        self.storage: optuna.storages.RDBStorage | None = None
        self.driver: _Driver | None = None
        self.interrupted = False
        self.tracking = False

    def open_study(self) -> None:
        if self.study is not None:
            return
        self.storage = open_storage(self.spec.study_dir)
        self.study = optuna.create_study(storage=self.storage, study_name=self.spec.study,
                                         directions=list(DIRECTIONS), load_if_exists=True,
                                         sampler=make_sampler(self.spec.sampler, self.spec.seed, self.spec.workers))
        if self.resumed:
            stored = dict(self.study.user_attrs["spec"])
            self.study.set_user_attr("spec", {**stored, **_budget_fields(self.spec)})
        else:
            self.study.set_user_attr("spec", self.spec.to_dict())
        (self.spec.study_dir / SPEC_FILE).write_text(json.dumps(self.study.user_attrs["spec"], indent=2) + "\n")

    def done_count(self) -> int:
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in self.study.get_trials(deepcopy=False))

    def budget_spent(self) -> bool:
        elapsed = float(self.study.user_attrs.get("elapsed_s") or 0.0)
        if self.done_count() >= self.spec.trials:
            self.progress.message(f"dsm-tune: the budget of {self.spec.trials} trials is already spent; raise "
                                  f"--trials to run more")
            return True
        if self.spec.timeout is not None and elapsed >= self.spec.timeout:
            self.progress.message(f"dsm-tune: the time budget of {format_duration(self.spec.timeout)} is already "
                                  f"spent ({format_duration(elapsed)}); raise --timeout to run more")
            return True
        return False

    def record_setup(self, info: Mapping[str, Any], fingerprint: ModelFingerprint, space_text: str) -> None:
        study = self.study
        stored_fp = study.user_attrs.get("fingerprint")
        if stored_fp is not None:
            if ModelFingerprint.from_dict(stored_fp) != fingerprint:
                raise StudyError(f"study {self.spec.study!r} was run on model {stored_fp} but the workers now load "
                                 f"{fingerprint.to_dict()}")
            return
        study.set_user_attr("fingerprint", fingerprint.to_dict())
        study.set_user_attr("baseline", json_safe(info.get("baseline") or {}))
        study.set_user_attr("data_fingerprint", info.get("data_fingerprint"))
        study.set_user_attr("versions", _versions())
        study.set_user_attr("elapsed_s", float(study.user_attrs.get("elapsed_s") or 0.0))
        (self.spec.study_dir / SPACE_COPY).write_text(space_text)

    def prepare(self, space: SearchSpace) -> None:
        recovered = _recover_stale(self.study, self.storage)
        if recovered:
            self.progress.message(f"dsm-tune: {recovered} trial(s) were running when the last run ended: marked "
                                  f"failed and queued again")
        seeded = _enqueue_seeds(self.study, space)
        if seeded:
            self.progress.message(f"dsm-tune: queued {seeded} seed configs (dense, ToMe constant-r, DSM paper "
                                  f"style)")

    def run(self, space: SearchSpace, pool: WorkerPool) -> None:
        self.tracker.start_study(self.spec, self.spec.study_dir, self.resumed)
        self.tracking = True
        elapsed_before = float(self.study.user_attrs.get("elapsed_s") or 0.0)
        driver = self.driver = _Driver(self.spec, self.study, self.storage, space, pool, self.tracker,
                                       self.progress, elapsed_before)
        self.progress.update(force=True)
        try:
            driver.run()
        except KeyboardInterrupt:
            self.interrupted = True
            self.progress.close()
            requeued = driver.interrupt()
            self.progress.message(f"dsm-tune: interrupted; {requeued} unfinished trial(s) marked failed and "
                                  f"queued again")
        finally:
            self.progress.close()
            self.study.set_user_attr("elapsed_s", round(driver.elapsed(), 3))

    def finish(self, stream: TextIO) -> StudyResult:
        spec, study = self.spec, self.study
        _recover_stale(study, self.storage)   # only when the budget was spent with trials left running
        df, front, best_number, best_path, files = _finish_outputs(study, spec, self.progress)
        if self.tracking:
            self.tracker.refresh_artifacts(spec.study_dir)
            self.tracker.end_study(pareto_numbers(df))
        _print_front(df, front, spec, stream)
        done = int(df["state"].isin(["COMPLETE", "PRUNED"]).sum()) if len(df) else 0
        stopped_by = "interrupt" if self.interrupted else (self.driver.stopped_by if self.driver else "budget")
        stream.write(f"Study files in {spec.study_dir}: " + ", ".join(p.name for p in files if p.exists()) + "\n")
        if self.interrupted:
            stream.write(f"Interrupted: {done} finished trial(s) kept.\n")
        if self.interrupted or (stopped_by == "timeout" and done < spec.trials):
            stream.write(f"Resume with: dsm-tune run --study {spec.study} --out {spec.out}"
                         + (" --timeout <more seconds>" if stopped_by == "timeout" else "") + "\n")
        stream.flush()
        return StudyResult(study_dir=spec.study_dir, study_name=str(spec.study), trials_done=done,
                           trials_measured_now=self.driver.measured_now if self.driver else 0, pareto=front,
                           best_trial=best_number, best_path=best_path,
                           files=[p for p in files if p.exists()], interrupted=self.interrupted,
                           stopped_by=stopped_by)


def _budget_fields(spec: StudySpec) -> dict[str, Any]:
    data = spec.to_dict()
    return {k: data[k] for k in ("trials", "timeout", "sampler", "seed", "workers", "ray_address", "mlflow_uri",
                                 "mlflow")}


def _space_text(spec: StudySpec, study_dir: Path, resumed: bool) -> tuple[str, Path]:
    """The space YAML: on resume the study's own copy (editing search_spaces/ later cannot change a study)."""
    copy = study_dir / SPACE_COPY
    if resumed and copy.is_file():
        text = copy.read_text()
        if spec.space is not None:
            try:
                asked = Path(spec.space).read_text()
            except OSError as exc:
                raise SpaceError(f"cannot read search space file {spec.space}: {exc}") from None
            if asked != text:
                raise StudyError(f"--space {spec.space} differs from the space study {spec.study!r} was started "
                                 f"with ({copy}); resume without --space or start a new study")
        return text, copy
    if spec.space is not None:
        source = Path(spec.space)
    else:
        from dsm_tune.search.space import space_file_for

        source = space_file_for(spec.model)
        if source.stem == "generic":
            try:   # an alias may name a family the pattern list knows by its timm name
                from dsm_tune.evaluation.models import resolve_model_name

                source = space_file_for(resolve_model_name(spec.model))
            except Exception:  # an unknown model fails clearly when the worker builds it
                pass
    try:
        return source.read_text(), source
    except FileNotFoundError:
        raise SpaceError(f"search space file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"cannot read search space file {source}: {exc}") from None
