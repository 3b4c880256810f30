"""A merge schedule as a *shape* and a *budget*, compiled to the frozen `DSMConfig` the runtime merger applies.

The budget is the fraction of the patch tokens merged away by the end of the last block. For a fixed shape every
block's token count falls monotonically as the budget grows, so latency falls and the accuracy drop rises with it:
the tuner can trace one shape's budgets by bisection instead of sampling ten loosely coupled ratios.

The shape says where and how the budget is spent:
- `start_layer`: blocks before it run dense (the delay);
- `hierarchy_depth` D and `local_blocks` k: the first D stages match inside windows (level D, then D-1, ... 1),
  k blocks each; all later blocks match globally;
- `front_loading` a: block j of the n merging blocks gets a share proportional to ((n - j) / n) ** a of the
  budget: a = 0 is ToMe's constant count per block, a > 0 merges more early (where it saves most), a < 0 later;
- `proportional_attention`;
- the operators (`merging.config.OPERATORS`): the first `prune_blocks` merging blocks prune (a windowed stage prunes
  whole when the hand-over falls inside it: window levels are per stage), the others use `merge_operator`. The
  defaults (0, merge) are ToMe's operator everywhere, and a shape that keeps them compiles to the config it always
  did.

Counts are whole tokens (the `r` form of a stage), so ToMe's constant-r schedule is the shape
(0, 0, -, 0.0, True) at budget r * L / N exactly. A windowed stage merges one count per block (the config format
has one count per stage) split evenly over its windows; whatever rounding or the bipartite cap (half of a window's
tokens) leaves unmerged is carried to the following blocks, so the realised schedule tracks the wanted one.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Protocol

from dsm_tune.merging import DSMConfig, ModelFingerprint, Stage
from dsm_tune.merging.config import DEFAULT_OPERATOR

SHAPE_PARAMS = ("start_layer", "hierarchy_depth", "local_blocks", "front_loading", "proportional_attention")
# Parameters a space declares only when it searches operators: a shape of any other space never carries them.
OPERATOR_PARAMS = ("prune_blocks", "merge_operator")
BUDGET_PARAM = "budget"
MERGE_OPERATORS = ("merge", "merge_norm", "merge_energy")


@dataclass(frozen=True)
class Shape:
    start_layer: int
    hierarchy_depth: int
    local_blocks: int
    front_loading: float
    proportional_attention: bool
    prune_blocks: int = 0
    merge_operator: str = DEFAULT_OPERATOR

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "Shape":
        return cls(start_layer=int(params["start_layer"]), hierarchy_depth=int(params["hierarchy_depth"]),
                   local_blocks=int(params.get("local_blocks", 1)),
                   front_loading=float(params.get("front_loading", 0.0)),
                   proportional_attention=bool(params["proportional_attention"]),
                   prune_blocks=int(params.get("prune_blocks", 0)),
                   merge_operator=str(params.get("merge_operator", DEFAULT_OPERATOR)))

    def params(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def default_operators(self) -> bool:
        return not self.prune_blocks and self.merge_operator == DEFAULT_OPERATOR

    def key(self) -> str:
        """Equal keys compile every budget to the same config (depth 0 makes `local_blocks` irrelevant); a shape
        with the default operators keeps the key it had before operators existed."""
        local = self.local_blocks if self.hierarchy_depth else 0
        operators = "" if self.default_operators else f"-x{self.prune_blocks}-o{self.merge_operator}"
        return (f"s{self.start_layer}-d{self.hierarchy_depth}-k{local}-a{self.front_loading:.3f}"
                f"-p{int(self.proportional_attention)}{operators}")

    def describe(self) -> str:
        local = f" x{self.local_blocks} local" if self.hierarchy_depth else ""
        operators = "" if self.default_operators else (
            f", prune {self.prune_blocks} block(s) then {self.merge_operator}" if self.prune_blocks
            else f", {self.merge_operator}")
        return (f"start {self.start_layer}, depth {self.hierarchy_depth}{local}, front-loading "
                f"{self.front_loading:+.2f}{', prop' if self.proportional_attention else ''}{operators}")


def _block_weights(count: int, front_loading: float) -> list[float]:
    return [((count - j) / count) ** front_loading for j in range(count)]


def _stage_lengths(shape: Shape, merging_blocks: int) -> tuple[int, list[int]]:
    """(depth actually used, lengths of its windowed stages): never more windowed blocks than merging blocks."""
    depth = min(shape.hierarchy_depth, merging_blocks)
    if depth == 0:
        return 0, []
    per_level = max(1, min(shape.local_blocks, merging_blocks // depth))
    return depth, [per_level] * depth


def compile_schedule(shape: Shape, budget: float, fingerprint: ModelFingerprint) -> DSMConfig:
    """The config that merges away about `budget` of the patch tokens, spread as `shape` says."""
    if not 0.0 <= budget <= 1.0 or math.isnan(budget):
        raise ValueError(f"budget {budget} must be a fraction of the patch tokens in [0, 1]")
    blocks = fingerprint.num_blocks
    if not 0 <= shape.start_layer < blocks:
        raise ValueError(f"start_layer {shape.start_layer} leaves no block to merge in a {blocks}-block model")
    initial = fingerprint.grid[0] * fingerprint.grid[1]
    merging = blocks - shape.start_layer
    total = round(budget * initial)
    weights = _block_weights(merging, shape.front_loading)
    weight_sum = sum(weights)
    # Wanted tokens removed after each merging block, rounded on the cumulative sum so counts stay whole and
    # every prefix grows monotonically with the budget.
    wanted, running = [], 0.0
    for weight in weights:
        running += weight
        wanted.append(round(total * running / weight_sum))

    depth, local_lengths = _stage_lengths(shape, merging)
    tokens, removed, block = initial, 0, 0
    stages: list[Stage] = []
    for stage_index, length in enumerate(local_lengths):
        windows = 4 ** (depth - stage_index)
        target = wanted[block + length - 1]
        per_window = max(0, math.floor((target - removed) / (length * windows) + 0.5))
        count = per_window * windows
        for _ in range(length):
            actual = min(per_window, (tokens // windows) // 2) * windows
            tokens -= actual
            removed += actual
        stages.append(Stage(length, r=count))
        block += length
    global_counts = []
    for j in range(block, merging):
        count = max(0, wanted[j] - removed)
        actual = min(count, tokens // 2)
        tokens -= actual
        removed += actual
        global_counts.append(count)
    # Equal neighbouring counts share one stage: ToMe's schedule stays one stage, the document stays short.
    for count in global_counts:
        if len(stages) > len(local_lengths) and stages[-1].r == count:
            stages[-1] = Stage(stages[-1].blocks + 1, r=count)
        else:
            stages.append(Stage(1, r=count))
    if not shape.default_operators:
        stages = _with_operators(stages, len(local_lengths), shape.prune_blocks, shape.merge_operator)
    return DSMConfig(start_layer=shape.start_layer, hierarchy_depth=depth, stages=tuple(stages),
                     proportional_attention=shape.proportional_attention, model=fingerprint)


def _with_operators(stages: list[Stage], windowed: int, prune_blocks: int, merge_operator: str) -> list[Stage]:
    """`stages` with the first `prune_blocks` merging blocks pruning and the rest merging by `merge_operator`. A
    global stage is split at the hand-over; a windowed one (the first `windowed`) prunes whole if it starts before."""
    out: list[Stage] = []
    block = 0
    for index, stage in enumerate(stages):
        head = min(max(prune_blocks - block, 0), stage.blocks)
        if head and (index < windowed or head == stage.blocks):
            out.append(dataclasses.replace(stage, operator="prune"))
        elif head:
            out += [dataclasses.replace(stage, blocks=head, operator="prune"),
                    dataclasses.replace(stage, blocks=stage.blocks - head, operator=merge_operator)]
        else:
            out.append(dataclasses.replace(stage, operator=merge_operator))
        block += stage.blocks
    return out


def tome_budget(r: int, fingerprint: ModelFingerprint) -> float:
    """The budget at which the ToMe shape compiles to a constant `r` per block."""
    return r * fingerprint.num_blocks / (fingerprint.grid[0] * fingerprint.grid[1])


TOME_SHAPE = Shape(start_layer=0, hierarchy_depth=0, local_blocks=1, front_loading=0.0, proportional_attention=True)


class ShapeBounds(Protocol):
    start_layer: tuple[int, int]
    hierarchy_depth: tuple[int, int]
    local_blocks: tuple[int, int]
    front_loading: tuple[float, float]
    prune_blocks: tuple[int, int]
    merge_operators: tuple[str, ...]


def mutate(shape: Shape, bounds: ShapeBounds, rng: random.Random) -> Shape:
    """A neighbour of `shape`: one or two of its parameters moved by one step, clipped to `bounds`."""
    clip = lambda value, limits: min(max(value, limits[0]), limits[1])
    moves = {
        "start_layer": lambda s: {"start_layer": clip(s.start_layer + rng.choice((-1, 1)), bounds.start_layer)},
        "hierarchy_depth": lambda s: {"hierarchy_depth": clip(s.hierarchy_depth + rng.choice((-1, 1)),
                                                              bounds.hierarchy_depth)},
        "local_blocks": lambda s: {"local_blocks": clip(s.local_blocks + rng.choice((-1, 1)), bounds.local_blocks)},
        "front_loading": lambda s: {"front_loading": round(clip(s.front_loading + rng.choice((-0.5, 0.5)),
                                                                bounds.front_loading), 3)},
    }
    # Operator moves only where the space searches operators: other spaces keep their random stream.
    if bounds.prune_blocks[0] != bounds.prune_blocks[1]:
        moves["prune_blocks"] = lambda s: {"prune_blocks": clip(s.prune_blocks + rng.choice((-1, 1)),
                                                                bounds.prune_blocks)}
    if len(bounds.merge_operators) > 1:
        moves["merge_operator"] = lambda s: {"merge_operator": rng.choice(
            [op for op in bounds.merge_operators if op != s.merge_operator])}
    names = [n for n in moves if n != "local_blocks" or shape.hierarchy_depth]
    changes: dict[str, Any] = {}
    for name in rng.sample(names, k=min(len(names), rng.choice((1, 2)))):
        changes.update(moves[name](shape))
    return Shape(**{**shape.params(), **changes})
