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


def class_variance_share(x: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of the variance of the rows of x (n, d) that their class means explain:
    sum_c n_c ||mean_c - mean||^2 / sum_i ||x_i - mean||^2 (eta squared). 1 when every row
    equals its class mean, about (classes - 1) / n for labels unrelated to x."""
    if x.dim() != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"need x (n, d) and labels (n,), got {tuple(x.shape)} and {tuple(labels.shape)}")
    x = x.double()
    centred = x - x.mean(0)
    total = centred.pow(2).sum()
    if total == 0:
        raise ValueError("the share of variance is undefined for constant rows")
    between = sum((labels == c).sum() * centred[labels == c].mean(0).pow(2).sum() for c in labels.unique().tolist())
    return float(between / total)
