"""Checkpoint surgery: turn a trained multi-head model into grouped-query attention."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from lab.checks import is_int
from lab.models.gpt import GPT


@torch.no_grad()
def mean_pool_kv_heads(model: GPT, n_kv_head: int) -> GPT:
    """A copy of `model` with its K and V projection heads mean-pooled into `n_kv_head`
    groups (Ainslie et al. 2023, "GQA"): query heads g*k .. g*k+k-1 share the average of
    their former K and V heads. Queries and everything else are unchanged."""
    cfg = model.config
    n_head, kv_now = cfg.n_head, cfg.n_kv_head or cfg.n_head
    if kv_now != n_head:
        raise ValueError(f"expected a multi-head model (n_kv_head == n_head == {n_head}), got n_kv_head={kv_now}")
    if not is_int(n_kv_head) or n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_kv_head must divide n_head={n_head}, got {n_kv_head!r}")
    hd = cfg.n_embd // n_head
    new = GPT(replace(cfg, n_kv_head=n_kv_head))
    state = copy.deepcopy(model.state_dict())
    for i in range(cfg.n_layer):
        for kind in ("weight", "bias"):
            key = f"blocks.{i}.attn.c_attn.{kind}"
            if key not in state:
                continue
            w = state[key]
            q, k, v = w.split(cfg.n_embd, dim=0)
            state[key] = torch.cat([q, _pool_heads(k, n_kv_head, n_head, hd), _pool_heads(v, n_kv_head, n_head, hd)])
    new.load_state_dict(state)
    return new.eval()


def _pool_heads(t: torch.Tensor, n_kv_head: int, n_head: int, hd: int) -> torch.Tensor:
    """(n_head * hd, ...) rows of per-head projections -> (n_kv_head * hd, ...): each group's mean."""
    return t.view(n_kv_head, n_head // n_kv_head, hd, *t.shape[1:]).mean(1).reshape(n_kv_head * hd, *t.shape[1:])
