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

from lab.report.intervals import (
    INTERVAL_METHODS,
    Interval,
    binomial_interval,
    hull,
    mean_interval,
    point,
    proportion_difference,
    undecidable,
)

CONFIRMED, REFUTED, INCONCLUSIVE = "confirmed", "refuted", "inconclusive"
CHECK = "check"  # a hypothesis whose only predictions are checks, all holding
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

    def bounds(self) -> dict[str, str]:
        """The expectation's numbers, for `{low}`, `{high}` and `{bound}` in the text: a
        text built from them cannot drift from what is judged."""
        e = self.expect
        out = {k: f"{v:g}" for k, v in (("low", e.low), ("high", e.high)) if v is not None}
        if len(out) == 1:
            out["bound"] = next(iter(out.values()))
        return out

    def render(self, params: Mapping[str, object]) -> Prediction:
        """Fill `{name}` placeholders in the text from the test's parameters, and
        `{low}` / `{high}` / `{bound}` from the expectation."""
        try:
            text = self.text.format(**{**self.bounds(), **params})
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


@dataclass(frozen=True)
class Evidence:
    """What a test recorded, as the verdict needs it: {metric: {seed or None: value}},
    the metrics declared exact (deterministic) and, for fractions, {metric: {seed:
    (successes, trials)}}."""

    measurements: Mapping[str, Mapping[int | None, float]]
    deterministic: frozenset[str] = frozenset()
    trials: Mapping[str, Mapping[int | None, tuple[int, int]]] = field(default_factory=dict)

    def seeded(self, metric: str) -> dict[int, float]:
        return {k: v for k, v in self.measurements[metric].items() if k is not None}

    def unseeded(self, metric: str) -> float | None:
        return self.measurements[metric].get(None)

    def is_exact(self, metric: str) -> bool:
        return metric in self.deterministic and None in self.measurements[metric]


def _evidence(measurements, deterministic, trials) -> Evidence:
    if isinstance(measurements, Evidence):
        return measurements
    return Evidence(measurements, frozenset(deterministic or ()), trials or {})


def _pooled(trials: Mapping[int | None, tuple[int, int]]) -> tuple[int, int]:
    return sum(k for k, _ in trials.values()), sum(n for _, n in trials.values())


def interval_for(ev: Evidence, metric: str, prediction: Prediction) -> tuple[Interval, str]:
    """Interval for one metric, and a sentence on how it was computed.

    - declared deterministic, recorded once: the value is its own interval;
    - recorded once without a seed and not declared: one sample of a random quantity,
      no interval;
    - a fraction (record_fraction): exact binomial interval over all trials pooled
      across seeds, widened to the t-interval over seeds where that is wider;
    - otherwise the prediction's interval (t or bootstrap) over seeds.
    """
    conf = prediction.confidence
    samples = ev.measurements[metric]
    values = list(ev.seeded(metric).values())
    if metric in ev.trials:
        k, n = _pooled(ev.trials[metric])
        exact = binomial_interval(k, n, confidence=conf)
        if len(values) < 2:
            return exact, f"{metric}: {k}/{n} trials"
        over_seeds = mean_interval(values, method=prediction.interval, confidence=conf)
        return hull(exact, over_seeds, within=(0.0, 1.0)), f"{metric}: {k}/{n} pooled, widened to the spread over seeds"
    if list(samples) == [None]:
        value = samples[None]
        if ev.is_exact(metric):
            return point(value), ""
        return undecidable(value, 1, "one unseeded sample of a random quantity", conf), ""
    return mean_interval(values, method=prediction.interval, confidence=conf), ""


