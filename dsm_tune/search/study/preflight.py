"""What the driver checks before Ray starts, so a bad input fails in a second, not from the first worker.

The model is built on PyTorch's meta device (shapes, no memory, under a second even for ViT-H): that resolves the
name, fits the checkpoint (read once here: its file is read again by each worker) and gives the fingerprint the
search space is checked against. Paths (checkpoint, data folder) are only checked when the workers run on this
machine; a remote cluster's workers may see other files.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.folder import StudyError
from dsm_tune.search.study.factory import resolve_target
from dsm_tune.search.study.spec import StudySpec


@dataclass(frozen=True)
class Preflight:
    target: Any                                  # the resolved Target profile
    fingerprint: ModelFingerprint | None         # None for a remote cluster (its files may differ)


def preflight(spec: StudySpec) -> Preflight:
    """Raise the user's error (ModelError, TargetError, DataError, StudyError) for a study that cannot start."""
    from dsm_tune.evaluation.data import DataSpec, default_data_spec
    from dsm_tune.evaluation.models import resolve_model_name

    target = resolve_target(spec)
    resolve_model_name(spec.model)
    data = spec.data if spec.data is not None else default_data_spec(spec.model)
    if data is None:
        raise StudyError(f"model {spec.model} has no evaluation data, so no accuracy can be measured: give --data "
                         f"(an image folder or a named data set)")
    if spec.ray_address is not None:
        return Preflight(target, None)
    DataSpec.parse(data)
    if spec.confirm_data is not None:
        DataSpec.parse(spec.confirm_data)
    return Preflight(target, ModelFingerprint.from_model(_model_skeleton(spec)))


def _model_skeleton(spec: StudySpec) -> Any:
    import torch

    from dsm_tune.evaluation.models import build_model

    with warnings.catch_warnings(), torch.device("meta"):
        # Loading the checkpoint into meta parameters only checks keys and shapes, which is the point here.
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        return build_model(spec.model, checkpoint=spec.checkpoint)
