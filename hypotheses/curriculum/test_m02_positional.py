"""Curriculum 02: positional encodings. Five ways to tell a transformer where a token
is, trained identically at one context length and then asked to read longer text."""

import numpy as np
import pytest

from lab.ablations import compare_runs
from lab.inspect.positions import alibi_matrix, cosine_matrix, encoding_table, offset_means, toeplitz_deviation
from lab.report import at_least, at_most, check, greater_than, less_than, prediction
from lab.train import per_position_loss

pytestmark = [pytest.mark.curriculum, pytest.mark.m02_positional]

ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")
EXTRAPOLATING = ("sinusoidal", "rope", "alibi", "none")


@pytest.fixture(scope="module")
def pos_runs(ablation_runs):
    return {pos: ablation_runs(pos=pos) for pos in ENCODINGS}


@pytest.fixture(scope="module")
def long_context_loss(lab, char_data, pos_runs):
    """{pos: {seed: {context: per-position val loss}}} at every profile eval context, on the
    same fixed validation windows for every model (one set per context length)."""
    a = lab.profile.architecture
    out = {}
    for pos in EXTRAPOLATING:
        out[pos] = {}
        for seed, run in pos_runs[pos].items():
            out[pos][seed] = {
                c: per_position_loss(
                    run.model.with_context(c),
                    char_data.val,
                    block_size=c,
                    batch_size=a.batch_size,
                    n_batches=a.eval_batches,
                )
                for c in a.eval_contexts
            }
    return out


