"""The verdict engine against an independent computation, case by case.

Every row of the boundary table states an interval (or the samples behind one), an
expectation and the verdict the rule in docs/guide/reading-verdicts.md gives. Intervals
are checked against scipy / numpy computed here, not against the engine's own helpers.
"""

import math

import numpy as np
import pytest
from scipy import stats

from lab.report.intervals import (
    Interval,
    binomial_interval,
    hull,
    mean_interval,
    point,
    proportion_difference,
    undecidable,
    wilson_interval,
)
from lab.report.predictions import (
    CONFIRMED,
    INCONCLUSIVE,
    INVALID,
    REFUTED,
    Evidence,
    Prediction,
    at_least,
    at_most,
    between,
    combine,
    greater_than,
    invalidate,
    judge,
    less_than,
)


def iv(low, high, estimate=None):
    est = (low + high) / 2 if estimate is None else estimate
    return Interval(est, low, high, 3, "t", 0.95)


# -- Expectation.judge: the whole interval decides ------------------------------------

BOUNDARY = [
    # (expectation, low, high, verdict)
    # inclusive bounds: equality at the bound satisfies
    (at_least(1), 1.0, 1.0, CONFIRMED),
    (at_least(1), 1.0, 2.0, CONFIRMED),
    (at_least(1), 0.5, 1.0, INCONCLUSIVE),
    (at_least(1), 0.5, 0.999, REFUTED),
    (at_least(1), 0.999, 1.5, INCONCLUSIVE),
    (at_most(1), 1.0, 1.0, CONFIRMED),
    (at_most(1), 0.0, 1.0, CONFIRMED),
    (at_most(1), 1.0, 2.0, INCONCLUSIVE),
    (at_most(1), 1.001, 2.0, REFUTED),
    (between(0, 1), 0.0, 1.0, CONFIRMED),
    (between(0, 1), -0.001, 0.5, INCONCLUSIVE),
    (between(0, 1), 0.5, 1.001, INCONCLUSIVE),
    (between(0, 1), 1.001, 2.0, REFUTED),
    (between(0, 1), -2.0, -0.001, REFUTED),
    (between(1, 1), 1.0, 1.0, CONFIRMED),
    (between(0, 1), -1.0, 2.0, INCONCLUSIVE),
    # strict bounds: equality at the bound violates
    (greater_than(1), 1.0, 1.0, REFUTED),
    (greater_than(1), 1.0, 2.0, INCONCLUSIVE),
    (greater_than(1), 1.001, 2.0, CONFIRMED),
    (greater_than(1), 0.0, 1.0, REFUTED),
    (greater_than(1), 0.0, 1.001, INCONCLUSIVE),
    (less_than(1), 1.0, 1.0, REFUTED),
    (less_than(1), 0.0, 1.0, INCONCLUSIVE),
    (less_than(1), 0.0, 0.999, CONFIRMED),
    (less_than(1), 1.0, 2.0, REFUTED),
    (less_than(1), 0.999, 2.0, INCONCLUSIVE),
    # comparisons with another metric: the interval is of metric - other, strictly vs 0
    (greater_than("b"), 0.0, 0.5, INCONCLUSIVE),
    (greater_than("b"), 0.001, 0.5, CONFIRMED),
    (greater_than("b"), -0.5, 0.0, REFUTED),
    (greater_than("b"), -0.5, -0.1, REFUTED),
    (greater_than("b"), -0.5, 0.001, INCONCLUSIVE),
    (less_than("b"), -0.5, 0.0, INCONCLUSIVE),
    (less_than("b"), -0.5, -0.001, CONFIRMED),
    (less_than("b"), 0.0, 0.5, REFUTED),
    (less_than("b"), -0.001, 0.5, INCONCLUSIVE),
    (less_than("b"), 0.0, 0.0, REFUTED),
    (greater_than("b"), 0.0, 0.0, REFUTED),
    # infinite ends never decide against a bound they cross
    (at_least(1), -math.inf, math.inf, INCONCLUSIVE),
    (greater_than("b"), 0.1, math.inf, CONFIRMED),
    (less_than("b"), -math.inf, -0.1, CONFIRMED),
]


@pytest.mark.parametrize("expect, low, high, verdict", BOUNDARY)
def test_boundary_table(expect, low, high, verdict):
    assert expect.judge(iv(low, high)) == verdict


@pytest.mark.parametrize("expect", [at_least(1), at_most(1), between(0, 1), greater_than(1), greater_than("b")])
def test_an_undecidable_interval_is_always_inconclusive(expect):
    for est in (-5.0, 0.5, 1.0, 5.0):
        assert expect.judge(undecidable(est, 1, "one sample")) == INCONCLUSIVE


