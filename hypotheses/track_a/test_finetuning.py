"""Track A: fine-tuning mechanics. A Shakespeare-trained base learns Milton through
transformers + peft (+ bitsandbytes): loss curves, learning rate, LoRA rank, QLoRA,
forgetting, and where the optimizer moves the weights."""

import math

import numpy as np
import pytest

from lab.report import at_least, at_most, between, greater_than, less_than, prediction

pytestmark = pytest.mark.track_a


def _val(result, vocab_size) -> float:
    """Final new-task val loss; a diverged run scores ln V (knows nothing)."""
    return math.log(vocab_size) if result.diverged else result.final["new_val"]


def _curves(runs, key):
    first = next(iter(runs.values()))
    steps = [e["step"] for e in first.evals]
    return steps, np.mean([[e[key] for e in r.evals] for r in runs.values()], axis=0)


@prediction(
    "Fast then slow: at least half of the total drop in Milton val loss happens in the first 20% of steps",
    metric="early_share",
    expect=at_least(0.5),
)
@prediction(
    "Milton val loss is still falling at the end of the budget (it bottoms out in the last 10% of steps): less than one epoch cannot overfit",
    metric="best_step_fraction",
    expect=at_least(0.9),
)
def test_loss_curves(lab, ft_runs, milton_data, outcome):
    """Loss curves of LoRA fine-tuning on Milton.

    Fine-tune the base (a Llama-style GQA model pretrained on tiny Shakespeare, exported
    to Hugging Face format) with LoRA rank 8 on q/k/v/o projections at the profile's
    learning rate (warm-up free cosine decay), evaluating Milton train and val loss on
    fixed batches every eval_interval steps. early_share = (val at step 0 - val at 20%
    of the steps) / (val at step 0 - final val); best_step_fraction = step of the lowest
    val loss / total steps. One base, a fine-tuning seed per run (batch order).
    """
    f = lab.profile.finetune
    runs = ft_runs(method="lora", rank=8)
    for seed, r in runs.items():
        vals = np.array([e["new_val"] for e in r.evals])
        steps = np.array([e["step"] for e in r.evals])
        at20 = vals[np.searchsorted(steps, 0.2 * f.steps)]
        outcome.record("early_share", float((vals[0] - at20) / (vals[0] - vals[-1])), seed=seed)
        outcome.record("best_step_fraction", float(steps[vals.argmin()] / f.steps), seed=seed)
    s, train = _curves(runs, "train_loss")
    _, val = _curves(runs, "new_val")
    outcome.plot_lines(
        "curves",
        {"Milton train": (s, train), "Milton val": (s, val)},
        xlabel="fine-tuning step",
        ylabel="loss (nats/char), mean over seeds",
        title="LoRA r=8 on Milton",
    )
    outcome.note(
        f"Milton: {len(milton_data.train):,} training characters; {milton_data.dropped_chars:,} characters "
        "outside the base's Shakespeare alphabet were dropped."
    )


