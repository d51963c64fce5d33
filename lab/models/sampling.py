"""Choosing the next token from logits: temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_sampling_args(temperature, top_k, top_p) -> None:
    """Raise ValueError for a temperature, top_k or top_p outside its domain."""
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = (
            f"{logits.dtype} tensor of shape {tuple(logits.shape)}"
            if isinstance(logits, torch.Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"logits must be a 2-D float tensor of shape (B, V), got {got}")
    if logits.size(1) == 0:
        raise ValueError(f"logits must have at least one column (V >= 1), got shape {tuple(logits.shape)}")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest in its row to -inf.

    Ties with the k-th largest value are kept, as in nanoGPT, so a row can keep
    more than k entries only when logits tie exactly. A k larger than the vocabulary
    (the V columns of logits) keeps every entry: it filters nothing, as in Hugging Face's
    top-k; k < 1 is a ValueError.
    """
    _check_logits(logits)
    check_sampling_args(1.0, k, None)
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[:, [-1]]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose probability reaches p.

    The most likely token is always kept, so the result can always be sampled.
    """
    _check_logits(logits)
    check_sampling_args(1.0, None, p)
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    # a token is in the nucleus if the mass strictly before it has not yet reached p
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits (B, V) -> (B,) int64.

    temperature == 0 is greedy decoding (argmax); top_k and top_p then change nothing.
    A top_k larger than the vocabulary (V) keeps every token, like top_k=None (see
    filter_top_k); top_k < 1 or top_p outside (0, 1] raises ValueError.
    """
    _check_logits(logits)
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    # multinomial needs its generator on the same device as the probabilities
    if generator is not None and generator.device != probs.device:
        tokens = torch.multinomial(probs.to(generator.device), 1, generator=generator)
        return tokens.squeeze(1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
