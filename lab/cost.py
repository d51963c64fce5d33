"""What a forward pass costs: its FLOPs (counted by torch's FlopCounterMode) and its wall
time, timed with several implementations interleaved so that none always runs first
(curriculum 08 and 15)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: torch.nn.Module, idx: torch.Tensor) -> int:
    """FLOPs of one forward pass of `model` on `idx`, counted by torch (a multiply-add is
    2 FLOPs; matmuls and attention only, as FlopCounterMode counts them)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(idx)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(
    fns: Mapping[str, Callable[[], object]], *, rounds: int, iterations: int = 1, device="cpu", warm_up: bool = True
) -> dict[str, list[float]]:
    """{name: [seconds per call, one per round]}: every function called `iterations` times
    per round, the functions interleaved within each round with their order rotating by
    round, after one untimed call each (unless warm_up=False). Wall time only; nothing is
    asserted about it."""
    if rounds < 1 or iterations < 1:
        raise ValueError(f"rounds and iterations must be >= 1, got rounds={rounds}, iterations={iterations}")
    if not fns:
        raise ValueError("interleaved_seconds needs at least one function to time")
    device = torch.device(device)
    names = list(fns)
    for f in fns.values() if warm_up else ():
        f()
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iterations):
                fns[n]()
            _sync(device)
            out[n].append((time.perf_counter() - t0) / iterations)
    return out
