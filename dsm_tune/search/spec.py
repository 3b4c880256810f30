"""The study spec: what to tune and with what budget. Each field says once, in its metadata, whether it is part
of the study's identity (a resume must not change it) or of its budget and infrastructure (a resume may)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dsm_tune.record import SPEC
from dsm_tune.search.folder import StudyError, StudyFolder

SAMPLERS = ("tpe", "nsga2", "gp", "random")
# TPE with the constant liar: trials still running count as bad results when the next one is asked, so parallel
# workers are steered apart instead of all sampling the same promising point. It is useful from a handful of
# trials on (NSGA-II needs whole generations of ~50 trials before selection starts; the GP sampler refits a
# Gaussian process on every ask and has no notion of pending trials).
DEFAULT_SAMPLER = "tpe"

IDENTITY, BUDGET = "identity", "budget"
DEFAULT_CONFIRM = 0.2
# What a study stored before these identity fields existed was made with: all its data searched, in the old
# class-prefix order. A resume adopts them (`adopt_legacy`), so it keeps scoring the very same images.
LEGACY_IDENTITY = {"confirm": 0.0, "confirm_data": None, "data_order": "class-prefix", "data_seed": 0}


def _identity(default: Any) -> Any:
    return field(default=default, metadata={"role": IDENTITY})


def _budget(default: Any) -> Any:
    return field(default=default, metadata={"role": BUDGET})


def default_study_name(model: str, target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{target}")


@dataclass
class StudySpec:
    """Everything `dsm-tune run` takes, stored in the study as the `spec` attr. `space`, `out` and `study` are
    neither identity nor budget: the space is checked against the study's own copy, out/study address it."""

    model: str = field(metadata={"role": IDENTITY})
    target: str = _identity("cpu")
    batch_size: int | None = _identity(None)
    dtype: str | None = _identity(None)
    compile: bool | None = _identity(None)
    data: str | None = _identity(None)
    limit: int | None = _identity(None)
    metric: str | None = _identity(None)
    checkpoint: str | None = _identity(None)
    pretrained: bool = _identity(False)
    max_accuracy_drop: float = _identity(1.0)
    # The share of the data held out of the search to confirm the front on (`--confirm`), or a folder of
    # confirmation images of its own (`--confirm-data`); and how a prefix of the images is drawn (data.ORDERS).
    confirm: float = _identity(DEFAULT_CONFIRM)
    confirm_data: str | None = _identity(None)
    data_order: str = _identity("balanced")
    data_seed: int = _identity(0)     # which images a --limit / --confirm draws (`--data-seed`)
    trials: int = _budget(24)
    timeout: float | None = _budget(None)
    sampler: str = _budget(DEFAULT_SAMPLER)
    space: str | None = None
    seed: int = _budget(0)
    workers: int = _budget(1)
    out: Path = Path("runs")          # every command's --out default (commands/common.py)
    study: str | None = None
    ray_address: str | None = _budget(None)
    # `run --no-ray`: one evaluator in the driver's own process, for a host without Ray (budget: a study may be
    # resumed with or without Ray).
    no_ray: bool = _budget(False)
    mlflow_uri: str | None = _budget(None)
    mlflow: bool = _budget(True)
    # `run --probe` (search/probe_narrow.py): the probe the space was narrowed with, and what was narrowed and why.
    probe: str | None = None
    probe_narrowing: dict | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.checkpoint is not None:
            self.checkpoint = str(self.checkpoint)
        if self.space is not None:
            self.space = str(self.space)
        if self.study is None:
            self.study = default_study_name(self.model, self.target)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.study) or self.study in (".", ".."):
            raise StudyError(f"study name {self.study!r} must use letters, digits, '.', '_' or '-' only")
        if self.sampler not in SAMPLERS:
            raise StudyError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise StudyError(f"--trials must be a positive integer, got {self.trials!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise StudyError(f"--workers must be a positive integer, got {self.workers!r}")
        if self.no_ray and self.workers != 1:
            raise StudyError(f"--no-ray evaluates in the driver's own process, one trial at a time: it cannot run "
                             f"--workers {self.workers} (several workers need Ray)")
        if self.no_ray and self.ray_address is not None:
            raise StudyError(f"--no-ray runs without Ray: it cannot join the Ray cluster at --ray-address "
                             f"{self.ray_address}")
        if self.timeout is not None and not self.timeout > 0:
            raise StudyError(f"--timeout must be a positive number of seconds, got {self.timeout!r}")
        if not (isinstance(self.max_accuracy_drop, (int, float)) and math.isfinite(self.max_accuracy_drop)
                and self.max_accuracy_drop >= 0):
            raise StudyError(f"--max-accuracy-drop must be a number >= 0, got {self.max_accuracy_drop!r}")
        self.max_accuracy_drop = float(self.max_accuracy_drop)
        if isinstance(self.confirm, bool) or not isinstance(self.confirm, (int, float)) or \
                not 0.0 <= self.confirm < 1.0:
            raise StudyError(f"--confirm must be a fraction of the images in [0, 1), got {self.confirm!r}")
        self.confirm = float(self.confirm)
        if self.confirm_data is not None:
            self.confirm_data = str(self.confirm_data)
        if self.data_order not in ("balanced", "class-prefix"):
            raise StudyError(f"unknown data order {self.data_order!r}")
        if self.limit is not None and self.limit < 1:
            raise StudyError(f"--limit must be a positive number of images, got {self.limit!r}")

    @staticmethod
    def default(name: str) -> Any:
        """A field's default: the CLI shows and applies these, it does not repeat them."""
        field_ = StudySpec.__dataclass_fields__[name]
        return field_.default

    @staticmethod
    def fields_of(role: str) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(StudySpec) if f.metadata.get("role") == role)

    @property
    def folder(self) -> StudyFolder:
        return StudyFolder(self.out, str(self.study))

    @property
    def study_dir(self) -> Path:
        return self.folder.path

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        return data

    def budget(self) -> dict[str, Any]:
        data = self.to_dict()
        return {name: data[name] for name in self.fields_of(BUDGET)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StudySpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def confirms(self) -> bool:
        """Whether the study's front is confirmed on images the search never saw."""
        return self.confirm_data is not None or self.confirm > 0

    def adopt_legacy(self, stored: Mapping[str, Any]) -> str | None:
        """Take the data settings of a study stored before they existed; the line to tell the user, or None."""
        missing = [key for key in LEGACY_IDENTITY if key not in stored]
        if not missing:
            return None
        for key in missing:
            setattr(self, key, LEGACY_IDENTITY[key])
        return (f"dsm-tune: study {self.study!r} was made before balanced image subsets and the confirmation split: "
                f"it keeps its images (a first-classes prefix when --limit is below the class count) and has no "
                f"confirmation; start a new --study for representative figures")

    def check_same_study(self, stored: Mapping[str, Any]) -> None:
        """Refuse to resume a study with other identity fields than it was started with."""
        asked = self.to_dict()
        stored = {**LEGACY_IDENTITY, **stored}   # fields a study stored before they existed: their legacy values
        differences = [f"{key} {stored.get(key)!r} (stored) vs {asked.get(key)!r} (now)"
                       for key in self.fields_of(IDENTITY) if stored.get(key) != asked.get(key)]
        if differences:
            raise StudyError(f"study {self.study!r} in {self.out} was started with other settings: "
                             f"{'; '.join(differences)}; resume it with the same settings or choose a new --study "
                             f"name")


def resume_spec(out: Path, study: str, **changes: Any) -> StudySpec:
    """The stored spec of an existing study, with budget/infrastructure `changes` (None values ignored)."""
    folder = StudyFolder(Path(out), study)
    if not folder.storage_file.is_file():
        raise folder.missing_error("give --model (and --device) to start one")
    stored = {**LEGACY_IDENTITY, **folder.load().user_attrs[SPEC]}
    stored.update({k: v for k, v in changes.items() if v is not None})
    stored["out"], stored["study"] = str(out), study
    return StudySpec.from_dict(stored)


def library_versions() -> dict[str, str]:
    """The versions a study's figures depend on (study attr `versions`, frozen configs' provenance)."""
    found = {}
    for name, dist in (("dsm_tune", "dsm-tune"), ("timm", "timm"), ("torch", "torch"), ("optuna", "optuna"),
                       ("ray", "ray")):
        try:
            found[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found
