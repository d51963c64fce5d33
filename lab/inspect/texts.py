"""Inputs for inspection: windows of real text and repeated random sequences."""

from __future__ import annotations

import numpy as np
import torch


def windows(tokens: np.ndarray, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (n, length): n windows spread evenly over `tokens` (e.g. a
    validation split), the targets shifted by one. Deterministic: no sampling."""
    if n < 1 or length < 1:
        raise ValueError(f"need n >= 1 and length >= 1, got n={n}, length={length}")
    if len(tokens) < length + 1:
        raise ValueError(f"{len(tokens)} tokens cannot hold one window of {length} + 1")
    starts = np.linspace(0, len(tokens) - length - 1, n).astype(np.int64)
    rows = np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def repeated_random(n: int, period: int, vocab_size: int, *, seed: int) -> torch.Tensor:
    """(n, 2 * period) token ids: a uniformly random sequence of `period` tokens, then the
    same sequence again. Only in-context copying can predict the second half."""
    if n < 1 or period < 2 or vocab_size < 2:
        raise ValueError(f"need n >= 1, period >= 2, vocab_size >= 2; got {n}, {period}, {vocab_size}")
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(vocab_size, (n, period), generator=gen)
    return torch.cat([half, half], dim=1)
