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
    method: str  # "t", "bootstrap", "binomial", "newcombe", "point" (exact) or "none" (undecidable)
    confidence: float
    why: str = ""  # for method "none": why the evidence gives no interval

    @property
    def decidable(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        if self.method == "point":
            return f"{self.estimate:.4g} (single deterministic measurement)"
        if self.method == "none":
            return f"{self.estimate:.4g} (n={self.n}: {self.why or 'too few seeds for an interval'})"
        name = METHOD_NAMES.get(self.method, self.method)
        over = "trials" if self.method in ("binomial", "newcombe") else "seeds"
        return (
            f"{self.estimate:.4g}, {self.confidence:.0%} {name} "
            f"[{self.low:.4g}, {self.high:.4g}] over n={self.n} {over}"
        )


METHOD_NAMES = {
    "t": "t-interval",
    "bootstrap": "bootstrap percentile interval",
    "binomial": "exact binomial (Clopper-Pearson) interval",
    "newcombe": "Newcombe interval of a difference of proportions",
}


def undecidable(estimate: float, n: int, why: str, confidence: float = 0.95) -> Interval:
    """No interval: the evidence cannot decide (one sample, no spread, ...)."""
    return Interval(float(estimate), -math.inf, math.inf, n, "none", confidence, why)


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
    One value gives no interval (method "none"): a single seed cannot show spread. Nor
    do identical values: a random quantity that happened to repeat exactly has an
    unknown spread, not a zero one (a quantity that is exact by construction should be
    recorded once and declared deterministic).
    """
    arr = _check(values, confidence, method)
    n = arr.size
    mean = float(arr.mean())
    if n < 2:
        return undecidable(mean, n, "too few seeds for an interval", confidence)
    if np.all(arr == arr[0]):
        return undecidable(mean, n, "identical values in every seed: no estimate of their spread", confidence)
    if method == "t":
        from scipy import stats

        half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * arr.std(ddof=1) / math.sqrt(n))
        return Interval(mean, mean - half, mean + half, n, "t", confidence)
    rng = np.random.default_rng(0)
    means = arr[rng.integers(0, n, size=(10_000, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(mean, float(low), float(high), n, "bootstrap", confidence)


def _binomial_check(successes: int, trials: int, confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    for name, x in (("successes", successes), ("trials", trials)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    if trials == 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")


def binomial_interval(successes: int, trials: int, *, confidence: float = 0.95) -> Interval:
    """Exact (Clopper-Pearson) interval for a proportion: the set of p whose binomial
    tail probabilities at the observed count are each at least (1 - confidence) / 2.
    Never zero-width: 0 of 48 gives [0, 0.074] at 95%."""
    _binomial_check(successes, trials, confidence)
    from scipy import stats

    alpha = 1 - confidence
    k, n = successes, trials
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Interval(k / n, low, high, n, "binomial", confidence)


def wilson_interval(successes: int, trials: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (the building block of Newcombe's)."""
    _binomial_check(successes, trials, confidence)
    from scipy import stats

    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    n, p = trials, successes / trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_difference(k1: int, n1: int, k2: int, n2: int, *, confidence: float = 0.95) -> Interval:
    """Interval for p1 - p2 of two independent proportions (Newcombe's hybrid score
    method, no continuity correction: Newcombe 1998, method 10)."""
    l1, u1 = wilson_interval(k1, n1, confidence=confidence)
    l2, u2 = wilson_interval(k2, n2, confidence=confidence)
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Interval(d, low, high, min(n1, n2), "newcombe", confidence)


def hull(a: Interval, b: Interval, *, within: tuple[float, float] | None = None) -> Interval:
    """The smallest interval holding both: certainty no larger than either method's.
    `within` (lo, hi): the values the quantity can take (a proportion: 0 to 1), which the
    t-interval over seeds does not know and may overshoot."""
    if not a.decidable:
        return b
    if not b.decidable:
        return a
    low, high = min(a.low, b.low), max(a.high, b.high)
    if within is not None:
        low, high = max(low, within[0]), min(high, within[1])
    return Interval(a.estimate, low, high, a.n, a.method, a.confidence)


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
