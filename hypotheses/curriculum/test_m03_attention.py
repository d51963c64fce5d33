"""Curriculum 03: attention basics — the causal mask, the 1/sqrt(d_k) scale, and how
many heads to split a fixed width into."""

import math

import numpy as np
import pytest
import torch

from lab.ablations import compare_runs
from lab.inspect.attention import patterns
from lab.models import GPT
from lab.models.config import POSITIONS
from lab.report import at_least, at_most, between, check, less_than, prediction
from lab.seeding import seed_everything

pytestmark = [pytest.mark.curriculum, pytest.mark.m03_attention]


@check(
    "Causal masking is exact: changing future tokens never changes an earlier position's logits (max |change| = 0)",
    metric="max_leak",
    expect=at_most(0.0),
)
def test_causal_mask_is_exact(lab, char_data, outcome):
    """Does anything leak from the future?

    For each positional encoding, a freshly initialised shared small GPT (seed 0) reads
    random token sequences; for 20 random cut points t, every token after t is
    replaced by random tokens and the logits at positions <= t are compared with the
    original ones. The statistic is the largest absolute change seen, over all
    encodings and trials (float32, eval mode): exact, since the weights, inputs and cut
    points are fixed. A check, not a finding: the mask is exact by construction.
    """
    a = lab.profile.architecture
    T, V = a.model.block_size, char_data.tokenizer.vocab_size
    gen = torch.Generator().manual_seed(0)
    worst, rows = 0.0, []
    for pos in POSITIONS:
        seed_everything(0)
        model = GPT(lab.arch_config(char_data, pos=pos)).eval()
        leak = 0.0
        with torch.no_grad():
            for _ in range(20):
                idx = torch.randint(0, V, (2, T), generator=gen)
                t = int(torch.randint(0, T - 1, (1,), generator=gen))
                changed = idx.clone()
                changed[:, t + 1 :] = torch.randint(0, V, (2, T - t - 1), generator=gen)
                diff = (model(idx)[0][:, : t + 1] - model(changed)[0][:, : t + 1]).abs().max().item()
                leak = max(leak, diff)
        rows.append({"encoding": pos, "max |logit change| at earlier positions": leak})
        worst = max(worst, leak)
    outcome.record("max_leak", worst, deterministic=True)
    outcome.table("leak_by_encoding", rows)


def _mean_normalised_entropy(pattern: torch.Tensor) -> float:
    """Mean over rows i >= 1 of H(row i) / log(i + 1): 1 = uniform over the visible keys."""
    p = pattern.double()
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)  # (B, H, T)
    visible = torch.arange(1, p.size(-1) + 1, dtype=torch.float64)
    return float((h[..., 1:] / visible[1:].log()).mean())


def _entropy_at_init(lab, char_data, d_k: int, *, scaled: bool, init_std: float | None, seed: int) -> float:
    a = lab.profile.architecture
    config = lab.arch_config(
        char_data,
        n_layer=1,
        n_head=1,
        n_embd=d_k,
        pos="learned",
        qk_scale=None if scaled else 1.0,
        init_std=init_std or 1 / math.sqrt(d_k),
    )
    seed_everything(seed)
    model = GPT(config).eval()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (8, a.model.block_size), generator=gen)
    return _mean_normalised_entropy(patterns(model, idx)[0])


def _entropy_sweep(lab, char_data, outcome, init_std):
    a = lab.profile.architecture
    lines = {"scaled by 1/sqrt(d_k)": ([], []), "unscaled": ([], [])}
    for d_k in a.head_dims:
        for label, scaled in (("scaled", True), ("unscaled", False)):
            values = [
                _entropy_at_init(lab, char_data, d_k, scaled=scaled, init_std=init_std, seed=s) for s in lab.seeds
            ]
            for s, v in zip(lab.seeds, values):
                outcome.record(f"{label}_entropy_dk{d_k}", v, seed=s)
                if d_k == max(a.head_dims):
                    outcome.record(f"{label}_entropy_at_max_dk", v, seed=s)
            key = "scaled by 1/sqrt(d_k)" if scaled else "unscaled"
            lines[key][0].append(d_k)
            lines[key][1].append(float(np.mean(values)))
    return lines


