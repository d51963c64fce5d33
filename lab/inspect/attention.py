"""Attention-pattern statistics, per head.

Every function takes a pattern (batch, heads, queries, keys) as captured at
`blocks.{i}.attn.hook_pattern` (rows sum to 1) and averages over the batch and
over queries q >= min_query (the first queries see too few keys to say much).
Queries and keys share positions (no KV cache): key k of query q is |q - k| back.
"""

from __future__ import annotations

import math

import torch


def _check(pattern: torch.Tensor, min_query: int) -> torch.Tensor:
    if not isinstance(pattern, torch.Tensor) or pattern.dim() != 4 or pattern.size(-1) != pattern.size(-2):
        raise ValueError(
            f"pattern must be a (batch, heads, T, T) tensor, got {getattr(pattern, 'shape', type(pattern).__name__)}"
        )
    T = pattern.size(-1)
    if not 0 <= min_query < T:
        raise ValueError(f"min_query must lie in [0, T={T}), got {min_query}")
    return pattern.float()


def _mean_over_queries(values: torch.Tensor, min_query: int) -> torch.Tensor:
    """(batch, heads, T) -> (heads,) averaged over batch and queries >= min_query."""
    return values[..., min_query:].mean(dim=(0, 2))


def entropy(pattern: torch.Tensor, *, min_query: int = 1, normalize: bool = True, causal: bool = True) -> torch.Tensor:
    """(heads,) mean attention entropy (nats). normalize divides each query's entropy by
    the log of the keys it may see (q + 1 causal, T bidirectional): 1 = uniform, 0 = one key."""
    p = _check(pattern, min_query)
    h = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (B, H, T)
    if normalize:
        T = p.size(-1)
        n_keys = torch.arange(1, T + 1, dtype=h.dtype) if causal else torch.full((T,), float(T))
        h = h / n_keys.log().clamp_min(1e-30)
        if min_query == 0 and causal:
            h[..., 0] = 0.0  # a single visible key: entropy 0 of log 1
    return _mean_over_queries(h, min_query)


def mean_distance(pattern: torch.Tensor, *, min_query: int = 1) -> torch.Tensor:
    """(heads,) mean attended distance |q - k| weighted by attention, in tokens."""
    p = _check(pattern, min_query)
    T = p.size(-1)
    pos = torch.arange(T, dtype=p.dtype)
    dist = (pos.view(T, 1) - pos.view(1, T)).abs()
    return _mean_over_queries((p * dist).sum(-1), min_query)


def key_share(pattern: torch.Tensor, key: int, *, min_query: int = 1) -> torch.Tensor:
    """(heads,) mean attention put on one absolute key position (0: the first token, a 'sink')."""
    p = _check(pattern, min_query)
    if not 0 <= key < p.size(-1):
        raise ValueError(f"key must lie in [0, T={p.size(-1)}), got {key}")
    return _mean_over_queries(p[..., key], min_query)


def offset_share(pattern: torch.Tensor, offset: int, *, min_query: int = 1) -> torch.Tensor:
    """(heads,) mean attention from query q to key q + offset (-1: previous token), over the
    queries where that key exists."""
    p = _check(pattern, min_query)
    T = p.size(-1)
    q = torch.arange(T)
    k = q + offset
    ok = (k >= 0) & (k < T) & (q >= min_query)
    if not bool(ok.any()):
        raise ValueError(f"offset {offset} leaves no query >= {min_query} with a key inside T={T}")
    vals = p[..., q[ok], k[ok]]  # (B, H, n)
    return vals.mean(dim=(0, 2))


def induction_score(pattern: torch.Tensor, period: int, *, start: int = 0) -> torch.Tensor:
    """(heads,) Olsson et al.'s induction score on a sequence whose tokens [start, start+period)
    repeat at [start+period, start+2*period): mean attention from each second-repeat
    token q to the token after its earlier occurrence, q - period + 1."""
    p = _check(pattern, 0)
    T = p.size(-1)
    if period < 2 or start < 0 or start + 2 * period > T:
        raise ValueError(f"need period >= 2 and start + 2*period <= T={T}, got period={period}, start={start}")
    q = torch.arange(start + period, start + 2 * period)
    return p[..., q, q - period + 1].mean(dim=(0, 2))


def js_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions along the last axis, any shape."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return (a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def js_divergence(p: torch.Tensor, q: torch.Tensor, *, min_query: int = 1) -> torch.Tensor:
    """(heads,) mean Jensen-Shannon divergence (nats, 0..log 2) between two patterns of the
    same text, query by query: how differently two models (or layers) attend."""
    p, q = _check(p, min_query), _check(q, min_query)
    if p.shape != q.shape:
        raise ValueError(f"patterns differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    return _mean_over_queries(js_rows(p, q), min_query)


def uniform_pattern(T: int, *, causal: bool = True) -> torch.Tensor:
    """(1, 1, T, T) the pattern of a head that spreads attention evenly: the baseline."""
    if causal:
        mask = torch.ones(T, T).tril()
        return (mask / mask.sum(-1, keepdim=True)).view(1, 1, T, T)
    return torch.full((1, 1, T, T), 1.0 / T)


LOG2 = math.log(2.0)


def patterns(model, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(layers, batch, heads, T, T) attention patterns of every layer for inputs idx."""
    from lab.inspect.hooks import run_with_cache

    _, cache = run_with_cache(model, idx, "blocks.*.attn.hook_pattern", attention_mask)
    return cache.stack("attn.hook_pattern").float()


def per_head(stat, pats, **kwargs) -> torch.Tensor:
    """(layers, heads) of stat(pattern, **kwargs) for each layer of one (layers, B, H, T, T)
    tensor, or averaged over a list of them (e.g. texts of different lengths)."""
    if isinstance(pats, torch.Tensor):
        pats = [pats]
    if not pats:
        raise ValueError("per_head needs at least one pattern tensor")
    return torch.stack([torch.stack([stat(layer, **kwargs) for layer in p]) for p in pats]).mean(0)
