"""Verdict logic: intervals over seeds decide confirmed / refuted / inconclusive."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.report.intervals import mean_interval, point
from lab.report.predictions import (
    CONFIRMED,
    INCONCLUSIVE,
    REFUTED,
    Prediction,
    at_least,
    at_most,
    between,
    combine,
    greater_than,
    judge,
    less_than,
)


def _pred(expect, metric="m", interval="t"):
    return Prediction("text", metric, expect, interval=interval)


def test_t_interval_matches_textbook():
    iv = mean_interval([1.0, 2.0, 3.0])
    # mean 2, s = 1, t_{0.975, 2} = 4.3027 -> half width 2.484
    assert iv.estimate == 2.0
    assert iv.high - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert iv.method == "t" and iv.n == 3


def test_bootstrap_interval_is_deterministic_and_inside_range():
    a = mean_interval([1.0, 2.0, 3.0, 4.0], method="bootstrap")
    b = mean_interval([1.0, 2.0, 3.0, 4.0], method="bootstrap")
    assert a == b
    assert 1.0 <= a.low <= a.estimate <= a.high <= 4.0


def test_one_seed_gives_no_interval_and_is_inconclusive():
    j = judge(_pred(at_least(0)), {"m": {0: 5.0}})
    assert j.verdict == INCONCLUSIVE
    assert j.interval.method == "none"


def test_exact_value_is_decided_as_a_point_only_when_declared_deterministic():
    exact = {"m"}
    assert judge(_pred(at_most(1)), {"m": {None: 0.5}}, deterministic=exact).verdict == CONFIRMED
    assert judge(_pred(at_most(1)), {"m": {None: 1.5}}, deterministic=exact).verdict == REFUTED
    undeclared = judge(_pred(at_most(1)), {"m": {None: 1.5}})
    assert undeclared.verdict == INCONCLUSIVE and "unseeded sample" in undeclared.detail


@pytest.mark.parametrize(
    "values, expect, verdict",
    [
        ([2.0, 2.1, 1.9], at_least(1.0), CONFIRMED),
        ([0.0, 0.1, -0.1], at_least(1.0), REFUTED),
        ([0.0, 2.0, 1.0], at_least(1.0), INCONCLUSIVE),
        ([0.5, 0.6, 0.55], between(0.0, 1.0), CONFIRMED),
        ([5.0, 5.1, 5.2], between(0.0, 1.0), REFUTED),
        ([0.5, 0.6, 0.55], less_than(1.0), CONFIRMED),
        ([0.5, 0.6, 0.55], greater_than(1.0), REFUTED),
    ],
)
def test_interval_rule(values, expect, verdict):
    samples = {i: v for i, v in enumerate(values)}
    assert judge(_pred(expect), {"m": samples}).verdict == verdict


def test_comparison_is_paired_by_seed():
    # a is always about b + 1 although both vary a lot across seeds: pairing sees it
    a = {0: 11.0, 1: 21.1, 2: 30.9}
    b = {0: 10.0, 1: 20.0, 2: 30.0}
    j = judge(_pred(greater_than("b"), metric="a"), {"a": a, "b": b})
    assert j.verdict == CONFIRMED
    assert "paired" in j.detail
    assert judge(_pred(less_than("b"), metric="a"), {"a": a, "b": b}).verdict == REFUTED


def test_unpaired_comparison_uses_welch():
    a = {0: 5.0, 1: 5.1, 2: 5.2}
    b = {3: 1.0, 4: 1.1, 5: 1.2}
    j = judge(_pred(greater_than("b"), metric="a"), {"a": a, "b": b})
    assert j.verdict == CONFIRMED and "Welch" in j.detail


def test_missing_metric_names_it_and_what_was_recorded():
    with pytest.raises(LookupError, match=r"\['nope'\].*recorded metrics: \['m'\]"):
        judge(_pred(at_least(0), metric="nope"), {"m": {None: 1.0}})


def test_bad_expectations_are_clear():
    with pytest.raises(ValueError, match="low 2.0 is above high 1.0"):
        between(2, 1)
    with pytest.raises(ValueError, match="finite number"):
        at_least(float("nan"))
    with pytest.raises(ValueError, match="interval must be one of"):
        Prediction("t", "m", at_least(0), interval="magic")
    with pytest.raises(ValueError, match="expect must be built"):
        Prediction("t", "m", 3.0)


def test_prediction_text_renders_parameters_and_hash_tracks_text():
    p = Prediction("lr={lr} underfits", "loss", at_least(0))
    assert p.render({"lr": 1e-5}).text == "lr=1e-05 underfits"
    with pytest.raises(ValueError, match="names a parameter 'lr'"):
        p.render({})
    assert p.fingerprint() != Prediction("lr={lr} overfits", "loss", at_least(0)).fingerprint()


def test_combine():
    assert combine([CONFIRMED, CONFIRMED]) == CONFIRMED
    assert combine([CONFIRMED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([CONFIRMED, REFUTED, INCONCLUSIVE]) == REFUTED


@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=20), st.floats(-1e6, 1e6))
def test_verdict_rule_properties(values, bound):
    """Confirmed implies every value's interval sits above the bound; refuted below."""
    iv = mean_interval(values)
    v = judge(_pred(at_least(bound)), {"m": dict(enumerate(values))}).verdict
    if v == CONFIRMED:
        assert iv.low >= bound
    elif v == REFUTED:
        assert iv.high < bound
    else:
        assert iv.low < bound <= iv.high


def test_point_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        point(float("nan"))
