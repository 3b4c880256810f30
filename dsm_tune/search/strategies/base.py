"""What every search strategy shares: the contract between the study's loop and a proposer, and what a search
space answers whatever its kind (hard constraints, the plan a config computes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Protocol

import optuna

from dsm_tune.errors import DSMTuneError
from dsm_tune.merging import DSMConfig, ModelFingerprint, block_plan
from dsm_tune.merging.config import DEFAULT_OPERATOR


class SpaceError(DSMTuneError):
    """A search space file is malformed, names an unknown key, or holds a range the model cannot take."""


@dataclass(frozen=True)
class Proposal:
    trial: optuna.trial.Trial           # asked from the study (the loop tells it)
    cfg: DSMConfig | None               # None: the parameters give no valid config, `invalid` says why
    options: dict[str, Any] = field(default_factory=dict)   # `evaluator.evaluate(cfg, **options)`: picklable
    seed_kind: str | None = None        # else the trial's seed-kind user attr (enqueued seeds carry it)
    invalid: str | None = None


class _Finished:
    """The proposer has nothing more to propose, ever: the loop lets running trials finish and stops."""

    def __repr__(self) -> str:
        return "FINISHED"


FINISHED: Final = _Finished()


class Proposer(Protocol):
    def propose(self, study: optuna.Study) -> Proposal | None | _Finished:
        """The next trial to run; None when nothing is ready now (the loop waits for running trials and asks
        again after the next `observe`; with nothing running, the study stops as if FINISHED); FINISHED when
        the strategy is exhausted."""

    def observe(self, trial: optuna.trial.FrozenTrial) -> str | None:
        """A trial was told (called after every tell, and at the start for every finished trial of a resume).
        May return one line for the user (printed above the progress line when the trial is told now)."""


ProposerFactory = Callable[[Any, Any], Proposer]   # (space, StudySpec) -> Proposer


def min_tokens_violation(cfg: DSMConfig, fingerprint: ModelFingerprint, min_kept: float | None) -> str | None:
    if min_kept is None:
        return None
    plans = block_plan(cfg, fingerprint)
    initial = fingerprint.grid[0] * fingerprint.grid[1]
    kept = (plans[-1].tokens_out if plans else initial) / initial
    if kept < min_kept:
        return f"keeps {kept:.3f} of the patch tokens, under the space's min_tokens_kept {min_kept}"
    return None



def plan_key(cfg: DSMConfig, fingerprint: ModelFingerprint | None = None) -> str:
    """What a config computes: per block, the windows it matches in and the tokens it merges in each, plus
    proportional attention when anything merges at all. Configs with equal plan keys run the same merged model
    (e.g. a ratio too small to merge one token in a window is the dense model), so one measurement serves all."""
    plans = block_plan(cfg, fingerprint)
    merges = any(p.merge_per_window for p in plans)
    # A merge block keeps its two-number form, so the plan keys of studies made before operators existed hold.
    blocks = [([p.windows, p.merge_per_window] + ([p.operator] if p.operator != DEFAULT_OPERATOR else []))
              if p.merge_per_window else [1, 0] for p in plans]
    return json.dumps({"blocks": blocks, "proportional_attention": bool(cfg.proportional_attention and merges)},
                      separators=(",", ":"))

