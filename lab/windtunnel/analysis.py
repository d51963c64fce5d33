"""Mechanism and geometry of a wind-tunnel transformer, through lab.inspect's hook points:
which sub-layer does the posterior update (ablation, probes), key orthogonality,
attention sharpening with depth, the entropy manifold, and training dynamics."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lab.inspect import capture
from lab.inspect.attention import js_rows
from lab.inspect.residual import pca, sublayer_ablations
from lab.windtunnel.metrics import calibration, predict
from lab.windtunnel.models import TunnelTransformer
from lab.windtunnel.tasks import Batch


def _one_pass(model, tokens):
    """One forward pass over all tokens: a capture keeps only the last pass, so a chunked
    predict() would leave the activations of its last chunk alone."""
    was = model.training
    model.eval()
    try:
        return model(tokens)
    finally:
        model.train(was)


def _check(model):
    if not isinstance(model, TunnelTransformer):
        raise ValueError(f"expected a TunnelTransformer, got {type(model).__name__}")
    return model.gpt.config.n_layer


def ablation_mae(model: TunnelTransformer, batch: Batch, *, mode: str = "zero") -> dict[str, list[float]]:
    """Entropy MAE (bits) with one sub-layer's write removed at a time:
    {'clean': [mae], 'attn': [per layer], 'mlp': [per layer]}. 'mean' replaces the write
    by its average over this batch's tokens instead of zeros."""
    _check(model)
    return sublayer_ablations(
        model.gpt,
        lambda: calibration(predict(model, batch.tokens), batch).entropy_mae,
        mode=mode,
        reference_pass=lambda: _one_pass(model, batch.tokens),
    )


def stream_points(n_layer: int) -> list[str]:
    """The stream before block 0, then after attention and after the FFN of every block."""
    names = ["blocks.0.hook_resid_pre"]
    for i in range(n_layer):
        names += [f"blocks.{i}.hook_resid_mid", f"blocks.{i}.hook_resid_post"]
    return names


