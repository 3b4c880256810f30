"""The MLflow client of a study: one parent run per study, one child run per trial, Pareto tags, artifacts.

Only the driver process logs, through `MlflowClient` with explicit run ids (never MLflow's global active run), so
Ray workers and concurrent studies cannot write into each other's runs.

A pure consumer: the tracker never opens the study storage and never draws. The driver hands it the study attrs
at `start_study`, each finished trial's record, and at `end_study` every finished trial (so anything MLflow lacks
is logged too); the driver stores the parent run id (`parent_run_id`) in the study attr `mlflow_parent_run_id`
and passes it back on resume. Children are found again by their `trial_number` tag, so logging a trial twice
never duplicates it.

Resilience: the tracking store is a convenience, the study storage is the record. Any failure to reach MLflow
is caught and reported as one warning line; the trial's payload is queued in memory and in
`<study>/mlflow_pending.jsonl` (`spool.Spool`) and retried on later calls, at `end_study`, and on resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from dsm_tune.record import PARENT_ATTR, SPEC
from dsm_tune.search.folder import StudyFolder
from dsm_tune.search.tracking.artifacts import StudyArtifacts
from dsm_tune.search.tracking.records import TrackingError, finite_metric, mlflow_payload, tag_value
from dsm_tune.search.tracking.runs import (
    EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ROLE_TAG, RUN_STATUS_OF_STATE, STUDY_TAG, ChildRuns, closing_figures,
    front_view, model_and_target, parent_tags,
)
from dsm_tune.search.tracking.spool import Spool

# One logger for the whole tracking package: its warnings are what users see of an outage.
log = logging.getLogger("dsm_tune.search.tracking")


# MLflow's HTTP client retries 7 times with a backoff factor of 2 by default (minutes per call against a dead
# server); a study should lose at most a few seconds per trial before queueing. Users' own settings win.
BOUNDED_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def resolve_tracking_uri(uri: str | None, out: Path) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else the project store `sqlite:///<out>/mlflow.db`."""
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    return f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"


