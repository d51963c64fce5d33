"""Predictions, expectations and the verdict rule.

A prediction names a metric the test records and what we expect of it. The verdict
is decided from an interval over seeds: *confirmed* only if the whole interval
satisfies the expectation, *refuted* only if the whole interval violates it,
*inconclusive* otherwise (or when there are too few seeds for an interval).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lab.report.intervals import INTERVAL_METHODS, Interval, mean_interval, point

CONFIRMED, REFUTED, INCONCLUSIVE = "confirmed", "refuted", "inconclusive"
INVALID = "invalid"  # a precondition of the experiment failed: no verdict on the claim
VERDICTS = (CONFIRMED, REFUTED, INCONCLUSIVE)
KINDS = ("prediction", "check")


@dataclass(frozen=True)
class Expectation:
    """What a metric is expected to do. Build with at_least / at_most / between /
    greater_than / less_than rather than directly."""

    kind: str
    low: float | None = None
    high: float | None = None
    other: str | None = None  # compare against another recorded metric

    def describe(self, metric: str) -> str:
        if self.other is not None:
            op = ">" if self.kind == "greater_than" else "<"
            return f"{metric} {op} {self.other}"
        if self.kind == "between":
            return f"{self.low:g} <= {metric} <= {self.high:g}"
        if self.kind in ("at_least", "greater_than"):
            op = ">=" if self.kind == "at_least" else ">"
            return f"{metric} {op} {self.low:g}"
        op = "<=" if self.kind == "at_most" else "<"
        return f"{metric} {op} {self.high:g}"

    def judge(self, interval: Interval) -> str:
        """Verdict for an interval of the metric (or of metric - other for comparisons)."""
        if not interval.decidable:
            return INCONCLUSIVE
        lo, hi = interval.low, interval.high
        if self.other is not None:  # interval is of the difference metric - other
            a, b = (0.0, math.inf) if self.kind == "greater_than" else (-math.inf, 0.0)
            strict = True
        else:
            a = self.low if self.low is not None else -math.inf
            b = self.high if self.high is not None else math.inf
            strict = self.kind in ("greater_than", "less_than")
        if strict:
            inside = (lo > a or a == -math.inf) and (hi < b or b == math.inf)
            outside = hi <= a or lo >= b
        else:
            inside = lo >= a and hi <= b
            outside = hi < a or lo > b
        if inside:
            return CONFIRMED
        if outside:
            return REFUTED
        return INCONCLUSIVE

    def to_dict(self) -> dict:
        return {"kind": self.kind, "low": self.low, "high": self.high, "other": self.other}


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def at_least(value: float) -> Expectation:
    return Expectation("at_least", low=_number(value, "at_least bound"))


def at_most(value: float) -> Expectation:
    return Expectation("at_most", high=_number(value, "at_most bound"))


def between(low: float, high: float) -> Expectation:
    lo, hi = _number(low, "between low"), _number(high, "between high")
    if lo > hi:
        raise ValueError(f"between: low {lo} is above high {hi}")
    return Expectation("between", low=lo, high=hi)


def greater_than(value_or_metric: float | str) -> Expectation:
    """Strictly above a number, or above another recorded metric (paired by seed)."""
    if isinstance(value_or_metric, str):
        return Expectation("greater_than", other=value_or_metric)
    return Expectation("greater_than", low=_number(value_or_metric, "greater_than bound"))


def less_than(value_or_metric: float | str) -> Expectation:
    """Strictly below a number, or below another recorded metric (paired by seed)."""
    if isinstance(value_or_metric, str):
        return Expectation("less_than", other=value_or_metric)
    return Expectation("less_than", high=_number(value_or_metric, "less_than bound"))


@dataclass(frozen=True)
class Prediction:
    text: str
    metric: str
    expect: Expectation
    interval: str = "t"
    confidence: float = 0.95
    kind: str = "prediction"  # or "check": an invariant true by construction, not a finding

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"prediction text must be a non-empty string, got {self.text!r}")
        if not isinstance(self.metric, str) or not self.metric.strip():
            raise ValueError(f"prediction metric must be a non-empty string, got {self.metric!r}")
        if not isinstance(self.expect, Expectation):
            raise ValueError(
                f"expect must be built with at_least/at_most/between/greater_than/less_than, got {self.expect!r}"
            )
        if self.interval not in INTERVAL_METHODS:
            raise ValueError(f"interval must be one of {INTERVAL_METHODS}, got {self.interval!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def render(self, params: Mapping[str, object]) -> Prediction:
        """Fill `{name}` placeholders in the text from the test's parameters."""
        try:
            text = self.text.format(**params)
        except (KeyError, IndexError) as exc:
            raise ValueError(
                f"prediction text {self.text!r} names a parameter {exc} the test does not have "
                f"(parameters: {sorted(params)})"
            ) from None
        return Prediction(text, self.metric, self.expect, self.interval, self.confidence, self.kind)

    @property
    def claim(self) -> str:
        return self.expect.describe(self.metric)

    def fingerprint(self) -> str:
        payload = json.dumps(
            {"text": self.text, "metric": self.metric, "expect": self.expect.to_dict()},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Judgement:
    prediction: Prediction
    verdict: str
    interval: Interval
    detail: str = ""
    extra: dict = field(default_factory=dict)


def interval_for(samples: Mapping[int | None, float], prediction: Prediction) -> Interval:
    """Interval for one metric's samples: keyed by seed, or by None for one exact value."""
    if list(samples) == [None]:
        return point(samples[None])
    values = [v for k, v in samples.items() if k is not None]
    return mean_interval(values, method=prediction.interval, confidence=prediction.confidence)


def judge(prediction: Prediction, measurements: Mapping[str, Mapping[int | None, float]]) -> Judgement:
    """Decide one prediction from the recorded measurements {metric: {seed: value}}."""
    metric = prediction.metric
    missing = [m for m in (metric, prediction.expect.other) if m and m not in measurements]
    if missing:
        raise LookupError(
            f"prediction {prediction.text!r} names metric(s) {missing} that the test never "
            f"recorded; recorded metrics: {sorted(measurements) or 'none'}"
        )
    samples = measurements[metric]
    other = prediction.expect.other
    if other is None:
        interval = interval_for(samples, prediction)
        return Judgement(prediction, prediction.expect.judge(interval), interval)
    other_samples = measurements[other]
    seeds, other_seeds = set(samples), set(other_samples)
    if seeds == other_seeds and None not in seeds:
        diffs = {s: samples[s] - other_samples[s] for s in samples}
        interval = interval_for(diffs, prediction)
        detail = f"paired by seed: interval of {metric} - {other}"
    elif None in other_seeds and len(other_seeds) == 1:
        shift = other_samples[None]
        diffs = {s: v - shift for s, v in samples.items()}
        interval = interval_for(diffs, prediction)
        detail = f"interval of {metric} - {other} ({other} is one exact value)"
    else:
        # unpaired: Welch-style interval via the difference of independent means
        from scipy import stats

        a = [v for k, v in samples.items() if k is not None] or list(samples.values())
        b = [v for k, v in other_samples.items() if k is not None] or list(other_samples.values())
        diff = sum(a) / len(a) - sum(b) / len(b)
        if len(a) < 2 or len(b) < 2:
            interval = Interval(diff, -math.inf, math.inf, min(len(a), len(b)), "none", prediction.confidence)
        else:
            res = stats.ttest_ind(a, b, equal_var=False)
            ci = res.confidence_interval(prediction.confidence)
            interval = Interval(diff, float(ci.low), float(ci.high), min(len(a), len(b)), "t", prediction.confidence)
        detail = f"unpaired Welch interval of mean({metric}) - mean({other})"
    return Judgement(prediction, prediction.expect.judge(interval), interval, detail)


def combine(verdicts: list[str]) -> str:
    """One verdict for a hypothesis with several predictions: refuted if any is,
    confirmed if all are, inconclusive otherwise."""
    if not verdicts:
        return INCONCLUSIVE
    if REFUTED in verdicts:
        return REFUTED
    if all(v == CONFIRMED for v in verdicts):
        return CONFIRMED
    return INCONCLUSIVE
