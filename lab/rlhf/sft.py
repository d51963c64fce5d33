"""Supervised fine-tuning: a copy of a pretrained GPT trained on prompt + completion with
the loss on completion tokens only."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from lab.checks import POSITIVE, POSITIVE_INT
from lab.rlhf.sequences import device_of, encode_batch, generator, token_logprobs


def adamw(params, lr: float) -> torch.optim.Optimizer:
    """The optimizer of every post-training stage: AdamW at a constant lr, no weight decay."""
    return torch.optim.AdamW(params, lr=float(POSITIVE.check("lr", lr)), betas=(0.9, 0.95), weight_decay=0.0)


def sft(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    history: list | None = None,
):
    """A fine-tuned copy of `model` (the original is untouched): AdamW at a constant lr on
    random batches of (prompt, completion) pairs, cross-entropy on completion tokens only
    (the prompt is context, never a target). `history` gets {step, loss} per step."""
    POSITIVE_INT.check("steps", steps)
    POSITIVE_INT.check("batch_size", batch_size)
    g = generator(seed)
    model = copy.deepcopy(model).train()
    dev = device_of(model)
    idx, mask, _ = encode_batch(tokenizer, prompts, completions, block_size=model.config.block_size)
    opt = adamw(model.parameters(), lr)
    for step in range(steps):
        rows = torch.randint(len(idx), (batch_size,), generator=g)
        b_idx, b_mask = idx[rows].to(dev), mask[rows].to(dev)
        logp = token_logprobs(model, b_idx, b_mask)
        loss = -logp.sum() / b_mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if history is not None:
            history.append({"step": step + 1, "loss": float(loss.detach())})
    return model.eval()
