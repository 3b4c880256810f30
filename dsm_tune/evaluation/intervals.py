"""Confidence intervals of an accuracy drop, from per-image paired differences (merged vs dense, same image).

Every metric's drop is a mean over images of a per-image loss: `top1` of 100 * (dense right - merged right), which
is +100, 0 or -100; `agreement` of 100 * (merged disagrees with dense), 0 or 100; `feature` of 100 * (1 - cosine),
continuous. Pairing on the image removes the variance the two models share (most images are right or wrong for
both), which is why the interval is much narrower than two independent accuracies' would be.

Why these intervals and not a bootstrap: the bootstrap of a mean of +/-100 differences is the Wald interval in
disguise and, like it, collapses to zero width when no prediction flipped (a 0-flip study on 200 images is not
proof of no drop). The discrete metrics get the closed-form intervals made for exactly this case:
- `top1`: Agresti and Min's (2005) adjusted Wald interval for a difference of paired proportions (half an image
  added to each discordant cell), which keeps close to nominal coverage down to a handful of flips;
- `agreement`: Wilson's score interval of the disagreement proportion;
- `feature`: the normal interval of the mean (the per-image distances are bounded and n is in the hundreds).
The coverage of each is tested on a synthetic evaluator with a known flip rate (tests/test_confirmation.py).
"""

from __future__ import annotations

import dataclasses
import math

# Two-sided 95%: what the progress line, the report, the plots, MLflow and frozen configs show.
CONFIDENCE = 0.95
Z_95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class DropInterval:
    low: float
    high: float
    num_images: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "num_images": self.num_images, "confidence": CONFIDENCE}


def top1_interval(n: int, lost: int, gained: int, z: float = Z_95) -> DropInterval:
    """Drop of top-1 (points) on `n` images where `lost` were right dense and wrong merged, `gained` the reverse."""
    _check_count(n)
    b, c = lost + 0.5, gained + 0.5
    m = n + 1.0
    diff = (b - c) / m
    variance = ((b + c) / m - diff * diff) / m
    half = z * math.sqrt(max(variance, 0.0))
    return DropInterval(100.0 * max(diff - half, -1.0), 100.0 * min(diff + half, 1.0), n)


def agreement_interval(n: int, disagreed: int, z: float = Z_95) -> DropInterval:
    """Drop of agreement (points) = 100 * the disagreement proportion, Wilson score interval."""
    _check_count(n)
    p = disagreed / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return DropInterval(100.0 * max(centre - half, 0.0), 100.0 * min(centre + half, 1.0), n)


def mean_interval(n: int, loss_sum: float, loss_sq_sum: float, z: float = Z_95) -> DropInterval:
    """Normal interval of the mean per-image loss (points), from its running sums."""
    _check_count(n)
    mean = loss_sum / n
    variance = max(loss_sq_sum / n - mean * mean, 0.0) * n / max(n - 1, 1)
    half = z * math.sqrt(variance / n)
    return DropInterval(mean - half, mean + half, n)


def _check_count(n: int) -> None:
    if n <= 0:
        raise ValueError(f"an interval needs at least one image, got {n}")
