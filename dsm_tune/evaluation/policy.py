"""When timing a config is wasted: the one decision the traced proposer and the evaluator share.

The proposer builds the policy from its latency model's prediction and the timed front so far; the evaluator
applies it once the accuracy is known. Both read the same optimistic speedup, so the screen's bar and the skip
cannot disagree. Picklable (it travels to Ray workers) and light: standard library only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class TimingPolicy:
    """max_drop: the study's limit; front: (drop, speedup) of the feasible timed trials so far; predicted_speedup:
    the latency model's prediction for this config (None: only the limit applies); margin: how much better than
    predicted (relative) the config may still turn out."""

    max_drop: float
    front: tuple[tuple[float, float], ...] = ()
    predicted_speedup: float | None = None
    margin: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "front", tuple((float(d), float(s)) for d, s in self.front))

    @classmethod
    def for_prediction(cls, max_drop: float, front: Iterable[tuple[float, float]], predicted_speedup: float,
                       rel_error: float, min_margin: float) -> "TimingPolicy":
        """A policy whose margin is twice the model's relative error, at least `min_margin`."""
        return cls(max_drop, tuple(front), predicted_speedup, max(2.0 * rel_error, min_margin))

    @classmethod
    def of(cls, value: "TimingPolicy | Mapping[str, Any] | None") -> "TimingPolicy | None":
        """A policy from itself, None, or its dict form ({"max_drop", "front", "predicted_speedup", "margin"})."""
        if value is None or isinstance(value, TimingPolicy):
            return value
        if not value:
            return None
        return cls(value["max_drop"], tuple(value.get("front", ())), value.get("predicted_speedup"),
                   value.get("margin", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "front": [list(point) for point in self.front]}

    def optimistic_speedup(self) -> float | None:
        """The best speedup the config can plausibly reach; None without a prediction."""
        if self.predicted_speedup is None:
            return None
        return self.predicted_speedup * (1.0 + self.margin)

    def screen_drop(self) -> float:
        """The bar of the accuracy screen: the limit or, lower, the drop of a timed point at least as fast as this
        config can be (scoring every image only pays when the config could enter the front)."""
        optimistic = self.optimistic_speedup()
        if optimistic is None:
            return self.max_drop
        return min([self.max_drop] + [drop for drop, speedup in self.front if speedup >= optimistic])

    def skip_reason(self, accuracy: Any) -> str | None:
        """Why timing the config measured as `accuracy` (an AccuracyResult) would be wasted, or None to time it.

        A config over the limit cannot enter the feasible front; one whose optimistic speedup is matched by a timed
        point at no larger drop cannot either."""
        if accuracy is None:
            return None
        drop = accuracy.drop
        if accuracy.extra.get("screened"):
            # The partial drop itself may well be within the limit, so the reason names the bar it cleared.
            bar = accuracy.extra.get("screen_drop", self.max_drop)
            return (f"screened out on {accuracy.num_images} images: drop {drop:.3f} is surely above {bar:.3f} (the "
                    f"limit, or the drop of a timed config faster than this one can be)")
        if accuracy.aborted or drop > self.max_drop:
            return f"accuracy drop {drop:.3f} is over the limit {self.max_drop:g}"
        optimistic = self.optimistic_speedup()
        if optimistic is None:
            return None
        for front_drop, front_speedup in self.front:
            if front_drop <= drop and front_speedup >= optimistic:
                return (f"predicted {self.predicted_speedup:.3f}x (+{self.margin:.0%}) is dominated by a timed "
                        f"{front_speedup:.3f}x at drop {front_drop:.3f}")
        return None
