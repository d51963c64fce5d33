"""The residual stream: its size through the layers, who writes into it, how positions
relate, its principal directions, and what each layer would predict (logit lens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lab.inspect.hooks import adapter, capture, mean_ablation, patch, zero_ablation


def stream_names(n_layers: int) -> list[str]:
    """Hook names of the stream at every depth: the embedding (block 0's input), then
    after each block."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


def _token_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (n, d) rows of real tokens (mask (B, T) of 1 = token, 0 = padding)."""
    rows = t.reshape(-1, t.size(-1)).float()
    return rows if mask is None else rows[mask.reshape(-1).bool()]


def mean_norm(t: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean L2 norm of the per-token vectors in a (B, T, d) activation."""
    return _token_rows(t, mask).norm(dim=-1).mean().item()


def stream_norms(cache, n_layers: int, mask: torch.Tensor | None = None) -> list[float]:
    """Mean residual norm at depths 0..n_layers (embedding, then after each block)."""
    return [mean_norm(cache[n], mask) for n in stream_names(n_layers)]


def write_norms(cache, n_layers: int, mask: torch.Tensor | None = None) -> dict[str, list[float]]:
    """{'attn': [...], 'mlp': [...]} mean norm of what each sub-layer writes, per layer."""
    return {
        "attn": [mean_norm(cache[f"blocks.{i}.hook_attn_out"], mask) for i in range(n_layers)],
        "mlp": [mean_norm(cache[f"blocks.{i}.hook_mlp_out"], mask) for i in range(n_layers)],
    }


@torch.no_grad()
def sublayer_ablations(
    model, score: Callable[[], float], *, mode: str = "zero", reference_pass: Callable[[], object] | None = None
) -> dict[str, list[float]]:
    """score() clean and with one sub-layer's write removed at a time:
    {'clean': [score], 'attn': [score with layer i's attention ablated], 'mlp': [...]}.
    mode 'zero' writes nothing; 'mean' writes the write's average over the tokens of
    reference_pass() (one forward pass of the model), which keeps its constant part and
    removes what depends on the input."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    a = adapter(model)
    names = [f"blocks.{i}.hook_{p}_out" for i in range(a.n_layers) for p in ("attn", "mlp")]
    means = {}
    if mode == "mean":
        if reference_pass is None:
            raise ValueError("mode 'mean' needs reference_pass, the forward pass whose writes are averaged")
        with capture(a, names) as cache:
            reference_pass()
        means = {n: cache[n].float().mean(dim=(0, 1)) for n in names}
    out = {"clean": [score()], "attn": [], "mlp": []}
    for part in ("attn", "mlp"):
        for i in range(a.n_layers):
            name = f"blocks.{i}.hook_{part}_out"
            with patch(a, {name: zero_ablation if mode == "zero" else mean_ablation(means[name])}):
                out[part].append(score())
    return out


def ablation_losses(
    model, idx: torch.Tensor, targets: torch.Tensor, *, mode: str = "zero", reference: torch.Tensor | None = None
) -> dict[str, list[float]]:
    """Next-token loss with one sub-layer's write removed at a time (sublayer_ablations);
    'mean' averages the writes over `reference` tokens (default idx)."""
    a = adapter(model)
    was_training = a.model.training
    a.model.eval()
    try:
        return sublayer_ablations(
            a,
            lambda: a.loss(idx, targets).item(),
            mode=mode,
            reference_pass=lambda: a.forward(idx if reference is None else reference),
        )
    finally:
        a.model.train(was_training)


def position_similarity(t: torch.Tensor) -> torch.Tensor:
    """(T, T) cosine similarity between the stream at position i and at position j, averaged
    over the batch of (B, T, d) activations."""
    if t.dim() != 3:
        raise ValueError(f"expected a (batch, T, d) activation, got shape {tuple(t.shape)}")
    u = F.normalize(t.float(), dim=-1)
    return (u @ u.transpose(1, 2)).mean(0)


def similarity_by_distance(sim: torch.Tensor) -> torch.Tensor:
    """(T,) mean of sim[i, j] over pairs |i - j| = d, for d = 0..T-1."""
    T = sim.size(0)
    return torch.stack([torch.diagonal(sim, offset=d).mean() for d in range(T)])


@dataclass
class PCA:
    explained: torch.Tensor  # (k,) fraction of variance along each principal direction
    components: torch.Tensor  # (k, d)
    mean: torch.Tensor  # (d,)

    def project(self, x: torch.Tensor, k: int = 2) -> torch.Tensor:
        return (x.float() - self.mean) @ self.components[:k].T

    def dims_for(self, fraction: float) -> int:
        """Components needed to explain `fraction` of the variance."""
        return int((self.explained.cumsum(0) < fraction).sum().item()) + 1


def pca(x: torch.Tensor) -> PCA:
    """Principal components of (n, d) rows (centred), by SVD."""
    if x.dim() != 2 or x.size(0) < 2:
        raise ValueError(f"pca needs an (n >= 2, d) matrix, got shape {tuple(x.shape)}")
    x = x.float()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    var = s**2
    return PCA(var / var.sum(), vh, mean)


@torch.no_grad()
def logit_lens(model, idx: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Next-token loss (nats) of decoding the stream at each depth 0..n_layers with the
    model's own final norm and unembedding. The last equals the model's loss."""
    a = adapter(model)
    was_training = a.model.training
    a.model.eval()
    try:
        names = stream_names(a.n_layers)
        with capture(a, names) as cache:
            a.forward(idx)
        losses = []
        for n in names:
            logits = a.unembed(cache[n]).float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1).item())
        return losses
    finally:
        a.model.train(was_training)


def layer_features(cache, n_layers: int, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[(n, d)] the stream's per-token vectors at each depth 0..n_layers, for probes and PCA."""
    return [_token_rows(cache[n], mask) for n in stream_names(n_layers)]


def monotone_fraction(values: Sequence[float], *, increasing: bool = True) -> float:
    """Fraction of consecutive steps that go the predicted way (1.0: monotone)."""
    steps = [b - a for a, b in zip(values, values[1:])]
    if not steps:
        raise ValueError("need at least two values")
    return sum((s > 0) if increasing else (s < 0) for s in steps) / len(steps)
