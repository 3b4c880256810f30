"""Stand-ins for tests and benchmarks of the orchestration: an evaluator with a fixed cost and deterministic
figures computed from the token schedule (no model, no data), and its picklable factory for Ray actors."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsm_tune import record as schema
from dsm_tune.evaluation.policy import TimingPolicy
from dsm_tune.merging import DSMConfig, ModelFingerprint, block_plan


class StandInEvaluator:
    """A fixed-cost evaluator with deterministic metrics computed from the token schedule, for tests and
    benchmarks of the orchestration (no model, no data).

    Latency follows the tokens each block processes; accuracy drop grows with tokens merged early and with global
    matching, and shrinks with proportional attention, so the search has a real trade-off to find. A config whose
    key is in `die_on` ends the worker process abruptly (as a crash or OOM kill would); `fail_on` raises instead
    (`"*"`: every config).

    `drift` multiplies the dense and merged timings of the n-th evaluation by `drift[n % len(drift)]` (a machine
    whose load comes and goes: the speedup is unchanged). Every `noisy_every`-th evaluation reports a speedup
    1.5x too high flagged `speedup_noisy`, as a timing under bursty load would be.

    `started_log`: a file that gets one line (the config key) as each evaluation begins, so a test can stop the
    process while one is surely running (the evaluator may run in another process, or the process may be killed).
    """

    def __init__(self, fingerprint: ModelFingerprint, cost_s: float = 0.0, die_on: tuple[str, ...] = (),
                 fail_on: tuple[str, ...] = (), die_on_init: bool = False, baseline_latency_ms: float = 10.0,
                 die_marker: str | None = None, drift: tuple[float, ...] = (), noisy_every: int = 0,
                 started_log: str | None = None):
        if die_on_init:
            os._exit(3)
        self.fingerprint = fingerprint
        self.cost_s = cost_s
        self.die_on = set(die_on)
        self.fail_on = set(fail_on)
        self.die_marker = die_marker
        self.baseline_latency_ms = baseline_latency_ms
        # The study's first dense timing is taken under the first drift (as a real one taken under load is).
        first_dense = baseline_latency_ms * (drift[0] if drift else 1.0)
        self.baseline = {"metric": "top1", "metric_value": 90.0, "latency_ms": first_dense,
                         "data_fingerprint": "stand-in"}
        self.data_fingerprint = "stand-in"
        self.drift, self.noisy_every = tuple(drift), noisy_every
        self.evaluations = 0
        self.started_log = started_log

    def evaluate(self, cfg: DSMConfig, **options: Any) -> dict[str, Any]:
        """`options` are recorded as `options_seen` (what the driver asked the evaluator for)."""
        key = cfg.key()
        if self.started_log is not None:
            with open(self.started_log, "a") as log:
                log.write(key + "\n")
        if key in self.die_on:
            # Die only once per marker file when one is given, so a re-run of the same config can succeed.
            if self.die_marker is None or not Path(self.die_marker).exists():
                if self.die_marker is not None:
                    Path(self.die_marker).write_text(key)
                os._exit(1)
        if key in self.fail_on or "*" in self.fail_on:
            raise RuntimeError(f"stand-in failure for {key}")
        started = time.perf_counter()
        time.sleep(self.cost_s)
        plans = block_plan(cfg, self.fingerprint)
        initial = self.fingerprint.grid[0] * self.fingerprint.grid[1]
        blocks = len(plans)
        drop = 0.0
        for index, plan in enumerate(plans):
            lateness = (index + 1) / blocks
            penalty = 1.0 if plan.windows == 1 else 0.6   # local matching loses less
            drop += 5.0 * (plan.merged / initial) * penalty * (1.5 - lateness) ** 2
        if cfg.proportional_attention:
            drop *= 0.85
        mean_tokens = sum(p.tokens_in + p.tokens_out for p in plans) / (2 * blocks * initial)
        index, self.evaluations = self.evaluations, self.evaluations + 1
        dense = self.baseline_latency_ms * (self.drift[index % len(self.drift)] if self.drift else 1.0)
        noisy = bool(self.noisy_every) and index % self.noisy_every == self.noisy_every - 1
        latency = dense * (0.08 + 0.92 * mean_tokens) / (1.5 if noisy else 1.0)
        final = plans[-1].tokens_out / initial if plans else 1.0
        return {
            schema.METRIC: "top1", schema.METRIC_VALUE: 90.0 - drop, schema.ACCURACY_DROP: round(drop, 6),
            schema.ABORTED: False, schema.LATENCY_MS: round(latency, 6), schema.LATENCY_IQR_MS: 0.0,
            schema.BASELINE_LATENCY_MS: round(dense, 6), schema.SPEEDUP: round(dense / latency, 6),
            schema.FLOPS_RATIO: round(mean_tokens, 6), schema.TOKENS_KEPT: round(final, 6), schema.NUM_IMAGES: 100,
            schema.EVAL_SECONDS: time.perf_counter() - started,
            **({schema.SPEEDUP_NOISY: True} if noisy else {}),
            **({schema.OPTIONS_SEEN: _stored_options(options)} if options else {}),
        }


def _stored_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as a trial attr can hold them: a timing policy in its dict form."""
    return {k: v.to_dict() if isinstance(v, TimingPolicy) else v for k, v in options.items()}


@dataclass(frozen=True)
class StandInFactory:
    """Picklable factory of `StandInEvaluator` for Ray actors."""

    fingerprint: ModelFingerprint
    cost_s: float = 0.0
    die_on: tuple[str, ...] = ()
    fail_on: tuple[str, ...] = ()
    die_on_init: bool = False
    die_marker: str | None = None
    drift: tuple[float, ...] = ()
    noisy_every: int = 0
    started_log: str | None = None

    def __call__(self) -> StandInEvaluator:
        return StandInEvaluator(self.fingerprint, cost_s=self.cost_s, die_on=self.die_on, fail_on=self.fail_on,
                                die_on_init=self.die_on_init, die_marker=self.die_marker, drift=self.drift,
                                noisy_every=self.noisy_every, started_log=self.started_log)
