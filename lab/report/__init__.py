"""The hypothesis API: recorded predictions, the `outcome` fixture, verdicts, the store
and the results site. The only part of `lab` that knows about pytest.

    from lab.report import prediction, at_most

    @pytest.mark.pretraining
    @prediction("Val loss ends below 1.88 nats", metric="val_loss", expect=at_most(1.88))
    def test_baby_gpt(lab, outcome):
        '''Method: train the nanoGPT baby config, read the final val loss.'''
        for seed in lab.seeds:
            outcome.record("val_loss", lab.pretrain(..., seed=seed).final_val_loss, seed=seed)
"""

from __future__ import annotations

from lab.report.outcome import Outcome
from lab.report.predictions import (
    CONFIRMED,
    INCONCLUSIVE,
    REFUTED,
    Expectation,
    Prediction,
    at_least,
    at_most,
    between,
    greater_than,
    less_than,
)


def prediction(
    text: str,
    *,
    metric: str,
    expect: Expectation,
    interval: str = "t",
    confidence: float = 0.95,
):  # -> pytest.MarkDecorator
    """Attach a prediction, recorded before the test runs, to a hypothesis.

    Works as a decorator and inside `pytest.param(..., marks=prediction(...))` for a
    prediction that belongs to one parameter set. `{name}` in `text` is filled from the
    test's parameters. Several predictions on one test each get a verdict.
    """
    import pytest  # here, so that lab.report's pieces import without pytest

    return pytest.mark.lab_prediction(Prediction(text, metric, expect, interval=interval, confidence=confidence))


def check(
    text: str,
    *,
    metric: str,
    expect: Expectation,
    interval: str = "t",
    confidence: float = 0.95,
):  # -> pytest.MarkDecorator
    """Attach an invariant that holds by construction (cache-bytes arithmetic, exact
    causal masking, an untrained control at chance). It is judged like a prediction
    and shown on the page, but it is not a finding: it is counted apart from confirmed
    and refuted predictions, and a check that does not hold fails the test."""
    import pytest

    return pytest.mark.lab_prediction(
        Prediction(text, metric, expect, interval=interval, confidence=confidence, kind="check")
    )


__all__ = [
    "CONFIRMED",
    "INCONCLUSIVE",
    "REFUTED",
    "Expectation",
    "Outcome",
    "Prediction",
    "at_least",
    "at_most",
    "between",
    "check",
    "greater_than",
    "less_than",
    "prediction",
]
