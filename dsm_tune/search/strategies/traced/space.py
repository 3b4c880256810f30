"""The traced space: a shape (where and how merging is spread, `shapes.py`) and a budget (how much), with the
known shapes traced first."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dsm_tune.merging import DSMConfig, ModelFingerprint
from dsm_tune.merging.config import DEFAULT_OPERATOR
from dsm_tune.search.strategies.base import min_tokens_violation
from dsm_tune.search.strategies.traced.shapes import BUDGET_PARAM, SHAPE_PARAMS, Shape, compile_schedule

DEFAULT_MAX_EVALS_PER_SHAPE = 4
# Budget steps finer than this rarely change latency measurably; the tracer stops bisecting below it.
BUDGET_RESOLUTION = 0.015


@dataclass(frozen=True)
class TracedSpace:
    """Shapes and budgets (shapes.py): the sampler picks shapes, `BudgetTracer` traces each one's budget.

    Parameters of every trial: the shape's (`SHAPE_PARAMS`) and `budget`; `suggest` maps them to the config, so a
    resumed or re-queued trial compiles to the same config."""

    source: Path
    fingerprint: ModelFingerprint
    start_layer: tuple[int, int]
    hierarchy_depth: tuple[int, int]
    local_blocks: tuple[int, int]
    front_loading: tuple[float, float]
    budget: tuple[float, float]
    proportional_attention: tuple[bool, ...]
    min_tokens_kept: float | None = None
    max_evals_per_shape: int = DEFAULT_MAX_EVALS_PER_SHAPE
    description: str = ""
    # The operators (shapes.py): searched only when the file gives more than one value; else fixed, and not a
    # parameter of any trial (a space without them makes the very trials it always did).
    prune_blocks: tuple[int, int] = (0, 0)
    merge_operators: tuple[str, ...] = (DEFAULT_OPERATOR,)

    @property
    def searches_operators(self) -> bool:
        return self.prune_blocks[0] != self.prune_blocks[1] or len(self.merge_operators) > 1

    def suggest_shape(self, trial: Any) -> Shape:
        depth = trial.suggest_int("hierarchy_depth", *self.hierarchy_depth)
        shape = Shape(
            start_layer=trial.suggest_int("start_layer", *self.start_layer),
            hierarchy_depth=depth,
            # Without windows the local stage length means nothing: keep it fixed so TPE sees one shape.
            local_blocks=trial.suggest_int("local_blocks", *self.local_blocks) if depth else self.local_blocks[0],
            front_loading=trial.suggest_float("front_loading", *self.front_loading),
            proportional_attention=bool(trial.suggest_categorical("proportional_attention",
                                                                  list(self.proportional_attention))))
        prune = trial.suggest_int("prune_blocks", *self.prune_blocks) if self.prune_blocks[0] != \
            self.prune_blocks[1] else self.prune_blocks[0]
        operator = trial.suggest_categorical("merge_operator", list(self.merge_operators)) if \
            len(self.merge_operators) > 1 else self.merge_operators[0]
        return dataclasses.replace(shape, prune_blocks=prune, merge_operator=operator)

    def suggest(self, trial: Any) -> DSMConfig:
        shape = self.suggest_shape(trial)
        return self.compile(shape, trial.suggest_float(BUDGET_PARAM, *self.budget))

    def compile(self, shape: Shape, budget: float) -> DSMConfig:
        return compile_schedule(shape, budget, self.fingerprint)

    def config_from_params(self, params: Mapping[str, Any]) -> DSMConfig:
        return self.compile(self.shape_from_params(params), float(params[BUDGET_PARAM]))

    def shape_from_params(self, params: Mapping[str, Any]) -> Shape:
        """The shape of a trial's parameters, with the operators the space fixes (they are no parameter)."""
        return self.fixed_operators(Shape.from_params(params))

    def shape_params(self, shape: Shape) -> dict[str, Any]:
        """The parameters `suggest_shape` asks for `shape` (what a trial enqueued for it must fix)."""
        params = {name: value for name, value in shape.params().items() if name in SHAPE_PARAMS}
        if self.prune_blocks[0] != self.prune_blocks[1]:
            params["prune_blocks"] = shape.prune_blocks
        if len(self.merge_operators) > 1:
            params["merge_operator"] = shape.merge_operator
        return params

    def params_for(self, shape: Shape, budget: float) -> dict[str, Any]:
        return {**self.shape_params(shape), BUDGET_PARAM: budget}

    def fixed_operators(self, shape: Shape) -> Shape:
        """`shape` with the operators this space fixes (a seed's, a parsed one's)."""
        prune = min(max(shape.prune_blocks, self.prune_blocks[0]), self.prune_blocks[1])
        operator = shape.merge_operator if shape.merge_operator in self.merge_operators else self.merge_operators[0]
        return dataclasses.replace(shape, prune_blocks=prune, merge_operator=operator)

    def violation(self, cfg: DSMConfig) -> str | None:
        return min_tokens_violation(cfg, self.fingerprint, self.min_tokens_kept)

    def seed_shapes(self) -> list[tuple[str, Shape]]:
        """Known shapes to trace first: ToMe's constant count from block 0, the DSM paper's delay with one local
        level, and a delayed global schedule that merges more in the later blocks (on the real ViT-S, merging
        later cost less accuracy per token than front-loading: docs/benchmarks.md, benchmarks/real_front.py)."""
        blocks = self.fingerprint.num_blocks
        clip = lambda value, bounds: min(max(value, bounds[0]), bounds[1])
        prop = True if True in self.proportional_attention else self.proportional_attention[0]
        delay = clip(max(1, round(blocks / 6)), self.start_layer)
        candidates = [
            ("tome", Shape(clip(0, self.start_layer), clip(0, self.hierarchy_depth), self.local_blocks[0],
                           clip(0.0, self.front_loading), prop)),
            ("paper", Shape(delay, clip(1, self.hierarchy_depth), clip(max(1, (blocks - delay) // 3),
                                                                        self.local_blocks),
                            clip(0.0, self.front_loading), prop)),
            ("late", Shape(clip(1, self.start_layer), clip(0, self.hierarchy_depth), self.local_blocks[0],
                           clip(-0.5, self.front_loading), prop)),
        ]
        if self.searches_operators:
            candidates += self._operator_seeds(candidates[0][1])
        unique: dict[str, tuple[str, Shape]] = {}
        for kind, shape in candidates:
            shape = self.fixed_operators(shape)
            unique.setdefault(shape.key(), (kind, shape))
        return list(unique.values())

    def _operator_seeds(self, tome: Shape) -> list[tuple[str, Shape]]:
        """ToMe's shape with the published operator choices, after ToMe's own three: pruning in the first third of
        the blocks then merging (ToFu's split, with its norm-keeping merge when the space has it), and merging
        the most redundant tokens first (PiToMe's energy)."""
        seeds = []
        if self.prune_blocks[1] > 0:
            prune = min(max(self.fingerprint.num_blocks // 3, self.prune_blocks[0]), self.prune_blocks[1])
            merge = "merge_norm" if "merge_norm" in self.merge_operators else self.merge_operators[0]
            seeds.append(("prune-merge", dataclasses.replace(tome, prune_blocks=prune, merge_operator=merge)))
        if "merge_energy" in self.merge_operators:
            seeds.append(("energy", dataclasses.replace(tome, prune_blocks=self.prune_blocks[0],
                                                        merge_operator="merge_energy")))
        return seeds

    @property
    def budget_resolution(self) -> float:
        return max(BUDGET_RESOLUTION, 1.0 / (self.fingerprint.grid[0] * self.fingerprint.grid[1]))

