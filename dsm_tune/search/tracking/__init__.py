"""MLflow tracking of a study, as a pure consumer of what the driver hands it: `records` (a trial as
params/metrics/tags), `spool` (the offline queue) and `client` (the MLflow runs)."""

from dsm_tune.search.tracking.client import (
    PARENT_ATTR, MlflowTracker, NullTracker, experiment_name, local_artifact_root,
    resolve_tracking_uri,
)
from dsm_tune.search.tracking.records import METRIC_KEYS, TAG_KEYS, TrackingError, mlflow_payload, trial_record

__all__ = ["METRIC_KEYS", "PARENT_ATTR", "TAG_KEYS", "MlflowTracker",
           "NullTracker", "TrackingError", "experiment_name", "local_artifact_root", "mlflow_payload",
           "resolve_tracking_uri", "trial_record"]
