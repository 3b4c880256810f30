"""One run of the driver over a study: opening the storage, the setup attrs, seeds, the tracker, the final
outputs. The driver is the storage's only writer; the tracker gets what it needs from here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, TextIO

import optuna

from dsm_tune.record import BASELINE, DATA_FINGERPRINT, ELAPSED_S, FINGERPRINT, SEEDED, SPEC, VERSIONS
from dsm_tune.errors import DiskFullError, disk_full_code
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.diskspace import device_of, write_text_atomically
from dsm_tune.search.folder import StudyError
from dsm_tune.search.progress import Progress, format_duration
from dsm_tune.search.dense_reference import study_reference
from dsm_tune.search.results import confirmed_scores, json_safe, pareto_numbers
from dsm_tune.search.strategies import Space, enqueue_seeds, make_sampler
from dsm_tune.search.study.dedup import SETTLED
from dsm_tune.search.study.outputs import DerivedWrites, LiveOutputs, print_front, write_final_outputs
from dsm_tune.search.spec import StudySpec, library_versions
from dsm_tune.search.study.tell import DIRECTIONS, recover_stale
from dsm_tune.search.tracking import PARENT_ATTR, trial_record
from dsm_tune.search.workers import WorkerInfo


class Tracker(Protocol):
    """Receives a study's trials (`dsm_tune.search.tracking.MlflowTracker`; `NullTracker` does nothing)."""

    parent_run_id: str | None          # the study's run once known; the driver stores it in the study

    def start_study(self, study_dir: Path, attrs: Mapping[str, Any], resumed: bool) -> str | None: ...

    def log_trial(self, record: Mapping[str, Any]) -> None: ...

    def refresh_artifacts(self, study_dir: Path) -> None: ...

    def end_study(self, pareto_trial_numbers: list[int], records: Iterable[Mapping[str, Any]] = ()) -> None: ...


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
    stopped_by: str = "trials"        # trials | timeout | interrupt | budget | exhausted