def _difference(ev: Evidence, metric: str, other: str, prediction: Prediction) -> tuple[Interval, str]:
    """Interval of metric - other."""
    conf = prediction.confidence
    a, b = ev.measurements[metric], ev.measurements[other]
    if metric in ev.trials and other in ev.trials:
        k1, n1 = _pooled(ev.trials[metric])
        k2, n2 = _pooled(ev.trials[other])
        iv = proportion_difference(k1, n1, k2, n2, confidence=conf)
        detail = f"difference of proportions {metric} - {other} ({k1}/{n1} vs {k2}/{n2})"
        if set(a) == set(b) and None not in a and len(a) >= 2:
            paired = mean_interval([a[s] - b[s] for s in a], method=prediction.interval, confidence=conf)
            return hull(iv, paired, within=(-1.0, 1.0)), detail + ", widened to the paired spread over seeds"
        return iv, detail
    a_exact, b_exact = ev.is_exact(metric), ev.is_exact(other)
    if None in a and None in b:
        if a_exact and b_exact:
            return point(a[None] - b[None]), f"{metric} - {other}, both exact"
        return undecidable(a[None] - b[None], 1, "one unseeded sample on each side", conf), ""
    if None in b or None in a:
        if not (b_exact if None in b else a_exact):
            single = other if None in b else metric
            est = _mean(a) - _mean(b)
            return undecidable(est, 1, f"{single} is one unseeded sample of a random quantity", conf), ""
        if None in b:
            diffs = [v - b[None] for v in a.values()]
            detail = f"interval of {metric} - {other} ({other} is one exact value)"
        else:
            diffs = [a[None] - v for v in b.values()]
            detail = f"interval of {metric} - {other} ({metric} is one exact value)"
        return mean_interval(diffs, method=prediction.interval, confidence=conf), detail
    if set(a) == set(b):
        diffs = [a[s] - b[s] for s in a]
        iv = mean_interval(diffs, method=prediction.interval, confidence=conf)
        return iv, f"paired by seed: interval of {metric} - {other}"
    return _welch(
        list(a.values()), list(b.values()), conf
    ), f"unpaired Welch interval of mean({metric}) - mean({other})"


def _mean(samples: Mapping) -> float:
    return sum(samples.values()) / len(samples)


def _welch(a: list[float], b: list[float], confidence: float) -> Interval:
    diff = sum(a) / len(a) - sum(b) / len(b)
    n = min(len(a), len(b))
    if n < 2:
        return undecidable(diff, n, "too few seeds on one side for an interval", confidence)
    if len(set(a)) == 1 and len(set(b)) == 1:
        return undecidable(diff, n, "identical values in every seed on both sides: no estimate of spread", confidence)
    from scipy import stats

    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return Interval(diff, float(ci.low), float(ci.high), n, "t", confidence)


def judge(
    prediction: Prediction,
    measurements: Mapping[str, Mapping[int | None, float]] | Evidence,
    *,
    deterministic: frozenset[str] | set[str] = frozenset(),
    trials: Mapping[str, Mapping[int | None, tuple[int, int]]] | None = None,
) -> Judgement:
    """Decide one prediction from the recorded measurements {metric: {seed: value}}."""
    ev = _evidence(measurements, deterministic, trials)
    metric, other = prediction.metric, prediction.expect.other
    missing = [m for m in (metric, other) if m and m not in ev.measurements]
    if missing:
        raise LookupError(
            f"prediction {prediction.text!r} names metric(s) {missing} that the test never "
            f"recorded; recorded metrics: {sorted(ev.measurements) or 'none'}"
        )
    if other is None:
        interval, detail = interval_for(ev, metric, prediction)
    else:
        interval, detail = _difference(ev, metric, other, prediction)
    if interval.method == "none":
        detail = "; ".join(d for d in (detail, f"undecided: {interval.why}") if d)
    return Judgement(prediction, prediction.expect.judge(interval), interval, detail)


def invalidate(j: Judgement, failed: list[str]) -> Judgement:
    """The same judgement, with verdict *invalid* because a validity check failed."""
    why = "invalid: " + "; ".join(failed)
    return Judgement(j.prediction, INVALID, j.interval, "; ".join(d for d in (j.detail, why) if d), j.extra)


def combine(verdicts: list[str]) -> str:
    """One verdict for a hypothesis with several predictions: invalid if any is (the
    experiment did not work), else refuted if any is, confirmed if all are,
    inconclusive otherwise (also for no predictions at all)."""
    if not verdicts:
        return INCONCLUSIVE
    if INVALID in verdicts:
        return INVALID
    if REFUTED in verdicts:
        return REFUTED
    if all(v == CONFIRMED for v in verdicts):
        return CONFIRMED
    return INCONCLUSIVE
