"""Curriculum 02: positional encodings. Five ways to tell a transformer where a token
is, trained identically at one context length and then asked to read longer text."""

import numpy as np
import pytest

from lab.ablations import compare_runs
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
