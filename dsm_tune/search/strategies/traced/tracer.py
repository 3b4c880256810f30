"""Tracing one shape's budget: the largest budget whose accuracy drop stays within the limit, in a few trials.

For a fixed shape the drop rises monotonically with the budget (more tokens merged everywhere), and so does the
speedup. So the shape's best feasible config is found by a safeguarded secant search on log(drop) against the
budget (drops grow roughly exponentially with the budget), bracketed by the largest feasible and the smallest
infeasible budget measured. The points measured on the way are themselves front candidates at smaller drops;
after the limit is bracketed, one more point is placed at each lower target (half and a quarter of the limit) so
the shape contributes to the whole front, not only to its right end.

The tracer is pure bookkeeping: it proposes budgets and is told results; it never measures anything itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

# Drops below this are "no measurable loss": log-scale interpolation needs a floor.
DROP_FLOOR = 1e-3
# A bracket end within this share of the limit is close enough: the next bisection step would gain little.
CLOSE_ENOUGH = 0.85
# Shares of the limit that get one point each once the limit is bracketed.
LOWER_TARGETS = (0.5, 0.25)
# A lower target is met by any point between this share of it and the target itself.
LOWER_TOLERANCE = 0.6
# Interpolation aims a little under a target: overshooting costs a whole extra trial, undershooting a little speed.
AIM = 0.93


@dataclass
class TracePoint:
    budget: float
    drop: float
    speedup: float | None     # measured, or predicted when not timed; None when unknown


@dataclass
class BudgetTracer:
    """Bisection of one shape's budget against `limit`. `resolution` is the smallest budget step worth taking
    (one token's worth, say); `max_evals` caps the trials spent on this shape's limit search."""

    limit: float
    low: float
    high: float
    start: float
    resolution: float
    max_evals: int = 4
    points: list[TracePoint] = field(default_factory=list)
    pending: set[float] = field(default_factory=set)
    same_plan: Callable[[float, float], bool] | None = None   # do two budgets compile to the same plan?
    # d log(drop) / d budget seen on other shapes: lets the second point land near the limit, not a blind step.
    prior_slope: float | None = None

    def tell(self, budget: float, drop: float | None, speedup: float | None = None) -> None:
        self.pending.discard(budget)
        if drop is None or not math.isfinite(drop):
            # An unmeasurable config (a failure): treat it as infeasible so the search moves below it.
            drop = math.inf
        self.points.append(TracePoint(budget, max(drop, 0.0), speedup))

    # the bracket -------------------------------------------------------------------------------------------
    def feasible(self, target: float | None = None) -> list[TracePoint]:
        target = self.limit if target is None else target
        return [p for p in self.points if p.drop <= target]

    def best_feasible(self) -> TracePoint | None:
        points = self.feasible()
        return max(points, key=lambda p: p.budget) if points else None

    def _bracket(self, target: float) -> tuple[TracePoint | None, TracePoint | None]:
        below = [p for p in self.points if p.drop <= target]
        above = [p for p in self.points if p.drop > target]
        lo = max(below, key=lambda p: p.budget) if below else None
        hi = min(above, key=lambda p: p.budget) if above else None
        if lo is not None and hi is not None and hi.budget <= lo.budget:
            # Noise broke monotonicity (a rounding artefact of the schedule): trust the feasible side.
            hi = min((p for p in above if p.budget > lo.budget), key=lambda p: p.budget, default=None)
        return lo, hi

    # proposing ---------------------------------------------------------------------------------------------
    def done(self) -> bool:
        return self.propose() is None and not self.pending

    def propose(self) -> float | None:
        """The next budget to measure, or None when this shape is traced (or waits for a pending result)."""
        if self.pending:
            return None
        limit_evals = len(self.points)
        if limit_evals < self.max_evals:
            budget = self._next_for(self.limit)
            if budget is not None:
                return budget
        for share in LOWER_TARGETS:
            target = share * self.limit
            if any(LOWER_TOLERANCE * target <= p.drop <= target for p in self.points):
                continue
            if limit_evals >= self.max_evals + len(LOWER_TARGETS):
                return None
            budget = self._next_for(target, lower=True)
            if budget is not None:
                return budget
        return None

    def claim(self, budget: float) -> None:
        self.pending.add(budget)

    def _new(self, budget: float) -> float | None:
        budget = min(max(budget, self.low), self.high)
        for p in self.points:
            if abs(p.budget - budget) < self.resolution / 2 or (self.same_plan and self.same_plan(p.budget, budget)):
                return None
        return budget

    def _next_for(self, target: float, lower: bool = False) -> float | None:
        if not self.points:
            return self._new(self.start)
        lo, hi = self._bracket(target)
        if lo is not None and hi is not None:
            if hi.budget - lo.budget <= self.resolution:
                return None
            if not lower and lo.drop >= CLOSE_ENOUGH * target:
                return None
            return self._between(lo, hi, AIM * target)
        if hi is None:
            # Everything measured is feasible: extrapolate upwards.
            if lo.budget >= self.high - self.resolution / 2:
                return None
            guess = self._secant(AIM * target, upwards=True)
            step = max(2 * self.resolution, 0.5 * (lo.budget - self.low) + self.resolution)
            guess = min(max(guess, lo.budget + self.resolution), lo.budget + step) if guess is not None \
                else lo.budget + step
            return self._new(guess)
        # Everything measured is infeasible: come down.
        if hi.budget <= self.low + self.resolution / 2:
            return None
        guess = self._secant(AIM * target, upwards=False)
        floor = self.low + 0.4 * (hi.budget - self.low)
        guess = max(min(guess, hi.budget - self.resolution), floor) if guess is not None else \
            self.low + 0.6 * (hi.budget - self.low)
        return self._new(guess)

    def _between(self, lo: TracePoint, hi: TracePoint, target: float) -> float | None:
        width = hi.budget - lo.budget
        guess = None
        if math.isfinite(hi.drop):
            y0, y1 = math.log(max(lo.drop, DROP_FLOOR)), math.log(max(hi.drop, DROP_FLOOR))
            if y1 > y0:
                guess = lo.budget + width * (math.log(max(target, DROP_FLOOR)) - y0) / (y1 - y0)
        if guess is None:
            guess = lo.budget + width / 2
        # Safeguard: stay well inside the bracket so every step shrinks it.
        guess = min(max(guess, lo.budget + 0.15 * width), hi.budget - 0.15 * width)
        return self._new(guess) if width > self.resolution else None

    def _secant(self, target: float, upwards: bool) -> float | None:
        """Log-linear extrapolation through the two measured points nearest the target."""
        usable = sorted((p for p in self.points if math.isfinite(p.drop)), key=lambda p: p.budget)
        if len(usable) == 1 and self.prior_slope and self.prior_slope > 0 and usable[0].drop > DROP_FLOOR:
            only = usable[0]
            return only.budget + (math.log(max(target, DROP_FLOOR)) - math.log(only.drop)) / self.prior_slope
        if len(usable) < 2:
            return None
        a, b = (usable[-2], usable[-1]) if upwards else (usable[0], usable[1])
        ya, yb = math.log(max(a.drop, DROP_FLOOR)), math.log(max(b.drop, DROP_FLOOR))
        if b.budget == a.budget or yb <= ya:
            return None
        slope = (yb - ya) / (b.budget - a.budget)
        return a.budget + (math.log(max(target, DROP_FLOOR)) - ya) / slope


def log_drop_slope(points: list[TracePoint]) -> float | None:
    """Least-squares slope of log(drop) against budget over a shape's measured points with a real drop."""
    usable = [(p.budget, math.log(p.drop)) for p in points if math.isfinite(p.drop) and p.drop > DROP_FLOOR]
    if len(usable) < 2:
        return None
    mean_b = sum(b for b, _ in usable) / len(usable)
    mean_y = sum(y for _, y in usable) / len(usable)
    spread = sum((b - mean_b) ** 2 for b, _ in usable)
    if spread <= 0:
        return None
    slope = sum((b - mean_b) * (y - mean_y) for b, y in usable) / spread
    return slope if slope > 0 else None
