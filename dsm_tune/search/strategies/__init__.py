"""Where a study's configs come from. A strategy is a space (what may be proposed, its known seeds) and a
`Proposer` (what to propose next, given every finished trial). The study's loop asks `propose` and reports every
told trial to `observe`; nothing in `search/study/` knows which strategy runs.

- `sampled.py`: Optuna's sampler over per-stage ratios, with dense, ToMe and paper seeds enqueued first;
- `traced/`: a sampler over shapes, each shape's budget traced by bisection, a latency model choosing what to time.

A new strategy is a module here plus a branch in `default_proposer`.
"""

from __future__ import annotations

from typing import Union

import optuna

from dsm_tune.evaluation.targets import Target, load_target
from dsm_tune.search.spec import StudySpec
from dsm_tune.search.strategies.base import (
    FINISHED, Proposal, Proposer, ProposerFactory, SpaceError, min_tokens_violation, plan_key,
)
from dsm_tune.search.strategies import sampled
from dsm_tune.search.strategies.sampled import SampledSpace, SamplerProposer, Seed, make_sampler, replay_attrs
from dsm_tune.search.strategies.traced import TracedProposer, TracedSpace

Space = Union[SampledSpace, TracedSpace]

__all__ = ["FINISHED", "Proposal", "Proposer", "ProposerFactory", "SampledSpace", "SamplerProposer", "Seed",
           "Space", "SpaceError", "TracedProposer", "TracedSpace", "default_proposer", "enqueue_seeds", "make_sampler",
           "min_tokens_violation", "plan_key", "replay_attrs"]


def default_proposer(space: Space, spec: StudySpec, target: Target | None = None) -> Proposer:
    """The proposer a study uses when `run_study` is given none, chosen by the kind of space: a traced space
    (shape + budget) gets the traced search; a sampled space gets Optuna's sampler over its parameters.
    `target`: the study's resolved profile (the driver's); else resolved from the spec."""
    if isinstance(space, TracedSpace):
        # Only the profile's device and batch size matter here (the latency model's row quanta), not presence.
        target = target or load_target(spec.target, batch_size=spec.batch_size, dtype=spec.dtype,
                                       compile=spec.compile, check_available=False)
        return TracedProposer(space, spec.max_accuracy_drop, sampler=spec.sampler, seed=spec.seed,
                              device=target.device, batch_size=target.batch_size, workers=spec.workers)
    return SamplerProposer(space)


def enqueue_seeds(study: optuna.Study, space: Space) -> int:
    """The seeds a study measures first, enqueued; how many. A traced space's seeds are shapes, which its proposer
    traces itself: none are enqueued."""
    return sampled.enqueue_seeds(study, space) if isinstance(space, SampledSpace) else 0
