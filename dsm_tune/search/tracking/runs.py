"""The MLflow runs of a study: the parent run's tags, and the child runs (one per trial, found again by their
`trial_number` tag, so logging a trial twice never duplicates it)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from dsm_tune.record import (
    ACCURACY_DROP, BASELINE_LATENCY_MS, CONFIG, CONFIRMED_DROP, DATA_FINGERPRINT, FLOPS_RATIO, INTERVAL_KEYS,
    LATE_METRIC_KEYS, LATENCY_MS, SEED_KIND, SPEEDUP,
)
from dsm_tune.search.text import describe_config
from dsm_tune.search.tracking.records import TRIAL_TAG, finite_metric

ROLE_TAG, STUDY_TAG, PARETO_TAG = "dsm_tune.role", "dsm_tune.study", "pareto"
PARENT_TAG = "mlflow.parentRunId"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_STATUS_OF_STATE = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}

# MLflow 3's UI opens an experiment on the GenAI overview (traces, "No data available") unless told it holds model
# training runs; the accepted values are the front end's ExperimentKind enum (mlflow/server/js: genai_development,
# custom_model_development, finetuning, forecasting, classification, regression, automl, no_inferred_type).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# A view saved on the experiment, as the UI's own "Share"/"Save view" stores it: an experiment tag holding a
# {name, createdAt, updatedAt, state} envelope whose state is the runs page's search facets and UI state.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
FRONT_TABLE = "pareto_front.json"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"   # what makes the artifact view render a JSON file as a table
FRONT_IMAGE_KEY = "pareto_front"
# The front table's columns, in this order; the interval and confirmation ones only where a front trial has them.
FRONT_FIGURES = (SPEEDUP, LATENCY_MS, ACCURACY_DROP, *INTERVAL_KEYS, *LATE_METRIC_KEYS)
CONFIG_COLUMNS = ("start_layer", "hierarchy_depth", "num_stages", "proportional_attention")
# best.json figures the parent gets as best_<key> metrics (the interval and confirmation ones when present).
BEST_FIGURES = (ACCURACY_DROP, LATENCY_MS, SPEEDUP, FLOPS_RATIO, *INTERVAL_KEYS, *LATE_METRIC_KEYS)
# Scatter charts show the first N runs of the table; a study rarely has more trials than this.
VIEW_RUNS_SHOWN = 500


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
        "data_fingerprint": attrs.get(DATA_FINGERPRINT),
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
    if not isinstance(best, dict):
        best = {}
    figures = best.get("metrics") if isinstance(best.get("metrics"), dict) else {}
    for key in BEST_FIGURES:
        value = finite_metric(figures.get(key))
        if value is not None:
            metrics[f"best_{key}"] = value
    # Which rule picked the exported config (confirmed / conservative / search); older best.json files have none.
    selection = best.get("selection")
    rule = selection.get("rule") if isinstance(selection, dict) else None
    if isinstance(rule, str) and rule:
        tags["best_selection"] = rule
    # The study's dense reference (best.json's latency_ms is it over best_speedup).
    reference = finite_metric(figures.get(BASELINE_LATENCY_MS))
    if reference is not None:
        metrics["dense_reference_ms"] = reference
    trial = (best.get("provenance") or {}).get("trial")
    if trial is not None:
        tags["best_trial"] = str(trial)
    return metrics, tags


def front_view_key(study_name: str) -> str:
    """The id of the study's saved view (`viewStateShareKey` in the UI's URL); tag keys allow few characters."""
    return "dsm-tune-" + re.sub(r"[^A-Za-z0-9_-]", "_", study_name)


def filter_literal(value: str) -> str:
    """A string as a literal of an MLflow search filter, which has no escapes: a value holding a single quote is
    double-quoted (study names hold neither; `ui --study` passes what a user typed)."""
    return f'"{value}"' if "'" in value and '"' not in value else f"'{value}'"


def front_view(study_name: str, now_ms: int) -> tuple[str, str]:
    """The experiment tag (key, value) of a saved runs view of this study's trials: a chart of accuracy drop
    against latency (the front is its lower left), the confirmed drop against latency, and a table of the figures
    a front is judged by, sorted by latency. Trials only: under their collapsed parent they would be neither rows
    nor chart points."""
    filter_string = (f"tags.`{STUDY_TAG}` = {filter_literal(study_name)} AND tags.`{ROLE_TAG}` = 'trial'")
    section = "dsm-tune-front"

    def scatter(uuid: str, title: str, y: str) -> dict[str, Any]:
        return {"uuid": uuid, "type": "SCATTER", "displayName": title, "metricSectionId": section,
                "runsCountToCompare": VIEW_RUNS_SHOWN, "deleted": False, "isGenerated": False,
                "xaxis": {"key": LATENCY_MS, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}}

    columns = ([f"metrics.`{k}`" for k in (ACCURACY_DROP, LATENCY_MS, SPEEDUP, *INTERVAL_KEYS,
                                           CONFIRMED_DROP)]
               + [f"tags.`{k}`" for k in (PARETO_TAG, SEED_KIND)]
               + [f"params.`{k}`" for k in CONFIG_COLUMNS[:3]])
    state = {
        "searchFilter": filter_string, "orderByKey": f"metrics.`{LATENCY_MS}`", "orderByAsc": True,
        "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
        "selectedColumns": columns, "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True,
        "compareRunSections": [{"uuid": section, "name": "Accuracy drop vs latency (front: lower left; "
                                                          "tags.pareto = 'true' marks it)",
                                "display": True, "isReordered": False}],
        "compareRunCharts": [scatter("dsm-tune-drop-vs-latency", "accuracy_drop vs latency_ms", ACCURACY_DROP),
                             scatter("dsm-tune-confirmed-vs-latency", "confirmed_drop vs latency_ms",
                                     CONFIRMED_DROP)],
        "isAccordionReordered": False, "useGroupedValuesInCharts": True, "chartsSearchFilter": "",
    }
    envelope = {"name": f"dsm-tune front: {study_name}", "createdAt": now_ms, "updatedAt": now_ms,
                "state": json.dumps(state)}
    return SHARED_VIEW_PREFIX + front_view_key(study_name), json.dumps(envelope)


def front_view_route(experiment_id: str, study_name: str | None) -> str:
    """The UI route (after `#`) of an experiment's runs: in MLflow 3 the `workflowType` query decides between the
    GenAI pages and the model-training ones; the chart mode and the study's saved view (when named) follow."""
    from urllib.parse import urlencode

    query = {"workflowType": "machine_learning", "compareRunsMode": "CHART"}
    if study_name:
        query["viewStateShareKey"] = front_view_key(study_name)
    return f"/experiments/{experiment_id}/runs?{urlencode(query)}"


