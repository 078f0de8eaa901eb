"""The comparison's statistics: a mean with its Student-t confidence interval over seeds, and the paired difference.

With n seeds the interval is `mean +- t_{(1 + level) / 2, n - 1} * s / sqrt(n)`, `s` the sample standard deviation
(n - 1 in the denominator). The paired difference of a method to the reference pipeline takes, seed by seed, the
method's score minus the reference's on the same seed (same data order, same evaluation), and reports the same
interval over those differences: it removes the seed-to-seed variation both share, so it is the interval to read
when asking "does this method beat two-stage SFT->RL?".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """A mean over `n` values with its confidence interval (`low`, `high`; NaN when `n < 2`) and standard deviation."""

    mean: float
    low: float
    high: float
    std: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (a significant difference at its level)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def t_quantile(probability: float, dof: int) -> float:
    """The Student-t quantile (scipy's `t.ppf`)."""
    try:
        from scipy.stats import t
    except ImportError as error:
        raise ImportError(
            "amft_trl.compare needs scipy for its confidence intervals: pip install 'amft-trl[compare]'."
        ) from error

    return float(t.ppf(probability, dof))


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and two-sided `level` Student-t confidence interval of `values` (one value per seed)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, float("nan"), float("nan"), float("nan"), 1)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, std, n)


def paired_difference(
    method: Mapping[int, float], reference: Mapping[int, float], level: float = 0.95
) -> Interval:
    """Mean and interval of `method[seed] - reference[seed]` over the seeds both have."""
    seeds = sorted(set(method) & set(reference))
    return mean_interval([method[s] - reference[s] for s in seeds], level)
