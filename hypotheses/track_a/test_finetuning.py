"""Track A: fine-tuning mechanics. A Shakespeare-trained base learns Milton through
transformers + peft (+ bitsandbytes): loss curves, learning rate, LoRA rank, QLoRA,
forgetting, and where the optimizer moves the weights."""

import math

import numpy as np
import pytest

from lab.report import at_least, at_most, between, check, greater_than, less_than, prediction

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
    "Milton val loss is still falling at the end of the budget (its last evaluation is below the one before it): "
    "less than one epoch cannot overfit",
    metric="last_eval_change",
    expect=less_than(0.0),
)
def test_loss_curves(lab, ft_runs, milton_data, outcome, require_finetuned):
    """Does Milton loss fall fast then slow under LoRA fine-tuning, and is it still falling at the end?

    Fine-tune the base (a Llama-style GQA model pretrained on tiny Shakespeare, exported
    to Hugging Face format) with LoRA rank 8 on q/k/v/o projections at the profile's
    learning rate (warm-up free cosine decay), evaluating Milton train and val loss on
    fixed batches every eval_interval steps. early_share = (val at step 0 - val at 20%
    of the steps) / (val at step 0 - final val); last_eval_change = final val - val at
    the evaluation before it (negative while still falling); best_step_fraction = step of
    the lowest val loss / total steps. One base, a fine-tuning seed per run (batch order).
    Valid only if the base learned Shakespeare and every run moved its Milton loss.
    """
    f = lab.profile.finetune
    runs = ft_runs(method="lora", rank=8)
    for seed, r in runs.items():
        vals = np.array([e["new_val"] for e in r.evals])
        steps = np.array([e["step"] for e in r.evals])
        at20 = vals[np.searchsorted(steps, 0.2 * f.steps)]
        outcome.record("early_share", float((vals[0] - at20) / (vals[0] - vals[-1])), seed=seed)
        outcome.record("best_step_fraction", float(steps[vals.argmin()] / f.steps), seed=seed)
        outcome.record("last_eval_change", float(vals[-1] - vals[-2]), seed=seed, unit="nats/char")
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
    require_finetuned({"LoRA r=8": runs})


@prediction(
    "The learning rate matters U-shaped: both the smallest and the largest rate end worse than the best rate in "
    "between",
    metric="u_depth",
    expect=greater_than(0.0),
)
@prediction(
    "The smallest rate (1e-5) underfits: at least 0.1 nats/char above the best rate",
    metric="low_lr_gap",
    expect=at_least(0.1),
)
@prediction(
    "The largest rate (5e-3) destabilizes: it ends at least 0.02 nats/char above the best of the other rates",
    metric="high_lr_gap",
    expect=at_least(0.02),
)
def test_learning_rate_sweep(lab, ft_runs, milton_data, outcome, require_finetuned):
    """Is LoRA fine-tuning's final loss U-shaped in the learning rate?

    LoRA (rank 8) at each rate of the seed's grid (1e-5, 2e-4, 1e-3, 5e-3): same base,
    data, steps and seeds; final Milton val loss per rate (a diverged run scores ln V).
    u_depth = min(loss at the smallest, loss at the largest rate) - min over the rates in
    between; each end's gap is measured from the best of the other rates of its seed (so
    it is negative when that end is itself the best rate). Valid only if the base learned
    Shakespeare and each seed's best rate moved its Milton loss.
    """
    f = lab.profile.finetune
    V = milton_data.tokenizer.vocab_size
    runs = {lr: ft_runs(method="lora", rank=8, lr=lr) for lr in f.lrs}
    lines, best_runs = {}, {}
    for seed in lab.seeds:
        vals = {lr: _val(runs[lr][seed], V) for lr in f.lrs}
        for lr, v in vals.items():
            outcome.record(f"val_at_{lr:g}", v, seed=seed, unit="nats/char")
        interior = min(vals[lr] for lr in f.lrs[1:-1])
        outcome.record("u_depth", min(vals[f.lrs[0]], vals[f.lrs[-1]]) - interior, seed=seed)
        outcome.record("low_lr_gap", vals[f.lrs[0]] - min(vals[lr] for lr in f.lrs[1:]), seed=seed)
        outcome.record("high_lr_gap", vals[f.lrs[-1]] - min(vals[lr] for lr in f.lrs[:-1]), seed=seed)
        best_runs[seed] = runs[min(vals, key=vals.get)][seed]
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
    require_finetuned({"best rate": best_runs})
    outcome.plot_lines(
        "val_by_lr",
        lines,
        xlabel="fine-tuning step",
        ylabel="Milton val loss, mean over seeds",
        title="LoRA r=8: learning-rate sweep",
    )


