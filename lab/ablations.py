"""Comparing training runs that differ in one component: per-variant curves, final
numbers with intervals, and per-layer statistics from the training history.

    runs = {"learned": {0: run, 1: run, 2: run}, "alibi": {...}}
    compare_runs(outcome, runs)   # records <variant>_val_loss per seed, plots, tables
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from lab.report.intervals import mean_interval
from lab.train import TrainResult

Runs = Mapping[str, Mapping[int, TrainResult]]


def _check_runs(runs: Runs) -> None:
    if not runs:
        raise ValueError("runs must map at least one variant name to {seed: TrainResult}")
    for label, by_seed in runs.items():
        if not by_seed or not all(isinstance(r, TrainResult) for r in by_seed.values()):
            raise ValueError(f"runs[{label!r}] must be a non-empty {{seed: TrainResult}} mapping")


def mean_curve(by_seed: Mapping[int, TrainResult], key: str = "val_loss") -> tuple[list[int], list[float]]:
    """Steps and the across-seed mean of an eval-record field (seeds share eval steps)."""
    runs = list(by_seed.values())
    steps = [e["step"] for e in runs[0].evals]
    values = np.mean([[e[key] for e in r.evals] for r in runs], axis=0)
    return steps, values.tolist()


def summary_rows(runs: Runs, *, baseline: str | None = None) -> list[dict]:
    """One table row per variant: architecture, parameters, final val loss with a 95%
    t-interval over seeds, and (with a baseline) the mean paired difference to it."""
    _check_runs(runs)
    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(runs)}")
    rows = []
    for label, by_seed in runs.items():
        first = next(iter(by_seed.values()))
        finals = [r.final_val_loss for r in by_seed.values()]
        iv = mean_interval(finals)
        row = {
            "variant": label,
            "architecture": first.model_config.describe(),
            "parameters": first.model.num_params(),
            "seeds": len(finals),
            "final val loss": round(iv.estimate, 4),
            "95% interval": "n/a (1 seed)" if not iv.decidable else f"[{iv.low:.4f}, {iv.high:.4f}]",
            "train tok/s": round(float(np.mean([r.tokens_per_s for r in by_seed.values()]))),
        }
        if baseline is not None and label != baseline:
            base = runs[baseline]
            diffs = [by_seed[s].final_val_loss - base[s].final_val_loss for s in by_seed if s in base]
            row[f"minus {baseline}"] = round(float(np.mean(diffs)), 4) if diffs else math.nan
        rows.append(row)
    return rows


def compare_runs(outcome, runs: Runs, *, title: str, baseline: str | None = None, unit: str = "nats/token") -> None:
    """Record `<variant>_val_loss` per seed, overlay the mean validation curves, and
    tabulate the final numbers with intervals."""
    _check_runs(runs)
    for label, by_seed in runs.items():
        for seed, run in by_seed.items():
            outcome.record(f"{label}_val_loss", run.final_val_loss, seed=seed, unit=unit)
    outcome.plot_lines(
        "val_curves",
        {label: mean_curve(by_seed) for label, by_seed in runs.items()},
        xlabel="optimizer step",
        ylabel=f"val loss ({unit}), mean over seeds",
        title=title,
    )
    outcome.table("final_losses", summary_rows(runs, baseline=baseline), caption="Final validation loss per variant")


def block_grad_norms(run: TrainResult, steps: int | None = None) -> np.ndarray:
    """(steps, n_layer) pre-clip gradient norm of each block over training (all steps by default)."""
    rows = [h["block_grad_norms"] for h in run.history if "block_grad_norms" in h]
    if not rows:
        raise ValueError("this run's history has no per-block gradient norms (trained before they were recorded)")
    return np.asarray(rows[:steps] if steps else rows, dtype=float)


def expert_load(run: TrainResult) -> np.ndarray:
    """(steps, n_layer, n_expert) fraction of routed tokens per expert, from an MoE run's history."""
    rows = [h["expert_load"] for h in run.history if "expert_load" in h]
    if not rows:
        raise ValueError("this run's history has no expert load (not a mixture-of-experts model)")
    return np.asarray(rows, dtype=float)


def normalized_entropy(load: np.ndarray) -> np.ndarray:
    """Entropy of expert-load distributions (last axis) over log(n_expert): 1 = perfectly
    balanced, 0 = every token on one expert."""
    p = np.clip(np.asarray(load, dtype=float), 0, None)
    p = p / p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return h / math.log(p.shape[-1])