# -- intervals against scipy -----------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [0.1, 0.12], [3.0, -1.0, 2.5, 7.0, 0.0]])
def test_t_interval_equals_scipy(values, confidence):
    got = mean_interval(values, confidence=confidence)
    low, high = stats.t.interval(confidence, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got.method == "t" and got.n == len(values) and got.confidence == confidence
    assert got.estimate == pytest.approx(np.mean(values))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_bootstrap_interval_equals_an_independent_resampling(confidence):
    values = np.array([0.3, 1.1, 0.7, 2.0, 1.4])
    got = mean_interval(values.tolist(), method="bootstrap", confidence=confidence)
    idx = np.random.default_rng(0).integers(0, len(values), size=(10_000, len(values)))
    means = values[idx].mean(axis=1)
    a = (1 - confidence) / 2
    assert got.method == "bootstrap"
    assert (got.low, got.high) == (pytest.approx(np.quantile(means, a)), pytest.approx(np.quantile(means, 1 - a)))


@pytest.mark.parametrize("k, n", [(0, 48), (1, 10), (5, 10), (10, 10), (47, 48), (3, 3)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_binomial_interval_equals_scipy_clopper_pearson(k, n, confidence):
    got = binomial_interval(k, n, confidence=confidence)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    assert got.method == "binomial" and got.n == n and got.estimate == k / n
    assert (got.low, got.high) == (pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12))
    assert got.high > got.low  # never zero-width, even at 0 of n or n of n


@pytest.mark.parametrize("k, n", [(0, 20), (7, 20), (20, 20)])
def test_wilson_interval_equals_scipy(k, n):
    ref = stats.binomtest(k, n).proportion_ci(method="wilson")
    assert wilson_interval(k, n) == (pytest.approx(ref.low), pytest.approx(ref.high))


@pytest.mark.parametrize("k1, n1, k2, n2", [(56, 70, 48, 80), (9, 10, 3, 10), (0, 20, 0, 20), (10, 10, 0, 12)])
def test_newcombe_difference_matches_its_formula(k1, n1, k2, n2):
    w1 = stats.binomtest(k1, n1).proportion_ci(method="wilson")
    w2 = stats.binomtest(k2, n2).proportion_ci(method="wilson")
    p1, p2 = k1 / n1, k2 / n2
    low = p1 - p2 - math.sqrt((p1 - w1.low) ** 2 + (w2.high - p2) ** 2)
    high = p1 - p2 + math.sqrt((w1.high - p1) ** 2 + (p2 - w2.low) ** 2)
    got = proportion_difference(k1, n1, k2, n2)
    assert got.method == "newcombe" and got.estimate == pytest.approx(p1 - p2)
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))


def test_newcombe_reference_value():
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80 -> [0.0524, 0.3339]
    got = proportion_difference(56, 70, 48, 80)
    assert got.low == pytest.approx(0.0524, abs=5e-4) and got.high == pytest.approx(0.3339, abs=5e-4)


def test_hull_takes_the_wider_ends_and_ignores_no_interval():
    a, b = iv(0.0, 1.0, 0.5), iv(-1.0, 0.5, 0.2)
    h = hull(a, b)
    assert (h.low, h.high, h.estimate) == (-1.0, 1.0, 0.5)
    assert hull(undecidable(1, 1, "x"), a) == a and hull(a, undecidable(1, 1, "x")) == a


@pytest.mark.parametrize("bad", [[], [1.0, math.nan], [[1.0, 2.0]]])
def test_interval_input_errors(bad):
    with pytest.raises(ValueError):
        mean_interval(bad)


def test_interval_argument_errors_name_the_value():
    with pytest.raises(ValueError, match="unknown interval method 'magic'"):
        mean_interval([1.0, 2.0], method="magic")
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1"):
        mean_interval([1.0, 2.0], confidence=1)
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        binomial_interval(3, 2)
    with pytest.raises(ValueError, match="successes must be a non-negative int"):
        binomial_interval(-1, 2)
    with pytest.raises(ValueError, match="value must be finite"):
        point(math.inf)


# -- judge(): what the samples say -------------------------------------------------------


def _p(expect, metric="m", interval="t", confidence=0.95):
    return Prediction("claim", metric, expect, interval=interval, confidence=confidence)


def test_identical_values_across_seeds_never_decide():
    j = judge(_p(at_most(1)), {"m": {0: 0.5, 1: 0.5, 2: 0.5}})
    assert j.verdict == INCONCLUSIVE and j.interval.method == "none"
    assert "identical values" in j.detail
    # the same numbers as a fraction of trials get an honest binomial interval
    ev = Evidence({"m": {0: 0.0, 1: 0.0, 2: 0.0}}, trials={"m": {0: (0, 16), 1: (0, 16), 2: (0, 16)}})
    j = judge(_p(at_most(0.1)), ev)
    ref = stats.binomtest(0, 48).proportion_ci(method="exact")
    assert j.interval.method == "binomial" and j.interval.high == pytest.approx(ref.high)
    assert j.verdict == CONFIRMED  # 0 of 48 rules out more than 7.4%
    assert judge(_p(at_most(0.05)), ev).verdict == INCONCLUSIVE  # ... but not more than 5%


