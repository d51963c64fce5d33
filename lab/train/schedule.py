"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

from lab.checks import bounded_int, check_int, check_number


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for the optimizer update with 0-based index `step`.

    Warmup climbs linearly as lr * (step + 1) / (warmup_steps + 1), so no update
    is wasted at lr 0; the peak lr comes at step == warmup_steps. Cosine decay
    then reaches lr * min_lr_ratio exactly at the last update, step == max_steps - 1,
    and stays there for any later step.
    """
    check_int("step", step, 0)
    check_number("lr", lr, 0, low_open=True)
    check_int("max_steps", max_steps, 1)
    bounded_int(0, max_steps, "max_steps").check("warmup_steps", warmup_steps)
    check_number("min_lr_ratio", min_lr_ratio, 0, 1)

    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    min_lr = lr * min_lr_ratio
    decay_steps = max_steps - 1 - warmup_steps
    if decay_steps <= 0:
        # at most one update after warmup: it gets the peak, there is nothing to decay over
        return lr if step == warmup_steps < max_steps else min_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
