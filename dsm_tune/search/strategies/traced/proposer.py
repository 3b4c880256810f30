"""The traced search: a sampler picks shapes, each shape's budget is traced by bisection, a latency model decides
what is worth timing.

Why: the per-stage ratio space has about ten loosely coupled dimensions; a 30-trial TPE cannot learn its
structure, and on a real ViT-S it lost to a hand sweep of ToMe's r. Split the schedule instead into a
*shape* (start, hierarchy, spread over blocks, proportional attention: what accuracy mostly depends on) and a
*budget* (how many tokens go: what latency depends on, monotonically). Then:
- the shape sampler sees one number per shape (its traced front, scored with the latency model, which averages
  the timing noise of every trial instead of carrying one trial's), so it learns from few, clean signals; it
  alternates a model-based proposal (TPE) with a small mutation of the best shape so far, because a handful of
  shapes is too few for TPE alone;
- `BudgetTracer` finds each shape's best budget within the limit in a few trials (tracer.py);
- accuracy is screened on a stratified quarter of the images first (`screen_drop`): a config that is clearly
  over the limit, or clearly less accurate than a timed config faster than it can be, costs a quarter of a trial,
  and its estimated drop still brackets the bisection;
- latency is predicted from the token schedule by `LatencyModel` (latency_model.py), fitted online, and only
  configs that could enter the front are timed (`timing`); predicted and measured speedups of every timed trial
  are recorded (`speedup_predicted`), so the model's error is reported.

Every measured config is an ordinary trial of the study, enqueued with fixed parameters (the shape's and
`budget`) and compiled by `TracedSpace.suggest`; so resume, MLflow, trials.csv and export work unchanged. Nothing
here is stored apart from the trials: on resume the tracers, the latency model and the shape sampler are rebuilt
by replaying the finished trials through `observe`.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dsm_tune.evaluation.policy import TimingPolicy
from dsm_tune.record import (
    ACCURACY_DROP, QUEUED_AGAIN, SEED_KIND, SHAPE, SPEEDUP, SPEEDUP_NOISY, SPEEDUP_PREDICTED,
)
from dsm_tune.merging import DSMConfig
from dsm_tune.search.strategies.base import FINISHED, Proposal, plan_key
from dsm_tune.search.strategies.traced.latency_model import LatencyModel
from dsm_tune.search.strategies.traced.shapes import BUDGET_PARAM, Shape, mutate
from dsm_tune.search.strategies.traced.space import TracedSpace
from dsm_tune.search.strategies.traced.tracer import BudgetTracer, TracePoint, log_drop_slope

# Score a shape by its best speedup within each of these shares of the limit: rewards the whole front.
SCORE_TARGETS = (1.0, 0.5, 0.25)
# Before any feasible point, a shape's first budget is this share of the space's upper bound.
FIRST_BUDGET_SHARE = 0.5
MIN_TIMING_MARGIN = 0.05
DENSE_KIND = "dense"


@dataclass
class _ShapeRun:
    shape: Shape
    kind: str | None                  # seed kind (tome / paper / late), None for a sampled or mutated shape
    tracer: BudgetTracer
    sampler_trial: optuna.Trial
    finished: bool = False
    origin: str = "sampled"           # seed | sampled | mutation | replayed (rebuilt on resume): for the user


def _make_shape_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        # NSGA-II needs generations of dozens of shapes; a traced study sees a handful: TPE serves both.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=3, constant_liar=True)


def _sampler_params(space: TracedSpace, shape: Shape) -> dict[str, Any]:
    params = space.shape_params(shape)
    if not shape.hierarchy_depth:
        params.pop("local_blocks")   # the shape sampler fixes it without windows (TracedSpace.suggest_shape)
    return params


class TracedProposer:
    def __init__(self, space: TracedSpace, max_drop: float, *, sampler: str = "tpe", seed: int = 0,
                 device: str = "cpu", batch_size: int = 1, workers: int = 1):
        self.space = space
        self.max_drop = max_drop
        self.workers = max(1, workers)
        self.latency = LatencyModel(space.fingerprint, batch_size=batch_size, device=device)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.shape_study = optuna.create_study(direction="maximize", sampler=_make_shape_sampler(sampler, seed))
        self.rng = random.Random(seed)
        self.runs: dict[str, _ShapeRun] = {}
        self.seed_queue = list(space.seed_shapes())
        self.dense_seen = False
        self.timed_front: list[tuple[float, float]] = []   # (drop, measured speedup) of feasible timed trials
        self.sampled_shapes = 0

    # observing ---------------------------------------------------------------------------------------------
    def observe(self, trial: FrozenTrial) -> str | None:
        """A finished trial of the study (told now, or replayed on resume); says so when it completes a shape."""
        params = trial.params
        if BUDGET_PARAM not in params:
            return None
        attrs = trial.user_attrs
        if attrs.get(SEED_KIND) == DENSE_KIND:
            self.dense_seen = True
        shape, budget = self.space.shape_from_params(params), float(params[BUDGET_PARAM])
        if trial.state == TrialState.FAIL:
            run = self.runs.get(shape.key())
            if run is not None:
                run.tracer.pending.discard(budget)
                if not attrs.get(QUEUED_AGAIN):
                    # A config that crashed its worker or raised: the tracer moves below it, as if infeasible.
                    run.tracer.tell(budget, None)
                    return self._finish_if_done(run)
            return None
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return None
        cfg = self.space.compile(shape, budget)
        speedup = attrs.get(SPEEDUP)
        timed = isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup > 0
        if timed:
            self.latency.add(cfg, float(speedup))
            drop = attrs.get(ACCURACY_DROP)
            # A noisy speedup may not decide what else gets timed: it could be a lucky draw.
            if isinstance(drop, (int, float)) and drop <= self.max_drop and not attrs.get(SPEEDUP_NOISY):
                self.timed_front.append((float(drop), float(speedup)))
        if attrs.get(SEED_KIND) == DENSE_KIND:
            return None
        kind = attrs.get(SEED_KIND)
        run = self.runs.get(shape.key()) or self._open(shape, kind, "seed" if kind else "replayed")
        drop = attrs.get(ACCURACY_DROP)
        run.tracer.tell(budget, float(drop) if isinstance(drop, (int, float)) else None,
                        float(speedup) if timed else None)
        return self._finish_if_done(run)

    # proposing ---------------------------------------------------------------------------------------------
    def propose(self, study: optuna.Study) -> Proposal | None | object:
        if any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
            return self._replay_waiting(study)
        if not self.dense_seen:
            self.dense_seen = True
            return self._ask(study, self.space.seed_shapes()[0][1], 0.0, DENSE_KIND)
        for run in self._active():
            budget = run.tracer.propose()
            if budget is not None:
                return self._ask(study, run.shape, budget, run.kind)
        if len(self._active()) >= self.workers + 1:
            return None   # every open shape waits for a result; more open shapes would only guess blindly
        run = self._open_next()
        if run is None:
            return None if self._active() else FINISHED
        budget = run.tracer.propose()
        return self._ask(study, run.shape, budget, run.kind) if budget is not None else None

    def _active(self) -> list[_ShapeRun]:
        return [run for run in self.runs.values() if not run.finished]

    def _replay_waiting(self, study: optuna.Study) -> Proposal:
        # A trial queued again after a failure or an interruption: measured first, with its own parameters.
        return self._proposal(study.ask())

    def _ask(self, study: optuna.Study, shape: Shape, budget: float, kind: str | None) -> Proposal:
        attrs: dict[str, Any] = {SEED_KIND: kind} if kind else {}
        study.enqueue_trial(self.space.params_for(shape, round(budget, 4)), user_attrs=attrs)
        return self._proposal(study.ask())

    def _proposal(self, trial: optuna.Trial) -> Proposal:
        """Compile an asked trial (its parameters fixed), claim its budget for its shape, predict its speedup."""
        cfg = self.space.suggest(trial)
        shape = self.space.shape_from_params(trial.params)
        trial.set_user_attr(SHAPE, shape.key())
        run = self.runs.get(shape.key())
        if run is not None and trial.user_attrs.get(SEED_KIND) != DENSE_KIND:   # dense is no shape's point
            run.tracer.claim(float(trial.params[BUDGET_PARAM]))
        options = self._options(cfg)
        trial.set_user_attr(SPEEDUP_PREDICTED, round(options["timing"].predicted_speedup, 4))
        return Proposal(trial, cfg, options, trial.user_attrs.get(SEED_KIND))

    def _options(self, cfg: DSMConfig) -> dict[str, Any]:
        prediction = self.latency.predict(cfg)
        policy = TimingPolicy.for_prediction(self.max_drop, self.timed_front, prediction.speedup,
                                             prediction.rel_error, MIN_TIMING_MARGIN)
        # Scoring every image only pays when the config could enter the front (TimingPolicy.screen_drop).
        return {"screen_drop": policy.screen_drop(), "timing": policy}

    # shapes ------------------------------------------------------------------------------------------------
    def _open(self, shape: Shape, kind: str | None, origin: str) -> _ShapeRun:
        self.shape_study.enqueue_trial(_sampler_params(self.space, shape))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a fixed parameter outside the sampler's range is fine here
            sampler_trial = self.shape_study.ask()
            self.space.suggest_shape(sampler_trial)
        return self._register(shape, kind, sampler_trial, origin)

    def _register(self, shape: Shape, kind: str | None, sampler_trial: optuna.Trial,
                  origin: str = "sampled") -> _ShapeRun:
        resolution = self.space.budget_resolution
        tracer = BudgetTracer(limit=self.max_drop, low=self.space.budget[0], high=self.space.budget[1],
                              start=self._first_budget(), resolution=resolution,
                              max_evals=self.space.max_evals_per_shape, prior_slope=self._prior_slope(),
                              same_plan=lambda a, b, s=shape: self._same_plan(s, a, b))
        run = self.runs[shape.key()] = _ShapeRun(shape, kind, tracer, sampler_trial, origin=origin)
        return run


    def _open_next(self) -> _ShapeRun | None:
        while self.seed_queue:
            kind, shape = self.seed_queue.pop(0)
            if shape.key() not in self.runs:
                return self._open(shape, kind, "seed")
        for _ in range(20):
            self.sampled_shapes += 1
            if self.sampled_shapes % 2 == 0 and self._incumbent() is not None:
                shape = mutate(self._incumbent().shape, self.space, self.rng)
                if shape.key() in self.runs:
                    continue
                return self._open(shape, None, "mutation")
            sampler_trial = self.shape_study.ask()
            shape = self.space.suggest_shape(sampler_trial)
            if shape.key() in self.runs:
                # Already traced: tell the sampler what it scored so it moves on.
                existing = self.runs[shape.key()]
                self.shape_study.tell(sampler_trial, self._score(existing))
                continue
            return self._register(shape, None, sampler_trial)
        return None

    def _incumbent(self) -> _ShapeRun | None:
        finished = [run for run in self.runs.values() if run.finished]
        return max(finished, key=self._score) if finished else None

    def _finish_if_done(self, run: _ShapeRun) -> str | None:
        if run.finished or not run.tracer.done():
            return None
        run.finished = True
        self.shape_study.tell(run.sampler_trial, self._score(run))
        best = run.tracer.best_feasible()
        found = (f"best {self._predicted(run.shape, best):.2f}x (predicted) at drop {best.drop:.3f}, budget "
                 f"{best.budget:.2f}" if best else "nothing within the limit")
        label = f"{run.kind} seed shape" if run.kind else f"{run.origin} shape"
        return f"{label} traced in {len(run.tracer.points)} trials ({run.shape.describe()}): {found}"

    def _score(self, run: _ShapeRun) -> float:
        """Mean over SCORE_TARGETS of the shape's best predicted speedup within that share of the limit."""
        total = 0.0
        for share in SCORE_TARGETS:
            points = [p for p in run.tracer.points if p.drop <= share * self.max_drop]
            total += max((self._predicted(run.shape, p) for p in points), default=1.0)
        return total / len(SCORE_TARGETS)

    def _predicted(self, shape: Shape, point: TracePoint) -> float:
        return self.latency.predict(self.space.compile(shape, point.budget)).speedup

    def _first_budget(self) -> float:
        best = [run.tracer.best_feasible() for run in self.runs.values()]
        budgets = sorted(p.budget for p in best if p is not None)
        if budgets:
            return budgets[-1] if len(budgets) < 3 else budgets[len(budgets) // 2]
        low, high = self.space.budget
        return low + FIRST_BUDGET_SHARE * (high - low)

    def _prior_slope(self) -> float | None:
        slopes = sorted(s for s in (log_drop_slope(run.tracer.points) for run in self.runs.values()) if s)
        return slopes[len(slopes) // 2] if slopes else None

    def _same_plan(self, shape: Shape, a: float, b: float) -> bool:
        return plan_key(self.space.compile(shape, a)) == plan_key(self.space.compile(shape, b))

    # reporting ---------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {"shapes_traced": sum(run.finished for run in self.runs.values()),
                "shapes_open": len(self._active()),
                "latency_model_rel_error": self.latency.rel_error,
                "latency_model_points": len(self.latency.points)}


__all__ = ["TracedProposer"]
