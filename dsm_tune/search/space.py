"""Search spaces: YAML files under `search_spaces/` bound what the tuner samples; `SearchSpace.suggest` turns the
sampled values of one Optuna trial into a `DSMConfig`.

`suggest` is the only mapping from parameters to a config. Parameter names are fixed (`start_layer`,
`hierarchy_depth`, `num_stages`, `proportional_attention`, `stage{i}_split`, `stage{i}_ratio`, and `stage0_r` for
ToMe reference points) so a resumed study, a re-queued trial and an enqueued seed all map to the same config.

Stage lengths are sampled by stick breaking: stage `i` (all but the last) takes the fraction `stage{i}_split` of
the blocks still unassigned, at least one block, leaving one for each later stage; the last stage takes the rest.
Every sampled point is therefore a valid split, and a given split has exactly one parameter vector
(`params_for`).

Keys of a space file (ranges are `[low, high]`, inclusive, or a single value to fix the parameter):

    start_layer: [0, 6]             # dense blocks before merging starts; or instead
    start_layer_fraction: [0, 0.5]  #   fractions of the model's block count (one file for any depth)
    hierarchy_depth: [0, 3]         # window levels (4**D finest windows); clipped to what the patch grid allows
    num_stages: [1, 3]              # stages after the delay (more than the blocks left: one per block)
    stage_ratio: [0.0, 0.4]         # per-block merge ratio of every stage, or one [low, high] per stage
    ratio_step: 0.01                # grid of the sampled ratios (default 0.01)
    stage_split: [0.0, 1.0]         # share of the unassigned blocks a stage takes (default [0, 1])
    proportional_attention: [true, false]
    proportional_attention_gpu: [true, false]   # replaces the line above when the study's target is a CUDA GPU
    constraints: {min_tokens_kept: 0.05}   # configs keeping fewer patch tokens are not measured (PRUNED)
    description: free text
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from dsm_tune.errors import DSMTuneError
from dsm_tune.merging import MAX_RATIO, ConfigError, DSMConfig, ModelFingerprint, Stage, block_plan
from dsm_tune.search.shapes import BUDGET_PARAM, Shape, compile_schedule

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
# A traced space: a shape (where and how merging is spread) and a budget (how much), see search/shapes.py.
TRACED_KEYS = {"budget", "local_blocks", "front_loading", "max_evals_per_shape"}
KNOWN_KEYS = COMMON_KEYS | SAMPLED_KEYS | TRACED_KEYS
KNOWN_CONSTRAINTS = {"min_tokens_kept"}
DEFAULT_RATIO_STEP = 0.01
# ToMe reference points: constant r per block removing about these fractions of the patch tokens over the model.
TOME_SEED_FRACTIONS = (0.5, 0.75, 0.9)
# The paper's style at two strengths: one ratio for every merging block, chosen so that about these fractions of
# the patch tokens are left at the end (a per-block ratio compounds, so deep models need smaller ratios).
PAPER_SEED_KEPT = (0.5, 0.25)
_RATIO_DIGITS = 6


class SpaceError(DSMTuneError):
    """A search space file is malformed, names an unknown key, or holds a range the model cannot take."""


@dataclass(frozen=True)
class Seed:
    """A known point enqueued before sampling; `kind` is dense, tome or paper (the trial's `seed_kind`)."""

    kind: str
    config: DSMConfig


# Trial user attr marking a trial enqueued with ToMe's fixed count `stage0_r` (Optuna keeps no public record of
# which parameters were pinned, and the sampler must never be asked for `stage0_r`).
R_FORM_ATTR = "merge_form"


def replay_attrs(params: Mapping[str, Any]) -> dict[str, Any]:
    """User attrs to enqueue with `params` so that `suggest` maps them back to the same config."""
    return {R_FORM_ATTR: "r"} if "stage0_r" in params else {}


class _PinnedTrial:
    """Answers `suggest_*` from a dict, as an enqueued Optuna trial would; lets `params_for` check itself."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = dict(params)
        self.user_attrs = replay_attrs(params)

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise SpaceError(f"parameter {name!r} is missing")
        return self.params[name]

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return int(self._get(name))

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return float(self._get(name))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._get(name)


def _uses_r_form(trial: Any) -> bool:
    return (getattr(trial, "user_attrs", None) or {}).get(R_FORM_ATTR) == "r"


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of the search for one model, already checked against its fingerprint."""

    source: Path
    fingerprint: ModelFingerprint
    start_layer: tuple[int, int]
    hierarchy_depth: tuple[int, int]
    num_stages: tuple[int, int]
    stage_ratio: tuple[tuple[float, float], ...]   # one range per stage index, len == num_stages[1]
    ratio_step: float
    stage_split: tuple[float, float]
    proportional_attention: tuple[bool, ...]
    min_tokens_kept: float | None = None
    description: str = ""

    # sampling ------------------------------------------------------------------------------------------------
    @property
    def max_r(self) -> int:
        grid = self.fingerprint.grid
        return grid[0] * grid[1] // 2

    def suggest(self, trial: Any) -> DSMConfig:
        """Sample one config. `trial` is an `optuna.Trial` (or anything with its suggest_* methods)."""
        if _uses_r_form(trial):
            # ToMe reference points live outside the ratio space by design (a constant count, from block 0);
            # Optuna would warn that their pinned values are out of range, which is expected here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._suggest(trial, r_form=True)
        return self._suggest(trial, r_form=False)

    def _suggest(self, trial: Any, r_form: bool) -> DSMConfig:
        num_blocks = self.fingerprint.num_blocks
        start = trial.suggest_int("start_layer", *self.start_layer)
        depth = trial.suggest_int("hierarchy_depth", *self.hierarchy_depth)
        num_stages = trial.suggest_int("num_stages", *self.num_stages)
        proportional = trial.suggest_categorical("proportional_attention", list(self.proportional_attention))
        remaining = num_blocks - start
        if r_form:
            r = trial.suggest_int("stage0_r", 0, self.max_r)
            stages: tuple[Stage, ...] = (Stage(remaining, r=r),)
        else:
            # More stages than blocks cannot be; the sampled count is kept, the config uses what fits.
            count = max(1, min(num_stages, remaining))
            lengths = []
            unassigned = remaining
            for i in range(count - 1):
                share = trial.suggest_float(f"stage{i}_split", *self.stage_split)
                later = count - 1 - i
                blocks = min(max(1, round(share * unassigned)), unassigned - later)
                lengths.append(blocks)
                unassigned -= blocks
            lengths.append(unassigned)
            stages = tuple(
                Stage(blocks, ratio=round(trial.suggest_float(
                    f"stage{i}_ratio", *self.stage_ratio[i], step=self.ratio_step), _RATIO_DIGITS))
                for i, blocks in enumerate(lengths))
        return DSMConfig(start_layer=start, hierarchy_depth=depth, stages=stages,
                         proportional_attention=bool(proportional), model=self.fingerprint)

    def config_from_params(self, params: Mapping[str, Any]) -> DSMConfig:
        """The config of a stored parameter vector (e.g. a finished trial's `params`)."""
        return self.suggest(_PinnedTrial(params))

    # inversion -----------------------------------------------------------------------------------------------
    def params_for(self, cfg: DSMConfig) -> dict[str, Any]:
        """Parameters that `suggest` maps to `cfg` (merge settings only); SpaceError if the space cannot."""
        params: dict[str, Any] = {
            "start_layer": cfg.start_layer,
            "hierarchy_depth": cfg.hierarchy_depth,
            "num_stages": len(cfg.stages),
            "proportional_attention": cfg.proportional_attention,
        }
        uses_r = any(stage.r is not None for stage in cfg.stages)
        if uses_r:
            if len(cfg.stages) != 1:
                raise SpaceError(f"{self.source.name}: only a single-stage config can use a fixed count r")
            params["stage0_r"] = cfg.stages[0].r
        else:
            unassigned = self.fingerprint.num_blocks - cfg.start_layer
            for i, stage in enumerate(cfg.stages):
                if i < len(cfg.stages) - 1:
                    params[f"stage{i}_split"] = stage.blocks / unassigned
                    unassigned -= stage.blocks
                params[f"stage{i}_ratio"] = stage.ratio
            self._check_in_space(params, cfg)
        rebuilt = self.config_from_params(params)
        if rebuilt.key() != cfg.key():
            raise SpaceError(f"{self.source.name}: the config {cfg.key()} cannot be expressed in this space "
                             f"(its parameters give {rebuilt.key()})")
        return params

    def _check_in_space(self, params: Mapping[str, Any], cfg: DSMConfig) -> None:
        def outside(name: str, low: float, high: float) -> None:
            value = params[name]
            if not low - 1e-9 <= value <= high + 1e-9:
                raise SpaceError(f"{self.source.name}: the config {cfg.key()} is outside the space: "
                                 f"{name} {value} not in [{low}, {high}]")

        outside("start_layer", *self.start_layer)
        outside("hierarchy_depth", *self.hierarchy_depth)
        outside("num_stages", *self.num_stages)
        if cfg.proportional_attention not in self.proportional_attention:
            raise SpaceError(f"{self.source.name}: proportional_attention {cfg.proportional_attention} is not "
                             f"among {list(self.proportional_attention)}")
        for i in range(len(cfg.stages)):
            if f"stage{i}_split" in params:
                outside(f"stage{i}_split", *self.stage_split)
            low, high = self.stage_ratio[i]
            outside(f"stage{i}_ratio", low, high)
            steps = (params[f"stage{i}_ratio"] - low) / self.ratio_step
            if abs(steps - round(steps)) > 1e-6:
                raise SpaceError(f"{self.source.name}: stage{i}_ratio {params[f'stage{i}_ratio']} is not on the "
                                 f"ratio_step {self.ratio_step} grid")

    # constraints ---------------------------------------------------------------------------------------------
    def violation(self, cfg: DSMConfig) -> str | None:
        """Why `cfg` breaks the space's hard constraints (not worth measuring), or None."""
        return _min_tokens_violation(cfg, self.fingerprint, self.min_tokens_kept)

    # seeds ---------------------------------------------------------------------------------------------------
    def seeds(self) -> list[Seed]:
        """Known points to measure first: dense, ToMe constant-r, and the paper's style (delay, then depth 1)."""
        seeds = [Seed("dense", self._dense_seed())]
        seeds += [Seed("tome", cfg) for cfg in self._tome_seeds()]
        seeds += [Seed("paper", cfg) for cfg in self._paper_seeds()]
        unique: dict[str, Seed] = {}
        for seed in seeds:
            if seed.kind == "dense" or self.violation(seed.config) is None:
                unique.setdefault(seed.config.key(), seed)
        return list(unique.values())

    def seed_configs(self) -> list[DSMConfig]:
        return [seed.config for seed in self.seeds()]

    def _dense_seed(self) -> DSMConfig:
        if self.stage_ratio[0][0] == 0.0:
            start, depth = self.start_layer[0], self.hierarchy_depth[0]
            remaining = self.fingerprint.num_blocks - start
            # One stage when the space allows it; otherwise the fewest, all at ratio 0.
            count = max(1, min(self.num_stages[0], remaining))
            if all(self.stage_ratio[i][0] == 0.0 for i in range(count)):
                lengths = [1] * (count - 1) + [remaining - (count - 1)]
                proportional = False if False in self.proportional_attention else self.proportional_attention[0]
                cfg = DSMConfig(start_layer=start, hierarchy_depth=depth,
                                stages=tuple(Stage(n, ratio=0.0) for n in lengths),
                                proportional_attention=proportional, model=self.fingerprint)
                try:
                    self.params_for(cfg)
                    return cfg
                except SpaceError:
                    pass
        # The space excludes ratio 0: measure the identity as ToMe with r = 0.
        return self._tome(0, proportional=False)

    def _tome(self, r: int, proportional: bool = True) -> DSMConfig:
        return DSMConfig(start_layer=0, hierarchy_depth=0, stages=(Stage(self.fingerprint.num_blocks, r=r),),
                         proportional_attention=proportional, model=self.fingerprint)

    def _tome_seeds(self) -> list[DSMConfig]:
        tokens = self.fingerprint.grid[0] * self.fingerprint.grid[1]
        blocks = self.fingerprint.num_blocks
        r_values = sorted({max(1, math.floor(f * tokens / blocks)) for f in TOME_SEED_FRACTIONS})
        return [self._tome(r) for r in r_values]

    def _paper_seeds(self) -> list[DSMConfig]:
        blocks = self.fingerprint.num_blocks
        start = min(max(round(blocks / 6), self.start_layer[0]), self.start_layer[1])
        depth = min(max(1, self.hierarchy_depth[0]), self.hierarchy_depth[1])
        count = min(max(2, self.num_stages[0]), self.num_stages[1], blocks - start)
        proportional = True if True in self.proportional_attention else self.proportional_attention[0]
        configs = []
        for kept in PAPER_SEED_KEPT:
            ratio = 1.0 - kept ** (1.0 / (blocks - start))
            params: dict[str, Any] = {"start_layer": start, "hierarchy_depth": depth, "num_stages": count,
                                      "proportional_attention": proportional}
            for i in range(count):
                if i < count - 1:
                    # Equal stage lengths: stick breaking takes 1/(stages left) of what is left.
                    params[f"stage{i}_split"] = min(max(1.0 / (count - i), self.stage_split[0]), self.stage_split[1])
                params[f"stage{i}_ratio"] = self._snap_ratio(ratio, i)
            cfg = self.config_from_params(params)
            try:
                self.params_for(cfg)
            except SpaceError:
                continue
            configs.append(cfg)
        return configs

    def _snap_ratio(self, wanted: float, stage: int) -> float:
        low, high = self.stage_ratio[stage]
        steps = round((min(max(wanted, low), high) - low) / self.ratio_step)
        return round(min(low + steps * self.ratio_step, high), _RATIO_DIGITS)


def _min_tokens_violation(cfg: DSMConfig, fingerprint: ModelFingerprint, min_kept: float | None) -> str | None:
    if min_kept is None:
        return None
    plans = block_plan(cfg, fingerprint)
    initial = fingerprint.grid[0] * fingerprint.grid[1]
    kept = (plans[-1].tokens_out if plans else initial) / initial
    if kept < min_kept:
        return f"keeps {kept:.3f} of the patch tokens, under the space's min_tokens_kept {min_kept}"
    return None


# Traced spaces ---------------------------------------------------------------------------------------------------

DEFAULT_MAX_EVALS_PER_SHAPE = 4
# Budget steps finer than this rarely change latency measurably; the tracer stops bisecting below it.
BUDGET_RESOLUTION = 0.015


@dataclass(frozen=True)
class TracedSpace:
    """Shapes and budgets (search/shapes.py): the sampler picks shapes, `BudgetTracer` traces each one's budget.

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

    def suggest_shape(self, trial: Any) -> Shape:
        depth = trial.suggest_int("hierarchy_depth", *self.hierarchy_depth)
        return Shape(
            start_layer=trial.suggest_int("start_layer", *self.start_layer),
            hierarchy_depth=depth,
            # Without windows the local stage length means nothing: keep it fixed so TPE sees one shape.
            local_blocks=trial.suggest_int("local_blocks", *self.local_blocks) if depth else self.local_blocks[0],
            front_loading=trial.suggest_float("front_loading", *self.front_loading),
            proportional_attention=bool(trial.suggest_categorical("proportional_attention",
                                                                  list(self.proportional_attention))))

    def suggest(self, trial: Any) -> DSMConfig:
        shape = self.suggest_shape(trial)
        return self.compile(shape, trial.suggest_float(BUDGET_PARAM, *self.budget))

    def compile(self, shape: Shape, budget: float) -> DSMConfig:
        return compile_schedule(shape, budget, self.fingerprint)

    def config_from_params(self, params: Mapping[str, Any]) -> DSMConfig:
        return self.compile(Shape.from_params(params), float(params[BUDGET_PARAM]))

    def params_for(self, shape: Shape, budget: float) -> dict[str, Any]:
        return {**shape.params(), BUDGET_PARAM: budget}

    def violation(self, cfg: DSMConfig) -> str | None:
        return _min_tokens_violation(cfg, self.fingerprint, self.min_tokens_kept)

    def seed_shapes(self) -> list[tuple[str, Shape]]:
        """Known shapes to trace first: ToMe's constant count from block 0, the DSM paper's delay with one local
        level, and a delayed global schedule that merges more in the later blocks (on the real ViT-S, merging
        later cost less accuracy per token than front-loading: issue 8's hand-picked configs and
        benchmarks/real_front.py)."""
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
        unique: dict[str, tuple[str, Shape]] = {}
        for kind, shape in candidates:
            unique.setdefault(shape.key(), (kind, shape))
        return list(unique.values())

    @property
    def budget_resolution(self) -> float:
        return max(BUDGET_RESOLUTION, 1.0 / (self.fingerprint.grid[0] * self.fingerprint.grid[1]))


def plan_key(cfg: DSMConfig, fingerprint: ModelFingerprint | None = None) -> str:
    """What a config computes: per block, the windows it matches in and the tokens it merges in each, plus
    proportional attention when anything merges at all. Configs with equal plan keys run the same merged model
    (e.g. a ratio too small to merge one token in a window is the dense model), so one measurement serves all."""
    plans = block_plan(cfg, fingerprint)
    merges = any(p.merge_per_window for p in plans)
    blocks = [[p.windows, p.merge_per_window] if p.merge_per_window else [1, 0] for p in plans]
    return json.dumps({"blocks": blocks, "proportional_attention": bool(cfg.proportional_attention and merges)},
                      separators=(",", ":"))


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
               target: str | None = None) -> SearchSpace:
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
                target: str | None = None) -> "SearchSpace | TracedSpace":
    """A `TracedSpace` when the file gives a `budget`, else a `SearchSpace` (per-stage sampled ratios).

    `target`: the study's target profile (name or .yaml path); on a CUDA target `proportional_attention_gpu`,
    when the file has it, replaces `proportional_attention`. None: the CPU choices."""
    where = source.name if source.name else str(source)
    data = _read_mapping(text, where)
    parser = _SpaceParser(where, data, fingerprint, gpu=GPU_PROPORTIONAL_KEY in data and _is_gpu_target(target))
    return parser.parse_traced(source) if is_traced(data) else parser.parse(source)


def is_traced(data: Mapping[str, Any]) -> bool:
    return "budget" in data


def _is_gpu_target(target: str | None) -> bool:
    if target is None:
        return False
    from dsm_tune.evaluation.targets import load_target

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

    def parse(self, source: Path) -> SearchSpace:
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
        return SearchSpace(source=source, fingerprint=self.fp, start_layer=start, hierarchy_depth=depth,
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
                           max_evals_per_shape=evals, description=description)

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