@prediction(
    "Diminishing returns with rank: doubling the smallest rank (8 -> 16) lowers Milton val loss more than doubling "
    "the largest (32 -> 64)",
    metric="gain_lowest_ranks",
    expect=greater_than("gain_highest_ranks"),
)
def test_lora_rank(lab, ft_runs, milton_data, outcome, require_finetuned):
    """Does raising the LoRA rank give diminishing returns on Milton?

    LoRA on q/k/v/o at each profile rank (alpha = 2 x rank, so the update's scale is the
    same), and full fine-tuning of every weight, at the profile's learning rate; same
    steps and seeds. Final val loss against trainable parameters; the gains are paired
    by seed (for the smoke profile's two ranks the second gain is 0). Valid only if the
    base learned Shakespeare and every run moved its Milton loss.
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
    require_finetuned({**{f"LoRA r={r}": runs[r] for r in f.ranks}, "full": full})
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
@check(
    "The 4-bit base needs at most half the bytes of the full-precision base",
    metric="base_bytes_ratio",
    expect=at_most(0.5),
)
def test_qlora_matches_lora(lab, ft_runs, milton_data, outcome, require_finetuned):
    """Does QLoRA (a 4-bit base) end as well as LoRA at the same rank, learning rate, steps and seeds?

    QLoRA loads the base through bitsandbytes as 4-bit NF4 with double quantisation
    (compute in float32) and trains the same LoRA adapters on top. Final Milton val
    loss paired by seed; the base's bytes in memory (model.get_memory_footprint(),
    4-bit weights counted packed) for each: exact, and a check rather than a finding
    (4-bit codes take an eighth of float32's bytes by construction). Valid only if the
    base learned Shakespeare and every run moved its Milton loss.
    """
    V = milton_data.tokenizer.vocab_size
    lora, qlora = ft_runs(method="lora", rank=8), ft_runs(method="qlora", rank=8)
    for seed in lab.seeds:
        outcome.record("qlora_minus_lora", _val(qlora[seed], V) - _val(lora[seed], V), seed=seed, unit="nats/char")
    lb, qb = next(iter(lora.values())).base_weight_bytes, next(iter(qlora.values())).base_weight_bytes
    outcome.record("base_bytes_ratio", qb / lb, deterministic=True)
    outcome.record("lora_base_bytes", lb, unit="bytes", deterministic=True)
    outcome.record("qlora_base_bytes", qb, unit="bytes", deterministic=True)
    require_finetuned({"LoRA r=8": lora, "QLoRA r=8": qlora})
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
def test_catastrophic_forgetting(lab, ft_runs, outcome, require_finetuned):
    """Does full fine-tuning forget the old task (Shakespeare) more than LoRA, and does replay help?

    Full fine-tuning and LoRA r=8 at the profile's learning rate, each with and without
    replay (profile replay_fraction of every batch drawn from Shakespeare's training
    text). Forgetting = final Shakespeare val loss - its value before fine-tuning,
    paired by seed. The plot traces each method in (Milton val, Shakespeare val) space.
    Valid only if the base learned Shakespeare and every run moved its Milton loss.
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
    require_finetuned(variants)


@prediction(
    "The last layer's LoRA update moves its weights more (relative change) than the first layer's",
    metric="delta_last",
    expect=greater_than("delta_first"),
)
def test_optimizer_state_by_layer(lab, ft_runs, outcome, require_finetuned):
    """Does LoRA fine-tuning move the last layer's weights more than the first layer's?

    From the LoRA r=8 runs, at every evaluation: per layer, the mean |first moment| and
    mean sqrt(second moment) of Adam over that layer's adapter weights, and the relative
    size of the layer's update, ||(alpha/r) B A|| / ||W0|| averaged over its q/k/v/o
    projections. The statistic compares the last and first layer at the end. Valid only
    if the base learned Shakespeare and every run moved its Milton loss.
    """
    runs = ft_runs(method="lora", rank=8)
    for seed, r in runs.items():
        layers = r.layer_stats[-1]["layers"]
        keys = sorted(layers, key=int)
        outcome.record("delta_first", layers[keys[0]]["delta"], seed=seed)
        outcome.record("delta_last", layers[keys[-1]]["delta"], seed=seed)
    require_finetuned({"LoRA r=8": runs})
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


@prediction(
    "trl's SFTTrainer with the same LoRA config, batches and seed ends at the written-out loop's Milton val loss: "
    "the difference (trl - lab) lies within {low} to {high} nats/char",
    metric="final_val_trl_minus_lab",
    expect=between(-0.02, 0.02),
)
@prediction(
    "The two Milton val-loss curves agree at every evaluation: their largest gap is at most {bound} nats/char",
    metric="max_val_gap",
    expect=at_most(0.05),
)
def test_trl_sfttrainer_matches_the_written_out_loop(
    lab, ft_runs, ft_base, ft_tokenizer, milton_data, old_data, outcome, require_finetuned, tmp_path_factory
):
    """Does trl's SFTTrainer, given the same LoRA config, data and seeds, fine-tune as the written-out loop does?

    The written-out loop (lab.finetune: LoRA rank 8 on q/k/v/o, the run of the loss-curve
    hypothesis) against trl's SFTTrainer (lab.finetune_trl) with the same peft LoraConfig
    passed to the trainer, the same base, the same windows in the same order (the loop's
    batch draws replayed as pre-tokenised rows of block_size + 1 tokens, read sequentially),
    the same seed (SFTTrainer seeds before it wraps the model, so the adapters start
    equal), AdamW with the loop's betas (0.9, 0.99), gradient clipping at 1.0 and float32.
    The one setting that differs is the schedule: transformers' cosine_with_min_lr reaches
    its floor one update after the last, so each update after the first runs at a
    learning rate up to lr / steps higher than the loop's. Both are evaluated by the same
    function on the same fixed batches every eval_interval steps. final_val_trl_minus_lab:
    the final Milton val losses' difference, paired by seed; max_val_gap: the largest
    |trl - lab| over the evaluations of a seed. Valid only if the base learned Shakespeare,
    every run moved its Milton loss and the two paths started together (first-step
    training losses within 1e-4).
    """
    from lab.finetune import FinetuneConfig
    from lab.finetune_trl import trl_finetune

    pytest.importorskip("trl")
    f = lab.profile.finetune
    runs = ft_runs(method="lora", rank=8)
    trl_runs, starts, rows = {}, [], []
    for seed, r in runs.items():
        cfg = FinetuneConfig(**{**r.config.to_dict(), "target_modules": tuple(r.config.target_modules)})
        t = trl_finetune(
            ft_base,
            milton_data,
            old_data,
            cfg,
            tokenizer=ft_tokenizer,
            out_dir=tmp_path_factory.mktemp(f"trl-sft-{seed}"),
            device=lab.device,
        )
        trl_runs[seed] = t
        gaps = [abs(a["new_val"] - b["new_val"]) for a, b in zip(r.evals, t.evals)]
        outcome.record("final_val_lab", r.final["new_val"], seed=seed, unit="nats/char")
        outcome.record("final_val_trl", t.final["new_val"], seed=seed, unit="nats/char")
        outcome.record("final_val_trl_minus_lab", t.final["new_val"] - r.final["new_val"], seed=seed)
        outcome.record("max_val_gap", max(gaps), seed=seed, unit="nats/char")
        outcome.record("final_old_val_lab", r.final["old_val"], seed=seed, unit="nats/char")
        outcome.record("final_old_val_trl", t.final["old_val"], seed=seed, unit="nats/char")
        starts.append((seed, r.history[0]["loss"], t.history[0]["loss"]))
        rows.append(
            {
                "seed": seed,
                "Milton val, lab -> trl": f"{r.final['new_val']:.4f} -> {t.final['new_val']:.4f}",
                "Shakespeare val, lab -> trl": f"{r.final['old_val']:.4f} -> {t.final['old_val']:.4f}",
                "largest val gap": f"{max(gaps):.2e}",
                "evaluations": len(gaps),
            }
        )
    steps = [e["step"] for e in next(iter(runs.values())).evals]
    mean = lambda rs, key: [sum(x.evals[i][key] for x in rs) / len(rs) for i in range(len(steps))]  # noqa: E731
    outcome.plot_lines(
        "curves_both_paths",
        {
            "Milton val, written-out loop": (steps, mean(list(runs.values()), "new_val")),
            "Milton val, trl SFTTrainer": (steps, mean(list(trl_runs.values()), "new_val")),
            "Shakespeare val, written-out loop": (steps, mean(list(runs.values()), "old_val")),
            "Shakespeare val, trl SFTTrainer": (steps, mean(list(trl_runs.values()), "old_val")),
        },
        xlabel="fine-tuning step",
        ylabel="loss (nats/char), mean over seeds",
        title=f"LoRA r=8 on Milton, two paths ({f.steps} steps)",
    )
    outcome.table("side_by_side", rows, caption="Final losses per seed, written-out loop vs trl's SFTTrainer")
    outcome.require(
        "the two paths started together",
        all(abs(a - b) <= 1e-4 for _, a, b in starts),
        "first-step training losses (lab / trl): " + ", ".join(f"seed {s} {a:.5f}/{b:.5f}" for s, a, b in starts),
    )
    moved = [s for s, t in trl_runs.items() if not t.final["new_val"] < t.evals[0]["new_val"]]
    outcome.require(
        "every trl run moved its Milton val loss", not moved, f"not met by seeds {moved}" if moved else "all did"
    )
    require_finetuned({"LoRA r=8": runs})