def test_fraction_interval_is_widened_to_the_spread_over_seeds():
    ev = Evidence({"m": {0: 0.1, 1: 0.9}}, trials={"m": {0: (100, 1000), 1: (900, 1000)}})
    j = judge(_p(at_least(0.4)), ev)
    t = stats.t.interval(0.95, 1, loc=0.5, scale=stats.sem([0.1, 0.9]))
    assert t[0] < 0 and t[1] > 1  # the t-interval knows nothing of a proportion's range ...
    assert (j.interval.low, j.interval.high) == (0.0, 1.0)  # ... the widened interval stays inside it
    assert j.verdict == INCONCLUSIVE  # pooled 1000/2000 alone would have confirmed
    narrow = Evidence({"m": {0: 0.97, 1: 0.99, 2: 1.0}}, trials={"m": {0: (97, 100), 1: (99, 100), 2: (100, 100)}})
    t = stats.t.interval(0.95, 2, loc=np.mean([0.97, 0.99, 1.0]), scale=stats.sem([0.97, 0.99, 1.0]))
    j = judge(_p(at_least(0.9)), narrow)
    assert j.interval.low == pytest.approx(t[0]) and j.interval.high == 1.0 < t[1]


def test_a_difference_of_fractions_stays_between_minus_one_and_one():
    a, b = {0: 0.9, 1: 0.1}, {0: 0.0, 1: 0.9}
    trials = {"a": {0: (9, 10), 1: (1, 10)}, "b": {0: (0, 10), 1: (9, 10)}}
    j = judge(_p(greater_than("b"), metric="a"), Evidence({"a": a, "b": b}, trials=trials))
    assert j.interval.low == -1.0 and j.interval.high == 1.0


def test_a_single_seed_is_inconclusive_whatever_its_value():
    for value in (-100.0, 0.5, 100.0):
        assert judge(_p(at_least(0)), {"m": {0: value}}).verdict == INCONCLUSIVE


def test_unseeded_values_are_exact_only_when_declared():
    assert judge(_p(at_least(1)), {"m": {None: 1.0}}, deterministic={"m"}).verdict == CONFIRMED
    assert judge(_p(greater_than(1)), {"m": {None: 1.0}}, deterministic={"m"}).verdict == REFUTED
    j = judge(_p(at_least(1)), {"m": {None: 5.0}})
    assert j.verdict == INCONCLUSIVE and "one unseeded sample" in j.detail


@pytest.mark.parametrize(
    "a, b, expect, verdict",
    [
        (2.0, 1.0, greater_than("b"), CONFIRMED),
        (1.0, 1.0, greater_than("b"), REFUTED),
        (0.5, 1.0, greater_than("b"), REFUTED),
        (1.0, 2.0, less_than("b"), CONFIRMED),
        (1.0, 1.0, less_than("b"), REFUTED),
        (3.0, 2.0, less_than("b"), REFUTED),
    ],
)
def test_exact_value_comparisons(a, b, expect, verdict):
    j = judge(_p(expect, metric="a"), {"a": {None: a}, "b": {None: b}}, deterministic={"a", "b"})
    assert j.verdict == verdict and j.interval.method == "point" and j.interval.estimate == a - b


def test_an_unseeded_random_side_makes_a_comparison_undecidable():
    # nanoGPT's one run against three lab seeds: one sample cannot carry an interval
    ev = {"lab": {0: 1.95, 1: 1.96, 2: 1.97}, "nano": {None: 1.886}}
    j = judge(_p(less_than("nano"), metric="lab"), ev)
    assert j.verdict == INCONCLUSIVE and "nano is one unseeded sample" in j.detail
    j = judge(_p(less_than("nano"), metric="lab"), ev, deterministic={"nano"})
    assert j.verdict == REFUTED and "one exact value" in j.detail
    j = judge(_p(greater_than("lab"), metric="nano"), ev, deterministic={"nano"})
    diffs = [1.886 - v for v in (1.95, 1.96, 1.97)]
    assert j.interval.estimate == pytest.approx(np.mean(diffs)) and j.verdict == REFUTED


def test_paired_comparison_equals_a_t_interval_of_differences():
    a = {0: 3.0, 1: 3.4, 2: 2.9, 3: 3.6}
    b = {0: 2.0, 1: 2.9, 2: 2.2, 3: 2.5}
    d = [a[s] - b[s] for s in a]
    ref = stats.t.interval(0.9, 3, loc=np.mean(d), scale=stats.sem(d))
    j = judge(_p(greater_than("b"), metric="a", confidence=0.9), {"a": a, "b": b})
    assert (j.interval.low, j.interval.high) == (pytest.approx(ref[0]), pytest.approx(ref[1]))
    assert j.verdict == (CONFIRMED if ref[0] > 0 else INCONCLUSIVE)


def test_unpaired_comparison_equals_scipy_welch():
    a, b = {0: 5.0, 1: 5.3, 2: 4.9}, {7: 4.0, 8: 4.6, 9: 4.1, 10: 4.4}
    ref = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval(0.95)
    j = judge(_p(greater_than("b"), metric="a"), {"a": a, "b": b})
    assert (j.interval.low, j.interval.high) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert "Welch" in j.detail


@pytest.mark.parametrize("a, b", [({0: 1.0}, {1: 2.0, 2: 3.0}), ({0: 1.0, 1: 1.2}, {2: 3.0})])
def test_unpaired_with_fewer_than_two_samples_is_inconclusive(a, b):
    j = judge(_p(less_than("b"), metric="a"), {"a": a, "b": b})
    assert j.verdict == INCONCLUSIVE and j.interval.method == "none"


