"""The study's one dense reference latency, and every trial's latency figures derived from it.

Every trial times the dense model again, interleaved with the merged one; the pair gives its speedup, which machine
drift between trials (other jobs, thermal state) does not move. A trial's latency is then the study's dense
reference over that speedup. The reference is the median of the dense timings of all finished trials, so a single
timing taken under load cannot shift every figure; it is recomputed whenever the study is read, so trials told
under an earlier reference follow the current one.

Figures of a trial as every surface shows them (trials.csv, `report`, the plots, best.json, MLflow at the end):
- `baseline_latency_ms`: the study's dense reference;
- `latency_ms`: `baseline_latency_ms / speedup`;
- `baseline_measured_ms`, `latency_measured_ms`: the trial's own interleaved dense and merged medians (raw).
Studies told before the reference existed hold the raw dense median in `baseline_latency_ms` and no
`baseline_measured_ms`; `trial_dense_ms` reads both layouts.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from dsm_tune.record import (
    BASELINE, BASELINE_LATENCY_MS, BASELINE_MEASURED_MS, DUPLICATE_OF, LATENCY_MEASURED_MS, LATENCY_MS,
    REFERENCE_ATTR, SPEEDUP,
)
from dsm_tune.search.text import is_finite_number

__all__ = ["REFERENCE_ATTR", "MEASURED_STATES", "DenseReference", "finite_positive",
           "study_reference", "trial_dense_ms", "truthy"]

MEASURED_STATES = ("COMPLETE", "PRUNED")  # the trials whose dense timing counts


def finite_positive(value: Any) -> bool:
    return is_finite_number(value) and value > 0


def truthy(value: Any) -> bool:
    """A boolean attr as stored (bool) or read back from trials.csv ("True"/"1")."""
    return str(value).strip().lower() in ("true", "1", "1.0")


def trial_dense_ms(attrs: Mapping[str, Any]) -> float | None:
    """The trial's own dense median, or None when it timed nothing or copied another trial's timing."""
    if attrs.get(DUPLICATE_OF) is not None:
        return None
    value = attrs.get(BASELINE_MEASURED_MS, attrs.get(BASELINE_LATENCY_MS))
    return float(value) if finite_positive(value) else None


@dataclass(frozen=True)
class DenseReference:
    latency_ms: float | None       # None: nothing timed the dense model yet
    timings: int                   # dense timings the median is over (0: the study's first timing stood in)
    first_ms: float | None         # the study's first dense timing (study attr `baseline`), for the record

    @classmethod
    def of(cls, timings: Iterable[float], first_ms: Any = None) -> "DenseReference":
        values = [float(v) for v in timings if finite_positive(v)]
        first = float(first_ms) if finite_positive(first_ms) else None
        median = round(statistics.median(values), 6) if values else first
        return cls(median, len(values), first)

    def describe(self) -> str:
        if self.latency_ms is None:
            return "no dense timing yet"
        source = (f"median of {self.timings} dense timing(s), one per trial" if self.timings
                  else "the first dense timing")
        return f"{self.latency_ms:.4g} ms per batch ({source})"

    def to_attr(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "timings": self.timings, "first_ms": self.first_ms}

    def figures(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """`attrs` (a trial's user attrs or an evaluator's result) with its latency figures under this reference:
        raw medians kept as `*_measured_ms`, `baseline_latency_ms` = the reference, `latency_ms` = reference /
        speedup. A trial without a speedup (not timed) keeps what it has."""
        out = dict(attrs)
        speedup = attrs.get(SPEEDUP)
        if not finite_positive(speedup) or self.latency_ms is None:
            return out
        if LATENCY_MEASURED_MS not in out:
            out[LATENCY_MEASURED_MS] = attrs.get(LATENCY_MS)
        if BASELINE_MEASURED_MS not in out:
            out[BASELINE_MEASURED_MS] = attrs.get(BASELINE_LATENCY_MS)
        out[BASELINE_LATENCY_MS] = self.latency_ms
        out[LATENCY_MS] = round(self.latency_ms / float(speedup), 6)
        return out


def study_reference(study: Any) -> DenseReference:
    """The current dense reference of an Optuna study of dsm-tune (read-only)."""
    timings = [trial_dense_ms(t.user_attrs) for t in study.get_trials(deepcopy=False)
               if t.state.name in MEASURED_STATES]
    return DenseReference.of([t for t in timings if t is not None], first_dense_ms(study.user_attrs))


def first_dense_ms(study_attrs: Mapping[str, Any]) -> float | None:
    """The evaluator's first dense timing (the study's `baseline` record): the reference before any trial."""
    return (study_attrs.get(BASELINE) or {}).get("latency_ms")
