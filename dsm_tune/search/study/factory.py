"""The production evaluator of a study, built inside each Ray actor (or in the driver, `--no-ray`) from plain
data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsm_tune.evaluation.data import search_holdout
from dsm_tune.search.spec import StudySpec
from dsm_tune.search.study.tell import ABORT_FACTOR


@dataclass(frozen=True)
class DefaultEvaluatorFactory:
    """Builds the real `TrialEvaluator` inside a Ray actor, or in the driver's process with `--no-ray`
    (picklable: plain data only)."""

    model: str
    target: str
    batch_size: int | None
    dtype: str | None
    compile: bool | None
    data: str | None
    metric: str | None
    limit: int | None
    checkpoint: str | None
    pretrained: bool
    max_drop: float | None
    cache_dir: str | None
    holdout: float = 0.0
    order: str = "balanced"
    data_seed: int = 0

    @classmethod
    def from_spec(cls, spec: StudySpec) -> "DefaultEvaluatorFactory":
        local = spec.ray_address is None
        return cls(model=spec.model, target=spec.target, batch_size=spec.batch_size, dtype=spec.dtype,
                   compile=spec.compile, data=spec.data, metric=spec.metric, limit=spec.limit,
                   checkpoint=spec.checkpoint, pretrained=spec.pretrained,
                   max_drop=ABORT_FACTOR * spec.max_accuracy_drop if spec.max_accuracy_drop > 0 else None,
                   # The dense-output cache is on the driver's disk: only local workers can share it.
                   cache_dir=str((spec.out / "cache").resolve()) if local else None,
                   holdout=search_holdout(spec.confirm, spec.confirm_data), order=spec.data_order,
                   data_seed=spec.data_seed)

    def __call__(self) -> Any:
        import torch

        from dsm_tune.evaluation.targets import load_target
        from dsm_tune.evaluation.trial import TrialEvaluator

        target = load_target(self.target, batch_size=self.batch_size, dtype=self.dtype, compile=self.compile)
        if target.device == "cpu":
            # Ray sets each actor to one thread (its CPU share); a CPU target is timed on the whole host, which
            # the timing guard gives to one worker at a time (in-process, the driver already has every core).
            torch.set_num_threads(os.cpu_count() or 1)
        return TrialEvaluator(self.model, target, self.data, metric=self.metric, limit=self.limit,
                              checkpoint=self.checkpoint, cache_dir=Path(self.cache_dir) if self.cache_dir else None,
                              max_drop=self.max_drop, pretrained=self.pretrained, order=self.order,
                              holdout=self.holdout, seed=self.data_seed)