def test_unpaired_with_no_spread_on_either_side_is_inconclusive():
    j = judge(_p(less_than("b"), metric="a"), {"a": {0: 1.0, 1: 1.0}, "b": {2: 3.0, 3: 3.0}})
    assert j.verdict == INCONCLUSIVE and j.interval.method == "none"


def test_difference_of_two_fractions_uses_newcombe():
    ev = Evidence({"a": {None: 0.9}, "b": {None: 0.3}}, trials={"a": {None: (9, 10)}, "b": {None: (3, 10)}})
    j = judge(_p(greater_than("b"), metric="a"), ev)
    ref = proportion_difference(9, 10, 3, 10)
    assert j.interval.method == "newcombe" and (j.interval.low, j.interval.high) == (ref.low, ref.high)
    assert j.verdict == CONFIRMED


def test_other_confidence_levels_change_the_verdict_as_they_should():
    values = {0: 1.1, 1: 1.5, 2: 1.3, 3: 1.05}
    wide = judge(_p(at_least(1), confidence=0.999), {"m": values})
    narrow = judge(_p(at_least(1), confidence=0.8), {"m": values})
    assert wide.interval.high - wide.interval.low > narrow.interval.high - narrow.interval.low
    assert narrow.verdict == CONFIRMED and wide.verdict == INCONCLUSIVE


def test_bootstrap_prediction_uses_the_bootstrap():
    values = {i: v for i, v in enumerate([1.0, 1.2, 1.4, 1.1, 1.3])}
    j = judge(_p(at_least(0.5), interval="bootstrap"), {"m": values})
    assert j.interval.method == "bootstrap" and j.verdict == CONFIRMED


def test_missing_metrics_are_named():
    with pytest.raises(LookupError, match=r"\['b'\]"):
        judge(_p(greater_than("b"), metric="a"), {"a": {0: 1.0, 1: 2.0}})


# -- combining and invalidating --------------------------------------------------------


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        ([], INCONCLUSIVE),
        ([CONFIRMED], CONFIRMED),
        ([CONFIRMED, CONFIRMED], CONFIRMED),
        ([CONFIRMED, INCONCLUSIVE], INCONCLUSIVE),
        ([INCONCLUSIVE, REFUTED], REFUTED),
        ([CONFIRMED, REFUTED], REFUTED),
        ([REFUTED, INVALID], INVALID),
        ([CONFIRMED, INVALID], INVALID),
        ([INVALID], INVALID),
    ],
)
def test_combine_table(verdicts, expected):
    assert combine(verdicts) == expected


def test_invalidate_keeps_the_numbers_and_says_why():
    j = judge(_p(at_least(0)), {"m": {0: 1.0, 1: 1.1}})
    bad = invalidate(j, ["trained (seed 0 stayed at ln 10)"])
    assert bad.verdict == INVALID and bad.interval == j.interval
    assert "invalid: trained (seed 0 stayed at ln 10)" in bad.detail


def test_describe_names_the_method_and_the_reason():
    assert "exact binomial" in binomial_interval(3, 10).describe()
    assert "over n=10 trials" in binomial_interval(3, 10).describe()
    assert "one sample" in undecidable(2.0, 1, "one sample").describe()
    assert "single deterministic measurement" in point(2.0).describe()


def test_an_unseeded_fraction_gets_its_binomial_interval():
    # a pretrained model has no seed: its share of heads is still a count out of trials
    ev = Evidence({"f": {None: 0.5}}, trials={"f": {None: (3, 6)}})
    j = judge(_p(at_least(0.9), metric="f"), ev)
    ref = stats.binomtest(3, 6).proportion_ci(method="exact")
    assert j.interval.method == "binomial" and (j.interval.low, j.interval.high) == (
        pytest.approx(ref.low),
        pytest.approx(ref.high),
    )
    assert j.verdict == REFUTED


# -- exact objects: every field of what the engine returns -----------------------------------


@pytest.mark.parametrize(
    "expect, kind, low, high, other, claim",
    [
        (at_least(1.5), "at_least", 1.5, None, None, "m >= 1.5"),
        (at_most(2), "at_most", None, 2.0, None, "m <= 2"),
        (between(-1, 0.25), "between", -1.0, 0.25, None, "-1 <= m <= 0.25"),
        (greater_than(3), "greater_than", 3.0, None, None, "m > 3"),
        (less_than(4), "less_than", None, 4.0, None, "m < 4"),
        (greater_than("b"), "greater_than", None, None, "b", "m > b"),
        (less_than("b"), "less_than", None, None, "b", "m < b"),
    ],
)
def test_constructors_and_claims(expect, kind, low, high, other, claim):
    assert (expect.kind, expect.low, expect.high, expect.other) == (kind, low, high, other)
    assert expect.describe("m") == claim
    assert expect.to_dict() == {"kind": kind, "low": low, "high": high, "other": other}