def front_table(records: Iterable[Mapping[str, Any]], pareto_numbers: Iterable[int],
                max_drop: float | None) -> dict[str, list[Any]]:
    """The Pareto-optimal trials as columns (cheapest first): trial, figures, intervals and confirmation where any
    front trial has them, `within_limit` when the study has a limit, and the config summary."""
    front = set(int(n) for n in pareto_numbers)
    rows = [r for r in records if int(r["number"]) in front]
    rows.sort(key=lambda r: (finite_metric(r.get(LATENCY_MS)) or float("inf"), int(r["number"])))
    table: dict[str, list[Any]] = {"trial": [int(r["number"]) for r in rows]}
    for key in FRONT_FIGURES:
        values = [finite_metric(r.get(key)) for r in rows]
        if key in (SPEEDUP, LATENCY_MS, ACCURACY_DROP) or any(v is not None for v in values):
            table[key] = values
    if max_drop is not None:
        table["within_limit"] = [d is not None and d <= max_drop for d in table[ACCURACY_DROP]]
    merges = [_merge_part(r.get(CONFIG)) for r in rows]
    for key in CONFIG_COLUMNS:
        table[key] = [m.get(key) for m in merges]
    table[CONFIG] = [describe_config(m) if m else "" for m in merges]
    return table


def _merge_part(config: Any) -> dict[str, Any]:
    """The merge settings of a trial's `config` attr, with the stage count (what the child's params call it)."""
    if not isinstance(config, dict):
        return {}
    merge = config.get("merge", config)
    if not isinstance(merge, dict):
        return {}
    stages = merge.get("stages")
    return {**merge, "num_stages": len(stages) if isinstance(stages, list) else None}


@dataclasses.dataclass
class _Child:
    run_id: str
    status: str
    pareto: str | None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)   # as MLflow holds them (latest)


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
                    runs[int(number)] = _Child(run.info.run_id, run.info.status, run.data.tags.get(PARETO_TAG),
                                               dict(run.data.metrics))
            token = page.token
            if not token:
                return cls(client, experiment_id, parent_run_id, study_name, runs)

    def finished(self, number: int) -> bool:
        child = self.runs.get(number)
        return child is not None and child.status in TERMINAL_STATUSES

    def late_metrics(self, payload: Mapping[str, Any]) -> dict[str, float]:
        """What a finished child still lacks of a payload: metrics it never got (figures that arrived after it
        was logged, such as the confirmation), and confirmation figures that changed since. The search figures a
        child has stay those of its time."""
        child = self.runs.get(payload["number"])
        if child is None:
            return {}
        return {k: v for k, v in payload["metrics"].items()
                if k not in child.metrics or (k in LATE_METRIC_KEYS and child.metrics[k] != v)}

    def lacks(self, payload: Mapping[str, Any]) -> bool:
        return not self.finished(payload["number"]) or bool(self.late_metrics(payload))

    def log(self, payload: Mapping[str, Any]) -> None:
        """One trial's payload (`records.mlflow_payload`) as a finished child run; a finished one is kept, and
        only gets the metrics it lacks (`late_metrics`)."""
        from mlflow.entities import Metric, Param, RunTag

        number = payload["number"]
        if self.finished(number):
            late = self.late_metrics(payload)
            if late:
                # Now, not the trial's end: a changed confirmation must become the latest value of its metric.
                now = int(time.time() * 1000)
                child = self.runs[number]
                self.client.log_batch(child.run_id, metrics=[Metric(k, v, now, 0) for k, v in late.items()])
                child.metrics.update(late)
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
        existing.metrics.update(payload["metrics"])
        status = RUN_STATUS_OF_STATE.get(payload["state"], "FAILED")
        self.client.set_terminated(existing.run_id, status=status, end_time=end_ms)
        existing.status = status

    def tag_pareto(self, front: set[int]) -> None:
        for number, child in sorted(self.runs.items()):
            value = "true" if number in front else "false"
            if child.pareto != value:
                self.client.set_tag(child.run_id, PARETO_TAG, value)
                child.pareto = value
