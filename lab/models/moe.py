"""A top-k routed mixture of experts, the MLP of a GPT whose config sets n_expert
(curriculum 08)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from lab.models.config import GPTConfig


class MoE(nn.Module):
    """Top-k routed mixture of MLP experts (Switch / Mixtral style).

    A linear router scores the experts for each token; the token goes to its top_k
    experts, whose outputs are mixed with the renormalised router probabilities.
    Each forward keeps `load` (fraction of routed token-slots per expert) and
    `aux_loss`, Switch Transformer's load-balancing loss E * sum_e f_e * P_e
    (f: routed fraction, P: mean router probability), which is 1 when balanced.
    """

    def __init__(self, config: GPTConfig, make_expert: Callable[[GPTConfig], nn.Module]):
        super().__init__()
        self.top_k = config.moe_top_k
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(make_expert(config) for _ in range(config.n_expert))
        self.load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x):
        shape, n_expert = x.shape, len(self.experts)
        flat = x.reshape(-1, shape[-1])
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot].unsqueeze(1))
        routed = torch.bincount(chosen.flatten(), minlength=n_expert).float() / chosen.numel()
        self.load = routed.detach()
        self.aux_loss = n_expert * (routed * probs.mean(0)).sum()
        return out.view(shape)