@torch.no_grad()
def streams_at_positions(model: TunnelTransformer, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """{hook name: (n * P, d)} the stream at the task's scored positions."""
    _check(model)
    with capture(model.gpt, names) as cache:
        _one_pass(model, tokens)
    pos = model.positions
    return {n: cache[n][:, pos].reshape(-1, cache[n].size(-1)).float() for n in names}


def ridge_r2(x: torch.Tensor, y: torch.Tensor, *, train_fraction: float = 0.5, alpha: float = 1e-2) -> float:
    """Held-out R^2 of a ridge regression of y (n,) on x (n, d), features standardised on the
    training half (rows are split in order: pass them shuffled or i.i.d.)."""
    n = len(y)
    k = int(n * train_fraction)
    if k < 2 or n - k < 2:
        raise ValueError(f"need at least 4 rows for a train/test split, got {n}")
    x, y = x.double(), y.double()
    mu, sd = x[:k].mean(0), x[:k].std(0).clamp_min(1e-8)
    z = (x - mu) / sd
    z = torch.cat([z, torch.ones(n, 1, dtype=z.dtype)], dim=1)
    a = z[:k].T @ z[:k] + alpha * k * torch.eye(z.size(1), dtype=z.dtype)
    w = torch.linalg.solve(a, z[:k].T @ y[:k])
    pred = z[k:] @ w
    resid = ((y[k:] - pred) ** 2).sum()
    total = ((y[k:] - y[k:].mean()) ** 2).sum().clamp_min(1e-12)
    return (1 - resid / total).item()


def entropy_probe(model: TunnelTransformer, batch: Batch) -> dict[str, float]:
    """{hook name: held-out R^2 of a linear probe for the Bayes posterior entropy} at every
    point of the stream (before block 0, after each attention, after each FFN)."""
    names = stream_points(_check(model))
    feats = streams_at_positions(model, batch.tokens, names)
    y = batch.entropy.reshape(-1)
    return {n: ridge_r2(feats[n], y) for n in names}


def update_gains(r2: dict[str, float], n_layer: int) -> tuple[float, float]:
    """(sum over blocks of the R^2 gained across attention, ... across the FFN)."""
    attn = ffn = 0.0
    before = r2["blocks.0.hook_resid_pre"]
    for i in range(n_layer):
        mid, post = r2[f"blocks.{i}.hook_resid_mid"], r2[f"blocks.{i}.hook_resid_post"]
        attn += mid - before
        ffn += post - mid
        before = post
    return attn, ffn


@torch.no_grad()
def key_cosines(model: TunnelTransformer, token_ids: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """(heads, pairs) |cosine| between the keys layer `layer`'s heads compute for every pair of
    distinct tokens (their embeddings through ln_1 and W_K; positions left out, as in the
    authors' analysis code)."""
    _check(model)
    gpt = model.gpt
    block = gpt.blocks[layer]
    x = block.ln_1(gpt.wte(token_ids))
    hd, nq, nkv = gpt.config.head_dim, gpt.config.n_head, gpt.config.kv_heads
    k = block.attn.c_attn(x)[:, nq * hd : (nq + nkv) * hd].view(len(token_ids), nkv, hd)
    k = F.normalize(k.float(), dim=-1).transpose(0, 1)  # (heads, n, hd)
    cos = (k @ k.transpose(1, 2)).abs()
    upper = torch.ones(len(token_ids), len(token_ids), dtype=torch.bool).triu(1)
    return cos[:, upper]


def key_orthogonality(model: TunnelTransformer, token_ids: torch.Tensor, layer: int = 0) -> float:
    """Mean |cosine| between keys of distinct tokens, averaged over pairs and heads."""
    return key_cosines(model, token_ids, layer).mean().item()


@torch.no_grad()
def context_keys(model: TunnelTransformer, tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(layers, heads, len(token_ids), d_head): every layer's keys at the positions holding
    each of `token_ids`, averaged over all its occurrences in `tokens` (the key a token
    presents in context, position and context averaged out). A token that never occurs
    raises."""
    n_layer = _check(model)
    with capture(model.gpt, "blocks.*.attn.hook_k") as cache:
        _one_pass(model, tokens)
    flat = tokens.reshape(-1)
    out = []
    for i in range(n_layer):
        k = cache[f"blocks.{i}.attn.hook_k"].double()  # (n, T, heads, d_head)
        k = k.reshape(-1, k.size(2), k.size(3))
        means = []
        for t in token_ids.tolist():
            rows = flat == t
            if not rows.any():
                raise ValueError(f"token {t} never occurs in the sequences given")
            means.append(k[rows].mean(0))
        out.append(torch.stack(means, dim=1))  # (heads, tokens, d_head)
    return torch.stack(out).float()


def mean_abs_cosine(vectors: torch.Tensor) -> torch.Tensor:
    """(..., n, d) -> (...): mean |cosine| over the n(n-1)/2 pairs of distinct rows."""
    v = F.normalize(vectors.double(), dim=-1)
    cos = (v @ v.transpose(-1, -2)).abs()
    n = v.size(-2)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    return cos[..., upper].mean(-1)


def key_geometry(model: TunnelTransformer, tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(layers, heads) mean |cosine| between the in-context keys (context_keys) of distinct
    tokens among `token_ids`: near 0 for an orthogonal key basis; compare with
    random_cosine_baseline(d_head)."""
    return mean_abs_cosine(context_keys(model, tokens, token_ids)).float()


def random_cosine_baseline(dim: int) -> float:
    """E|cos| between two random directions in `dim` dimensions (about sqrt(2 / (pi dim)))."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


@torch.no_grad()
def attention_entropy_by_layer(model: TunnelTransformer, tokens: torch.Tensor) -> list[float]:
    """Mean attention entropy (bits) of each layer's heads at the scored positions."""
    n_layer = _check(model)
    with capture(model.gpt, "blocks.*.attn.hook_pattern") as cache:
        _one_pass(model, tokens)
    out = []
    for i in range(n_layer):
        p = cache[f"blocks.{i}.attn.hook_pattern"][:, :, model.positions].double()  # (n, H, P, T)
        h = -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(-1)
        out.append(h.mean().item())
    return out


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    # average ties
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def spearman(a, b) -> float:
    a, b = _rank(np.asarray(a, dtype=float)), _rank(np.asarray(b, dtype=float))
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def manifold(model: TunnelTransformer, batch: Batch, point: str | None = None) -> dict:
    """PCA of the residual stream at the scored positions (default: after the last block,
    centred, not standardised) against the Bayes entropy; the same numbers as
    value_manifold."""
    n_layer = _check(model)
    point = point or f"blocks.{n_layer - 1}.hook_resid_post"
    x = streams_at_positions(model, batch.tokens, [point])[point]
    return _pc1_against_entropy(x, batch, len(model.positions))


@torch.no_grad()
def attention_values(model: TunnelTransformer, tokens: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """(n * P, heads * d_head) what attention reads at the scored positions of layer `layer`
    (default: the last): each head's attention-weighted sum of value vectors, heads
    concatenated, before the output projection."""
    n_layer = _check(model)
    layer = n_layer - 1 if layer is None else layer
    if not 0 <= layer < n_layer:
        raise ValueError(f"layer must lie in [0, {n_layer}), got {layer}")
    names = [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"]
    with capture(model.gpt, names) as cache:
        _one_pass(model, tokens)
    pattern = cache[names[0]][:, :, model.positions].double()  # (n, H, P, T)
    v = cache[names[1]].double()  # (n, T, kv_heads, d_head)
    heads = pattern.size(1)
    v = v.repeat_interleave(heads // v.size(2), dim=2)
    z = torch.einsum("nhpt,nthd->nphd", pattern, v)  # (n, P, H, d_head)
    return z.reshape(-1, z.size(2) * z.size(3)).float()


def standardised(x: torch.Tensor) -> torch.Tensor:
    """Each column to mean 0 and standard deviation 1 (scikit-learn's StandardScaler, as the
    authors' analysis); a constant column stays 0."""
    x = x.double()
    sd = x.std(0, unbiased=False)
    return ((x - x.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))).float()


def value_manifold(model: TunnelTransformer, batch: Batch, layer: int | None = None) -> dict:
    """The value manifold as the authors measure it: the attention values (attention_values)
    at the scored positions, standardised per feature, then PCA. PC1's share of the
    variance, |Spearman rho| of PC1 with the Bayes entropy, and the same rho within each
    position (where the entropy varies there), averaged."""
    x = standardised(attention_values(model, batch.tokens, layer))
    return _pc1_against_entropy(x, batch, len(model.positions))


def _pc1_against_entropy(x: torch.Tensor, batch: Batch, n_positions: int) -> dict:
    h = batch.entropy.reshape(-1).numpy()
    fit = pca(x)
    pc = fit.project(x, 2).numpy()
    pos = np.tile(np.arange(n_positions), batch.tokens.size(0))
    within = [abs(spearman(pc[pos == p, 0], h[pos == p])) for p in range(n_positions) if np.std(h[pos == p]) > 1e-9]
    return {
        "pc1_share": fit.explained[0].item(),
        "rho": abs(spearman(pc[:, 0], h)),
        "rho_within_position": float(np.mean(within)) if within else float("nan"),
        "points": pc,
        "entropy": h,
    }


@torch.no_grad()
def attention_drift(model_a: TunnelTransformer, model_b: TunnelTransformer, tokens: torch.Tensor) -> float:
    """Mean Jensen-Shannon divergence (nats) between two models' attention patterns on the
    same tokens, at the scored positions, over layers and heads."""
    pats = []
    for m in (model_a, model_b):
        with capture(m.gpt, "blocks.*.attn.hook_pattern") as cache:
            _one_pass(m, tokens)
        pats.append(cache.stack("attn.hook_pattern")[:, :, :, m.positions])  # (L, n, H, P, T)
    return js_rows(*pats).mean().item()


def frame_step(drifts: dict[int, float], fraction: float = 0.1) -> int:
    """The first kept step whose attention drift to the final model is at most `fraction` of
    the drift at initialisation (step 0): when the attention frame has settled."""
    if 0 not in drifts:
        raise ValueError("drifts must include step 0 (initialisation)")
    limit = fraction * drifts[0]
    for step in sorted(drifts):
        if drifts[step] <= limit:
            return step
    return max(drifts)


__all__ = [
    "ablation_mae",
    "attention_drift",
    "attention_entropy_by_layer",
    "attention_values",
    "context_keys",
    "key_geometry",
    "mean_abs_cosine",
    "standardised",
    "value_manifold",
    "entropy_probe",
    "frame_step",
    "key_cosines",
    "key_orthogonality",
    "manifold",
    "random_cosine_baseline",
    "ridge_r2",
    "spearman",
    "stream_points",
    "streams_at_positions",
    "update_gains",
]
