"""The reward model: a copy of the GPT trunk with a scalar head on the last token,
trained on preference pairs with the Bradley-Terry loss."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.checks import POSITIVE_INT
from lab.rlhf.preferences import PreferencePair, pair_tensors, stack_padded
from lab.rlhf.sequences import device_of, encode_batch, generator
from lab.rlhf.sft import adamw


class RewardModel(nn.Module):
    """r(x, y): a copy of a GPT trunk and a scalar head on the hidden state of the last
    token of prompt + completion. The head starts at zero (every reward 0)."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = copy.deepcopy(trunk)
        w = trunk.wte.weight
        self.head = nn.Linear(trunk.config.n_embd, 1).to(device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.trunk.hidden_states(idx)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths.to(idx.device) - 1]
        return self.head(last).squeeze(-1)

    @torch.no_grad()
    def rewards(self, tokenizer, prompts, completions, *, batch_size: int = 256) -> torch.Tensor:
        """(N,) rewards in eval mode."""
        was = self.training
        self.eval()
        try:
            out = []
            dev = device_of(self)
            for s in range(0, len(prompts), batch_size):
                idx, _, lengths = encode_batch(
                    tokenizer,
                    prompts[s : s + batch_size],
                    completions[s : s + batch_size],
                    block_size=self.trunk.config.block_size,
                )
                out.append(self(idx.to(dev), lengths).cpu())
            return torch.cat(out)
        finally:
            self.train(was)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(r_chosen - r_rejected): the negative log-likelihood of the
    preferences under the Bradley-Terry model P(chosen > rejected) = sigmoid(r_c - r_r)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def train_reward_model(
    trunk,
    tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    history: list | None = None,
) -> RewardModel:
    """A RewardModel on a copy of `trunk`, trained with the Bradley-Terry loss by AdamW at a
    constant lr on random batches of `pairs` (chosen and rejected in one forward)."""
    POSITIVE_INT.check("steps", steps)
    POSITIVE_INT.check("batch_size", batch_size)
    g = generator(seed)
    rm = RewardModel(trunk).train()
    dev = device_of(rm)
    (ci, _, cl), (ri, _, rl) = pair_tensors(tokenizer, pairs, trunk.config.block_size)
    opt = adamw(rm.parameters(), lr)
    for step in range(steps):
        rows = torch.randint(len(ci), (batch_size,), generator=g)
        idx = stack_padded(ci[rows], ri[rows]).to(dev)
        r = rm(idx, torch.cat([cl[rows], rl[rows]]))
        loss = bradley_terry_loss(r[:batch_size], r[batch_size:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if history is not None:
            history.append({"step": step + 1, "loss": float(loss.detach())})
    return rm.eval()


def pairwise_accuracy(rm: RewardModel, tokenizer, pairs: Sequence[PreferencePair]) -> float:
    """Share of pairs whose chosen completion gets the higher reward (a tie counts half)."""
    if not pairs:
        raise ValueError("pairwise_accuracy needs at least one pair, got none")
    prompts = [p.prompt for p in pairs]
    rc = rm.rewards(tokenizer, prompts, [p.chosen for p in pairs])
    rr = rm.rewards(tokenizer, prompts, [p.rejected for p in pairs])
    return float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean())
