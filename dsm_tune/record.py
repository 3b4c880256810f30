"""The trial record: every user attr a dsm-tune trial can hold, named once, with who writes it and how MLflow
logs it; and the study-level attrs beside it.

Every surface (trials.csv, best.json, MLflow, the plots, `report`) takes its names and column lists from here, so
a new attr is added in one place. It sits beside the layers rather than in one: the evaluator writes most of the
record and must not import the search layer, and the CLI reads names from it without loading torch; it imports
nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

# Who writes a trial attr.
EVALUATOR = "evaluator"        # the evaluator's result (`TrialOutcome.flat`)
DRIVER = "driver"              # the driver's bookkeeping: not copied onto a duplicate, not an evaluator result
PROPOSER = "proposer"          # the traced proposer's record of what it predicted
RUN = "run"                    # about one evaluation run, not about the config: not copied onto a duplicate
REFERENCE = "reference"        # derived when read, under the study's dense reference (`search/dense_reference.py`)
CONFIRMATION = "confirmation"  # scored on held-out images after the search; kept in a study attr
TEST = "test"                  # stand-in evaluators only

# How MLflow logs it on the trial's child run (None: not logged).
METRIC_LOG = "metric"
TAG_LOG = "tag"


@dataclass(frozen=True)
class Field:
    name: str
    owner: str
    mlflow: str | None = None
    doc: str = ""


# --- trial attr names -----------------------------------------------------------------------------------------
METRIC = "metric"
METRIC_VALUE = "metric_value"
ACCURACY_DROP = "accuracy_drop"
ACCURACY_DROP_CI_LOW = "accuracy_drop_ci_low"
ACCURACY_DROP_CI_HIGH = "accuracy_drop_ci_high"
ABORTED = "aborted"
LATENCY_MS = "latency_ms"
LATENCY_IQR_MS = "latency_iqr_ms"
BASELINE_LATENCY_MS = "baseline_latency_ms"
BASELINE_LATENCY_IQR_MS = "baseline_latency_iqr_ms"
LATENCY_MEASURED_MS = "latency_measured_ms"
BASELINE_MEASURED_MS = "baseline_measured_ms"
SPEEDUP = "speedup"
SPEEDUP_IQR = "speedup_iqr"
SPEEDUP_NOISY = "speedup_noisy"
SPEEDUP_RETIMED = "speedup_retimed"
COMPILE_S = "compile_s"
FLOPS_RATIO = "flops_ratio"
TOKENS_KEPT = "tokens_kept"
NUM_IMAGES = "num_images"
EVAL_SECONDS = "eval_seconds"
SCREENED = "screened"
CONSTRAINT = "constraint"
CONFIRMED_DROP = "confirmed_drop"
CONFIRMED_DROP_CI_LOW = "confirmed_drop_ci_low"
CONFIRMED_DROP_CI_HIGH = "confirmed_drop_ci_high"
CONFIRMED_NUM_IMAGES = "confirmed_num_images"
WORKER = "worker"
FAIL_REASON = "fail_reason"
SEED_KIND = "seed_kind"
DUPLICATE_OF = "duplicate_of"
CONFIG = "config"
CONFIG_KEY = "config_key"
PLAN_KEY = "plan_key"
REQUEUED_FROM = "requeued_from"
MERGE_FORM = "merge_form"
QUEUED_AGAIN = "queued_again"
IN_PROCESS = "in_process"
PROCESS_DEATHS = "process_deaths"
KILLED_PROCESS = "killed_process"
WALL_SECONDS = "wall_seconds"
LOCK_WAIT_S = "lock_wait_s"
SHAPE = "shape"
SPEEDUP_PREDICTED = "speedup_predicted"
OPTIONS_SEEN = "options_seen"

# The table. Its order is the order of the MLflow metric and tag lists derived below.
FIELDS: tuple[Field, ...] = (
    Field(METRIC, EVALUATOR, TAG_LOG, "the accuracy metric (top1, agreement, feature)"),
    Field(METRIC_VALUE, EVALUATOR, METRIC_LOG, "the metric of the merged model"),
    Field(ACCURACY_DROP, EVALUATOR, METRIC_LOG, "dense metric minus merged metric, in points"),
    Field(LATENCY_MS, EVALUATOR, METRIC_LOG, "merged latency per batch; under the dense reference when read"),
    Field(LATENCY_IQR_MS, EVALUATOR, METRIC_LOG),
    Field(BASELINE_LATENCY_MS, EVALUATOR, METRIC_LOG, "dense latency; the study's dense reference when read"),
    Field(BASELINE_LATENCY_IQR_MS, EVALUATOR, METRIC_LOG),
    Field(LATENCY_MEASURED_MS, REFERENCE, METRIC_LOG, "the trial's raw merged median"),
    Field(BASELINE_MEASURED_MS, REFERENCE, METRIC_LOG, "the trial's raw dense median"),
    Field(SPEEDUP, EVALUATOR, METRIC_LOG, "median of the interleaved dense/merged pair ratios"),
    Field(SPEEDUP_IQR, EVALUATOR, METRIC_LOG),
    Field(FLOPS_RATIO, EVALUATOR, METRIC_LOG),
    Field(TOKENS_KEPT, EVALUATOR, METRIC_LOG),
    Field(NUM_IMAGES, EVALUATOR, METRIC_LOG),
    Field(EVAL_SECONDS, EVALUATOR, METRIC_LOG),
    Field(COMPILE_S, EVALUATOR, METRIC_LOG),
    Field(CONSTRAINT, DRIVER, METRIC_LOG, "accuracy_drop - max_accuracy_drop, as told to Optuna"),
    Field(ACCURACY_DROP_CI_LOW, EVALUATOR, METRIC_LOG, "95% paired interval of the search drop"),
    Field(ACCURACY_DROP_CI_HIGH, EVALUATOR, METRIC_LOG),
    Field(CONFIRMED_DROP, CONFIRMATION, METRIC_LOG, "the drop on held-out images"),
    Field(CONFIRMED_DROP_CI_LOW, CONFIRMATION, METRIC_LOG),
    Field(CONFIRMED_DROP_CI_HIGH, CONFIRMATION, METRIC_LOG),
    Field(CONFIRMED_NUM_IMAGES, CONFIRMATION, METRIC_LOG),
    Field(WORKER, DRIVER, TAG_LOG, "which worker measured it"),
    Field(FAIL_REASON, DRIVER, TAG_LOG, "why it failed, was pruned or was not timed (the evaluator sets it too)"),
    Field(SEED_KIND, DRIVER, TAG_LOG, "dense / tome / paper for an enqueued seed config"),
    Field(ABORTED, EVALUATOR, TAG_LOG, "the accuracy pass stopped early: the drop was hopeless"),
    Field(SPEEDUP_NOISY, EVALUATOR, TAG_LOG, "the interleaved pairs disagreed even when timed again"),
    Field(SPEEDUP_RETIMED, EVALUATOR, None, "the first timing was noisy: timed again"),
    Field(SCREENED, EVALUATOR, None, "stopped by the multi-fidelity screen"),
    Field(DUPLICATE_OF, DRIVER, None, "the trial whose measurement this one copied"),
    Field(CONFIG, DRIVER, None, "the config document (`results.config_attr`)"),
    Field(CONFIG_KEY, DRIVER),
    Field(PLAN_KEY, DRIVER),
    Field(REQUEUED_FROM, DRIVER),
    Field(MERGE_FORM, DRIVER, None, "'r' for a trial sampled in the fixed-r form"),
    Field(QUEUED_AGAIN, DRIVER, None, "a FAILed trial whose parameters were enqueued again"),
    Field(IN_PROCESS, DRIVER, None, "evaluating / evaluated in the driver's own process"),
    Field(PROCESS_DEATHS, DRIVER),
    Field(KILLED_PROCESS, DRIVER),
    Field(WALL_SECONDS, RUN),
    Field(LOCK_WAIT_S, RUN),
    Field(SHAPE, PROPOSER, None, "the traced shape's key"),
    Field(SPEEDUP_PREDICTED, PROPOSER, None, "the latency model's prediction, made before the trial"),
    Field(OPTIONS_SEEN, TEST),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def _named(owner: str) -> frozenset[str]:
    return frozenset(f.name for f in FIELDS if f.owner == owner)


# --- derived lists ----------------------------------------------------------------------------------------------
# Trial attrs the driver owns; everything else a trial holds came from its evaluator (or its proposer).
DRIVER_ATTRS = _named(DRIVER)
# About one particular evaluation run, not about the config.
RUN_ATTRS = _named(RUN)
# Optuna's objectives, as trials-frame columns.
OBJECTIVES = (ACCURACY_DROP, LATENCY_MS)
# The 95% paired interval of the search drop (absent on older studies).
INTERVAL_KEYS = (ACCURACY_DROP_CI_LOW, ACCURACY_DROP_CI_HIGH)
# The confirmation figures: set after the search, so they reach MLflow children late (a later value replaces the
# logged one).
CONFIRMED_FIELDS = (CONFIRMED_DROP, CONFIRMED_DROP_CI_LOW, CONFIRMED_DROP_CI_HIGH, CONFIRMED_NUM_IMAGES)
LATE_METRIC_KEYS = CONFIRMED_FIELDS
# Child-run metrics and tags of MLflow (names as in the trials frame, so the two compare 1:1).
METRIC_KEYS = tuple(f.name for f in FIELDS if f.mlflow == METRIC_LOG)
TAG_KEYS = tuple(f.name for f in FIELDS if f.mlflow == TAG_LOG)
# Columns of trials.csv read first when present, in this order (the rest follow alphabetically).
PREFERRED_ATTRS = (
    SEED_KIND, ACCURACY_DROP, *INTERVAL_KEYS, *CONFIRMED_FIELDS,
    LATENCY_MS, SPEEDUP, CONSTRAINT, METRIC, METRIC_VALUE, ABORTED,
    LATENCY_IQR_MS, BASELINE_LATENCY_MS, LATENCY_MEASURED_MS, BASELINE_MEASURED_MS, SPEEDUP_IQR,
    SPEEDUP_NOISY, FLOPS_RATIO, TOKENS_KEPT, NUM_IMAGES, EVAL_SECONDS, WORKER,
    FAIL_REASON, DUPLICATE_OF, CONFIG_KEY, CONFIG,
)
# Trials-frame columns read as numbers.
NUMERIC_ATTRS = OBJECTIVES + CONFIRMED_FIELDS + (CONSTRAINT, SPEEDUP, BASELINE_LATENCY_MS, *INTERVAL_KEYS)
# Trial metrics copied into best.json / a frozen config, in the order a reader wants them.
FROZEN_METRIC_KEYS = (METRIC, METRIC_VALUE, ACCURACY_DROP, *INTERVAL_KEYS, *CONFIRMED_FIELDS, LATENCY_MS,
                      LATENCY_IQR_MS, BASELINE_LATENCY_MS, SPEEDUP, SPEEDUP_IQR, SPEEDUP_NOISY, LATENCY_MEASURED_MS,
                      BASELINE_MEASURED_MS, BASELINE_LATENCY_IQR_MS, FLOPS_RATIO, TOKENS_KEPT, NUM_IMAGES)

# --- study attr names -----------------------------------------------------------------------------------------
SPEC = "spec"
FINGERPRINT = "fingerprint"
VERSIONS = "versions"
BASELINE = "baseline"
DATA_FINGERPRINT = "data_fingerprint"
ELAPSED_S = "elapsed_s"
SEEDED = "seeded"                       # the sampled space's seeds were enqueued (once per study)
CONFIRM_ATTR = "confirmations"          # {"data_fingerprint": ..., "scores": {trial number: {CONFIRMED_FIELDS}}}
REFERENCE_ATTR = "dense_reference"      # written by the driver after every tell (a record only)
PARENT_ATTR = "mlflow_parent_run_id"    # the study's MLflow parent run

STUDY_FIELDS: tuple[Field, ...] = (
    Field(SPEC, DRIVER, None, "the study's settings (search/spec.py)"),
    Field(FINGERPRINT, DRIVER, None, "the model fingerprint every trial config refers to"),
    Field(VERSIONS, DRIVER),
    Field(BASELINE, DRIVER, None, "the evaluator's first dense record"),
    Field(DATA_FINGERPRINT, DRIVER),
    Field(ELAPSED_S, DRIVER, None, "wall time spent on the study over all its runs"),
    Field(SEEDED, DRIVER, None, "the sampled space's seed configs were enqueued"),
    Field(CONFIRM_ATTR, CONFIRMATION),
    Field(REFERENCE_ATTR, DRIVER),
    Field(PARENT_ATTR, DRIVER),
)