def degradation(curves: dict, trained: int, longest: int) -> float:
    """Mean loss at the positions past the trained length (context `longest`) minus the
    mean loss over the second half of the trained length (context `trained`)."""
    return float(curves[longest][trained:].mean() - curves[trained][trained // 2 : trained].mean())


@prediction(
    "RoPE beats learned absolute positions at the trained length (lower val loss)",
    metric="rope_val_loss",
    expect=less_than("learned_val_loss"),
)
@prediction(
    "A model with no positional encoding (NoPE) is worse than learned positions at the trained length",
    metric="none_val_loss",
    expect=greater_than("learned_val_loss"),
)
def test_encodings_at_the_trained_length(pos_runs, outcome, require_trained):
    """How do the five positional encodings compare at the context length they were trained on?

    Train the shared small GPT (profile.architecture) five times per seed, identical
    except for positions: learned absolute embeddings (GPT-2), fixed sinusoids
    (Vaswani et al.; scaled to the token embeddings' RMS), rotary q/k (RoPE),
    distance-proportional attention biases (ALiBi), and none at all (NoPE: only the
    causal mask carries order). Same data order, budget and seeds. Compare final
    validation loss, paired by seed.
    """
    compare_runs(outcome, pos_runs, title="Positional encodings: validation loss", baseline="learned")
    require_trained(pos_runs, "every model")


@check(
    "Learned position embeddings cannot run past their trained length: a longer context is refused with a clear error",
    metric="learned_longest_context",
    expect=at_most(0),
)
def test_learned_positions_stop_at_trained_length(lab, pos_runs, outcome):
    """Can a learned-position model read a longer context than it was trained on?

    Ask the learned-position model (seed 0) for a copy with each longer evaluation
    context. The statistic is how many tokens past the trained length the longest
    accepted context goes (0 = none). A refusal must be a ValueError that says why. A
    check, not a finding: the model has no embedding for a position past its table.
    """
    a = lab.profile.architecture
    model = next(iter(pos_runs["learned"].values())).model
    trained, longest = a.model.block_size, a.model.block_size
    for c in a.eval_contexts[1:]:
        try:
            model.with_context(c)
            longest = max(longest, c)
        except ValueError as exc:
            assert "learned position embeddings" in str(exc), exc
            outcome.note(f"with_context({c}) refused: {exc}")
    outcome.record("learned_longest_context", longest - trained, unit="tokens", deterministic=True)


def _plot_long_context(lab, long_context_loss, outcome):
    a = lab.profile.architecture
    longest = max(a.eval_contexts)
    lines = {
        pos: (np.arange(longest), np.mean([s[longest] for s in by_seed.values()], axis=0))
        for pos, by_seed in long_context_loss.items()
    }
    outcome.plot_lines(
        "per_position_long",
        lines,
        xlabel=f"position (trained on the first {a.model.block_size})",
        ylabel="val loss (nats/char), mean over seeds",
        title=f"Per-position loss at context {longest}, trained at {a.model.block_size}",
    )


@prediction(
    "ALiBi extrapolates best: smaller loss increase past the trained length than sinusoidal",
    metric="alibi_degradation",
    expect=less_than("sinusoidal_degradation"),
)
@prediction(
    "ALiBi extrapolates best: smaller loss increase past the trained length than RoPE",
    metric="alibi_degradation",
    expect=less_than("rope_degradation"),
)
@prediction(
    "ALiBi extrapolates best: smaller loss increase past the trained length than no positions (NoPE)",
    metric="alibi_degradation",
    expect=less_than("none_degradation"),
)
def test_alibi_extrapolates_best(lab, pos_runs, long_context_loss, outcome, require_trained):
    """Which of the four encodings that define every position extrapolates best past the trained length?

    Evaluate each trained model (same weights, longer context) on fixed validation
    windows at every profile context length and compute the per-position loss. The
    degradation is the mean loss at positions past the trained length (longest
    context) minus the mean loss over the second half of the trained length; 0 means
    the extra positions are read as well as the trained ones. Paired by seed.
    """
    a = lab.profile.architecture
    trained, longest = a.model.block_size, max(a.eval_contexts)
    rows = []
    for pos, by_seed in long_context_loss.items():
        for seed, curves in by_seed.items():
            outcome.record(f"{pos}_degradation", degradation(curves, trained, longest), seed=seed, unit="nats/char")
        for c in a.eval_contexts:
            rows.append(
                {
                    "encoding": pos,
                    "context": c,
                    "mean loss (mean over seeds)": round(float(np.mean([s[c].mean() for s in by_seed.values()])), 4),
                    "loss past trained length": round(
                        float(np.mean([s[c][trained:].mean() for s in by_seed.values()])), 4
                    )
                    if c > trained
                    else "-",
                }
            )
    outcome.table("by_context", rows, caption="Validation loss by evaluation context")
    _plot_long_context(lab, long_context_loss, outcome)
    require_trained({pos: pos_runs[pos] for pos in EXTRAPOLATING}, "every model")


@prediction(
    "RoPE degrades beyond the trained length: loss past it rises by at least 0.1 nats/char",
    metric="rope_degradation",
    expect=at_least(0.1),
)
def test_rope_degrades_past_trained_length(lab, pos_runs, long_context_loss, outcome, require_trained):
    """Does RoPE degrade at positions past its trained length?

    The RoPE models' degradation (as in the ALiBi comparison: loss past the trained
    length at the longest context minus loss over the second half of the trained
    length), paired by seed; the per-position curves of all encodings for reference.
    """
    a = lab.profile.architecture
    trained, longest = a.model.block_size, max(a.eval_contexts)
    for seed, curves in long_context_loss["rope"].items():
        outcome.record("rope_degradation", degradation(curves, trained, longest), seed=seed, unit="nats/char")
        for c in a.eval_contexts[1:]:
            outcome.record(f"rope_degradation_at_{c}", degradation(curves, trained, c), seed=seed, unit="nats/char")
    _plot_long_context(lab, long_context_loss, outcome)
    require_trained(pos_runs["rope"], "each seed's RoPE model")


def _encoding_figure(panels):
    """One column per encoding: its position table above, its similarity matrix below."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6.2), squeeze=False)
    for c, (name, table, sim, sim_label) in enumerate(panels):
        top, bottom = axes[0][c], axes[1][c]
        if table is None:
            top.axis("off")
            top.text(0.5, 0.5, f"{name}: no position vectors", ha="center", va="center", fontsize=8)
        else:
            fig.colorbar(top.imshow(table.T, aspect="auto", cmap="RdBu_r", interpolation="nearest"), ax=top)
            top.set_title(f"{name}: vectors", fontsize=9)
            top.set_xlabel("position", fontsize=8)
            top.set_ylabel("dimension", fontsize=8)
        fig.colorbar(bottom.imshow(sim, cmap="viridis", interpolation="nearest"), ax=bottom)
        bottom.set_title(f"{name}: {sim_label}", fontsize=9)
        bottom.set_xlabel("position", fontsize=8)
        bottom.set_ylabel("position", fontsize=8)
    fig.tight_layout()
    return fig


@check(
    "The sinusoidal and RoPE position-by-position similarities depend only on the offset between positions "
    "(largest spread along a diagonal at most {bound})",
    metric="fixed_toeplitz_deviation",
    expect=at_most(1e-5),
)
def test_fixed_encodings_depend_only_on_offset(lab, char_data, outcome):
    """Do the fixed encodings' similarities depend only on the distance between positions?

    For the shared small GPT's sinusoidal table and its RoPE rotation ((cos, sin) of
    each frequency, one vector per position), compute the cosine similarity of every
    pair of positions over the trained context, and the largest spread of the values
    along any diagonal (0 when similarity is a function of the offset j - i alone). A
    check, not a finding: cos(a)cos(b) + sin(a)sin(b) = cos(a - b) for every frequency.
    """
    n = lab.profile.architecture.model.block_size
    worst = 0.0
    for pos in ("sinusoidal", "rope"):
        config = lab.arch_config(char_data, pos=pos)
        deviation = toeplitz_deviation(cosine_matrix(encoding_table(config, n)))
        outcome.record(f"{pos}_toeplitz_deviation", deviation, deterministic=True)
        worst = max(worst, deviation)
    outcome.record("fixed_toeplitz_deviation", worst, deterministic=True)


@prediction(
    "Learned position embeddings become smooth: neighbouring positions (offset 1) are more cosine-similar than "
    "positions at least half the context apart",
    metric="learned_adjacent_cosine",
    expect=greater_than("learned_far_cosine"),
)
def test_position_similarity_heatmaps(lab, char_data, pos_runs, outcome, require_trained):
    """What does each encoding look like, and how similar are its positions to each other?

    Heatmaps of each encoding over the trained context of the shared small GPT: the
    learned table (the first seed's trained model), the sinusoids and RoPE's (cos, sin)
    per frequency as position x dimension images, each with its position-by-position
    cosine-similarity matrix; ALiBi has no vectors, so its panel is its attention bias
    from each query to each key (averaged over heads); NoPE has nothing to show. The
    statistic is the learned table's mean cosine between neighbouring positions (offset
    1) against its mean cosine between positions at least half the context apart, one
    value of each per seed, paired. At initialisation both are about 0 (independent
    random vectors); only training can make neighbours alike. The mean similarity at
    each offset is plotted for the learned (every seed), sinusoidal and RoPE tables.
    """
    n = lab.profile.architecture.model.block_size
    learned = {seed: run for seed, run in pos_runs["learned"].items() if not isinstance(run, Exception)}
    curves = {}
    for seed, run in learned.items():
        by_offset = offset_means(cosine_matrix(encoding_table(run.model.config, n, run.model)))
        outcome.record("learned_adjacent_cosine", float(by_offset[1]), seed=seed)
        outcome.record("learned_far_cosine", float(by_offset[n // 2 :].mean()), seed=seed)
        curves[f"learned, seed {seed}"] = (list(range(n)), by_offset.tolist())
    panels = []
    if learned:
        first = learned[min(learned)].model
        table = encoding_table(first.config, n, first)
        panels.append(("learned", table, cosine_matrix(table), "cosine similarity"))
    for pos in ("sinusoidal", "rope"):
        table = encoding_table(lab.arch_config(char_data, pos=pos), n)
        sim = cosine_matrix(table)
        curves[pos] = (list(range(n)), offset_means(sim).tolist())
        panels.append((pos, table, sim, "cosine similarity"))
    panels.append(("alibi", None, alibi_matrix(lab.arch_config(char_data, pos="alibi"), n), "attention bias"))
    outcome.plot("encodings", _encoding_figure(panels), caption="Each encoding and its position-by-position matrix")
    outcome.plot_lines(
        "similarity_by_offset",
        curves,
        xlabel="offset j - i",
        ylabel="mean cosine similarity",
        title="Similarity of two positions by their distance",
    )
    require_trained({"learned positions": pos_runs["learned"]}, "every learned-position model")


@prediction(
    "Training on the longer context beats extrapolating to it: a RoPE model trained at twice the length (same tokens "
    "per step) has lower loss at the positions past the short model's trained length than the short RoPE model",
    metric="long_trained_past_loss",
    expect=less_than("rope_extrapolated_past_loss"),
)
def test_training_long_beats_extrapolating(
    lab, char_data, ablation_runs, pos_runs, long_context_loss, outcome, require_trained
):
    """Is it better to train on the longer context than to extrapolate to it?

    Curriculum 07's advice ("extrapolation is hard; better to train on long sequences").
    Train the shared small RoPE GPT at the second evaluation context (twice the trained
    length on the cpu profile) with the batch shrunk to keep the tokens per step, the same
    steps and seeds, and compare its per-position validation loss at that context with
    the RoPE model trained at the short length and read at the longer one (the
    long-context evaluation every encoding gets: the same fixed windows). The statistic
    is the mean loss at the positions past the short length, paired by seed; ALiBi's
    extrapolation and both models' loss within the short length are recorded beside it.
    Valid only if every model trained.
    """
    a = lab.profile.architecture
    trained, longer = a.model.block_size, a.eval_contexts[1]
    batch = max(1, a.batch_size * trained // longer)
    long_runs = ablation_runs(train=dict(batch_size=batch), pos="rope", block_size=longer)
    lines = {}
    for seed, run in long_runs.items():
        if isinstance(run, Exception):
            continue
        curve = per_position_loss(
            run.model, char_data.val, block_size=longer, batch_size=a.batch_size, n_batches=a.eval_batches
        )
        short = long_context_loss["rope"][seed][longer]
        outcome.record("long_trained_past_loss", float(curve[trained:].mean()), seed=seed, unit="nats/char")
        outcome.record("rope_extrapolated_past_loss", float(short[trained:].mean()), seed=seed, unit="nats/char")
        alibi = long_context_loss["alibi"][seed][longer]
        outcome.record("alibi_extrapolated_past_loss", float(alibi[trained:].mean()), seed=seed, unit="nats/char")
        outcome.record("long_trained_within_loss", float(curve[:trained].mean()), seed=seed, unit="nats/char")
        outcome.record("rope_short_within_loss", float(short[:trained].mean()), seed=seed, unit="nats/char")
        lines[f"trained at {longer}, seed {seed}"] = (np.arange(longer), curve)
        lines[f"trained at {trained}, read at {longer}, seed {seed}"] = (np.arange(longer), short)
    outcome.plot_lines(
        "per_position",
        lines,
        xlabel=f"position (the short model trained on the first {trained})",
        ylabel="val loss (nats/char)",
        title=f"RoPE at context {longer}: trained there vs extrapolating",
    )
    outcome.note(
        f"the long model trains on batches of {batch} x {longer} tokens, the short ones on {a.batch_size} x {trained}"
    )
    require_trained({"trained long": long_runs, "RoPE": pos_runs["rope"], "ALiBi": pos_runs["alibi"]}, "every model")
