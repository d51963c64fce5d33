"""Comparing two models' representations of the same inputs (Track C): linear CKA
(Kornblith et al. 2019), 1 for representations equal up to rotation and scale."""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment of x (n, d1) and y (n, d2), rows the same n inputs:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with columns centred. In [0, 1];
    invariant to orthogonal transforms and isotropic scaling of either side."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need two 2-D tensors with the same rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 rows, got {x.shape[0]}")
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if norm == 0:
        raise ValueError("CKA is undefined for a constant representation (no variance)")
    return float(cross / norm)
