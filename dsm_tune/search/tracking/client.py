"""MLflow tracking of a study: one parent run per study, one child run per trial, Pareto tags, plot artifacts.

Only the driver process logs, through `MlflowClient` with explicit run ids (never MLflow's global active run), so
Ray workers and concurrent studies cannot write into each other's runs.

Resilience: the tracking store is a convenience, the study storage is the record. Any failure to reach MLflow
is caught and reported as one warning line; the trial's record is queued in memory and in
`<study>/mlflow_pending.jsonl` and retried on later calls, at `end_study`, and on resume. At `end_study` every
finished trial of the study storage that MLflow still lacks is logged too, so nothing measured is lost.

Resume: the parent run id lives in the study user attr `mlflow_parent_run_id` (the tracker writes it as soon as
both the run and the study storage exist; `start_study` also returns it). Children are found again by their
`trial_number` tag, so logging a trial twice never duplicates it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from dsm_tune.errors import DSMTuneError

log = logging.getLogger(__name__)

PENDING_NAME = "mlflow_pending.jsonl"
PARENT_ATTR = "mlflow_parent_run_id"
STUDY_DB_NAME = "study.db"
# Files of the study folder mirrored as parent-run artifacts (whichever exist).
ARTIFACT_NAMES = ("pareto.html", "pareto.png", "trials.csv", "best.json", "spec.json", "space.yaml")

# Trial attrs logged as child-run metrics (names as in the trials frame, so the two compare 1:1).
METRIC_KEYS = ("metric_value", "accuracy_drop", "latency_ms", "latency_iqr_ms", "baseline_latency_ms",
               "baseline_latency_iqr_ms", "speedup", "speedup_iqr", "flops_ratio", "tokens_kept", "num_images",
               "eval_seconds", "compile_s", "constraint")
# Trial attrs logged as child-run tags (strings a UI filter can match).
TAG_KEYS = ("metric", "worker", "fail_reason", "seed_kind", "aborted")

ROLE_TAG, STUDY_TAG, TRIAL_TAG, PARETO_TAG = "dsm_tune.role", "dsm_tune.study", "trial_number", "pareto"
PARENT_TAG = "mlflow.parentRunId"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_STATUS_OF_STATE = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}

# MLflow's HTTP client retries 7 times with a backoff factor of 2 by default (minutes per call against a dead
# server); a study should lose at most a few seconds per trial before queueing. Users' own settings win.
BOUNDED_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
MAX_TAG_LENGTH = 5000


class TrackingError(DSMTuneError):
    """The tracking configuration is unusable (a malformed URI, a record without a trial number)."""


class _Unreachable(Exception):
    """Internal: the tracking store failed; the caller queues and moves on."""


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


def trial_record(trial: Any) -> dict[str, Any]:
    """The record `log_trial` takes, built from an Optuna FrozenTrial of a dsm-tune study.

    Keys: number, state (COMPLETE/FAIL/PRUNED), params (Optuna's), start_ms/end_ms, and every trial user attr
    at the top level (config, metric, accuracy_drop, latency_ms, ..., worker, fail_reason, seed_kind).
    """
    record: dict[str, Any] = dict(trial.user_attrs)
    record.update(number=int(trial.number), state=trial.state.name, params=dict(trial.params),
                  start_ms=_ms(trial.datetime_start), end_ms=_ms(trial.datetime_complete))
    return record


def _ms(moment: _dt.datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None


def _as_dict(spec: Any) -> dict[str, Any]:
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return dict(spec)
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    if hasattr(spec, "to_dict"):
        return dict(spec.to_dict())
    return dict(vars(spec))


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if mapping.get(key) not in (None, ""):
            return mapping[key]
    return None


def _tag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_TAG_LENGTH]


def _finite_metric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if not math.isnan(number) else None


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


def _study_versions() -> dict[str, str]:
    import timm
    import torch

    from dsm_tune import __version__

    return {"dsm_tune": __version__, "timm": timm.__version__, "torch": torch.__version__}


class NullTracker:
    """The tracker protocol, doing nothing (studies run with --no-mlflow, and tests of the driver)."""

    parent_run_id: str | None = None

    def start_study(self, spec: Any, study_dir: Path, resumed: bool) -> None:
        return None

    def log_trial(self, record: Mapping[str, Any]) -> None:
        return None

    def refresh_artifacts(self, study_dir: Path) -> None:
        return None

    def end_study(self, pareto_trial_numbers: list[int]) -> None:
        return None


@dataclasses.dataclass
class _Child:
    run_id: str
    status: str
    pareto: str | None


class MlflowTracker:
    """Logs one study into MLflow; see the module docstring for its guarantees.

    `retry_interval_s`: after a failure, how long log calls only queue before trying the store again
    (`end_study` always tries). `artifact_interval_s`: while trials come in, the plots are redrawn from the
    study storage and the parent's artifacts refreshed at most this often (None: only when asked).
    """

    def __init__(self, uri: str | None = None, experiment: str | None = None, out: Path = Path("runs"),
                 retry_interval_s: float = 30.0, artifact_interval_s: float | None = 120.0):
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
        self._spec: dict[str, Any] = {}
        self._resumed = False
        self._client = None
        self._children: dict[int, _Child] | None = None
        self._pending: dict[int, dict[str, Any]] = {}
        self._parent_attr_saved = False
        self._study = None
        self._offline_since: float | None = None
        self._next_attempt = 0.0
        self.artifact_interval_s = artifact_interval_s
        self._last_artifacts = time.monotonic()

    # --- protocol -----------------------------------------------------------------------------------------------
    def start_study(self, spec: Any, study_dir: Path, resumed: bool) -> str | None:
        """Open (or, on resume, reopen) the study's parent run; returns its id, None while MLflow is unreachable."""
        self.study_dir = Path(study_dir)
        self.study_dir.mkdir(parents=True, exist_ok=True)
        self._study = None
        self._spec = _as_dict(spec)
        self.study_name = str(_first(self._spec, "study", "name", "study_name") or self.study_dir.name)
        self._resumed = resumed
        self._load_spool()
        self._attempt(force=True)
        return self.parent_run_id

    def log_trial(self, record: Mapping[str, Any]) -> None:
        """Log one finished trial as a child run (queued if MLflow is unreachable)."""
        self._require_started()
        payload = self._normalise(record)
        self._pending[payload["number"]] = payload
        if not self._attempt(force=False):
            self._write_spool()
            return
        due = self.artifact_interval_s is not None and \
            time.monotonic() - self._last_artifacts >= self.artifact_interval_s
        if due:
            self._redraw_plots()
            self.refresh_artifacts(self.study_dir)

    def refresh_artifacts(self, study_dir: Path | None = None) -> None:
        """Mirror the study folder's plots, trials.csv, best.json and space into the parent run's artifacts."""
        self._require_started()
        if not self._attempt(force=False):
            return
        try:
            with _bounded_http_retries():
                self._upload_artifacts(Path(study_dir) if study_dir is not None else self.study_dir)
        except Exception as exc:  # the store failing must not stop the study
            self._went_offline("uploading the study's artifacts", exc)
        self._last_artifacts = time.monotonic()

    def _redraw_plots(self) -> None:
        """Plots of the trials so far, so the parent run shows the front while an overnight study runs."""
        from dsm_tune.search.plots import write_pareto_plots
        from dsm_tune.search.results import trials_frame

        study = self._open_study()
        if study is None:
            return
        spec = {**(study.user_attrs.get("spec") or {}), **self._spec}
        try:
            write_pareto_plots(trials_frame(study), self.study_dir, spec.get("max_accuracy_drop"))
        except Exception as exc:  # a progress picture is not worth an overnight study
            log.warning("dsm-tune: warning: could not redraw the Pareto plots (%s)", _short(exc))

    def end_study(self, pareto_trial_numbers: list[int]) -> None:
        """Log whatever is still missing, tag the Pareto-optimal children and close the parent run."""
        self._require_started()
        self._attempt(force=True)
        if self.parent_run_id is None:
            self._write_spool()
            log.warning("dsm-tune: warning: MLflow at %s is still unreachable; %d trial(s) stay queued in %s and "
                        "are logged when the study is resumed", self.uri, len(self._pending),
                        self.study_dir / PENDING_NAME)
            return
        try:
            with _bounded_http_retries():
                self._backfill_from_storage()
                self._flush_pending()
                self._tag_pareto(set(int(n) for n in pareto_trial_numbers))
                self._upload_artifacts(self.study_dir)
                self._close_parent(pareto_trial_numbers)
        except Exception as exc:
            self._went_offline("finishing the study", exc)
            self._write_spool()
            log.warning("dsm-tune: warning: %d trial(s) stay queued in %s and are logged when the study is resumed",
                        len(self._pending), self.study_dir / PENDING_NAME)
            return
        self._write_spool()

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
                self._save_parent_attr()
                self._flush_pending()
        except Exception as exc:  # any failure of the store: queue, warn once, carry on
            self._went_offline("logging to it", exc)
            return False
        if self._offline_since is not None:
            log.warning("dsm-tune: MLflow at %s is reachable again; queued trials logged", self.uri)
            self._offline_since = None
        return True

    def _went_offline(self, doing: str, exc: BaseException) -> None:
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            log.warning("dsm-tune: warning: MLflow at %s failed while %s (%s); trials are queued in %s and retried",
                        self.uri, doing, _short(exc), self.study_dir / PENDING_NAME)
        self._next_attempt = time.monotonic() + self.retry_interval_s

    # --- parent run -------------------------------------------------------------------------------------------
    def _open_parent(self) -> None:
        from mlflow.exceptions import MlflowException

        stored = self.parent_run_id or self._stored_parent_id()
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
                if run.info.status != "RUNNING":
                    self.client.update_run(self.parent_run_id, status="RUNNING")
                self._log_parent_tags()
                self._children = self._find_children()
                return
        self.experiment_id = self._experiment_id()
        run = self.client.create_run(self.experiment_id, run_name=self.study_name,
                                     tags={ROLE_TAG: "study", STUDY_TAG: self.study_name})
        self.parent_run_id = run.info.run_id
        self._parent_attr_saved = False
        self._log_parent_tags()
        self._children = {}

    def _experiment_id(self) -> str:
        model, target = self._model_and_target()
        name = self.experiment_override or experiment_name(model, target)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        root = local_artifact_root(self.uri)
        return self.client.create_experiment(name, artifact_location=root.resolve().as_uri() if root else None)

    def _model_and_target(self) -> tuple[str, str]:
        attrs = self._study_attrs()
        spec = {**(attrs.get("spec") or {}), **self._spec}
        model = _first(spec, "model", "model_name") or (attrs.get("fingerprint") or {}).get("name") or "model"
        try:
            from dsm_tune.evaluation.models import resolve_model_name

            model = resolve_model_name(str(model))
        except Exception:  # an alias the resolver does not know still names an experiment well enough
            pass
        target = _first(spec, "target", "device") or "target"
        if isinstance(target, Mapping):
            target = _first(target, "name", "profile") or "target"
        return str(model), str(target)

    def _log_parent_tags(self) -> None:
        from mlflow.entities import RunTag

        attrs = self._study_attrs()
        spec = {**(attrs.get("spec") or {}), **self._spec}
        versions = attrs.get("versions") or _study_versions()
        model, target = self._model_and_target()
        tags = {
            ROLE_TAG: "study", STUDY_TAG: self.study_name, "model": model, "target": target,
            "versions.dsm_tune": versions.get("dsm_tune"), "versions.timm": versions.get("timm"),
            "versions.torch": versions.get("torch"),
            # None in the spec means "the default": the space file of the model family (copied to the
            # space.yaml artifact), the model's own data, the metric its data allows.
            "search_space": _first(spec, "space", "space_file", "search_space") or "default (artifact space.yaml)",
            "sampler": _first(spec, "sampler"), "data": _first(spec, "data", "data_spec") or "model default",
            "data_fingerprint": attrs.get("data_fingerprint"),
            "metric": _first(spec, "metric") or (attrs.get("baseline") or {}).get("metric"),
            "max_accuracy_drop": _first(spec, "max_accuracy_drop"), "study_dir": str(self.study_dir.resolve()),
            "mlflow.note.content": self._note(model, target, spec),
        }
        tags = [RunTag(k, _tag_value(v)) for k, v in tags.items() if v is not None]
        self.client.log_batch(self.parent_run_id, tags=tags)

    def _note(self, model: str, target: str, spec: Mapping[str, Any]) -> str:
        limit = spec.get("max_accuracy_drop")
        return (f"dsm-tune study `{self.study_name}`: {model} on {target}"
                + (f", accuracy-drop limit {limit}" if limit is not None else "")
                + ". Pareto-optimal trials: filter `tags.pareto = 'true'`. Plots: artifacts pareto.html/pareto.png.")

    def _save_parent_attr(self) -> None:
        """Keep the parent id in the study storage so a resumed study finds its run again."""
        if self._parent_attr_saved or self.parent_run_id is None:
            return
        study = self._open_study()
        if study is None:
            return
        if study.user_attrs.get(PARENT_ATTR) != self.parent_run_id:
            study.set_user_attr(PARENT_ATTR, self.parent_run_id)
        self._parent_attr_saved = True

    def _close_parent(self, pareto_numbers: list[int]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        tags = [RunTag("pareto_trials", ",".join(str(n) for n in sorted(pareto_numbers))),
                RunTag("n_trials", str(len(self._children or {})))]
        metrics = []
        best_path = self.study_dir / "best.json"
        if best_path.exists():
            try:
                best = json.loads(best_path.read_text())
            except (OSError, json.JSONDecodeError):
                best = {}
            figures = best.get("metrics") or {}
            for key in ("accuracy_drop", "latency_ms", "speedup", "flops_ratio"):
                value = _finite_metric(figures.get(key))
                if value is not None:
                    metrics.append(Metric(f"best_{key}", value, now, 0))
            trial = (best.get("provenance") or {}).get("trial")
            if trial is not None:
                tags.append(RunTag("best_trial", str(trial)))
        self._log_parent_tags()
        self.client.log_batch(self.parent_run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(self.parent_run_id, status="FINISHED")

    # --- children -----------------------------------------------------------------------------------------------
    def _find_children(self) -> dict[int, _Child]:
        children: dict[int, _Child] = {}
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                max_results=1000, page_token=token)
            for run in page:
                number = run.data.tags.get(TRIAL_TAG)
                if number is None or not number.isdigit():
                    continue
                child = _Child(run.info.run_id, run.info.status, run.data.tags.get(PARETO_TAG))
                previous = children.get(int(number))
                # Keep a finished duplicate over an unfinished one (a crash between create and terminate).
                if previous is None or previous.status not in TERMINAL_STATUSES:
                    children[int(number)] = child
            token = page.token
            if not token:
                return children

    def _flush_pending(self) -> None:
        for number in sorted(self._pending):
            self._log_child(self._pending[number])
            del self._pending[number]
        self._write_spool()

    def _log_child(self, payload: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        number = payload["number"]
        existing = self._children.get(number)
        if existing is not None and existing.status in TERMINAL_STATUSES:
            return
        end_ms = payload.get("end_ms") or int(time.time() * 1000)
        if existing is None:
            run = self.client.create_run(
                self.experiment_id, start_time=payload.get("start_ms"), run_name=f"trial-{number:04d}",
                tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: str(number), ROLE_TAG: "trial",
                      STUDY_TAG: self.study_name})
            existing = _Child(run.info.run_id, "RUNNING", None)
            self._children[number] = existing
        # A fixed timestamp makes a retried batch identical to the first one, not a second history point.
        metrics = [Metric(k, v, end_ms, 0) for k, v in payload["metrics"].items()]
        params = [Param(k, str(v)) for k, v in payload["params"].items()]
        tags = [RunTag(k, v) for k, v in payload["tags"].items()]
        self.client.log_batch(existing.run_id, metrics=metrics, params=params, tags=tags)
        status = RUN_STATUS_OF_STATE.get(payload["state"], "FAILED")
        self.client.set_terminated(existing.run_id, status=status, end_time=end_ms)
        existing.status = status

    def _tag_pareto(self, front: set[int]) -> None:
        for number, child in sorted(self._children.items()):
            value = "true" if number in front else "false"
            if child.pareto != value:
                self.client.set_tag(child.run_id, PARETO_TAG, value)
                child.pareto = value

    def _backfill_from_storage(self) -> None:
        study = self._open_study()
        if study is None:
            return
        for trial in study.get_trials(deepcopy=False):
            if trial.state.name not in RUN_STATUS_OF_STATE or trial.number in self._pending:
                continue
            child = self._children.get(trial.number)
            if child is None or child.status not in TERMINAL_STATUSES:
                self._pending[trial.number] = self._normalise(trial_record(trial))

    def _normalise(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A record (see `trial_record`) as what MLflow gets: JSON-safe params/metrics/tags."""
        if "number" not in record:
            raise TrackingError(f"trial record without a 'number': {sorted(record)}")
        attrs = dict(record.get("user_attrs") or {})
        attrs.update({k: v for k, v in record.items() if k != "user_attrs"})
        metrics_in = {**attrs, **(attrs.get("metrics") or {})}
        state = str(attrs.get("state") or "COMPLETE").upper().replace("TRIALSTATE.", "")
        metrics = {}
        for key in METRIC_KEYS:
            value = _finite_metric(metrics_in.get(key))
            if value is not None:
                metrics[key] = value
        tags = {TRIAL_TAG: str(int(attrs["number"])), "state": state}
        reason = _first(attrs, "fail_reason", "reason")
        for key in TAG_KEYS:
            value = reason if key == "fail_reason" else attrs.get(key)
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                tags[key] = _tag_value(value)
        return {"number": int(attrs["number"]), "state": state, "params": self._params(attrs),
                "metrics": metrics, "tags": tags, "start_ms": attrs.get("start_ms"), "end_ms": attrs.get("end_ms")}

    @staticmethod
    def _params(attrs: Mapping[str, Any]) -> dict[str, str]:
        config = attrs.get("config")
        if config is not None:
            from dsm_tune.merging import DSMConfig

            if isinstance(config, str):
                config = json.loads(config)
            if not isinstance(config, DSMConfig):
                document = {k: v for k, v in dict(config).items()
                            if k not in ("model", "target", "metrics", "provenance")}
                config = DSMConfig.from_dict(document)
            return {k: _tag_value(v) for k, v in config.merge_params().items()}
        # No config (a trial that failed before its config was built): Optuna's raw parameters.
        return {k: _tag_value(v) for k, v in (attrs.get("params") or {}).items()}

    # --- artifacts --------------------------------------------------------------------------------------------
    def _upload_artifacts(self, study_dir: Path) -> None:
        if self.parent_run_id is None:
            return
        for name in ARTIFACT_NAMES:
            path = study_dir / name
            if path.is_file():
                self.client.log_artifact(self.parent_run_id, str(path))

    # --- study storage and spool ----------------------------------------------------------------------------------
    def _open_study(self):
        """The study (its attrs are read fresh from the storage on every access), None until it exists."""
        if self._study is not None:
            return self._study
        database = self.study_dir / STUDY_DB_NAME
        if not database.exists():
            return None
        import optuna

        try:
            self._study = optuna.load_study(study_name=self.study_name, storage=f"sqlite:///{database.resolve()}")
        except KeyError:  # the database exists but holds no study of that name yet
            return None
        return self._study

    def _study_attrs(self) -> dict[str, Any]:
        study = self._open_study()
        return dict(study.user_attrs) if study is not None else {}

    def _stored_parent_id(self) -> str | None:
        return self._study_attrs().get(PARENT_ATTR)

    def _load_spool(self) -> None:
        path = self.study_dir / PENDING_NAME
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash mid-write; the storage backfill covers it
                continue
            self._pending[int(payload["number"])] = payload

    def _write_spool(self) -> None:
        path = self.study_dir / PENDING_NAME
        if not self._pending:
            path.unlink(missing_ok=True)
            return
        temporary = path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(self._pending[n]) + "\n" for n in sorted(self._pending)))
        os.replace(temporary, path)
