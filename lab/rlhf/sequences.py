"""Sequences of prompt + completion for post-training: padded batches with a completion
mask, log pi(completion | prompt) (with and without gradients), and sampling one
completion per prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lab.checks import NON_NEGATIVE_INT, POSITIVE_INT
from lab.rlhf.task import STOP


def generator(seed: int) -> torch.Generator:
    """A torch.Generator seeded with `seed` (an int >= 0)."""
    g = torch.Generator()
    g.manual_seed(NON_NEGATIVE_INT.check("seed", seed))
    return g


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def encode_batch(tokenizer, prompts: Sequence[str], completions: Sequence[str], *, block_size: int | None = None):
    """Right-padded token ids (B, T) int64, a bool mask (B, T) of the completion tokens,
    and the lengths (B,) of prompt + completion. Padding repeats id 0 and is never read:
    attention is causal and every statistic stops at a row's length."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: they must pair up")
    if not prompts:
        raise ValueError("encode_batch needs at least one (prompt, completion) pair, got none")
    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not isinstance(p, str) or not p or not isinstance(c, str) or not c:
            raise ValueError(f"pair {i}: prompt and completion must be non-empty strings, got {p!r}, {c!r}")
        rows.append((tokenizer.encode(p), tokenizer.encode(c)))
    lengths = [len(a) + len(b) for a, b in rows]
    T = max(lengths)
    if block_size is not None and T > block_size:
        i = lengths.index(T)
        raise ValueError(
            f"pair {i} is {T} tokens long, more than the model's block_size={block_size}: "
            f"{prompts[i]!r} + {completions[i]!r}"
        )
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (a, b) in enumerate(rows):
        idx[i, : len(a) + len(b)] = torch.tensor(a + b)
        mask[i, len(a) : len(a) + len(b)] = True
    return idx, mask, torch.tensor(lengths)


def token_logprobs(model, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(token | everything before it) over the tokens where mask is True
    (the completion): log pi(y | x) for a causal LM. Keeps the graph for training."""
    logits, _ = model(idx)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts, completions, *, batch_size: int = 256) -> torch.Tensor:
    """(N,) log pi(completion | prompt) per pair, in eval mode, without gradients."""
    was = model.training
    model.eval()
    try:
        out = []
        for s in range(0, len(prompts), batch_size):
            idx, mask, _ = encode_batch(
                tokenizer,
                prompts[s : s + batch_size],
                completions[s : s + batch_size],
                block_size=model.config.block_size,
            )
            out.append(token_logprobs(model, idx.to(device_of(model)), mask.to(device_of(model))).cpu())
        return torch.cat(out)
    finally:
        model.train(was)


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    batch_size: int = 512,
) -> list[str]:
    """One sampled completion per prompt, cut after its first newline (or max_new_tokens
    characters without one). Prompts of equal length are batched; order is kept."""
    POSITIVE_INT.check("max_new_tokens", max_new_tokens)
    encoded = [tokenizer.encode(p) for p in prompts]
    longest = max((len(e) for e in encoded), default=0)
    if longest + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"a {longest}-token prompt + max_new_tokens={max_new_tokens} exceeds the model's "
            f"block_size={model.config.block_size}"
        )
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    out: list[str] = [""] * len(prompts)
    was = model.training
    model.eval()
    try:
        for n, rows in sorted(by_len.items()):
            for s in range(0, len(rows), batch_size):
                chunk = rows[s : s + batch_size]
                idx = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device_of(model))
                gen = model.generate(idx, max_new_tokens, temperature=temperature, generator=generator)
                for i, ids in zip(chunk, gen[:, n:].cpu().tolist()):
                    text = tokenizer.decode(ids)
                    cut = text.find(STOP)
                    out[i] = text if cut < 0 else text[: cut + len(STOP)]
    finally:
        model.train(was)
    return out
