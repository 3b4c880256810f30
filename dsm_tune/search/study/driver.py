"""The study driver: an Optuna multi-objective study (accuracy drop, latency) run by ask/tell over Ray workers, or
over one evaluator in the driver's own process (`spec.no_ray`, `run --no-ray`: Ray is never imported).

`run_study` holds the study's lock, resolves its inputs once (`preflight.StudyPlan`), starts Ray, takes SIGTERM
back from it, and hands the rest to the parts named in the package docstring.

The driver is the only writer of `<out>/<study>/study.db`; workers only evaluate configs. Everything a later run
needs to resume is in that storage: the spec, the model fingerprint and baseline (study user attrs), every trial's
config and measurements (trial user attrs), the wall time spent so far (`elapsed_s`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import optuna

from dsm_tune.record import ELAPSED_S
from dsm_tune.interrupts import sigterm_as_interrupt
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.diskspace import check_free_space, holds_no_study, stop_on_full_disk
from dsm_tune.search.folder import StudyError
from dsm_tune.search.progress import Progress
from dsm_tune.search.space import parse_space
from dsm_tune.search.strategies import ProposerFactory, default_proposer
from dsm_tune.search.study.library_logs import library_logs_to
from dsm_tune.search.study.factory import DefaultEvaluatorFactory
from dsm_tune.search.study.loop import MAX_FRESH_DEATHS, WAIT_SLICE_S, Loop
from dsm_tune.search.study.preflight import StudyPlan, preflight, resolve_plan
from dsm_tune.search.study.session import StudyResult, StudySession, Tracker
from dsm_tune.search.spec import StudySpec, resume_spec
from dsm_tune.search.study.tell import mark_in_process
from dsm_tune.search.workers import (
    Evaluator, InProcessPool, Placement, WorkerFailedToStart, WorkerInfo, WorkerPool, WorkerReady, start_ray,
    stop_ray,
)

STARTUP_NOTICE_S = 120.0      # a worker not up by then probably cannot be placed: say what it needs


def run_study(spec: StudySpec, evaluator_factory: Callable[[], Evaluator] | None = None,
              tracker: Tracker | None = None, stream: TextIO | None = None,
              proposer_factory: ProposerFactory | None = None) -> StudyResult:
    """Run (or resume) the study of `spec` to its trial/time budget; see the module docstring.

    `evaluator_factory` builds one evaluator per worker (default: the real `TrialEvaluator` for the spec);
    `tracker` receives the trials (default: MLflow unless `spec.mlflow` is False); `proposer_factory(space, spec)`
    gives the proposer of configs (default: `default_proposer`, Optuna's sampler over the space).
    """
    stream = stream or sys.stderr
    # A full disk anywhere in the run leaves as one DiskFullError, with the lock still held (diskspace.py).
    with _study_lock(spec), library_logs_to(spec.folder.log_file), \
            stop_on_full_disk(spec.folder.storage_file, spec.folder.name):
        return _run_locked(spec, evaluator_factory, tracker, stream, proposer_factory or default_proposer)


def sync_tracking(out: Path, study: str, mlflow_uri: str | None = None, tracker: Tracker | None = None,
                  stream: TextIO | None = None) -> int:
    """Deliver what the tracker queued (`mlflow_pending.jsonl`) and whatever finished trial MLflow lacks, without
    running anything; returns how many trials stay queued (MLflow still unreachable)."""
    from dsm_tune.search.results import trials_frame
    from dsm_tune.search.tracking import MlflowTracker

    spec = resume_spec(out, study, mlflow_uri=mlflow_uri)
    with _study_lock(spec), library_logs_to(spec.folder.log_file), \
            stop_on_full_disk(spec.folder.storage_file, spec.folder.name):
        tracker = tracker if tracker is not None else MlflowTracker(uri=spec.mlflow_uri, out=spec.out)
        progress = Progress(total=spec.trials, max_drop=spec.max_accuracy_drop, stream=stream or sys.stderr)
        session = StudySession(spec, progress, tracker, resumed=True)
        session.open()
        session.start_tracking()
        session.end_tracking(trials_frame(session.study))
    pending = spec.folder.pending_file
    return len(pending.read_text().splitlines()) if pending.exists() else 0


@contextlib.contextmanager
def _study_lock(spec: StudySpec) -> Iterator[None]:
    """The study's lock for the whole run; a start that fails before the study exists leaves no folder."""
    from filelock import FileLock, Timeout

    folder = spec.folder
    # The outermost folder this start creates (the study's, or --out itself): what a failed start removes.
    created = next((p for p in reversed([folder.path, *folder.path.parents]) if not p.exists()), None)
    folder.path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StudyError(f"study {spec.study!r} is being run by another dsm-tune process ({folder.lock_file} is "
                         f"locked)") from None
    try:
        yield
    finally:
        lock.release()
        # A start that stored no study (bad input, or a disk full before the study was created) leaves nothing.
        if created is not None and holds_no_study(folder.storage_file, folder.name):
            shutil.rmtree(folder.path, ignore_errors=True)
            for parent in folder.path.parents:   # folders above it only while empty (another study may start)
                if parent == created.parent:
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()


def _run_locked(spec: StudySpec, evaluator_factory: Callable[[], Evaluator] | None, tracker: Tracker | None,
                stream: TextIO, proposer_factory: ProposerFactory | None) -> StudyResult:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan = resolve_plan(spec)
    for note in plan.notes:
        stream.write(note + "\n")
    folder = spec.folder
    progress = Progress(total=spec.trials, max_drop=spec.max_accuracy_drop, stream=stream)
    session = StudySession(spec, progress, tracker if tracker is not None else _make_tracker(spec), plan.resumed)
    session.confirmer = _confirmer(plan, evaluator_factory)
    spent = None
    if plan.resumed:
        session.open()
        spent = session.budget_spent()
    if spent is None:   # trials to measure: their storage and outputs need room (diskspace.MIN_FREE_ENV)
        check_free_space(folder.path)
        if evaluator_factory is None:   # the default evaluator's inputs, before Ray and before the announcement
            plan = preflight(plan)
    if plan.fingerprint is not None:
        parse_space(plan.space_text, plan.fingerprint, plan.space_source, target=plan.target)
    progress.message(f"dsm-tune: {'resuming' if plan.resumed else 'starting'} study {spec.study!r} in "
                     f"{folder.path} ({spec.model} on {spec.target}, "
                     f"{'in-process, no Ray' if spec.no_ray else f'{spec.workers} worker(s)'}, sampler {spec.sampler})")
    if spent is not None:
        # Nothing to measure: no workers, no Ray; refresh the outputs from the storage, and deliver what the
        # tracker queued while its server was down.
        progress.message(spent)
        if folder.pending_file.exists():
            session.start_tracking()
        return session.finish(stream, "budget", 0, interrupted=False)
    placement = Placement.for_target(plan.target, spec.workers) if evaluator_factory is None else Placement()
    proposer_factory = proposer_factory or functools.partial(default_proposer, target=plan.target)
    return _run_workers(plan, session, evaluator_factory or DefaultEvaluatorFactory.from_spec(spec), placement,
                        proposer_factory, stream)


def _run_workers(plan: StudyPlan, session: StudySession, factory: Callable[[], Evaluator], placement: Placement,
                 proposer_factory: ProposerFactory, stream: TextIO) -> StudyResult:
    spec, progress = plan.spec, session.progress
    # --no-ray: the evaluator lives in this process and Ray is never imported (a GPU host may not have it).
    started_ray = False if spec.no_ray else start_ray(
        spec.ray_address, num_cpus=max(os.cpu_count() or 1, spec.workers) if spec.ray_address is None else None)
    # Ray installs a fatal-signal handler for SIGTERM that ends the process on the spot; a `kill` should stop the
    # study as cleanly as Ctrl-C does (running trials failed and queued again), so take SIGTERM back (without Ray
    # too: SIGTERM's default would end the process without writing the outputs).
    restore_sigterm = sigterm_as_interrupt()
    pool: WorkerPool | InProcessPool | None = None
    loop: Loop | None = None
    interrupted = False
    try:
        if spec.no_ray:
            pool = InProcessPool(factory, placement, on_evaluate=lambda task, done: mark_in_process(task.trial, done))
        else:
            pool = WorkerPool(factory, spec.workers, placement)
        info = _wait_first_worker(pool, progress)
        fingerprint = ModelFingerprint.from_dict(info.fingerprint)
        space = parse_space(plan.space_text, fingerprint, plan.space_source, target=plan.target)
        session.open()
        session.record_setup(info, fingerprint, plan.space_text)
        session.prepare(space)
        session.start_tracking()
        elapsed_before = float(session.study.user_attrs.get(ELAPSED_S) or 0.0)
        loop = Loop(spec, session.study, session.storage, space, proposer_factory(space, spec), pool, progress,
                    elapsed_before, session.trial_told)
        interrupted = _run_loop(loop, progress, session)
    finally:
        if pool is not None:
            pool.cancel_all()
        stop_ray(started_ray)
        restore_sigterm()
    return session.finish(stream, "interrupt" if interrupted else loop.stopped_by, loop.measured_now, interrupted)


def _run_loop(loop: Loop, progress: Progress, session: StudySession) -> bool:
    """Run the loop to its budget; True when Ctrl-C (or SIGTERM) stopped it."""
    progress.update(force=True)
    try:
        loop.run()
        return False
    except KeyboardInterrupt:
        progress.close()
        requeued = loop.interrupt()
        progress.message(f"dsm-tune: interrupted; {requeued} unfinished trial(s) marked failed and queued again")
        return True
    finally:
        progress.close()
        session.study.set_user_attr(ELAPSED_S, round(loop.elapsed(), 3))


def _confirmer(plan: StudyPlan, evaluator_factory: Callable[[], Evaluator] | None) -> Callable[[], Any] | None:
    """What scores the front on the held-out images: the real model for the default evaluator, the factory's own
    `confirmer` for another (a stand-in), none when the study holds no images out."""
    spec = plan.spec
    if not spec.confirms:
        return None
    if evaluator_factory is not None:
        return getattr(evaluator_factory, "confirmer", None)
    from dsm_tune.search.confirmation import scorer_factory_for

    return scorer_factory_for(spec.to_dict(), str((spec.out / "cache").resolve()), target=plan.target)


def _make_tracker(spec: StudySpec) -> Tracker:
    from dsm_tune.search.tracking import MlflowTracker, NullTracker

    if not spec.mlflow:
        return NullTracker()
    return MlflowTracker(uri=spec.mlflow_uri, out=spec.out)


def _wait_first_worker(pool: WorkerPool | InProcessPool, progress: Progress) -> WorkerInfo:
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
            if isinstance(event, WorkerReady):
                return event.info
            if isinstance(event, WorkerFailedToStart):
                if event.info.error is not None:
                    raise event.info.error   # a user error (missing data, unknown model): as itself, at once
                reason = event.info.error_text
            else:
                reason = event.reason
            failures += 1
            if failures >= MAX_FRESH_DEATHS:
                raise StudyError(f"workers cannot start ({failures} attempts), last: {reason}")
            progress.message(f"dsm-tune: a worker failed to start: {reason}; retrying")
            pool.replace(event.slot)
