"""Deterministic seeding: same seed, same profile, same machine -> same numbers."""

from __future__ import annotations

import random

import numpy as np
import torch

from lab.checks import check_int


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same way."""
    check_int("seed", seed, 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
