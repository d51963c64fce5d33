"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for the optimizer update with 0-based index `step`.

    Warmup climbs linearly as lr * (step + 1) / (warmup_steps + 1), so no update
    is wasted at lr 0; the peak lr comes at step == warmup_steps. Cosine decay
    then reaches lr * min_lr_ratio exactly at the last update, step == max_steps - 1,
    and stays there for any later step.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or not 0 <= warmup_steps <= max_steps:
        raise ValueError(f"warmup_steps must be an int in [0, max_steps={max_steps}], got {warmup_steps!r}")
    if not isinstance(min_lr_ratio, (int, float)) or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}")

    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    min_lr = lr * min_lr_ratio
    decay_steps = max_steps - 1 - warmup_steps
    if decay_steps <= 0:
        # at most one update after warmup: it gets the peak, there is nothing to decay over
        return lr if step == warmup_steps < max_steps else min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