@prediction(
    "Without 1/sqrt(d_k), attention at a variance-preserving init collapses as d_k grows: normalised entropy at the "
    "largest d_k <= 0.5",
    metric="unscaled_entropy_at_max_dk",
    expect=at_most(0.5),
)
@prediction(
    "With 1/sqrt(d_k), attention entropy at init stays high at the largest d_k (>= 0.8)",
    metric="scaled_entropy_at_max_dk",
    expect=at_least(0.8),
)
def test_unscaled_attention_collapses_with_dk(lab, char_data, outcome):
    """Without the 1/sqrt(d_k) scale, does attention at initialisation collapse as d_k grows?

    The textbook argument (Vaswani et al., footnote 4) assumes query and key components
    of unit variance, so q.k has variance d_k. Build one-layer, one-head models of width
    d_k for each profile d_k with every weight drawn from N(0, 1/d_k) (variance
    preserving: q and k components then have unit variance after the LayerNorm), on
    random tokens, and measure the attention rows' entropy normalised by the log of the
    number of visible keys (1 = uniform), averaged over rows; with the 1/sqrt(d_k)
    scale (qk_scale=None) and without it (qk_scale=1). One init per seed.
    """
    lines = _entropy_sweep(lab, char_data, outcome, init_std=None)
    outcome.plot_lines(
        "entropy_vs_dk",
        lines,
        xlabel="head size d_k",
        ylabel="normalised attention entropy at init",
        title="Attention entropy at a variance-preserving init",
        logx=True,
    )


@prediction(
    "At GPT-2's small init (std 0.02) even unscaled attention starts near-uniform (normalised entropy >= 0.95 at "
    "the largest d_k): the scale matters once q and k grow",
    metric="unscaled_entropy_at_max_dk",
    expect=at_least(0.95),
)
def test_small_init_hides_the_missing_scale(lab, char_data, outcome):
    """Does GPT-2's small initialisation (every weight N(0, 0.02^2)) hide the missing scale?

    With std 0.02, q and k components have variance d_k * 0.0004, so q.k is tiny at
    any d_k this lab builds and the softmax is near-uniform with or without the scale;
    the scale only starts to matter as training grows the weights. The same sweep and
    measurement as the variance-preserving one.
    """
    lines = _entropy_sweep(lab, char_data, outcome, init_std=0.02)
    d = max(lab.profile.architecture.head_dims)
    # q and k components have variance d * std^2, so q.k has variance d * (d * std^2)^2
    outcome.note(
        f"At std 0.02 the unscaled logit q.k has standard deviation sqrt(d^3) * 0.02^2 = "
        f"{(d**3) ** 0.5 * 0.02**2:.2f} at d_k = {d} (vs {(d**3) ** 0.5 * 0.02**2 / d**0.5:.2f} with the scale): "
        "small only for small heads, since it grows as d_k^1.5."
    )
    outcome.plot_lines(
        "entropy_vs_dk",
        lines,
        xlabel="head size d_k",
        ylabel="normalised attention entropy at init",
        title="Attention entropy at GPT-2's init (std 0.02)",
        logx=True,
    )


@prediction(
    "Splitting the width into several heads beats one head of full width (middle head count < 1 head, val loss)",
    metric="heads_mid_val_loss",
    expect=less_than("heads_1_val_loss"),
)
@prediction(
    "Returns diminish: the most heads are within +-0.03 nats/char of the middle count",
    metric="heads_most_minus_mid",
    expect=between(-0.03, 0.03),
)
def test_head_count_at_fixed_width(lab, ablation_runs, outcome, require_trained):
    """At fixed width, do more attention heads lower the validation loss?

    Train the shared small GPT with each profile head count (width, depth, data,
    budget and seeds fixed; head size = width / heads, so parameters are identical)
    and compare final validation loss, paired by seed.
    """
    counts = lab.profile.architecture.head_counts
    runs = {f"heads_{h}": ablation_runs(n_head=h) for h in counts}
    compare_runs(outcome, runs, title="Head count at fixed width: validation loss", baseline=f"heads_{counts[0]}")
    mid, most = counts[len(counts) // 2], max(counts)
    for seed in lab.seeds:
        outcome.record("heads_mid_val_loss", runs[f"heads_{mid}"][seed].final_val_loss, seed=seed)
        outcome.record(
            "heads_most_minus_mid",
            runs[f"heads_{most}"][seed].final_val_loss - runs[f"heads_{mid}"][seed].final_val_loss,
            seed=seed,
        )
    require_trained(runs, "every model")
