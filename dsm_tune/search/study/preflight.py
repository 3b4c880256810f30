"""The study's inputs, resolved once before any worker starts and handed down as one `StudyPlan`: the stored spec
of a resumed study, the space file's text, the target profile, the model's timm name. Nothing after this point
reads the space file, loads the profile or resolves the model name again.

`preflight` adds what the default evaluator needs checked, so a bad input fails in a second, not from the first
worker: the device is present, the data exists, and the model builds on PyTorch's meta device (shapes, no
memory, under a second even for ViT-H), which fits the checkpoint and gives the fingerprint the search space is
checked against. Paths (checkpoint, data folder) are only checked when the workers run on this machine; a remote
cluster's workers may see other files.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dsm_tune.record import SPEC
from dsm_tune.errors import DSMTuneError
from dsm_tune.evaluation.models import resolve_model_name
from dsm_tune.evaluation.targets import Target, check_device_present, load_target
from dsm_tune.merging import ModelFingerprint
from dsm_tune.search.folder import StudyError, StudyFolder
from dsm_tune.search.space import precheck_space, read_space_file, space_file_for
from dsm_tune.search.spec import StudySpec


@dataclass(frozen=True)
class StudyPlan:
    spec: StudySpec
    resumed: bool
    stored_spec: Mapping[str, Any] | None        # the `spec` attr of a resumed study
    space_text: str
    space_source: Path
    target: Target                               # the profile; its device checked only by `preflight`
    model_name: str | None                       # timm's name; None when not a known model (a stand-in's)
    fingerprint: ModelFingerprint | None = None  # set by `preflight` for a local default evaluator
    notes: tuple[str, ...] = field(default=())   # lines for the user


def resolve_plan(spec: StudySpec) -> StudyPlan:
    """Read what the study stands on (StudyError, SpaceError, TargetError for a bad input); mutates `spec` only
    to adopt the data settings of a study stored before they existed."""
    folder = spec.folder
    resumed = folder.holds_study()
    stored, notes = None, []
    if resumed:
        stored = folder.load().user_attrs[SPEC]
        legacy_note = spec.adopt_legacy(stored)
        if legacy_note:
            notes.append(legacy_note)
        spec.check_same_study(stored)
    try:
        model_name: str | None = resolve_model_name(spec.model)
    except DSMTuneError:   # an unknown model fails clearly in `preflight`, or when a worker builds it
        model_name = None
    text, source = study_space_text(spec, folder, resumed, model_name)
    precheck_space(text, source)   # before any worker starts, so a malformed file fails fast
    # Only the profile here: a remote cluster (or a stand-in evaluator) has its devices elsewhere.
    target = load_target(spec.target, batch_size=spec.batch_size, dtype=spec.dtype, compile=spec.compile,
                         check_available=False)
    return StudyPlan(spec, resumed, stored, text, source, target, model_name, notes=tuple(notes))


def preflight(plan: StudyPlan) -> StudyPlan:
    """The plan with the model's fingerprint; raises the user's error (ModelError, TargetError, DataError,
    StudyError) for a study the default evaluator cannot run."""
    from dsm_tune.evaluation.data import DataSpec, default_data_spec

    spec = plan.spec
    if spec.ray_address is None:   # a remote cluster has the devices, this machine may not
        check_device_present(plan.target)
    model_name = plan.model_name or resolve_model_name(spec.model)   # raises for an unknown model
    data = spec.data if spec.data is not None else default_data_spec(spec.model)
    if data is None:
        raise StudyError(f"model {spec.model} has no evaluation data, so no accuracy can be measured: give --data "
                         f"(an image folder or a named data set)")
    if spec.ray_address is not None:
        return plan
    DataSpec.parse(data)
    if spec.confirm_data is not None:
        DataSpec.parse(spec.confirm_data)
    return dataclasses.replace(plan, model_name=model_name,
                               fingerprint=ModelFingerprint.from_model(_model_skeleton(spec)))


def study_space_text(spec: StudySpec, folder: StudyFolder, resumed: bool,
                     model_name: str | None = None) -> tuple[str, Path]:
    """The space YAML: on resume the study's own copy (editing search_spaces/ later cannot change a study).
    `model_name`: timm's name for `spec.model`, when known (an alias may name a family the patterns know by it)."""
    copy = folder.space_copy
    if resumed and copy.is_file():
        text = copy.read_text()
        if spec.space is not None and read_space_file(Path(spec.space)) != text:
            raise StudyError(f"--space {spec.space} differs from the space study {spec.study!r} was started "
                             f"with ({copy}); resume without --space or start a new study")
        return text, copy
    if spec.space is not None:
        source = Path(spec.space)
    else:
        source = space_file_for(spec.model)
        if source.stem == "generic" and model_name is not None:
            source = space_file_for(model_name)
    return read_space_file(source), source


def _model_skeleton(spec: StudySpec) -> Any:
    import torch

    from dsm_tune.evaluation.models import build_model

    with warnings.catch_warnings(), torch.device("meta"):
        # Loading the checkpoint into meta parameters only checks keys and shapes, which is the point here.
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        return build_model(spec.model, checkpoint=spec.checkpoint)
