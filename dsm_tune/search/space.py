"""Search-space files: the YAML under `search_spaces/` that bounds a study, read, checked against the model and
turned into the space its strategy searches: a `TracedSpace` (shape + budget, `strategies/traced/`) when the file
gives a `budget`, else a `SampledSpace` (per-stage sampled ratios, `strategies/sampled.py`).

Keys of a space file (ranges are `[low, high]`, inclusive, or a single value to fix the parameter):

    start_layer: [0, 6]             # dense blocks before merging starts; or instead
    start_layer_fraction: [0, 0.5]  #   fractions of the model's block count (one file for any depth)
    hierarchy_depth: [0, 3]         # window levels (4**D finest windows); clipped to what the patch grid allows
    proportional_attention: [true, false]
    proportional_attention_gpu: [true, false]   # replaces the line above when the study's target is a CUDA GPU
    constraints: {min_tokens_kept: 0.05}   # configs keeping fewer patch tokens are not measured (PRUNED)
    description: free text
  a traced space:
    budget: [0.0, 0.9]              # share of the patch tokens merged away by the last block
    prune_blocks: [0, 4]            # the first merging blocks prune instead (default 0)
    merge_operator: [merge, merge_norm, merge_energy]   # how the others merge (default merge)
    local_blocks: [1, 4]            # blocks per window level
    front_loading: [-1.0, 1.0]      # > 0 merges more early, < 0 later
    max_evals_per_shape: 4
  a sampled space:
    num_stages: [1, 3]              # stages after the delay (more than the blocks left: one per block)
    stage_ratio: [0.0, 0.4]         # per-block merge ratio of every stage, or one [low, high] per stage
    ratio_step: 0.01                # grid of the sampled ratios (default 0.01)
    stage_split: [0.0, 1.0]         # share of the unassigned blocks a stage takes (default [0, 1])
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from dsm_tune.evaluation.targets import Target, load_target
from dsm_tune.merging import MAX_RATIO, ConfigError, DSMConfig, ModelFingerprint, Stage
from dsm_tune.search.strategies.base import SpaceError
from dsm_tune.search.strategies.sampled import DEFAULT_RATIO_STEP, SampledSpace
from dsm_tune.search.strategies.traced.shapes import MERGE_OPERATORS
from dsm_tune.search.strategies.traced.space import DEFAULT_MAX_EVALS_PER_SHAPE, TracedSpace

# The repository's search_spaces/ in a checkout; in an installed wheel, its copy inside the package (setup.py maps
# search_spaces/ to the package dsm_tune.search_spaces, so the repository keeps the one copy people edit).
_INSTALLED_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SPACES_DIR = _INSTALLED_SPACES if _INSTALLED_SPACES.is_dir() else Path(__file__).resolve().parents[2] / "search_spaces"
GENERIC_SPACE = "generic"
# On a CUDA target the proportional-attention choices may differ from the CPU's: there the bias costs more (extra
# kernel work and launches per merged block) and the trade-off is the target's to measure.
GPU_PROPORTIONAL_KEY = "proportional_attention_gpu"

# The one list that picks a space file from a model name (alias, timm name or fingerprint name), first match wins.
SPACE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|_)demo($|_)", "demo"),
    (r"^deit", "deit"),
    (r"^vit_tiny", "vit_tiny"),
    (r"^vit_small", "vit_small"),
    (r"^vit_base", "vit_base"),
    (r"^vit_large", "vit_large"),
    (r"^vit_huge", "vit_huge"),
)

COMMON_KEYS = {"description", "start_layer", "start_layer_fraction", "hierarchy_depth", "proportional_attention",
               GPU_PROPORTIONAL_KEY, "constraints"}
# A sampled space: every stage's ratio and split is its own parameter (the first spaces; still accepted).
SAMPLED_KEYS = {"num_stages", "stage_ratio", "ratio_step", "stage_split"}
# A traced space: a shape (where and how merging is spread) and a budget (how much), see strategies/traced/shapes.py.
TRACED_KEYS = {"budget", "local_blocks", "front_loading", "max_evals_per_shape", "prune_blocks", "merge_operator"}
KNOWN_KEYS = COMMON_KEYS | SAMPLED_KEYS | TRACED_KEYS
KNOWN_CONSTRAINTS = {"min_tokens_kept"}


# loading -------------------------------------------------------------------------------------------------------

def space_file_for(model_name: str, fingerprint: ModelFingerprint | None = None,
                   spaces_dir: Path = SPACES_DIR) -> Path:
    """The YAML file for a model: the first SPACE_PATTERNS match of any of its names, else the generic one."""
    names = [model_name.lower()]
    if fingerprint is not None:
        names.append(fingerprint.name.lower())
    for pattern, stem in SPACE_PATTERNS:
        if any(re.search(pattern, name) for name in names):
            return spaces_dir / f"{stem}.yaml"
    return spaces_dir / f"{GENERIC_SPACE}.yaml"


def load_space(path: str | Path | None, model_name: str, fingerprint: ModelFingerprint,
               target: Target | str | None = None) -> SampledSpace | TracedSpace:
    """Read and check a search space for this model; `path` None picks `search_spaces/<family>.yaml`."""
    source = Path(path) if path is not None else space_file_for(model_name, fingerprint)
    return parse_space(read_space_file(source), fingerprint, source, target=target)


def read_space_file(source: Path) -> str:
    """The text of a space file; SpaceError naming the file when it cannot be read."""
    try:
        return source.read_text()
    except FileNotFoundError:
        raise SpaceError(f"search space file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"cannot read search space file {source}: {exc}") from None


def _read_mapping(text: str, where: str) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SpaceError(f"{where}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, Mapping):
        raise SpaceError(f"{where}: a search space must be a mapping of keys, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - KNOWN_KEYS)
    if unknown:
        raise SpaceError(f"{where}: key {unknown[0]!r}: unknown key; known keys: {', '.join(sorted(KNOWN_KEYS))}")
    if is_traced(data):
        mixed = sorted(set(map(str, data)) & SAMPLED_KEYS)
        if mixed:
            raise SpaceError(f"{where}: key {mixed[0]!r} belongs to a sampled space, but 'budget' makes this a traced "
                             f"space (shape + budget): use {', '.join(sorted(TRACED_KEYS))} instead of "
                             f"{', '.join(sorted(SAMPLED_KEYS))}")
    else:
        stray = sorted(set(map(str, data)) & (TRACED_KEYS - {"budget"}))
        if stray:
            raise SpaceError(f"{where}: key {stray[0]!r} needs 'budget' (the traced space's merge amount, e.g. "
                             f"budget: [0.0, 0.9])")
    return data


def precheck_space(text: str, source: Path = Path("<space>")) -> None:
    """The checks that need no model (YAML syntax, known keys), so a bad file fails before any worker starts."""
    _read_mapping(text, source.name or str(source))


def parse_space(text: str, fingerprint: ModelFingerprint, source: Path = Path("<space>"),
                target: Target | str | None = None) -> "SampledSpace | TracedSpace":
    """A `TracedSpace` when the file gives a `budget`, else a `SampledSpace` (per-stage sampled ratios).

    `target`: the study's target profile (name or .yaml path); on a CUDA target `proportional_attention_gpu`,
    when the file has it, replaces `proportional_attention`. None: the CPU choices."""
    where = source.name if source.name else str(source)
    data = _read_mapping(text, where)
    parser = _SpaceParser(where, data, fingerprint, gpu=GPU_PROPORTIONAL_KEY in data and _is_gpu_target(target))
    return parser.parse_traced(source) if is_traced(data) else parser.parse(source)


def is_traced(data: Mapping[str, Any]) -> bool:
    return "budget" in data


def _is_gpu_target(target: Target | str | None) -> bool:
    if target is None:
        return False
    if isinstance(target, Target):
        return target.is_cuda
    return load_target(target, check_available=False).is_cuda


class _SpaceParser:
    def __init__(self, where: str, data: Mapping[str, Any], fingerprint: ModelFingerprint, gpu: bool = False):
        self.where = where
        self.data = data
        self.fp = fingerprint
        self.gpu = gpu

    def fail(self, key: str, message: str) -> SpaceError:
        return SpaceError(f"{self.where}: key {key!r}: {message}")

    def number_range(self, key: str, kind: type, value: Any = None) -> tuple[Any, Any]:
        """A range written `[low, high]` or a single value (fixed)."""
        value = self.data[key] if value is None else value
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(items) == 1:
            items = items * 2
        if len(items) != 2:
            raise self.fail(key, f"expected [low, high] or one value, got {value!r}")
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise self.fail(key, f"expected numbers, got {item!r}")
            if kind is int and (not float(item).is_integer()):
                raise self.fail(key, f"expected integers, got {item!r}")
            out.append(kind(item))
        if out[0] > out[1]:
            raise self.fail(key, f"low {out[0]} is above high {out[1]}")
        return out[0], out[1]

    def parse(self, source: Path) -> SampledSpace:
        blocks = self.fp.num_blocks
        start = self.start_layer(blocks)
        depth = self.hierarchy_depth(start)
        stages = self.num_stages()
        ratio_step = self.ratio_step()
        ratios = self.stage_ratio(stages[1], ratio_step)
        split = self.number_range("stage_split", float) if "stage_split" in self.data else (0.0, 1.0)
        if not 0.0 <= split[0] <= split[1] <= 1.0:
            raise self.fail("stage_split", f"must lie within [0, 1], got {list(split)}")
        proportional = self.proportional_attention()
        min_kept = self.constraints()
        description = self.data.get("description", "")
        if not isinstance(description, str):
            raise self.fail("description", "must be text")
        return SampledSpace(source=source, fingerprint=self.fp, start_layer=start, hierarchy_depth=depth,
                           num_stages=stages, stage_ratio=ratios, ratio_step=ratio_step, stage_split=split,
                           proportional_attention=proportional, min_tokens_kept=min_kept, description=description)

    def parse_traced(self, source: Path) -> TracedSpace:
        blocks = self.fp.num_blocks
        start = self.start_layer(blocks)
        depth = self.hierarchy_depth(start)
        local = self.number_range("local_blocks", int) if "local_blocks" in self.data else (1, 1)
        if local[0] < 1:
            raise self.fail("local_blocks", f"a windowed level needs at least one block, got {local[0]}")
        front = self.number_range("front_loading", float) if "front_loading" in self.data else (0.0, 0.0)
        if not -4.0 <= front[0] <= front[1] <= 4.0:
            raise self.fail("front_loading", f"exponents must lie within [-4, 4], got {list(front)}")
        budget = self.number_range("budget", float)
        if not 0.0 <= budget[0] <= budget[1] < 1.0:
            raise self.fail("budget", f"must be shares of the patch tokens within [0, 1), got {list(budget)}")
        evals = self.data.get("max_evals_per_shape", DEFAULT_MAX_EVALS_PER_SHAPE)
        if isinstance(evals, bool) or not isinstance(evals, int) or evals < 2:
            raise self.fail("max_evals_per_shape", f"must be an integer >= 2 (a bracket needs two points), "
                                                   f"got {evals!r}")
        description = self.data.get("description", "")
        if not isinstance(description, str):
            raise self.fail("description", "must be text")
        return TracedSpace(source=source, fingerprint=self.fp, start_layer=start, hierarchy_depth=depth,
                           local_blocks=local, front_loading=front, budget=budget,
                           proportional_attention=self.proportional_attention(), min_tokens_kept=self.constraints(),
                           max_evals_per_shape=evals, description=description,
                           prune_blocks=self.prune_blocks(blocks - start[0]), merge_operators=self.merge_operators())

    def prune_blocks(self, merging_blocks: int) -> tuple[int, int]:
        prune = self.number_range("prune_blocks", int) if "prune_blocks" in self.data else (0, 0)
        if not 0 <= prune[0] <= prune[1] <= merging_blocks:
            raise self.fail("prune_blocks", f"must lie within [0, {merging_blocks}] (the blocks that can merge), got "
                                            f"{list(prune)}")
        return prune

    def merge_operators(self) -> tuple[str, ...]:
        value = self.data.get("merge_operator", [MERGE_OPERATORS[0]])
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        unknown = [item for item in items if item not in MERGE_OPERATORS]
        if not items or unknown:
            raise self.fail("merge_operator", f"must be one or a list of {', '.join(MERGE_OPERATORS)} (pruning is "
                                              f"'prune_blocks'), got {value!r}")
        return tuple(dict.fromkeys(items))

    def start_layer(self, blocks: int) -> tuple[int, int]:
        has_abs, has_frac = "start_layer" in self.data, "start_layer_fraction" in self.data
        if has_abs == has_frac:
            raise self.fail("start_layer", "give exactly one of 'start_layer' (blocks) or 'start_layer_fraction' "
                                           "(fractions of the model's blocks)")
        if has_abs:
            key = "start_layer"
            low, high = self.number_range(key, int)
        else:
            key = "start_layer_fraction"
            flow, fhigh = self.number_range(key, float)
            if not 0.0 <= flow <= fhigh < 1.0:
                raise self.fail(key, f"fractions must lie in [0, 1), got {[flow, fhigh]}")
            low, high = math.floor(flow * blocks), math.floor(fhigh * blocks)
        if low < 0:
            raise self.fail(key, f"must be >= 0, got {low}")
        if high > blocks - 1:
            raise self.fail(key, f"upper bound {high} leaves no block to merge in this {blocks}-block model "
                                 f"(at most {blocks - 1})")
        return low, high

    def hierarchy_depth(self, start: tuple[int, int]) -> tuple[int, int]:
        key = "hierarchy_depth"
        low, high = self.number_range(key, int) if key in self.data else (0, 0)
        if low < 0:
            raise self.fail(key, f"must be >= 0, got {low}")

        def fits(depth: int) -> str | None:
            try:
                DSMConfig(start_layer=start[0], hierarchy_depth=depth,
                          stages=(Stage(self.fp.num_blocks - start[0], ratio=0.0),), model=self.fp)
            except ConfigError as exc:
                return str(exc)
            return None

        problem = fits(low)
        if problem is not None:
            raise self.fail(key, f"lower bound {low} does not fit the model: {problem}")
        # Deeper levels than the grid allows are dropped, so one file serves models of several resolutions.
        while high > low and fits(high) is not None:
            high -= 1
        return low, high

    def num_stages(self) -> tuple[int, int]:
        key = "num_stages"
        low, high = self.number_range(key, int) if key in self.data else (1, 1)
        if low < 1:
            raise self.fail(key, f"needs at least one stage, got {low}")
        if low > self.fp.num_blocks:
            raise self.fail(key, f"{low} stages cannot fit in {self.fp.num_blocks} blocks")
        return low, high

    def ratio_step(self) -> float:
        key = "ratio_step"
        step = self.data.get(key, DEFAULT_RATIO_STEP)
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= MAX_RATIO:
            raise self.fail(key, f"must be a number in (0, {MAX_RATIO}], got {step!r}")
        return float(step)

    def stage_ratio(self, max_stages: int, step: float) -> tuple[tuple[float, float], ...]:
        key = "stage_ratio"
        if key not in self.data:
            raise self.fail(key, "missing: give 'budget' (the share of patch tokens merged away by the end, e.g. "
                                 "[0.0, 0.9], a traced space) or the per-stage merge ratio range, e.g. [0.0, 0.4]")
        value = self.data[key]
        per_stage = isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value)
        if per_stage:
            if len(value) != max_stages:
                raise self.fail(key, f"gives {len(value)} ranges but num_stages allows up to {max_stages}")
            ranges = [self.number_range(key, float, v) for v in value]
        else:
            ranges = [self.number_range(key, float)] * max_stages
        for low, high in ranges:
            if not 0.0 <= low <= high <= MAX_RATIO:
                raise self.fail(key, f"ratios must lie within [0, {MAX_RATIO}] (bipartite matching merges at most "
                                     f"half the tokens), got [{low}, {high}]")
            steps = (high - low) / step
            if abs(steps - round(steps)) > 1e-6:
                raise self.fail(key, f"range [{low}, {high}] is not a whole number of ratio_step {step}")
        return tuple(ranges)

    def proportional_attention(self) -> tuple[bool, ...]:
        cpu = self._booleans("proportional_attention")
        # The GPU list is checked on every target, so a typo in it fails on the CPU too, not first on a GPU host.
        gpu = self._booleans(GPU_PROPORTIONAL_KEY) if GPU_PROPORTIONAL_KEY in self.data else None
        return gpu if self.gpu and gpu is not None else cpu

    def _booleans(self, key: str) -> tuple[bool, ...]:
        value = self.data.get(key, [True, False])
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items or not all(isinstance(v, bool) for v in items):
            raise self.fail(key, f"must be true, false or a list of them, got {value!r}")
        return tuple(dict.fromkeys(items))

    def constraints(self) -> float | None:
        key = "constraints"
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a mapping like {{min_tokens_kept: 0.1}}, got {value!r}")
        unknown = sorted(set(map(str, value)) - KNOWN_CONSTRAINTS)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}", f"unknown constraint; known: {', '.join(sorted(KNOWN_CONSTRAINTS))}")
        if "min_tokens_kept" not in value:
            return None
        kept = value["min_tokens_kept"]
        if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not 0.0 <= kept <= 1.0:
            raise self.fail(f"{key}.min_tokens_kept", f"must be a fraction in [0, 1], got {kept!r}")
        return float(kept)