@pytest.mark.parametrize(
    "build, what",
    [
        (lambda: at_least(math.inf), "at_least bound"),
        (lambda: at_most("x"), "at_most bound"),
        (lambda: greater_than(math.nan), "greater_than bound"),
        (lambda: less_than(True), "less_than bound"),
        (lambda: between(math.nan, 1), "between low"),
        (lambda: between(0, math.inf), "between high"),
    ],
)
def test_bad_bounds_name_which_bound(build, what):
    with pytest.raises(ValueError, match=f"^{what} must be a finite number, got "):
        build()


def test_between_accepts_equal_ends_and_refuses_reversed_ones():
    assert between(1, 1).describe("m") == "1 <= m <= 1"
    with pytest.raises(ValueError, match=r"^between: low 2.0 is above high 1.0$"):
        between(2, 1)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"text": "  "}, "prediction text must be a non-empty string, got '  '"),
        ({"text": 3}, "prediction text must be a non-empty string, got 3"),
        ({"metric": ""}, "prediction metric must be a non-empty string, got ''"),
        ({"metric": None}, "prediction metric must be a non-empty string, got None"),
        ({"kind": "finding"}, "kind must be one of ('prediction', 'check'), got 'finding'"),
    ],
)
def test_prediction_fields_are_checked(kw, message):
    args = {"text": "t", "metric": "m", "expect": at_least(0), **kw}
    with pytest.raises(ValueError) as exc:
        Prediction(**args)
    assert str(exc.value) == message


def test_bounds_fill_the_text():
    assert Prediction("at most {bound}", "m", at_most(1.5)).bounds() == {"high": "1.5", "bound": "1.5"}
    assert Prediction("x", "m", at_least(2)).bounds() == {"low": "2", "bound": "2"}
    assert Prediction("x", "m", between(0.1, 3)).bounds() == {"low": "0.1", "high": "3"}
    assert Prediction("x", "m", greater_than("b")).bounds() == {}
    p = Prediction(
        "{low} to {high} at lr={lr}", "m", between(0.1, 3), interval="bootstrap", confidence=0.9, kind="check"
    )
    r = p.render({"lr": 0.01})
    assert r == Prediction(
        "0.1 to 3 at lr=0.01", "m", between(0.1, 3), interval="bootstrap", confidence=0.9, kind="check"
    )


def test_the_legacy_store_hash_is_stable():
    # the store keyed predictions by this hash before the registry: it must never change
    p = Prediction("x is at least 1", "x", at_least(1))
    assert p.fingerprint() == "fb49fb587b9943d6"


def test_intervals_are_complete_objects():
    inf = math.inf
    assert undecidable(2, 3, "why") == Interval(2.0, -inf, inf, 3, "none", 0.95, "why")
    assert undecidable(2, 3, "why", 0.9).confidence == 0.9
    assert mean_interval([4.0], confidence=0.9) == Interval(
        4.0, -inf, inf, 1, "none", 0.9, "too few seeds for an interval"
    )
    assert mean_interval([2.0, 2.0], confidence=0.8) == Interval(
        2.0, -inf, inf, 2, "none", 0.8, "identical values in every seed: no estimate of their spread"
    )
    assert point(3) == Interval(3.0, 3.0, 3.0, 1, "point", 1.0)
    b = mean_interval([1.0, 2.0, 4.0], method="bootstrap", confidence=0.9)
    assert (b.n, b.method, b.confidence, b.why) == (3, "bootstrap", 0.9, "")
    t = mean_interval([1.0, 2.0, 4.0], confidence=0.9)
    assert (t.n, t.method, t.confidence, t.why) == (3, "t", 0.9, "")
    d = proportion_difference(9, 10, 3, 12, confidence=0.9)
    assert (d.n, d.method, d.confidence) == (10, "newcombe", 0.9)
    w1, w2 = wilson_interval(9, 10, confidence=0.9), wilson_interval(3, 12, confidence=0.9)
    assert d.low == pytest.approx(0.65 - math.sqrt((0.9 - w1[0]) ** 2 + (w2[1] - 0.25) ** 2))
    assert binomial_interval(2, 5, confidence=0.9).confidence == 0.9
    h = hull(iv(0, 1), Interval(0.2, -1.0, 0.5, 7, "binomial", 0.9))
    assert h == Interval(0.5, -1.0, 1.0, 3, "t", 0.95)


