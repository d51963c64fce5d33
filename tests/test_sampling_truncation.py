"""The truncated distributions behind curriculum 05's entropy and support hypotheses."""

import pytest
import torch

from lab.truncation import entropy_nats, top_p_matching_entropy, truncated_probs


def _logits(n=16, v=40, seed=0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_entropy_equals_torch_categorical():
    probs = truncated_probs(_logits(), top_k=5)
    assert torch.allclose(entropy_nats(probs), torch.distributions.Categorical(probs=probs).entropy(), atol=1e-5)


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.7), (10, 0.9), (None, 1.0)])
def test_truncated_probs_equal_transformers_warpers(top_k, top_p):
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits()
    ref = logits.clone()
    if top_k is not None:
        ref = warpers.TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None and top_p < 1:
        ref = warpers.TopPLogitsWarper(top_p)(None, ref)
    assert torch.allclose(truncated_probs(logits, top_k=top_k, top_p=top_p), torch.softmax(ref, -1), atol=1e-6)


def test_top_k_support_is_k():
    probs = truncated_probs(_logits(), top_k=3)
    assert ((probs > 0).sum(-1) == 3).all()
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]))


def test_top_p_matching_entropy_matches_top_k():
    logits = _logits()
    target = entropy_nats(truncated_probs(logits, top_k=6)).mean().item()
    p = top_p_matching_entropy(logits, target)
    assert 0 < p <= 1
    assert abs(entropy_nats(truncated_probs(logits, top_p=p)).mean().item() - target) < 0.05


def test_bad_filters_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        truncated_probs(_logits(), top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        truncated_probs(_logits(), top_p=1.5)
