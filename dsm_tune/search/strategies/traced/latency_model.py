"""A per-device latency model fitted online: relative latency (merged / dense) from the tokens each block sees.

Timing a config costs as much as scoring its accuracy and is noisy; its token schedule is known for free. The
model lets the driver time only configs that could enter the front, and gives the shape sampler a speedup
estimate that averages the noise of many timed trials instead of carrying one trial's noise.

Relative latency = t0 + t1 * linear + t2 * quadratic + t3 * matching, with every feature scaled so the dense
model has linear = quadratic = 1 and matching = 0:
- linear: token rows through the projections and the MLP (attention's q/k/v/proj see the block's input tokens,
  the MLP the merged ones);
- quadratic: attention scores, tokens squared;
- matching: the bipartite matching of merging blocks, also squared in the tokens it compares;
- t0: what does not scale with tokens (patch embedding, head, Python and launch overhead).
On GPUs, kernels run in waves of tiles, so time steps with the rows (batch x tokens) rounded up to a tile
multiple (the tail effect); the model tries row quanta and keeps the one with the smallest leave-one-out error.
Coefficients are non-negative and pulled gently towards a FLOP-count prior, so a handful of trials already gives
sane predictions and more trials let the measurements speak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import lsq_linear

from dsm_tune.merging import DSMConfig, ModelFingerprint, block_plan

CPU_QUANTA = (1,)
GPU_QUANTA = (1, 8, 16, 32, 64, 128)
PRIOR_WEIGHT = 0.05          # pull towards the prior, relative to one measured point
FIXED_SHARE_PRIOR = 0.05     # share of dense latency assumed not to scale with tokens
DEFAULT_REL_ERROR = 0.15     # assumed relative error of a prediction before it can be estimated
MIN_POINTS_FOR_QUANTA = 6
# The model's error is estimated leaving each point out up to this many timed points, then by CROSS_FOLDS folds.
MAX_LOO_POINTS = 40
CROSS_FOLDS = 10


@dataclass(frozen=True)
class Prediction:
    speedup: float
    rel_error: float          # leave-one-out relative error of the speedup, the margin to apply


def _quantize(rows: float, quantum: int) -> float:
    return math.ceil(rows / quantum) * quantum if quantum > 1 else rows


class LatencyModel:
    def __init__(self, fingerprint: ModelFingerprint, batch_size: int = 1, device: str = "cpu"):
        self.fingerprint = fingerprint
        self.batch_size = max(1, int(batch_size))
        self.quanta = GPU_QUANTA if device.startswith("cuda") else CPU_QUANTA
        self.points: list[tuple[list[tuple[int, int, int]], float]] = []   # (plan, relative latency)
        self.quantum = 1
        self.theta = self._prior()
        self._rel_error: float | None = None

    # features ----------------------------------------------------------------------------------------------
    def _plan(self, cfg: DSMConfig) -> list[tuple[int, int, int]]:
        return [(p.tokens_in, p.tokens_out, p.merged) for p in block_plan(cfg, self.fingerprint)]

    def _features(self, plan: list[tuple[int, int, int]], quantum: int) -> np.ndarray:
        prefix = self.fingerprint.num_prefix_tokens
        rows = lambda tokens: _quantize((tokens + prefix) * self.batch_size, quantum) / self.batch_size
        dense_rows = rows(self.fingerprint.grid[0] * self.fingerprint.grid[1])
        blocks = len(plan)
        linear = sum(rows(n_in) + rows(n_out) for n_in, n_out, _ in plan) / (2 * blocks * dense_rows)
        quadratic = sum(rows(n_in) ** 2 for n_in, _, _ in plan) / (blocks * dense_rows ** 2)
        matching = sum(rows(n_in) ** 2 for n_in, _, merged in plan if merged) / (blocks * dense_rows ** 2)
        return np.array([1.0, linear, quadratic, matching])

    def _prior(self) -> np.ndarray:
        # Per token and block: projections + MLP cost ~ (8 + 4 * mlp_ratio) d^2 flops, attention scores ~ 4 n d.
        dim = self.fingerprint.embed_dim
        tokens = self.fingerprint.grid[0] * self.fingerprint.grid[1] + self.fingerprint.num_prefix_tokens
        linear, quadratic = 24.0 * dim * dim, 4.0 * tokens * dim
        scaling = 1.0 - FIXED_SHARE_PRIOR
        return np.array([FIXED_SHARE_PRIOR, scaling * linear / (linear + quadratic),
                         scaling * quadratic / (linear + quadratic), 0.0])

    # fitting -----------------------------------------------------------------------------------------------
    def add(self, cfg: DSMConfig, speedup: float) -> None:
        """One timed config: its interleaved speedup over dense (dense itself is speedup 1)."""
        if not (math.isfinite(speedup) and speedup > 0):
            return
        self.points.append((self._plan(cfg), 1.0 / speedup))
        self._fit()

    def _solve(self, rows: list[np.ndarray], targets: list[float]) -> np.ndarray:
        prior = self._prior()
        weight = math.sqrt(PRIOR_WEIGHT)
        design = np.vstack([*rows, weight * np.eye(len(prior))])
        values = np.concatenate([np.asarray(targets, dtype=float), weight * prior])
        return lsq_linear(design, values, bounds=(0.0, np.inf)).x

    def _loo_error(self, quantum: int) -> float | None:
        """Leave-one-out error while points are few; past MAX_LOO_POINTS, CROSS_FOLDS-fold (interleaved), so a
        refit costs a fixed number of solves however long the study runs, not one per point."""
        count = len(self.points)
        if count < 3:
            return None
        features = [self._features(plan, quantum) for plan, _ in self.points]
        targets = [rel for _, rel in self.points]
        folds = count if count <= MAX_LOO_POINTS else CROSS_FOLDS
        errors = []
        for fold in range(folds):
            held = range(fold, count, folds)
            kept = [i for i in range(count) if i % folds != fold]
            theta = self._solve([features[i] for i in kept], [targets[i] for i in kept])
            for i in held:
                predicted = float(features[i] @ theta)
                errors.append(abs(targets[i] / predicted - 1.0) if predicted > 0 else 1.0)
        return float(np.sqrt(np.mean(np.square(errors))))

    def _fit(self) -> None:
        quanta = self.quanta if len(self.points) >= MIN_POINTS_FOR_QUANTA else (1,)
        scored = [(self._loo_error(q), q) for q in quanta]
        error, self.quantum = min(scored, key=lambda item: (math.inf if item[0] is None else item[0], item[1]))
        self._rel_error = error
        self.theta = self._solve([self._features(plan, self.quantum) for plan, _ in self.points],
                                 [rel for _, rel in self.points])

    # prediction --------------------------------------------------------------------------------------------
    def predict(self, cfg: DSMConfig) -> Prediction:
        relative = float(self._features(self._plan(cfg), self.quantum) @ self.theta)
        error = self._rel_error if self._rel_error is not None else DEFAULT_REL_ERROR
        return Prediction(speedup=1.0 / max(relative, 1e-6), rel_error=error)

    @property
    def rel_error(self) -> float | None:
        """Leave-one-out relative error of the predicted speedups (None before 3 timed configs)."""
        return self._rel_error
