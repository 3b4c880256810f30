"""The MLflow runs of a study: the parent run's tags, and the child runs (one per trial, found again by their
`trial_number` tag, so logging a trial twice never duplicates it)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping

from dsm_tune.search.tracking.records import TRIAL_TAG, finite_metric

ROLE_TAG, STUDY_TAG, PARETO_TAG = "dsm_tune.role", "dsm_tune.study", "pareto"
PARENT_TAG = "mlflow.parentRunId"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_STATUS_OF_STATE = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}


def parent_tags(study_name: str, study_dir: Path, attrs: Mapping[str, Any], model: str,
                target: str) -> dict[str, Any]:
    """The parent run's tags, from the study user attrs (None values left out)."""
    spec = attrs.get("spec") or {}
    versions = attrs.get("versions") or {}
    limit = spec.get("max_accuracy_drop")
    note = (f"dsm-tune study `{study_name}`: {model} on {target}"
            + (f", accuracy-drop limit {limit}" if limit is not None else "")
            + ". Pareto-optimal trials: filter `tags.pareto = 'true'`. Plots: artifacts pareto.html/pareto.png.")
    tags = {
        ROLE_TAG: "study", STUDY_TAG: study_name, "model": model, "target": target,
        "versions.dsm_tune": versions.get("dsm_tune"), "versions.timm": versions.get("timm"),
        "versions.torch": versions.get("torch"),
        # None in the spec means "the default": the space file of the model family (copied to the space.yaml
        # artifact), the model's own data, the metric its data allows.
        "search_space": spec.get("space") or "default (artifact space.yaml)",
        "sampler": spec.get("sampler"), "data": spec.get("data") or "model default",
        "data_fingerprint": attrs.get("data_fingerprint"),
        "metric": spec.get("metric") or (attrs.get("baseline") or {}).get("metric"),
        "max_accuracy_drop": limit, "study_dir": str(Path(study_dir).resolve()), "mlflow.note.content": note,
        # `run --probe`: what the probe narrowed (the details are in the spec.json artifact).
        "probe_narrowing": (spec.get("probe_narrowing") or {}).get("summary"),
    }
    return {k: v for k, v in tags.items() if v is not None}


def model_and_target(attrs: Mapping[str, Any]) -> tuple[str, str]:
    """The timm model name and target profile of a study (they name its experiment)."""
    spec = attrs.get("spec") or {}
    model = spec.get("model") or (attrs.get("fingerprint") or {}).get("name") or "model"
    try:
        from dsm_tune.evaluation.models import resolve_model_name

        model = resolve_model_name(str(model))
    except Exception:  # an alias the resolver does not know still names an experiment well enough
        pass
    return str(model), str(spec.get("target") or "target")


def closing_figures(best_path: Path, pareto_numbers: list[int], n_trials: int) -> tuple[dict[str, float],
                                                                                      dict[str, str]]:
    """Metrics and tags of a finished study's parent run: the front, and best.json's figures when it exists."""
    metrics: dict[str, float] = {}
    tags = {"pareto_trials": ",".join(str(n) for n in sorted(pareto_numbers)), "n_trials": str(n_trials)}
    if not best_path.exists():
        return metrics, tags
    try:
        best = json.loads(best_path.read_text())
    except (OSError, json.JSONDecodeError):
        best = {}
    figures = best.get("metrics") or {}
    for key in ("accuracy_drop", "latency_ms", "speedup", "flops_ratio"):
        value = finite_metric(figures.get(key))
        if value is not None:
            metrics[f"best_{key}"] = value
    # The study's dense reference (best.json's latency_ms is it over best_speedup).
    reference = finite_metric(figures.get("baseline_latency_ms"))
    if reference is not None:
        metrics["dense_reference_ms"] = reference
    trial = (best.get("provenance") or {}).get("trial")
    if trial is not None:
        tags["best_trial"] = str(trial)
    return metrics, tags


@dataclasses.dataclass
class _Child:
    run_id: str
    status: str
    pareto: str | None


class ChildRuns:
    """The child runs of one parent run, by trial number."""

    def __init__(self, client: Any, experiment_id: str, parent_run_id: str, study_name: str,
                 runs: dict[int, _Child] | None = None):
        self.client, self.experiment_id = client, experiment_id
        self.parent_run_id, self.study_name = parent_run_id, study_name
        self.runs: dict[int, _Child] = runs or {}

    @classmethod
    def find(cls, client: Any, experiment_id: str, parent_run_id: str, study_name: str) -> "ChildRuns":
        runs: dict[int, _Child] = {}
        token = None
        while True:
            page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                      max_results=1000, page_token=token)
            for run in page:
                number = run.data.tags.get(TRIAL_TAG)
                if number is None or not number.isdigit():
                    continue
                previous = runs.get(int(number))
                # Keep a finished duplicate over an unfinished one (a crash between create and terminate).
                if previous is None or previous.status not in TERMINAL_STATUSES:
                    runs[int(number)] = _Child(run.info.run_id, run.info.status, run.data.tags.get(PARETO_TAG))
            token = page.token
            if not token:
                return cls(client, experiment_id, parent_run_id, study_name, runs)

    def finished(self, number: int) -> bool:
        child = self.runs.get(number)
        return child is not None and child.status in TERMINAL_STATUSES

    def log(self, payload: Mapping[str, Any]) -> None:
        """One trial's payload (`records.mlflow_payload`) as a finished child run; a finished one is kept."""
        from mlflow.entities import Metric, Param, RunTag

        number = payload["number"]
        if self.finished(number):
            return
        existing = self.runs.get(number)
        end_ms = payload.get("end_ms") or int(time.time() * 1000)
        if existing is None:
            run = self.client.create_run(
                self.experiment_id, start_time=payload.get("start_ms"), run_name=f"trial-{number:04d}",
                tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: str(number), ROLE_TAG: "trial",
                      STUDY_TAG: self.study_name})
            existing = self.runs[number] = _Child(run.info.run_id, "RUNNING", None)
        # A fixed timestamp makes a retried batch identical to the first one, not a second history point.
        metrics = [Metric(k, v, end_ms, 0) for k, v in payload["metrics"].items()]
        params = [Param(k, str(v)) for k, v in payload["params"].items()]
        tags = [RunTag(k, v) for k, v in payload["tags"].items()]
        self.client.log_batch(existing.run_id, metrics=metrics, params=params, tags=tags)
        status = RUN_STATUS_OF_STATE.get(payload["state"], "FAILED")
        self.client.set_terminated(existing.run_id, status=status, end_time=end_ms)
        existing.status = status

    def tag_pareto(self, front: set[int]) -> None:
        for number, child in sorted(self.runs.items()):
            value = "true" if number in front else "false"
            if child.pareto != value:
                self.client.set_tag(child.run_id, PARETO_TAG, value)
                child.pareto = value
