"""Where the next config comes from. The loop asks a `Proposer` for a `Proposal` (an asked Optuna trial, its
config and the evaluator options) and tells it every finished trial; the default `SamplerProposer` is Optuna's
sampler over the search space. Seeds and requeued trials reach any proposer that asks through `study.ask()`:
they are enqueued in the study."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import optuna

from dsm_tune.merging import DSMConfig
from dsm_tune.search.space import SearchSpace, SpaceError, TracedSpace

if TYPE_CHECKING:
    from dsm_tune.search.study.spec import StudySpec


@dataclass(frozen=True)
class Proposal:
    trial: optuna.trial.Trial           # asked from the study (the loop tells it)
    cfg: DSMConfig | None               # None: the parameters give no valid config, `invalid` says why
    options: dict[str, Any] = field(default_factory=dict)   # `evaluator.evaluate(cfg, **options)`: plain data
    seed_kind: str | None = None        # else the trial's `seed_kind` user attr (enqueued seeds carry it)
    invalid: str | None = None


class Proposer(Protocol):
    def propose(self, study: optuna.Study) -> Proposal | None:
        """The next trial to run; None when nothing is ready now (the loop waits for running trials and asks
        again after the next `observe`; with nothing running, the study stops: the proposer is exhausted)."""

    def observe(self, trial: optuna.trial.FrozenTrial) -> str | None:
        """A trial was told (called after every tell, and at the start for every finished trial of a resume).
        May return one line for the user (printed above the progress line when the trial is told now)."""


ProposerFactory = Callable[[SearchSpace, "StudySpec"], Proposer]


class SamplerProposer:
    """Ask the study's sampler; the space maps the sampled parameters to a config."""

    def __init__(self, space: SearchSpace):
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


def default_proposer(space: SearchSpace | TracedSpace, spec: "StudySpec") -> Proposer:
    """The proposer a study uses when `run_study` is given none: chosen by the kind of space. A traced space
    (shape + budget) gets the traced search; a sampled space gets Optuna's sampler over its parameters."""
    if isinstance(space, TracedSpace):
        from dsm_tune.evaluation.targets import load_target
        from dsm_tune.search.strategy import TracedProposer

        # Only the profile's device and batch size matter here (the latency model's row quanta), not presence.
        target = load_target(spec.target, batch_size=spec.batch_size, dtype=spec.dtype, compile=spec.compile,
                             check_available=False)
        return TracedProposer(space, spec.max_accuracy_drop, sampler=spec.sampler, seed=spec.seed,
                              device=target.device, batch_size=target.batch_size, workers=spec.workers)
    return SamplerProposer(space)
