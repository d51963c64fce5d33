"""Curriculum 04: the transformer block — where the norm goes, and what the residual
connection buys, as depth and learning rate grow."""

import numpy as np
import pytest

from lab.ablations import block_grad_norms, mean_curve
from lab.data import unigram_entropy
from lab.report import greater_than, prediction
from lab.train import TrainingDivergedError

pytestmark = [pytest.mark.curriculum, pytest.mark.m04_block]


def _deep(ablation_runs, lab, depth, lr, **overrides):
    """The depth ablations' stack: profile depth_width, `depth` layers, no warmup."""
    a = lab.profile.architecture
    return ablation_runs(
        train=dict(lr=lr, max_steps=a.depth_steps, warmup_steps=0),
        n_layer=depth,
        n_embd=a.depth_width,
        **overrides,
    )


# "Beats the unigram baseline" means by more than this: a model that learned only the
# character frequencies lands within a few thousandths of the unigram entropy, on either
# side, because validation batches are a sample of the text.
FAIL_MARGIN = 0.05


def _failed(loss: float, unigram: float) -> bool:
    return loss > unigram - FAIL_MARGIN


def _loss(run, vocab_size) -> float:
    """Final val loss; a diverged run scores ln V, the loss of a model that knows nothing."""
    return float(np.log(vocab_size)) if isinstance(run, TrainingDivergedError) else run.final_val_loss


@pytest.fixture(scope="module")
def norm_grid(lab, ablation_runs):
    """{(norm_position, depth, lr): {seed: run or TrainingDivergedError}}."""
    a = lab.profile.architecture
    return {
        (where, d, lr): _deep(ablation_runs, lab, d, lr, norm_position=where)
        for where in ("pre", "post")
        for d in a.depths
        for lr in a.depth_lrs
    }


@pytest.fixture(scope="module")
def unigram(char_data):
    """Entropy of the validation text's characters: the loss of a model that ignores context."""
    return unigram_entropy(char_data.tokenizer.decode(char_data.val.tolist()))


@prediction(
    "Post-norm fails first: across depths x learning rates (no warmup), more post-norm runs fail to beat the "
    "unigram baseline than pre-norm runs",
    metric="post_failures",
    expect=greater_than("pre_failures"),
)
@prediction(
    "At the deepest stack and highest learning rate, post-norm ends with higher val loss than pre-norm",
    metric="post_loss_deepest",
    expect=greater_than("pre_loss_deepest"),
)
def test_post_norm_fails_first(lab, char_data, norm_grid, unigram, outcome, require_trained):
    """As depth and learning rate grow, does post-norm fail before pre-norm?

    Train stacks of each profile depth (width depth_width) at each profile learning
    rate, with no warmup (the regime Xiong et al. 2020 find post-norm fragile in),
    with the norm before each sub-layer (pre-norm, GPT-2) or after the residual add
    (post-norm, the original Transformer). A run fails if it diverges or its final
    validation loss does not beat the unigram entropy of the validation text (a model
    that ignores context) by more than 0.05 nats. Per seed, count the failed cells of each
    variant: a share of the depth x learning-rate cells, compared between the variants
    with an interval for a difference of proportions over all seeds' cells (Newcombe),
    widened to the paired spread over seeds. A diverged run's loss is scored as ln V.
    Valid only if the easiest cell (pre-norm, fewest layers, lowest rate) trains.
    """
    a = lab.profile.architecture
    V = char_data.tokenizer.vocab_size
    outcome.record("unigram_entropy", unigram, unit="nats/char", deterministic=True)
    cells = [(d, lr) for d in a.depths for lr in a.depth_lrs]
    for seed in lab.seeds:
        for where in ("pre", "post"):
            fails = sum(_failed(_loss(norm_grid[(where, d, lr)][seed], V), unigram) for d, lr in cells)
            outcome.record_fraction(f"{where}_failures", fails, len(cells), seed=seed, unit="share of cells")
            deepest = norm_grid[(where, max(a.depths), max(a.depth_lrs))][seed]
            outcome.record(f"{where}_loss_deepest", _loss(deepest, V), seed=seed, unit="nats/char")
    rows, lines = [], {}
    for (where, d, lr), by_seed in norm_grid.items():
        losses = [_loss(r, V) for r in by_seed.values()]
        rows.append(
            {
                "norm": f"{where}-norm",
                "layers": d,
                "lr": lr,
                "final val loss (mean)": round(float(np.mean(losses)), 4),
                "diverged": sum(isinstance(r, TrainingDivergedError) for r in by_seed.values()),
                "failed": sum(_failed(v, unigram) for v in losses),
                "seeds": len(losses),
            }
        )
        lines.setdefault(f"{where}-norm, lr {lr:g}", ([], []))
        lines[f"{where}-norm, lr {lr:g}"][0].append(d)
        lines[f"{where}-norm, lr {lr:g}"][1].append(float(np.mean(losses)))
    outcome.table("grid", rows, caption="Final validation loss by norm placement, depth and learning rate")
    easiest = norm_grid[("pre", min(a.depths), min(a.depth_lrs))]
    require_trained(easiest, "the easiest cell (pre-norm, fewest layers, lowest rate)")
    outcome.note(
        f"A run fails when its final val loss is above unigram entropy - {FAIL_MARGIN} nats. The first cpu run "
        "(2026-11-27 01:52) counted only loss >= unigram entropy as failure; post-norm stacks stuck at "
        "3.336 against 3.337 then counted as successes, so post_failures = pre_failures = 0 and the first "
        "prediction read refuted. The margin was added after seeing that run: read this verdict with that "
        "in mind (the table shows every cell's loss either way)."
    )
    outcome.plot_lines(
        "loss_vs_depth",
        lines,
        xlabel="layers",
        ylabel="final val loss (nats/char), mean over seeds",
        title="Pre- vs post-norm by depth",
        hlines={"unigram entropy": unigram},
    )