def test_bootstrap_equals_an_independent_resampling_exactly():
    values = np.array([0.3, 1.1, 0.7, 2.0, 1.4])
    got = mean_interval(values.tolist(), method="bootstrap")
    means = values[np.random.default_rng(0).integers(0, 5, size=(10_000, 5))].mean(axis=1)
    assert (got.low, got.high) == (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def test_intervals_refuse_bad_confidence_and_counts():
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^confidence must be in \(0, 1\), got {bad!r}$"):
            mean_interval([1.0, 2.0], confidence=bad)
        with pytest.raises(ValueError, match=rf"^confidence must be in \(0, 1\), got {bad!r}$"):
            binomial_interval(1, 2, confidence=bad)
    with pytest.raises(ValueError, match=r"^successes must be a non-negative int, got True$"):
        binomial_interval(True, 2)
    with pytest.raises(ValueError, match=r"^trials must be a non-negative int, got 2.0$"):
        binomial_interval(1, 2.0)
    with pytest.raises(ValueError, match=r"^need 0 <= successes <= trials and trials > 0, got 0/0$"):
        binomial_interval(0, 0)
    assert binomial_interval(1, 1) == Interval(1.0, binomial_interval(1, 1).low, 1.0, 1, "binomial", 0.95)
    with pytest.raises(ValueError, match=r"^need a non-empty 1-D sequence of values, got \[\]$"):
        mean_interval([])
    with pytest.raises(ValueError, match=r"^values must be finite, got \[1.0, nan\]$"):
        mean_interval([1.0, math.nan])
    with pytest.raises(ValueError, match=r"^value must be finite, got nan$"):
        point(math.nan)


def test_wilson_stays_inside_zero_and_one():
    low, high = wilson_interval(0, 3)
    assert low == pytest.approx(0.0, abs=1e-12) and low >= 0.0 and 0 < high < 1
    low, high = wilson_interval(3, 3)
    assert 0 < low < 1 and high == pytest.approx(1.0) and high <= 1.0


@pytest.mark.parametrize(
    "interval, text",
    [
        (point(2.5), "2.5 (single deterministic measurement)"),
        (Interval(1.0, -math.inf, math.inf, 1, "none", 0.95), "1 (n=1: too few seeds for an interval)"),
        (undecidable(1.0, 2, "no spread"), "1 (n=2: no spread)"),
        (Interval(1.0, 0.5, 1.5, 3, "t", 0.95), "1, 95% t-interval [0.5, 1.5] over n=3 seeds"),
        (Interval(1.0, 0.5, 1.5, 4, "bootstrap", 0.9),
         "1, 90% bootstrap percentile interval [0.5, 1.5] over n=4 seeds"),
        (Interval(0.3, 0.1, 0.5, 20, "binomial", 0.95),
         "0.3, 95% exact binomial (Clopper-Pearson) interval [0.1, 0.5] over n=20 trials"),
        (Interval(0.2, 0.1, 0.3, 9, "newcombe", 0.95),
         "0.2, 95% Newcombe interval of a difference of proportions [0.1, 0.3] over n=9 trials"),
        (Interval(0.2, 0.1, 0.3, 9, "other", 0.95), "0.2, 95% other [0.1, 0.3] over n=9 seeds"),
    ],
)  # fmt: skip
def test_describe_texts(interval, text):
    assert interval.describe() == text


def test_spearman_equals_scipy_and_checks_its_input():
    from lab.report.intervals import spearman

    x, y = [1, 2, 3, 4, 5], [2.0, 1.0, 4.0, 3.0, 5.0]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert spearman([1, 2], [3, 4]) == pytest.approx(1.0)
    for a, b in (([1, 2], [1, 2, 3]), ([1], [1]), ([1, 2, 3], [1, 2])):
        with pytest.raises(ValueError, match=rf"^need two sequences of equal length >= 2, got {len(a)} and {len(b)}$"):
            spearman(a, b)


# -- judge(): details and paths ---------------------------------------------------------------


def test_details_say_how_each_interval_was_made():
    det = {"m"}
    assert judge(_p(at_least(0)), {"m": {None: 1.0}}, deterministic=det).detail == ""
    assert judge(_p(at_least(0)), {"m": {0: 1.0, 1: 2.0}}).detail == ""
    assert judge(_p(at_least(0)), {"m": {None: 1.0}}).detail == "undecided: one unseeded sample of a random quantity"
    j = judge(_p(at_least(0)), {"m": {0: 0.5}}, trials={"m": {0: (5, 10)}})
    assert j.detail == "m: 5/10 trials" and j.interval.n == 10
    j = judge(_p(at_least(0)), {"m": {0: 0.5, 1: 0.4}}, trials={"m": {0: (5, 10), 1: (4, 10)}})
    assert j.detail == "m: 9/20 pooled, widened to the spread over seeds"
    j = judge(_p(greater_than("b"), metric="a"), {"a": {None: 1.0}, "b": {None: 0.5}})
    assert j.detail == "undecided: one unseeded sample on each side" and j.interval.n == 1
    j = judge(_p(greater_than("b"), metric="a"), {"a": {None: 1.0}, "b": {None: 0.5}}, deterministic={"a", "b"})
    assert j.detail == "a - b, both exact"
    j = judge(_p(greater_than("b"), metric="a"), {"a": {0: 1.0, 1: 1.2}, "b": {0: 0.1, 1: 0.4}})
    assert j.detail == "paired by seed: interval of a - b"
    j = judge(_p(greater_than("b"), metric="a"), {"a": {0: 1.0, 1: 2.0}, "b": {5: 0.0, 6: 0.1}})
    assert j.detail == "unpaired Welch interval of mean(a) - mean(b)"


def test_fraction_intervals_use_the_predictions_confidence_and_method():
    ev = Evidence({"m": {0: 0.3, 1: 0.6}}, trials={"m": {0: (3, 10), 1: (6, 10)}})
    j = judge(_p(at_least(0), confidence=0.8), ev)
    exact = binomial_interval(9, 20, confidence=0.8)
    over = mean_interval([0.3, 0.6], confidence=0.8)
    assert (j.interval.low, j.interval.high) == (max(0, min(exact.low, over.low)), max(exact.high, over.high))
    assert j.interval.confidence == 0.8
    j = judge(_p(at_least(0), interval="bootstrap"), Evidence({"m": {0: 0.3, 1: 0.6, 2: 0.5}}, trials={
        "m": {0: (30, 100), 1: (60, 100), 2: (50, 100)}}))  # fmt: skip
    boot = mean_interval([0.3, 0.6, 0.5], method="bootstrap")
    assert j.interval.high == max(boot.high, binomial_interval(140, 300).high)
    one = judge(_p(at_least(0), confidence=0.8), Evidence({"m": {0: 0.3}}, trials={"m": {0: (3, 10)}}))
    assert one.interval == binomial_interval(3, 10, confidence=0.8)


def test_fraction_differences_pair_seeds_and_use_the_confidence():
    a, b = {0: 0.9, 1: 0.5}, {0: 0.2, 1: 0.3}
    trials = {"a": {0: (9, 10), 1: (5, 10)}, "b": {0: (2, 10), 1: (3, 10)}}
    j = judge(_p(greater_than("b"), metric="a", confidence=0.9), Evidence({"a": a, "b": b}, trials=trials))
    newc = proportion_difference(14, 20, 5, 20, confidence=0.9)
    paired = mean_interval([0.7, 0.2], confidence=0.9)
    assert (j.interval.low, j.interval.high) == (
        max(-1, min(newc.low, paired.low)),
        min(1, max(newc.high, paired.high)),
    )
    assert j.detail == "difference of proportions a - b (14/20 vs 5/20), widened to the paired spread over seeds"
    # one side a fraction, the other not: not a difference of proportions
    j = judge(_p(greater_than("b"), metric="a"), Evidence({"a": a, "b": b}, trials={"a": trials["a"]}))
    assert j.interval.method == "t" and j.detail == "paired by seed: interval of a - b"
    # unpaired fractions: Newcombe alone
    j = judge(_p(greater_than("b"), metric="a"), Evidence({"a": {0: 0.9}, "b": {1: 0.2}},
              trials={"a": {0: (9, 10)}, "b": {1: (2, 10)}}))  # fmt: skip
    assert (
        j.interval == proportion_difference(9, 10, 2, 10)
        and j.detail == "difference of proportions a - b (9/10 vs 2/10)"
    )


def test_a_single_exact_side_shifts_the_other_with_the_method_and_confidence():
    ev = {"a": {0: 1.0, 1: 1.5, 2: 1.1}, "b": {None: 0.5}}
    j = judge(_p(greater_than("b"), metric="a", confidence=0.8, interval="bootstrap"), ev, deterministic={"b"})
    assert j.interval == mean_interval([0.5, 1.0, 0.6], method="bootstrap", confidence=0.8)
    ev = {"a": {None: 2.0}, "b": {0: 1.0, 1: 1.5, 2: 1.1}}
    j = judge(_p(greater_than("b"), metric="a", confidence=0.8), ev, deterministic={"a"})
    assert (
        j.interval == mean_interval([1.0, 0.5, 0.9], confidence=0.8)
        and j.detail == "interval of a - b (a is one exact value)"
    )
    j = judge(_p(greater_than("b"), metric="a"), ev)
    assert j.verdict == INCONCLUSIVE and j.detail == "undecided: a is one unseeded sample of a random quantity"
    assert j.interval.estimate == pytest.approx(2.0 - np.mean([1.0, 1.5, 1.1]))


def test_welch_uses_the_confidence_and_reports_the_smaller_side():
    a, b = {0: 5.0, 1: 5.3, 2: 4.9}, {7: 4.0, 8: 4.6, 9: 4.1, 10: 4.4}
    ref = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval(0.8)
    j = judge(_p(greater_than("b"), metric="a", confidence=0.8), {"a": a, "b": b})
    diff = np.mean(list(a.values())) - np.mean(list(b.values()))
    assert j.interval == Interval(pytest.approx(diff), pytest.approx(ref.low), pytest.approx(ref.high), 3, "t", 0.8)
    one = judge(_p(greater_than("b"), metric="a", confidence=0.8), {"a": {0: 1.0}, "b": b})
    assert (one.interval.n, one.interval.confidence) == (1, 0.8)
    assert one.interval.why == "too few seeds on one side for an interval"
    flat = judge(
        _p(greater_than("b"), metric="a", confidence=0.8), {"a": {0: 1.0, 1: 1.0}, "b": {3: 2.0, 4: 2.0, 5: 2.0}}
    )
    assert (flat.interval.n, flat.interval.confidence, flat.interval.estimate) == (2, 0.8, -1.0)
    assert flat.interval.why == "identical values in every seed on both sides: no estimate of spread"
    some = judge(_p(greater_than("b"), metric="a"), {"a": {0: 1.0, 1: 1.0}, "b": {3: 2.0, 4: 2.5}})
    assert some.interval.method == "t"  # one side with spread is enough for Welch


def test_judge_accepts_plain_dicts_with_trials_and_missing_metrics_are_listed():
    j = judge(_p(at_most(0.1)), {"m": {0: 0.0, 1: 0.0}}, trials={"m": {0: (0, 40), 1: (0, 40)}})
    assert j.interval.method == "binomial" and j.prediction == _p(at_most(0.1))
    with pytest.raises(LookupError) as exc:
        judge(_p(at_least(0), metric="x"), {})
    assert (
        str(exc.value)
        == "prediction 'claim' names metric(s) ['x'] that the test never recorded; recorded metrics: none"
    )


def test_invalidate_joins_reasons_and_keeps_the_prediction():
    j = judge(_p(at_least(0)), {"m": {None: 1.0}})
    bad = invalidate(j, ["a", "b"])
    assert bad.prediction == j.prediction and bad.extra == j.extra == {}
    assert bad.detail == "undecided: one unseeded sample of a random quantity; invalid: a; b"
    j2 = judge(_p(at_least(0)), {"m": {0: 1.0, 1: 2.0}})
    j2.extra["k"] = 1
    assert invalidate(j2, ["x"]).detail == "invalid: x" and invalidate(j2, ["x"]).extra == {"k": 1}


def test_constructors_built_inside_a_test():
    # (the tables above build expectations at import time; these run inside the test)
    assert less_than("b") == Expectation_("less_than", None, None, "b")
    assert less_than(2) == Expectation_("less_than", None, 2.0, None)
    assert at_most(2) == Expectation_("at_most", None, 2.0, None)
    assert at_least(2) == Expectation_("at_least", 2.0, None, None)
    assert greater_than(2) == Expectation_("greater_than", 2.0, None, None)
    assert greater_than("b") == Expectation_("greater_than", None, None, "b")
    assert between(1, 2) == Expectation_("between", 1.0, 2.0, None)
    assert at_most(2).judge(iv(2.0, 2.0)) == CONFIRMED and less_than(2).judge(iv(2.0, 2.0)) == REFUTED
    with pytest.raises(ValueError, match="^less_than bound must be a finite number, got None$"):
        less_than(None)


def Expectation_(kind, low, high, other):
    from lab.report.predictions import Expectation

    return Expectation(kind, low=low, high=high, other=other)


def test_undecidable_comparisons_are_complete_objects():
    inf = math.inf
    # both unseeded, only one declared exact: still one sample on the random side
    j = judge(
        _p(greater_than("b"), metric="a", confidence=0.9), {"a": {None: 3.0}, "b": {None: 1.0}}, deterministic={"a"}
    )
    assert j.interval == Interval(2.0, -inf, inf, 1, "none", 0.9, "one unseeded sample on each side")
    j = judge(_p(greater_than("b"), metric="a", confidence=0.9), {"a": {None: 3.0}, "b": {0: 1.0, 1: 2.0}})
    assert j.interval == Interval(1.5, -inf, inf, 1, "none", 0.9, "a is one unseeded sample of a random quantity")
    j = judge(_p(at_least(0), confidence=0.9), {"m": {None: 3.0}})
    assert j.interval == Interval(3.0, -inf, inf, 1, "none", 0.9, "one unseeded sample of a random quantity")


def test_paired_comparisons_honour_the_interval_method():
    a = {i: 1.0 + 0.1 * i * i for i in range(5)}
    b = {i: 0.5 + 0.05 * i for i in range(5)}
    j = judge(_p(greater_than("b"), metric="a", interval="bootstrap"), {"a": a, "b": b})
    assert j.interval == mean_interval([a[i] - b[i] for i in range(5)], method="bootstrap")
    trials = {"a": {i: (int(10 * a[i]), 30) for i in range(5)}, "b": {i: (int(10 * b[i]), 30) for i in range(5)}}
    fa = {i: trials["a"][i][0] / 30 for i in range(5)}
    fb = {i: trials["b"][i][0] / 30 for i in range(5)}
    j = judge(_p(greater_than("b"), metric="a", interval="bootstrap"), Evidence({"a": fa, "b": fb}, trials=trials))
    boot = mean_interval([fa[i] - fb[i] for i in range(5)], method="bootstrap")
    assert j.interval.low <= boot.low and j.interval.high >= boot.high


def test_identical_paired_differences_say_both_how_and_why():
    j = judge(_p(greater_than("b"), metric="a"), {"a": {0: 2.0, 1: 3.0}, "b": {0: 1.0, 1: 2.0}})
    assert j.detail == (
        "paired by seed: interval of a - b; undecided: identical values in every seed: no estimate of their spread"
    )


def test_fractions_on_different_seeds_are_not_paired():
    ev = Evidence(
        {"a": {0: 0.9, 1: 0.8}, "b": {5: 0.1, 6: 0.2}},
        trials={"a": {0: (9, 10), 1: (8, 10)}, "b": {5: (1, 10), 6: (2, 10)}},
    )
    j = judge(_p(greater_than("b"), metric="a", confidence=0.9), ev)
    assert j.interval == proportion_difference(17, 20, 3, 20, confidence=0.9)
    assert j.detail == "difference of proportions a - b (17/20 vs 3/20)"
    single = Evidence({"a": {0: 0.9}, "b": {0: 0.1}}, trials={"a": {0: (9, 10)}, "b": {0: (1, 10)}})
    assert judge(_p(greater_than("b"), metric="a"), single).interval == proportion_difference(9, 10, 1, 10)
