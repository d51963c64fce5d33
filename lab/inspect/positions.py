"""What each positional encoding looks like (curriculum 02): its table of position
vectors and the position-by-position similarity those vectors imply."""

from __future__ import annotations

import torch

from lab.models.config import GPTConfig
from lab.models.positions import alibi_bias, alibi_slopes, rope_tables, sinusoidal_table


def encoding_table(config: GPTConfig, n: int, model=None) -> torch.Tensor | None:
    """(n, d) position vectors of the config's encoding: the learned table (needs `model`),
    the sinusoids, or RoPE's (cos, sin) per frequency (the rotation a position applies).
    None for ALiBi and NoPE, which have no vectors."""
    positions = torch.arange(n)
    if config.pos == "learned":
        if model is None:
            raise ValueError("a learned encoding's table comes from a trained model: pass model=")
        return model.wpe.weight[:n].detach().float()
    if config.pos == "sinusoidal":
        return sinusoidal_table(positions, config.n_embd)
    if config.pos == "rope":
        cos, sin = rope_tables(n, config.head_dim, config.rope_theta)
        half = config.head_dim // 2
        return torch.cat((cos[:, :half], sin[:, :half]), dim=1)
    return None


def alibi_matrix(config: GPTConfig, n: int) -> torch.Tensor:
    """(n, n) ALiBi's attention bias from each query to each key, averaged over heads."""
    positions = torch.arange(n)
    return alibi_bias(alibi_slopes(config.n_head), positions, positions).mean(0)


def cosine_matrix(table: torch.Tensor) -> torch.Tensor:
    """(n, n) cosine similarity of every pair of rows of `table` (n, d)."""
    unit = torch.nn.functional.normalize(table.double(), dim=1)
    return (unit @ unit.T).float()


def offset_means(matrix: torch.Tensor) -> torch.Tensor:
    """(n,) the mean of `matrix` (n, n) on each diagonal: entry k averages [i, i + k]."""
    n = matrix.shape[0]
    return torch.stack([torch.diagonal(matrix, k).mean() for k in range(n)])


def toeplitz_deviation(matrix: torch.Tensor) -> float:
    """The largest spread (max - min) along any diagonal of `matrix`: 0 when every entry
    depends only on the offset j - i."""
    n = matrix.shape[0]
    return max(float(torch.diagonal(matrix, k).max() - torch.diagonal(matrix, k).min()) for k in range(-n + 1, n))