@prediction(
    "At initialisation, post-norm's gradients grow toward the output: its last/first block gradient-norm ratio "
    "exceeds pre-norm's",
    metric="post_grad_ratio",
    expect=greater_than("pre_grad_ratio"),
)
def test_post_norm_gradients_grow_with_layer(lab, norm_grid, outcome):
    """At initialisation, do post-norm's gradients grow toward the output more than pre-norm's?

    From the deepest stacks of the pre/post-norm grid (lowest learning rate), read each
    block's gradient norm on the first optimizer step (the weights are still the
    initialisation, so the learning rate plays no part) and over training. The
    statistic is the last block's gradient norm over the first block's, paired by seed.
    """
    a = lab.profile.architecture
    d, lr = max(a.depths), min(a.depth_lrs)
    init_lines, late_lines = {}, {}
    for where in ("pre", "post"):
        runs = {s: r for s, r in norm_grid[(where, d, lr)].items() if not isinstance(r, TrainingDivergedError)}
        for seed, run in runs.items():
            g = block_grad_norms(run)
            outcome.record(f"{where}_grad_ratio", float(g[0, -1] / g[0, 0]), seed=seed)
        first = np.mean([block_grad_norms(r)[0] for r in runs.values()], axis=0)
        late = np.mean([block_grad_norms(r)[-max(1, len(r.history) // 10) :].mean(0) for r in runs.values()], axis=0)
        init_lines[f"{where}-norm"] = (np.arange(d), first)
        late_lines[f"{where}-norm"] = (np.arange(d), late)
    post0 = init_lines["post-norm"][1]
    outcome.note(
        f"Post-norm's first block gets {post0[0] / post0[1:].mean():.0f}x the gradient of the others. A reading, "
        "not a measurement: post-norm's first block adds its output to the raw embeddings (std 0.02 at GPT-2's "
        "init; the original Transformer scales them up by sqrt(d)) and its LayerNorm divides by that small "
        "scale, which multiplies the gradient of what feeds it; every later block reads a unit-scale stream."
    )
    outcome.plot_lines(
        "grad_norm_init",
        init_lines,
        xlabel="block",
        ylabel="gradient norm (first step)",
        title=f"Per-block gradient norm at initialisation, {d} layers",
        logy=True,
    )
    outcome.plot_lines(
        "grad_norm_late",
        late_lines,
        xlabel="block",
        ylabel="gradient norm (last 10% of steps)",
        title=f"Per-block gradient norm late in training, {d} layers",
        logy=True,
    )


@prediction(
    "Without residual connections the deepest stack fails to train: its val loss does not beat the unigram entropy",
    metric="no_residual_deep_loss",
    expect=greater_than("unigram_entropy"),
)
@prediction(
    "Without residual connections the deepest stack ends far worse than with them",
    metric="no_residual_deep_loss",
    expect=greater_than("residual_deep_loss"),
)
def test_residuals_let_deep_stacks_train(lab, char_data, ablation_runs, norm_grid, unigram, outcome, require_trained):
    """Can a deep stack train without residual connections?

    At the shallowest and deepest profile depths (pre-norm, lowest learning rate, no
    warmup, the grid's budget), train with each sub-layer's output replacing the stream
    (x = f(norm(x))) instead of adding to it. Compare final validation loss with the
    residual stacks and the unigram entropy; plot the curves and the deep stack's
    per-block gradient norms at initialisation. Valid only if the residual stacks (the
    comparison) trained.
    """
    a = lab.profile.architecture
    V = char_data.tokenizer.vocab_size
    lr = min(a.depth_lrs)
    outcome.record("unigram_entropy", unigram, unit="nats/char", deterministic=True)
    curves, grads, residual = {}, {}, {}
    for d, tag in ((min(a.depths), "shallow"), (max(a.depths), "deep")):
        with_res = norm_grid[("pre", d, lr)]
        without = _deep(ablation_runs, lab, d, lr, residual=False)
        residual.update({f"{d} layers, seed {s}": r for s, r in with_res.items()})
        for seed in lab.seeds:
            outcome.record(f"residual_{tag}_loss", _loss(with_res[seed], V), seed=seed, unit="nats/char")
            outcome.record(f"no_residual_{tag}_loss", _loss(without[seed], V), seed=seed, unit="nats/char")
        for label, runs in ((f"{d} layers, residual", with_res), (f"{d} layers, no residual", without)):
            ok = {s: r for s, r in runs.items() if not isinstance(r, TrainingDivergedError)}
            if ok:
                curves[label] = mean_curve(ok)
                if d == max(a.depths):
                    grads[label] = (np.arange(d), np.mean([block_grad_norms(r)[0] for r in ok.values()], axis=0))
    require_trained(residual, "every residual stack")
    outcome.plot_lines(
        "val_curves",
        curves,
        xlabel="optimizer step",
        ylabel="val loss (nats/char), mean over seeds",
        title="With and without residual connections",
        hlines={"unigram entropy": unigram},
    )
    outcome.plot_lines(
        "grad_norm_init",
        grads,
        xlabel="block",
        ylabel="gradient norm (first step)",
        title="Per-block gradient norm at initialisation",
        logy=True,
    )


@prediction(
    "Without normalisation more runs fail across depths x learning rates (no warmup) than with pre-LayerNorm",
    metric="none_failures",
    expect=greater_than("pre_failures"),
)
@prediction(
    "At the deepest stack and highest learning rate, the model without normalisation ends with higher val loss "
    "than pre-LayerNorm",
    metric="none_loss_deepest",
    expect=greater_than("pre_loss_deepest"),
)
def test_normalisation_stabilises_training(lab, char_data, ablation_runs, unigram, outcome, require_trained):
    """Does LayerNorm stabilise training?

    The pre/post-norm grid's stacks (each profile depth at width depth_width, each profile
    learning rate, no warmup, the same budget and seeds) trained twice: with pre-LayerNorm
    (GPT-2) and with every norm replaced by the identity (norm="none": no normalisation
    anywhere, the final one included). A run fails if it diverges or its final validation
    loss does not beat the unigram entropy of the validation text by more than 0.05 nats
    (the grid's rule). Per seed, the share of failed depth x learning-rate cells of each
    variant, compared with a Newcombe interval for the difference of proportions widened
    to the paired spread over seeds; and the deepest, fastest cell's final loss (a
    diverged run scores ln V). Valid only if the easiest pre-norm cell trains.
    """
    a = lab.profile.architecture
    V = char_data.tokenizer.vocab_size
    cells = [(d, lr) for d in a.depths for lr in a.depth_lrs]
    grid = {
        (norm, d, lr): _deep(
            ablation_runs, lab, d, lr, norm_position="pre", **({"norm": "none"} if norm == "none" else {})
        )
        for norm in ("pre", "none")
        for d, lr in cells
    }
    outcome.record("unigram_entropy", unigram, unit="nats/char", deterministic=True)
    for seed in lab.seeds:
        for norm in ("pre", "none"):
            fails = sum(_failed(_loss(grid[(norm, d, lr)][seed], V), unigram) for d, lr in cells)
            outcome.record_fraction(f"{norm}_failures", fails, len(cells), seed=seed, unit="share of cells")
            deepest = grid[(norm, max(a.depths), max(a.depth_lrs))][seed]
            outcome.record(f"{norm}_loss_deepest", _loss(deepest, V), seed=seed, unit="nats/char")
    rows, lines = [], {}
    for (norm, d, lr), by_seed in grid.items():
        losses = [_loss(r, V) for r in by_seed.values()]
        label = "pre-LayerNorm" if norm == "pre" else "no normalisation"
        rows.append(
            {
                "norm": label,
                "layers": d,
                "lr": lr,
                "final val loss (mean)": round(float(np.mean(losses)), 4),
                "diverged": sum(isinstance(r, TrainingDivergedError) for r in by_seed.values()),
                "failed": sum(_failed(v, unigram) for v in losses),
                "seeds": len(losses),
            }
        )
        lines.setdefault(f"{label}, lr {lr:g}", ([], []))
        lines[f"{label}, lr {lr:g}"][0].append(d)
        lines[f"{label}, lr {lr:g}"][1].append(float(np.mean(losses)))
    outcome.table("grid", rows, caption="Final validation loss with and without normalisation, by depth and rate")
    outcome.plot_lines(
        "loss_vs_depth",
        lines,
        xlabel="layers",
        ylabel="final val loss (nats/char), mean over seeds",
        title="Pre-LayerNorm vs no normalisation by depth",
        hlines={"unigram entropy": unigram},
    )
    require_trained(
        grid[("pre", min(a.depths), min(a.depth_lrs))], "the easiest cell (pre-norm, fewest layers, lowest rate)"
    )
