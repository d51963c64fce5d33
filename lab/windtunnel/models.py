"""Models for the wind tunnels. Each maps a batch's tokens to log-probabilities over the
task's answer classes at its scored positions, (n, P, C):

- TunnelTransformer: the lab's GPT (learned positions, RMSNorm, GELU, tied embeddings,
  as the authors' model). Bijection: its next-token logits at key positions, read on
  the value tokens; HMM: a linear posterior head on the final hidden state.
- PrefixMLP: the information-matched baseline without attention. For each scored
  position it sees the whole prefix (the embeddings of positions 0..p concatenated, later
  ones zeroed) through a residual MLP, so it has the same information as the transformer.
- PaperMLP: the baseline shaped like the paper's (a deep stack of width x width residual
  layers, parameters within 1% of the transformer's), given the context the way the
  authors' released MLP control is: each scored position sees its own token and its
  position, nothing else. It is context-blind, so on the bijection it can do no better
  than uniform over all values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lab.models import GPT, GPTConfig
from lab.windtunnel.tasks import BijectionTask, HMMTask


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TunnelTransformer(nn.Module):
    def __init__(self, task, *, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.task = task
        self.gpt = GPT(
            GPTConfig(
                vocab_size=task.vocab_size,
                block_size=task.seq_len,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
                pos="learned",
                norm="rmsnorm",
                mlp="gelu",
                bias=False,
                tie_weights=True,
            )
        )
        self.register_buffer("positions", task.positions.clone(), persistent=False)
        self.head = nn.Linear(n_embd, task.n_classes) if isinstance(task, HMMTask) else None

    def class_logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Answer-class logits from final-normed hidden states at the scored positions."""
        if self.head is not None:
            return self.head(h)
        V = self.task.n_values
        return self.gpt.lm_head(h)[..., V : 2 * V]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.gpt.hidden_states(tokens)  # final-normed hidden states, with gradients
        return self.class_logits_from_hidden(h[:, self.positions]).log_softmax(-1)

    def loss(self, batch) -> torch.Tensor:
        if self.head is not None:
            return soft_cross_entropy(self(batch.tokens), batch.posterior)
        # the authors' objective: next-token cross-entropy over the whole vocabulary at key positions
        return self.gpt(batch.tokens, batch.targets)[1]

    def leaked_mass(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, P) probability the full-vocabulary softmax puts outside the answer tokens."""
        if self.head is not None:
            return torch.zeros(tokens.size(0), len(self.positions))
        V = self.task.n_values
        p = self.gpt(tokens)[0][:, self.positions].softmax(-1)
        return 1 - p[..., V : 2 * V].sum(-1)


class _ResidualMLP(nn.Module):
    def __init__(self, width: int, hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.norm(x)


class PrefixMLP(nn.Module):
    def __init__(self, task, *, embd: int, width: int, depth: int):
        super().__init__()
        self.task = task
        T = task.seq_len
        self.wte = nn.Embedding(task.vocab_size, embd)
        self.inp = nn.Linear(T * embd, width)
        self.query = nn.Embedding(len(task.positions), width)  # which position is being predicted
        self.body = _ResidualMLP(width, 4 * width, depth)
        self.out = nn.Linear(width, task.n_classes)
        pos = task.positions
        # mask[p, t] = 1 where the prediction at scored position p may see token t
        self.register_buffer("mask", (torch.arange(T).unsqueeze(0) <= pos.unsqueeze(1)).float(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.wte(tokens)  # (n, T, e)
        x = e.unsqueeze(1) * self.mask.unsqueeze(0).unsqueeze(-1)  # (n, P, T, e)
        x = self.inp(x.flatten(2)) + self.query.weight
        return self.out(self.body(x)).log_softmax(-1)

    def loss(self, batch) -> torch.Tensor:
        return soft_cross_entropy(self(batch.tokens), _answer_targets(self.task, batch))


class PaperMLP(nn.Module):
    def __init__(self, task, *, width: int, depth: int):
        super().__init__()
        self.task = task
        self.wte = nn.Embedding(task.vocab_size, width)
        self.wpe = nn.Embedding(task.seq_len, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        # bijection: tied embeddings read out over the whole vocabulary, as the transformer
        self.head = nn.Linear(width, task.n_classes) if isinstance(task, HMMTask) else None
        self.register_buffer("positions", task.positions.clone(), persistent=False)

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens[:, self.positions]) + self.wpe(self.positions)
        for b in self.blocks:
            x = x + b(x)
        x = self.norm(x)
        return self.head(x) if self.head is not None else x @ self.wte.weight.T

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self._logits(tokens)
        if self.head is None:
            V = self.task.n_values
            logits = logits[..., V : 2 * V]
        return logits.log_softmax(-1)

    def loss(self, batch) -> torch.Tensor:
        if self.head is not None:
            return soft_cross_entropy(self(batch.tokens), batch.posterior.float())
        # the transformer's objective: next-token cross-entropy over the whole vocabulary at key positions
        logits = self._logits(batch.tokens)
        return F.cross_entropy(logits.flatten(0, 1), batch.targets[:, self.positions].flatten())


def _answer_targets(task, batch) -> torch.Tensor:
    """(n, P, C) training targets: the sampled value (one-hot) for the bijection, as the
    transformer's next-token loss; the exact posterior for the HMM, as in the paper."""
    if isinstance(task, BijectionTask):
        values = batch.targets[:, task.positions] - task.n_values
        return F.one_hot(values, task.n_classes).float()
    return batch.posterior.float()


