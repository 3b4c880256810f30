"""The study's progress line: trials done/total, feasible count, Pareto size, best speedup within the drop limit
and its latency under the study's dense reference, ETA. Rewritten in place on a terminal; one plain line per
finished trial otherwise (logs, CI, pipes).

Points are kept by speedup, not latency: a latency is the dense reference (which moves as trials come in) over the
speedup, so the front and the best point follow the reference the line shows. A noisy speedup is counted as
feasible but is no front point, as in `results.pareto_numbers`."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from dsm_tune.search.results import front


@dataclass
class _Point:
    number: int
    drop: float
    speedup: float
    drop_interval: tuple[float, float] | None = None   # 95% paired interval of the drop on the search images


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass
class Progress:
    """Counts what the driver tells it; `render` gives the line, `update` prints it when due."""

    total: int
    max_drop: float
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    live: bool | None = None
    min_interval_s: float = 0.5
    done: int = 0
    failed: int = 0
    running: int = 0
    feasible: int = 0
    reference_ms: float | None = None     # the study's dense reference (`reference.DenseReference`)
    # Kept as points come in, so a trial costs the same late in a study as early: a point off the front stays off
    # it whatever comes later (dominance is transitive), so the front is all `results.front` needs to see.
    _front: list[_Point] = field(default_factory=list)
    _best: _Point | None = None
    _session_done: int = 0
    _session_start: float = field(default_factory=time.monotonic)
    _last_draw: float = 0.0
    _drawn_width: int = 0

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def record(self, state: str, drop: float | None = None, latency: float | None = None,
               speedup: float | None = None, number: int = -1, earlier: bool = False, noisy: bool = False,
               drop_interval: tuple[float | None, float | None] | None = None) -> None:
        """One finished trial; `earlier` ones (from before a resume) do not count towards this session's pace."""
        if state == "FAIL":
            self.failed += 1
            return
        self.done += 1
        if not earlier:
            self._session_done += 1
        finite = all(v is not None and math.isfinite(v) for v in (drop, latency))
        if finite and drop <= self.max_drop:
            self.feasible += 1
            if state == "COMPLETE" and not noisy and speedup is not None and speedup > 0:
                known = drop_interval is not None and all(
                    v is not None and math.isfinite(v) for v in drop_interval)
                self._add_point(_Point(number, drop, speedup, tuple(drop_interval) if known else None))

    def _add_point(self, point: _Point) -> None:
        if math.isfinite(point.speedup) and (self._best is None or point.speedup > self._best.speedup):
            self._best = point
        # 1 / speedup orders the points as reference / speedup (the latency) does, whatever the reference.
        candidates = [*self._front, point]
        kept = set(front((1.0 / p.speedup, p.drop, p.number) for p in candidates))
        self._front = [p for p in candidates if p.number in kept]

    @property
    def pareto_size(self) -> int:
        return len(self._front)

    @property
    def best_speedup(self) -> float | None:
        return self._best.speedup if self._best is not None else None

    @property
    def best_point(self) -> _Point | None:
        return self._best

    @property
    def best_latency_ms(self) -> float | None:
        best = self.best_speedup
        if best is None or self.reference_ms is None:
            return None
        return round(self.reference_ms / best, 6)

    def eta_seconds(self) -> float:
        remaining = max(self.total - self.done, 0)
        if remaining == 0:
            return 0.0
        if self._session_done == 0:
            return math.inf
        pace = (time.monotonic() - self._session_start) / self._session_done
        return pace * remaining

    def render(self) -> str:
        best, latency = self.best_speedup, self.best_latency_ms
        best_text = f"{best:.2f}x" if best is not None else "-"
        if latency is not None:
            best_text += f" ({latency:.4g} ms)"
        point = self.best_point
        if point is not None:
            # The drop behind the best speedup, with its interval: a point estimate alone hides how close to the
            # limit it may really be.
            best_text += f" drop {point.drop:.2f}" + (
                f" [{point.drop_interval[0]:.2f}, {point.drop_interval[1]:.2f}]" if point.drop_interval else "")
        parts = [
            f"trials {self.done}/{self.total}",
            f"running {self.running}",
            f"feasible {self.feasible}",
            f"pareto {self.pareto_size}",
            f"best speedup @drop<={self.max_drop:g}: {best_text}",
            f"ETA {format_duration(self.eta_seconds())}",
        ]
        if self.reference_ms is not None:
            parts.insert(-1, f"dense {self.reference_ms:.4g} ms")
        if self.failed:
            parts.insert(2, f"failed {self.failed}")
        return " | ".join(parts)

    def update(self, force: bool = False) -> None:
        """Redraw the live line (rate-limited); plain mode prints only when forced (after each trial)."""
        now = time.monotonic()
        if self.live:
            if not force and now - self._last_draw < self.min_interval_s:
                return
            line = self.render()
            padding = max(self._drawn_width - len(line), 0)
            self.stream.write("\r" + line + " " * padding)
            self.stream.flush()
            self._drawn_width = len(line)
        elif force:
            self.stream.write(self.render() + "\n")
            self.stream.flush()
        self._last_draw = now

    def message(self, text: str) -> None:
        """A line of its own that does not garble the live line."""
        if self.live and self._drawn_width:
            self.stream.write("\r" + " " * self._drawn_width + "\r")
            self._drawn_width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self._drawn_width:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_width = 0
