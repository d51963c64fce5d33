"""Intervals over seeds, the evidence every verdict rests on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

INTERVAL_METHODS = ("t", "bootstrap")


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int
    method: str  # "t", "bootstrap", "point" (one exact measurement) or "none" (too few seeds)
    confidence: float

    @property
    def decidable(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        if self.method == "point":
            return f"{self.estimate:.4g} (single deterministic measurement)"
        if self.method == "none":
            return f"{self.estimate:.4g} (n={self.n}: too few seeds for an interval)"
        name = "t-interval" if self.method == "t" else "bootstrap percentile interval"
        return (
            f"{self.estimate:.4g}, {self.confidence:.0%} {name} [{self.low:.4g}, {self.high:.4g}] over n={self.n} seeds"
        )


def _check(values: Sequence[float], confidence: float, method: str) -> np.ndarray:
    if method not in INTERVAL_METHODS:
        raise ValueError(f"unknown interval method {method!r}; expected one of {INTERVAL_METHODS}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of values, got {values!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"values must be finite, got {arr.tolist()}")
    return arr


def mean_interval(values: Sequence[float], *, method: str = "t", confidence: float = 0.95) -> Interval:
    """Interval for the mean of per-seed values.

    `t`: Student-t interval, mean +- t_{(1+c)/2, n-1} * s / sqrt(n).
    `bootstrap`: percentile interval of 10,000 resampled means (fixed resampling seed,
    so the same values always give the same interval).
    One value gives no interval (method "none"): a single seed cannot show spread.
    """
    arr = _check(values, confidence, method)
    n = arr.size
    mean = float(arr.mean())
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n, "none", confidence)
    if method == "t":
        from scipy import stats

        half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * arr.std(ddof=1) / math.sqrt(n))
        return Interval(mean, mean - half, mean + half, n, "t", confidence)
    rng = np.random.default_rng(0)
    means = arr[rng.integers(0, n, size=(10_000, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(mean, float(low), float(high), n, "bootstrap", confidence)


def point(value: float) -> Interval:
    """A single deterministic measurement: its own interval."""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"value must be finite, got {value!r}")
    return Interval(v, v, v, 1, "point", 1.0)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks)."""
    from scipy import stats

    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    return float(stats.spearmanr(x, y).statistic)