def soft_cross_entropy(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logp).sum(-1).mean()


def _match_width(build, target_params: int) -> int:
    """The width w (4..4096) for which n_params(build(w)) is closest to target_params
    (parameter counts grow with width, so a binary search finds it)."""
    lo, hi = 4, 4096
    while lo < hi:
        mid = (lo + hi) // 2
        if n_params(build(mid)) < target_params:
            lo = mid + 1
        else:
            hi = mid
    return min((w for w in (lo - 1, lo) if w >= 4), key=lambda w: abs(n_params(build(w)) - target_params))


def _matched(model, target_params: int, tolerance: float, what: str):
    if abs(n_params(model) - target_params) > tolerance * target_params:
        raise ValueError(
            f"no width gives a {what} within {tolerance:.0%} of {target_params:,} parameters "
            f"(closest: {n_params(model):,}); change its depth or embedding size"
        )
    return model


def matched_prefix_mlp(task, target_params: int, *, embd: int, depth: int, tolerance: float = 0.1) -> PrefixMLP:
    """A PrefixMLP of the given depth whose width puts its parameter count within
    `tolerance` of target_params (the transformer's)."""
    width = _match_width(lambda w: PrefixMLP(task, embd=embd, width=w, depth=depth), target_params)
    return _matched(
        PrefixMLP(task, embd=embd, width=width, depth=depth), target_params, tolerance, f"depth-{depth} PrefixMLP"
    )


def matched_paper_mlp(
    task, target_params: int, *, depths: tuple[int, ...] = (18, 19, 20), tolerance: float = 0.01
) -> PaperMLP:
    """The PaperMLP whose parameter count is closest to target_params over the given depths
    (the paper: 18-20 residual layers) and every width; ValueError unless within `tolerance`."""
    if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"depths must be positive ints, got {depths!r}")
    best = None
    for depth in depths:
        width = _match_width(lambda w, d=depth: PaperMLP(task, width=w, depth=d), target_params)
        gap = abs(n_params(PaperMLP(task, width=width, depth=depth)) - target_params)
        if best is None or gap < best[0]:
            best = (gap, width, depth)
    _, width, depth = best
    return _matched(
        PaperMLP(task, width=width, depth=depth), target_params, tolerance, f"PaperMLP of depth {list(depths)}"
    )