class StudySession:
    def __init__(self, spec: StudySpec, progress: Progress, tracker: Tracker, resumed: bool):
        self.spec, self.folder, self.progress, self.tracker = spec, spec.folder, progress, tracker
        self.resumed = resumed
        self.study: optuna.Study | None = None
        self.storage: optuna.storages.RDBStorage | None = None
        # trials.csv, plots and MLflow while trials come in: a full disk there is warned about once (the storage
        # is the record; the end of the run writes them again).
        self.derived = DerivedWrites(progress.message)
        self.outputs = LiveOutputs(self.folder, spec.max_accuracy_drop, tracker, derived=self.derived)
        self.tracking = False
        # Builds the scorer of the held-out images (`search/confirmation.py`); None: the front is not confirmed.
        self.confirmer: Callable[[], Any] | None = None

    def open(self) -> None:
        if self.study is not None:
            return
        spec = self.spec
        self.storage = self.folder.open_storage()
        self.study = optuna.create_study(storage=self.storage, study_name=spec.study, directions=list(DIRECTIONS),
                                         load_if_exists=True,
                                         sampler=make_sampler(spec.sampler, spec.seed, spec.workers))
        stored = self.study.user_attrs.get(SPEC) if self.resumed else None
        self.study.set_user_attr(SPEC, {**stored, **spec.budget()} if stored else spec.to_dict())
        write_text_atomically(self.folder.spec_file, json.dumps(self.study.user_attrs[SPEC], indent=2) + "\n")

    def done_count(self) -> int:
        return sum(t.state in SETTLED for t in self.study.get_trials(deepcopy=False))

    def budget_spent(self) -> str | None:
        """Why nothing is left to run (the line to show), None while budget is left."""
        elapsed = float(self.study.user_attrs.get(ELAPSED_S) or 0.0)
        if self.done_count() >= self.spec.trials:
            return f"dsm-tune: the budget of {self.spec.trials} trials is already spent; raise --trials to run more"
        if self.spec.timeout is not None and elapsed >= self.spec.timeout:
            return (f"dsm-tune: the time budget of {format_duration(self.spec.timeout)} is already spent "
                    f"({format_duration(elapsed)}); raise --timeout to run more")
        return None

    def record_setup(self, info: WorkerInfo, fingerprint: ModelFingerprint, space_text: str) -> None:
        study = self.study
        stored_fp = study.user_attrs.get(FINGERPRINT)
        if stored_fp is not None:
            if ModelFingerprint.from_dict(stored_fp) != fingerprint:
                raise StudyError(f"study {self.spec.study!r} was run on model {stored_fp} but the workers now load "
                                 f"{fingerprint.to_dict()}")
            return
        study.set_user_attr(FINGERPRINT, fingerprint.to_dict())
        study.set_user_attr(BASELINE, json_safe(info.baseline))
        study.set_user_attr(DATA_FINGERPRINT, info.data_fingerprint)
        study.set_user_attr(VERSIONS, library_versions())
        study.set_user_attr(ELAPSED_S, float(study.user_attrs.get(ELAPSED_S) or 0.0))
        write_text_atomically(self.folder.space_copy, space_text)

    def prepare(self, space: Space) -> None:
        recovered = recover_stale(self.study, self.storage)
        if recovered:
            self.progress.message(f"dsm-tune: {recovered} trial(s) were running when the last run ended: marked "
                                  f"failed and queued again")
        seeded = self._enqueue_seeds(space)
        if seeded:
            self.progress.message(f"dsm-tune: queued {seeded} seed configs (dense, ToMe constant-r, DSM paper "
                                  f"style)")

    def _enqueue_seeds(self, space: Space) -> int:
        if self.study.user_attrs.get(SEEDED):
            return 0
        seeded = enqueue_seeds(self.study, space)
        self.study.set_user_attr(SEEDED, True)
        return seeded

    # tracking --------------------------------------------------------------------------------------------------
    def start_tracking(self) -> None:
        self.tracker.start_study(self.folder.path, dict(self.study.user_attrs), self.resumed)
        self.tracking = True
        self._store_parent_id()

    def _store_parent_id(self) -> None:
        """The tracker's run id, kept in the study so a resume finds the run again."""
        run_id = self.tracker.parent_run_id
        if run_id is not None and self.study.user_attrs.get(PARENT_ATTR) != run_id:
            self.study.set_user_attr(PARENT_ATTR, run_id)

    def trial_told(self, frozen: optuna.trial.FrozenTrial) -> None:
        self.outputs.trial_told(self.study, frozen)
        # The tracker queues what MLflow did not take (its spool may find the disk full too): end_study logs
        # every finished trial MLflow lacks, from the storage.
        self.derived.attempt(lambda: self.tracker.log_trial(trial_record(frozen)))
        self._store_parent_id()

    def end_tracking(self, frame: Any) -> None:
        """Give the tracker every finished trial (it logs what it lacks, its queue included) and close its run."""
        # Under the current dense reference: the trials MLflow still lacks get the figures of trials.csv. The
        # confirmation's figures live on the study, not on its (frozen) trials: the records carry them, so the
        # children logged during the study receive them now.
        reference = study_reference(self.study)
        confirmed = confirmed_scores(self.study.user_attrs)
        finished = [{**trial_record(t, reference), **confirmed.get(t.number, {})}
                    for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        self.tracker.end_study(pareto_numbers(frame), finished)
        self._store_parent_id()
        self._check_tracker_space()

    def _check_tracker_space(self) -> None:
        """A tracker that ends with trials still queued because its store's disk is full: the run says so as a
        full disk (the queue and the storage keep everything; a resume delivers it)."""
        error = getattr(self.tracker, "last_error", None)
        code = disk_full_code(error)
        if code is None or not self.folder.pending_file.exists():
            return
        uri = str(getattr(self.tracker, "uri", ""))
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else self.folder.pending_file
        raise DiskFullError(str(path), f"the MLflow store {uri}" if uri else "the MLflow store", code,
                            device_of(path)) from error

    # the end ---------------------------------------------------------------------------------------------------
    def confirm(self) -> None:
        """Score the front's candidates on the held-out images; a failure there costs the confirmation only."""
        from dsm_tune.errors import DSMTuneError
        from dsm_tune.search.confirmation import confirm_front
        from dsm_tune.search.results import trials_frame

        try:
            confirm_front(self.study, trials_frame(self.study), self.spec.max_accuracy_drop, self.confirmer,
                          self.progress.message)
        except DSMTuneError as exc:
            self.progress.message(f"dsm-tune: the front was not confirmed: {exc}; `dsm-tune report` tries again")

    def finish(self, stream: TextIO, stopped_by: str, measured_now: int, interrupted: bool) -> StudyResult:
        spec, study = self.spec, self.study
        recover_stale(study, self.storage)   # only when the budget was spent with trials left running
        if self.confirmer is not None and not interrupted:
            self.confirm()
        final = write_final_outputs(study, self.folder, spec.max_accuracy_drop, self.progress)
        if self.tracking:
            self.tracker.refresh_artifacts(self.folder.path)
            self.end_tracking(final.frame)
        print_front(final.frame, spec.max_accuracy_drop, stream)
        done = self.done_count()
        stream.write(f"Study files in {self.folder.path}: " + ", ".join(p.name for p in final.files) + "\n")
        if interrupted:
            stream.write(f"Interrupted: {done} finished trial(s) kept.\n")
        if interrupted or (stopped_by == "timeout" and done < spec.trials):
            stream.write(f"Resume with: dsm-tune run --study {spec.study} --out {spec.out}"
                         + (" --timeout <more seconds>" if stopped_by == "timeout" else "") + "\n")
        stream.flush()
        return StudyResult(study_dir=self.folder.path, study_name=str(spec.study), trials_done=done,
                           trials_measured_now=measured_now, pareto=final.front, best_trial=final.best_trial,
                           best_path=final.best_path, files=final.files, interrupted=interrupted,
                           stopped_by=stopped_by)