def local_artifact_root(uri: str) -> Path | None:
    """Where artifacts go for a local database store (next to the database); None for a tracking server,
    which decides itself. Without this MLflow would drop them into ./mlruns of whatever the current folder is."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///"):])
    return database.parent / "mlartifacts"


def experiment_name(model: str, target: str) -> str:
    return f"dsm-tune/{model}/{target}"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


@contextlib.contextmanager
def _bounded_http_retries() -> Iterator[None]:
    added = [name for name in BOUNDED_HTTP_RETRIES if name not in os.environ]
    for name in added:
        os.environ[name] = BOUNDED_HTTP_RETRIES[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class NullTracker:
    """The tracker protocol (`dsm_tune.search.study.Tracker`), doing nothing (studies run with --no-mlflow)."""

    parent_run_id: str | None = None

    def start_study(self, study_dir: Path, attrs: Mapping[str, Any], resumed: bool) -> str | None:
        return None

    def log_trial(self, record: Mapping[str, Any]) -> None:
        return None

    def refresh_artifacts(self, study_dir: Path) -> None:
        return None

    def end_study(self, pareto_trial_numbers: list[int], records: Iterable[Mapping[str, Any]] = ()) -> None:
        return None


class MlflowTracker:
    """Logs one study into MLflow; see the module docstring for its guarantees.

    `retry_interval_s`: after a failure, how long log calls only queue before trying the store again
    (`end_study` always tries).
    """

    def __init__(self, uri: str | None = None, experiment: str | None = None, out: Path = Path("runs"),
                 retry_interval_s: float = 30.0):
        self.out = Path(out)
        self.uri = resolve_tracking_uri(uri, self.out)
        if "://" not in self.uri and not self.uri.startswith(("databricks", "file:")):
            raise TrackingError(f"MLflow tracking URI {self.uri!r} is not a URI (expected e.g. "
                                f"sqlite:///path/mlflow.db or http://127.0.0.1:5000)")
        self.experiment_override = experiment
        self.retry_interval_s = retry_interval_s
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.study_dir: Path | None = None
        self.study_name: str | None = None
        self._attrs: dict[str, Any] = {}
        self._spool: Spool | None = None
        self._client = None
        self._children: ChildRuns | None = None
        self._pending: dict[int, dict[str, Any]] = {}
        self._offline_since: float | None = None
        self._next_attempt = 0.0

    # --- protocol -----------------------------------------------------------------------------------------------
    def start_study(self, study_dir: Path, attrs: Mapping[str, Any], resumed: bool) -> str | None:
        """Open the study's parent run (on resume the one named by attr `mlflow_parent_run_id`) and deliver the
        queue; returns the run id, None while MLflow is unreachable. `attrs`: the study user attrs."""
        folder = StudyFolder.at(study_dir)
        self.study_dir, self.study_name = folder.path, folder.name
        self._attrs = dict(attrs)
        self.parent_run_id = self._attrs.get(PARENT_ATTR)
        self._children = None
        self._spool = Spool(folder.pending_file)
        self._pending.update(self._spool.load())
        self._attempt(force=True)
        return self.parent_run_id

    def log_trial(self, record: Mapping[str, Any]) -> None:
        """Log one finished trial as a child run (queued if MLflow is unreachable)."""
        self._require_started()
        payload = mlflow_payload(record)
        self._pending[payload["number"]] = payload
        if not self._attempt(force=False):
            self._spool.write(self._pending)

    def refresh_artifacts(self, study_dir: Path | None = None) -> None:
        """Mirror the study folder's plots, trials.csv, best.json and space into the parent run's artifacts."""
        self._require_started()
        if not self._attempt(force=False):
            return
        try:
            with _bounded_http_retries():
                self._artifacts().upload(Path(study_dir) if study_dir is not None else self.study_dir)
        except Exception as exc:  # the store failing must not stop the study
            self._went_offline("uploading the study's artifacts", exc)

    def end_study(self, pareto_trial_numbers: list[int], records: Iterable[Mapping[str, Any]] = ()) -> None:
        """Log whatever is still missing (of the queue and of `records`, every finished trial of the study),
        tag the Pareto-optimal children and close the parent run."""
        self._require_started()
        self._attempt(force=True)
        if self.parent_run_id is None:
            self._queue_missing(records)
            self._spool.write(self._pending)
            log.warning("dsm-tune: warning: MLflow at %s is still unreachable; %d trial(s) stay queued in %s and "
                        "are logged when the study is resumed", self.uri, len(self._pending), self._spool.path)
            return
        records = list(records)
        try:
            with _bounded_http_retries():
                self._queue_missing(records)
                self._flush_pending()
                self._children.tag_pareto(set(int(n) for n in pareto_trial_numbers))
                artifacts = self._artifacts()
                artifacts.upload(self.study_dir)
                limit = finite_metric((self._attrs.get(SPEC) or {}).get("max_accuracy_drop"))
                artifacts.log_front(pareto_trial_numbers, records, limit, len(self._children.runs))
                self._close_parent(pareto_trial_numbers)
        except Exception as exc:
            self._went_offline("finishing the study", exc)
            self._spool.write(self._pending)
            log.warning("dsm-tune: warning: %d trial(s) stay queued in %s and are logged when the study is resumed",
                        len(self._pending), self._spool.path)
            return
        self._spool.write(self._pending)

    def _queue_missing(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            number = int(record["number"])
            if record.get("state") not in RUN_STATUS_OF_STATE or number in self._pending:
                continue
            payload = mlflow_payload(record)
            # A finished child too, when it lacks figures set after it was logged (the confirmation).
            if self._children is None or self._children.lacks(payload):
                self._pending[number] = payload

    # --- the connection -------------------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _require_started(self) -> None:
        if self.study_dir is None:
            raise TrackingError("MlflowTracker.start_study must be called before logging")

    def _attempt(self, force: bool) -> bool:
        """Try to get the parent run and flush the queue; False (after one warning line) when MLflow fails."""
        if not force and self._offline_since is not None and time.monotonic() < self._next_attempt:
            return False
        try:
            with _bounded_http_retries():
                if self.parent_run_id is None or self._children is None:
                    self._open_parent()
                self._flush_pending()
        except Exception as exc:  # any failure of the store: queue, warn once, carry on
            self._went_offline("logging to it", exc)
            return False
        if self._offline_since is not None:
            log.warning("dsm-tune: MLflow at %s is reachable again; queued trials logged", self.uri)
            self._offline_since = None
        return True

    def _went_offline(self, doing: str, exc: BaseException) -> None:
        self.last_error = exc   # the driver tells a full disk from an outage by it (study/session.py)
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            log.warning("dsm-tune: warning: MLflow at %s failed while %s (%s); trials are queued in %s and retried",
                        self.uri, doing, _short(exc), self._spool.path)
        self._next_attempt = time.monotonic() + self.retry_interval_s

    # --- parent run -------------------------------------------------------------------------------------------
    def _open_parent(self) -> None:
        from mlflow.exceptions import MlflowException

        stored = self.parent_run_id
        if stored is not None:
            try:
                run = self.client.get_run(stored)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("dsm-tune: warning: parent run %s of study %s is not in %s; starting a new parent run",
                            stored, self.study_name, self.uri)
            else:
                self.parent_run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
                self._tag_experiment()
                if run.info.status != "RUNNING":
                    self.client.update_run(self.parent_run_id, status="RUNNING")
                self._log_parent_tags()
                self._children = ChildRuns.find(self.client, self.experiment_id, self.parent_run_id, self.study_name)
                return
        model, target = model_and_target(self._attrs)
        self.experiment_id = _experiment_id(self.client, self.experiment_override or experiment_name(model, target),
                                            self.uri)
        self._tag_experiment()
        run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                     tags={ROLE_TAG: "study", STUDY_TAG: self.study_name})
        self.parent_run_id = run.info.run_id
        self._log_parent_tags()
        self._children = ChildRuns(self.client, self.experiment_id, self.parent_run_id, self.study_name)

    def _tag_experiment(self) -> None:
        _tag_experiment(self.client, self.experiment_id, self.study_name)

    def _artifacts(self) -> StudyArtifacts:
        return StudyArtifacts(self.client, self.parent_run_id, self.study_dir)

    def _log_parent_tags(self) -> None:
        from mlflow.entities import RunTag

        model, target = model_and_target(self._attrs)
        tags = parent_tags(self.study_name, self.study_dir, self._attrs, model, target)
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, tag_value(v)) for k, v in tags.items()])

    def _close_parent(self, pareto_numbers: list[int]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        best_file = StudyFolder.at(self.study_dir).best_file
        metrics, tags = closing_figures(best_file, pareto_numbers, len(self._children.runs))
        self._log_parent_tags()
        self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.parent_run_id, status="FINISHED")

    def _flush_pending(self) -> None:
        for number in sorted(self._pending):
            self._children.log(self._pending[number])
            del self._pending[number]
        self._spool.write(self._pending)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The experiment `name`, restored when deleted, created (artifacts beside a local store) when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    root = local_artifact_root(uri)
    return client.create_experiment(name, artifact_location=root.resolve().as_uri() if root else None)


def _tag_experiment(client: Any, experiment_id: str, study_name: str) -> None:
    """The experiment kind (so MLflow 3 shows runs, not GenAI traces) and this study's saved front view, on
    a new experiment and on one reused from earlier studies alike."""
    key, view = front_view(study_name, int(time.time() * 1000))
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    client.set_experiment_tag(experiment_id, key, view)
