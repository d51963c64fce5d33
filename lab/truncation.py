"""Truncated next-token distributions (curriculum 05): what top-k and top-p leave of a
model's distribution, its entropy and support. Kept outside lab/models so that the
trained-run cache key (lab.session.code_version) does not move."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lab.models.sampling import _check_logits, check_sampling_args, filter_top_k, filter_top_p


def truncated_probs(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """The distribution (N, V) that sample_next draws from at temperature 1 with these
    filters: top-k, then top-p, the survivors renormalised."""
    _check_logits(logits)
    check_sampling_args(1.0, top_k, top_p)
    logits = logits.float()
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    return F.softmax(logits, dim=-1)


def entropy_nats(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of probs (N, V); zero-probability entries add nothing."""
    return -torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), torch.zeros_like(probs)).sum(-1)


def top_p_matching_entropy(logits: torch.Tensor, entropy: float, *, iters: int = 40) -> float:
    """The top-p whose truncated distributions have mean entropy closest to `entropy`
    (nats), by bisection on p in (0, 1]: the mean entropy rises with p."""
    _check_logits(logits)
    lo, hi = 1e-6, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if entropy_nats(truncated_probs(logits, top_p=mid)).mean().item() < entropy:
            lo = mid
        else:
            hi = mid
    mean = lambda p: entropy_nats(truncated_probs(logits, top_p=p)).mean().item()  # noqa: E731
    return min((lo, hi), key=lambda p: abs(mean(p) - entropy))
