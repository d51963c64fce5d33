"""Linear probes: how much of a property a layer's representation makes linearly readable.

A probe is multinomial logistic regression on frozen features, fit on one split and
scored on another. Its accuracy is only meaningful next to a control task (Hewitt &
Liang 2019): the same inputs with each token type mapped to a random label, which
a probe can only fit by memorising types. Selectivity = accuracy - control accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ProbeResult:
    accuracy: float  # on the held-out split
    train_accuracy: float
    majority: float  # held-out accuracy of always answering the most frequent train label
    n_train: int
    n_test: int


def _check(features, labels, name):
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            f"{name} features must be a 2-D float tensor (n, d), got {getattr(features, 'shape', features)!r}"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"{name} labels must be a 1-D int tensor (n,), got {getattr(labels, 'shape', labels)!r}")
    if len(features) != len(labels) or len(labels) == 0:
        raise ValueError(f"{name}: {len(features)} feature rows but {len(labels)} labels (need equal, > 0)")


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> ProbeResult:
    """Fit a linear classifier on standardised train features (full-batch Adam) and score it."""
    _check(train_x, train_y, "train")
    _check(test_x, test_y, "test")
    if train_x.size(1) != test_x.size(1):
        raise ValueError(f"train features have {train_x.size(1)} dims, test features {test_x.size(1)}")
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = train_x.float(), test_x.float()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(xtr.size(1), n_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=gen)
        probe.bias.zero_()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(probe(xtr), train_y).backward()
            opt.step()
    with torch.no_grad():
        acc = (probe(xte).argmax(-1) == test_y).float().mean().item()
        train_acc = (probe(xtr).argmax(-1) == train_y).float().mean().item()
    majority_label = torch.bincount(train_y, minlength=n_classes).argmax()
    majority = (test_y == majority_label).float().mean().item()
    return ProbeResult(acc, train_acc, majority, len(train_y), len(test_y))


def control_labels(token_types: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang's control task: each token type gets a fixed random label, drawn
    with the real labels' frequencies, so only memorising types can predict it."""
    if token_types.shape != labels.shape:
        raise ValueError(f"token_types {tuple(token_types.shape)} and labels {tuple(labels.shape)} differ in shape")
    gen = torch.Generator().manual_seed(seed)
    n_types = int(token_types.max()) + 1
    pool = labels[torch.randint(len(labels), (n_types,), generator=gen)]
    return pool[token_types]
