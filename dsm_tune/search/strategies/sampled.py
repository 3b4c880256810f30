"""The sampled strategy: Optuna's sampler over a space whose every stage ratio and split is a parameter, and the
known points (dense, ToMe's constant r, the paper's style) measured first as enqueued seeds.

`SampledSpace.suggest` is the only mapping from parameters to a config. Parameter names are fixed (`start_layer`,
`hierarchy_depth`, `num_stages`, `proportional_attention`, `stage{i}_split`, `stage{i}_ratio`, and `stage0_r` for
ToMe reference points) so a resumed study, a re-queued trial and an enqueued seed all map to the same config.

Stage lengths are sampled by stick breaking: stage `i` (all but the last) takes the fraction `stage{i}_split` of
the blocks still unassigned, at least one block, leaving one for each later stage; the last stage takes the rest.
Every sampled point is therefore a valid split, and a given split has exactly one parameter vector
(`params_for`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna

from dsm_tune.record import MERGE_FORM, SEED_KIND
from dsm_tune.merging import DSMConfig, ModelFingerprint, Stage
from dsm_tune.search.strategies.base import Proposal, SpaceError, min_tokens_violation

DEFAULT_RATIO_STEP = 0.01
RATIO_DIGITS = 6
# ToMe reference points: constant r per block removing about these fractions of the patch tokens over the model.
TOME_SEED_FRACTIONS = (0.5, 0.75, 0.9)
# The paper's style at two strengths: one ratio for every merging block, chosen so that about these fractions of
# the patch tokens are left at the end (a per-block ratio compounds, so deep models need smaller ratios).
PAPER_SEED_KEPT = (0.5, 0.25)


@dataclass(frozen=True)
class Seed:
    """A known point enqueued before sampling; `kind` is dense, tome or paper (the trial's `seed_kind`)."""

    kind: str
    config: DSMConfig



# Trial user attr marking a trial enqueued with ToMe's fixed count `stage0_r` (Optuna keeps no public record of
# which parameters were pinned, and the sampler must never be asked for `stage0_r`).


def replay_attrs(params: Mapping[str, Any]) -> dict[str, Any]:
    """User attrs to enqueue with `params` so that `suggest` maps them back to the same config."""
    return {MERGE_FORM: "r"} if "stage0_r" in params else {}


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
    return (getattr(trial, "user_attrs", None) or {}).get(MERGE_FORM) == "r"



@dataclass(frozen=True)
class SampledSpace:
    """Bounds of a sampled search for one model (every stage's ratio and split is a parameter), already checked
    against its fingerprint."""

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
                    f"stage{i}_ratio", *self.stage_ratio[i], step=self.ratio_step), RATIO_DIGITS))
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
        return min_tokens_violation(cfg, self.fingerprint, self.min_tokens_kept)

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
        return round(min(low + steps * self.ratio_step, high), RATIO_DIGITS)



class SamplerProposer:
    """Ask the study's sampler; the space maps the sampled parameters to a config. Seeds reach it through
    `study.ask()`: they are enqueued in the study (`enqueue_seeds`)."""

    def __init__(self, space: SampledSpace):
        self.space = space

    def propose(self, study: optuna.Study) -> Proposal:
        trial = study.ask()
        try:
            return Proposal(trial, self.space.suggest(trial))
        except (SpaceError, ValueError) as exc:   # ConfigError is a ValueError
            return Proposal(trial, None, invalid=f"no valid config from these parameters: {exc}")

    def observe(self, trial: optuna.trial.FrozenTrial) -> None:
        return None   # the sampler reads finished trials from the storage itself


def make_sampler(name: str, seed: int, workers: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # Multivariate + group: the stage count makes the space conditional; grouping models each subspace
            # jointly instead of falling back to independent sampling.
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True, group=True,
                                              n_startup_trials=max(10, 2 * workers))
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(16, 4 * workers))
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


def enqueue_seeds(study: optuna.Study, space: SampledSpace) -> int:
    """Enqueue the space's seeds (`SampledSpace.seeds`) in the study, each marked with its kind; how many."""
    seeds = space.seeds()
    for seed in seeds:
        params = space.params_for(seed.config)
        study.enqueue_trial(params, user_attrs={**replay_attrs(params), SEED_KIND: seed.kind})
    return len(seeds)