@prediction(
    "The learning rate matters U-shaped: both the smallest and the largest rate end worse than the best rate in between",
    metric="u_depth",
    expect=greater_than(0.0),
)
@prediction(
    "The smallest rate (1e-5) underfits: at least 0.1 nats/char above the best rate",
    metric="low_lr_gap",
    expect=at_least(0.1),
)
@prediction(
    "The largest rate (5e-3) destabilizes: it ends at least 0.02 nats/char above the best rate",
    metric="high_lr_gap",
    expect=at_least(0.02),
)
def test_learning_rate_sweep(lab, ft_runs, milton_data, outcome):
    """LoRA (rank 8) fine-tuning at each rate of the seed's grid (1e-5, 2e-4, 1e-3, 5e-3).

    Same base, data, steps and seeds; final Milton val loss per rate (a diverged run
    scores ln V). u_depth = min(loss at the smallest, loss at the largest rate) - min
    over the rates in between; gaps are measured from the best rate of each seed.
    """
    f = lab.profile.finetune
    V = milton_data.tokenizer.vocab_size
    runs = {lr: ft_runs(method="lora", rank=8, lr=lr) for lr in f.lrs}
    lines = {}
    for seed in lab.seeds:
        vals = {lr: _val(runs[lr][seed], V) for lr in f.lrs}
        for lr, v in vals.items():
            outcome.record(f"val_at_{lr:g}", v, seed=seed, unit="nats/char")
        interior = min(vals[lr] for lr in f.lrs[1:-1])
        best = min(vals.values())
        outcome.record("u_depth", min(vals[f.lrs[0]], vals[f.lrs[-1]]) - interior, seed=seed)
        outcome.record("low_lr_gap", vals[f.lrs[0]] - best, seed=seed)
        outcome.record("high_lr_gap", vals[f.lrs[-1]] - best, seed=seed)
        spikes = [
            max(
                0.0,
                max(h["loss"] for h in runs[lr][seed].history[len(runs[lr][seed].history) // 10 :])
                - runs[lr][seed].history[len(runs[lr][seed].history) // 10]["loss"],
            )
            for lr in f.lrs
        ]
        for lr, sp in zip(f.lrs, spikes):
            outcome.record(f"spike_at_{lr:g}", sp, seed=seed)
    for lr in f.lrs:
        lines[f"lr {lr:g}"] = _curves(runs[lr], "new_val")
    outcome.plot_lines(
        "val_by_lr",
        lines,
        xlabel="fine-tuning step",
        ylabel="Milton val loss, mean over seeds",
        title="LoRA r=8: learning-rate sweep",
    )


@prediction(
    "Diminishing returns with rank: doubling the smallest rank (8 -> 16) lowers Milton val loss more than doubling the largest (32 -> 64)",
    metric="gain_lowest_ranks",
    expect=greater_than("gain_highest_ranks"),
)
def test_lora_rank(lab, ft_runs, milton_data, outcome):
    """LoRA rank vs Milton val loss, with full fine-tuning as the reference.

    LoRA on q/k/v/o at each profile rank (alpha = 2 x rank, so the update's scale is the
    same), and full fine-tuning of every weight, at the profile's learning rate; same
    steps and seeds. Final val loss against trainable parameters; the gains are paired
    by seed (for the smoke profile's two ranks the second gain is 0).
    """
    f = lab.profile.finetune
    V = milton_data.tokenizer.vocab_size
    runs = {r: ft_runs(method="lora", rank=r) for r in f.ranks}
    full = ft_runs(method="full")
    rows = []
    for seed in lab.seeds:
        vals = {r: _val(runs[r][seed], V) for r in f.ranks}
        for r, v in vals.items():
            outcome.record(f"val_rank_{r}", v, seed=seed, unit="nats/char")
        outcome.record("val_full", _val(full[seed], V), seed=seed, unit="nats/char")
        ranks = list(f.ranks)
        outcome.record("gain_lowest_ranks", vals[ranks[0]] - vals[ranks[1]], seed=seed)
        outcome.record("gain_highest_ranks", vals[ranks[-2]] - vals[ranks[-1]] if len(ranks) > 2 else 0.0, seed=seed)
    for r in f.ranks:
        first = next(iter(runs[r].values()))
        rows.append(
            {
                "method": first.config.label,
                "trainable params": first.trainable_params,
                "final Milton val (mean)": round(float(np.mean([_val(x, V) for x in runs[r].values()])), 4),
            }
        )
    first = next(iter(full.values()))
    rows.append(
        {
            "method": "full fine-tuning",
            "trainable params": first.trainable_params,
            "final Milton val (mean)": round(float(np.mean([_val(x, V) for x in full.values()])), 4),
        }
    )
    outcome.table("rank", rows, caption="Final Milton val loss vs trainable parameters")
    outcome.plot_lines(
        "val_vs_params",
        {
            "LoRA": (
                [row["trainable params"] for row in rows[:-1]],
                [row["final Milton val (mean)"] for row in rows[:-1]],
            ),
            "full fine-tuning": ([rows[-1]["trainable params"]], [rows[-1]["final Milton val (mean)"]]),
        },
        xlabel="trainable parameters",
        ylabel="final Milton val loss",
        title="LoRA rank vs full fine-tuning",
        logx=True,
    )


@prediction(
    "QLoRA (4-bit NF4 base + LoRA r=8) ends within 0.05 nats/char of LoRA r=8 on the full-precision base",
    metric="qlora_minus_lora",
    expect=between(-0.05, 0.05),
)
@prediction(
    "The 4-bit base needs at most half the bytes of the full-precision base",
    metric="base_bytes_ratio",
    expect=at_most(0.5),
)
def test_qlora_matches_lora(lab, ft_runs, milton_data, outcome):
    """QLoRA vs LoRA at the same rank, learning rate, steps and seeds.

    QLoRA loads the base through bitsandbytes as 4-bit NF4 with double quantisation
    (compute in float32) and trains the same LoRA adapters on top. Final Milton val
    loss paired by seed; the base's bytes in memory (model.get_memory_footprint(),
    4-bit weights counted packed) for each.
    """
    V = milton_data.tokenizer.vocab_size
    lora, qlora = ft_runs(method="lora", rank=8), ft_runs(method="qlora", rank=8)
    for seed in lab.seeds:
        outcome.record("qlora_minus_lora", _val(qlora[seed], V) - _val(lora[seed], V), seed=seed, unit="nats/char")
    lb, qb = next(iter(lora.values())).base_weight_bytes, next(iter(qlora.values())).base_weight_bytes
    outcome.record("base_bytes_ratio", qb / lb)
    outcome.record("lora_base_bytes", lb, unit="bytes")
    outcome.record("qlora_base_bytes", qb, unit="bytes")
    outcome.plot_lines(
        "curves",
        {"LoRA r=8": _curves(lora, "new_val"), "QLoRA r=8": _curves(qlora, "new_val")},
        xlabel="fine-tuning step",
        ylabel="Milton val loss, mean over seeds",
        title="QLoRA vs LoRA",
    )


@prediction(
    "Full fine-tuning forgets more than LoRA: Shakespeare val loss rises more",
    metric="full_forgetting",
    expect=greater_than("lora_forgetting"),
)
@prediction(
    "Replay (a quarter of each batch from Shakespeare) reduces full fine-tuning's forgetting",
    metric="full_replay_forgetting",
    expect=less_than("full_forgetting"),
)
def test_catastrophic_forgetting(lab, ft_runs, outcome):
    """Old task (Shakespeare) vs new task (Milton) during fine-tuning.

    Full fine-tuning and LoRA r=8 at the profile's learning rate, each with and without
    replay (profile replay_fraction of every batch drawn from Shakespeare's training
    text). Forgetting = final Shakespeare val loss - its value before fine-tuning,
    paired by seed. The plot traces each method in (Milton val, Shakespeare val) space.
    """
    f = lab.profile.finetune
    variants = {
        "full": ft_runs(method="full"),
        "lora": ft_runs(method="lora", rank=8),
        "full_replay": ft_runs(method="full", replay_fraction=f.replay_fraction),
        "lora_replay": ft_runs(method="lora", rank=8, replay_fraction=f.replay_fraction),
    }
    lines = {}
    for name, runs in variants.items():
        for seed, r in runs.items():
            outcome.record(
                f"{name}_forgetting", r.final["old_val"] - r.evals[0]["old_val"], seed=seed, unit="nats/char"
            )
            outcome.record(f"{name}_new_val", r.final["new_val"], seed=seed, unit="nats/char")
        _, new = _curves(runs, "new_val")
        _, old = _curves(runs, "old_val")
        lines[name.replace("_", " + ")] = (new, old)
    outcome.plot_lines(
        "old_vs_new",
        lines,
        xlabel="Milton val loss (new task)",
        ylabel="Shakespeare val loss (old task)",
        title="Forgetting trajectories (mean over seeds; training runs right to left)",
    )


@prediction(
    "The last layer's LoRA update moves its weights more (relative change) than the first layer's",
    metric="delta_last",
    expect=greater_than("delta_first"),
)
def test_optimizer_state_by_layer(lab, ft_runs, outcome):
    """Adam's moments and the weight change per layer, over LoRA fine-tuning.

    From the LoRA r=8 runs, at every evaluation: per layer, the mean |first moment| and
    mean sqrt(second moment) of Adam over that layer's adapter weights, and the relative
    size of the layer's update, ||(alpha/r) B A|| / ||W0|| averaged over its q/k/v/o
    projections. The statistic compares the last and first layer at the end.
    """
    runs = ft_runs(method="lora", rank=8)
    for seed, r in runs.items():
        layers = r.layer_stats[-1]["layers"]
        keys = sorted(layers, key=int)
        outcome.record("delta_first", layers[keys[0]]["delta"], seed=seed)
        outcome.record("delta_last", layers[keys[-1]]["delta"], seed=seed)
    first = next(iter(runs.values()))
    steps = [s["step"] for s in first.layer_stats]
    for stat, label in (
        ("delta", "relative weight change"),
        ("adam_m", "mean |Adam m|"),
        ("adam_v", "mean sqrt(Adam v)"),
    ):
        lines = {}
        for layer in sorted(first.layer_stats[-1]["layers"], key=int):
            lines[f"layer {layer}"] = (steps[1:], [s["layers"][layer].get(stat, 0.0) for s in first.layer_stats[1:]])
        outcome.plot_lines(
            f"layers_{stat}",
            lines,
            xlabel="fine-tuning step",
            ylabel=label,
            title=f"LoRA r=8, per layer: {label} (seed {next(iter(runs))})",
        )
