"""Front arithmetic the search benchmarks share: points are (accuracy drop in points, relative latency = 1/speedup),
both minimised; the region of interest is drop <= the limit and latency <= dense (relative latency <= 1)."""

from __future__ import annotations

import math
from pathlib import Path


def hypervolume(points: list[tuple[float, float]], max_drop: float) -> float:
    """Area dominated by `points` within [0, max_drop] x [0, 1]. Larger is better; 0 means nothing useful."""
    inside = sorted((max(d, 0.0), r) for d, r in points if d <= max_drop and r < 1.0)
    area, best_latency = 0.0, 1.0
    for index, (drop, latency) in enumerate(inside):
        best_latency = min(best_latency, latency)
        next_drop = inside[index + 1][0] if index + 1 < len(inside) else max_drop
        area += (next_drop - drop) * (1.0 - best_latency)
    return area


def front_latency_at(points: list[tuple[float, float]], drop: float) -> float:
    """Best relative latency among points with at most `drop` accuracy drop (1.0 = dense, inf = none)."""
    latencies = [r for d, r in points if d <= drop + 1e-9]
    return min(latencies) if latencies else math.inf


def best_speedup_within(points: list[tuple[float, float]], drop: float) -> float:
    """Fastest speedup with at most `drop` accuracy drop (1.0 when nothing beats dense)."""
    latency = front_latency_at(points, drop)
    return 1.0 / latency if math.isfinite(latency) and latency < 1.0 else 1.0


def as_fast_at(points: list[tuple[float, float]], reference: list[tuple[float, float]],
               max_drop: float) -> tuple[int, int]:
    """At how many feasible `reference` points is the front of `points` as fast or faster at that drop."""
    feasible = [(d, r) for d, r in reference if d <= max_drop]
    return sum(front_latency_at(points, d) <= r for d, r in feasible), len(feasible)


def study_points(study_dir: Path) -> list[tuple[float, float]]:
    """(drop, 1/speedup) of every timed trial of a dsm-tune study (duplicates count once)."""
    from dsm_tune.search.results import load_study

    points = []
    for trial in load_study(study_dir).get_trials():
        attrs = trial.user_attrs
        if trial.state.name != "COMPLETE" or not attrs.get("speedup") or "duplicate_of" in attrs:
            continue
        points.append((float(attrs["accuracy_drop"]), 1.0 / float(attrs["speedup"])))
    return points
