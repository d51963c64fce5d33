"""Curriculum 11: pretraining objectives — causal LM (GPT), prefix LM (T5/UniLM) and
masked LM (BERT) on the same data, model and compute."""

import numpy as np
import pytest
import torch

from lab.ablations import compare_runs
from lab.data import get_batch, unigram_entropy
from lab.inspect.probes import fit_probe
from lab.report import greater_than, less_than, prediction
from lab.train.objectives import next_token_nll

pytestmark = [pytest.mark.curriculum, pytest.mark.m11_objectives]

OBJECTIVES = ("clm", "prefix_lm", "mlm")


@pytest.fixture(scope="module")
def objective_runs(ablation_runs, char_data):
    """The shared small GPT trained with each objective; the MLM model's vocabulary has
    one extra id, its [MASK]."""
    return {
        "clm": ablation_runs(),
        "prefix_lm": ablation_runs(train=dict(objective="prefix_lm")),
        "mlm": ablation_runs(train=dict(objective="mlm"), vocab_size=char_data.tokenizer.vocab_size + 1),
    }


def _windows(array, lab, n_batches, seed):
    a = lab.profile.architecture
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([get_batch(array, a.model.block_size, a.batch_size, gen)[0] for _ in range(n_batches)])


@prediction(
    "Causal LM predicts the next token better than prefix LM (causal-task val loss)",
    metric="clm_next_token",
    expect=less_than("prefix_lm_next_token"),
)
@prediction(
    "Prefix LM predicts the next token better than masked LM (causal-task val loss)",
    metric="prefix_lm_next_token",
    expect=less_than("mlm_next_token"),
)
def test_causal_lm_is_best_at_next_token(lab, char_data, objective_runs, outcome, require_trained):
    """Which objective makes the best next-token predictor (the generation task)?

    Train the shared small GPT with each objective on the same data, steps and seeds:
    causal LM (every next token, causal attention); prefix LM (per row a random
    prefix seen bidirectionally, only the rest predicted); masked LM (15% of positions
    replaced by [MASK], bidirectional, only those predicted). Then score every model on
    the causal task: -log p(x_t | x_<t) on fixed validation windows at 8 context
    lengths, each model predicting the way its objective taught it (causal LM: causal
    forward; prefix LM: the context as the prefix; masked LM: the context followed by
    one [MASK]). Mean over windows and lengths, paired by seed. Valid only if every model
    trained on its own objective (its own validation loss below the unigram entropy of
    the training text by a margin): otherwise the comparison is with an untrained model.
    """
    a = lab.profile.architecture
    T = a.model.block_size
    positions = sorted({max(1, round(T * f)) for f in np.linspace(1 / 8, 1, 8)} - {T}) + [T - 1]
    positions = sorted(set(positions))
    windows = _windows(char_data.val, lab, a.eval_batches, seed=1234)
    lines = {}
    for obj, by_seed in objective_runs.items():
        per_pos = []
        for seed, run in by_seed.items():
            nll = next_token_nll(run.model, obj, windows, positions)  # (B, P)
            outcome.record(f"{obj}_next_token", float(nll.mean()), seed=seed, unit="nats/char")
            per_pos.append(nll.mean(0).numpy())
        lines[obj] = (positions, np.mean(per_pos, axis=0))
    outcome.plot_lines(
        "next_token_by_context",
        lines,
        xlabel="context length (tokens)",
        ylabel="next-token loss (nats/char), mean over seeds",
        title="Causal-task loss by objective",
    )
    compare_runs(
        outcome, objective_runs, title="Each objective's own validation loss (not comparable across objectives)"
    )
    unigram = unigram_entropy(char_data.tokenizer.decode(char_data.val.tolist()))
    outcome.record("unigram_entropy", unigram, unit="nats/char", deterministic=True)
    require_trained(objective_runs, "every model (on its own objective)")
    for obj, by_seed in objective_runs.items():
        left = [next((e["step"] for e in r.evals if e["val_loss"] < unigram - 0.05), None) for r in by_seed.values()]
        outcome.note(
            f"{obj}: first evaluation step with its own val loss 0.05 nats below the unigram entropy "
            f"({unigram:.3f}), per seed: {', '.join('never' if s is None else str(s) for s in left)}."
        )


def _probe_split(model, obj, array, lab, n, seed):
    """Final hidden states at n random positions (never the first 2 of a window) and the
    identity of the token two places back; whole windows are read with the attention
    each objective trains (causal, or bidirectional over the whole window)."""
    a = lab.profile.architecture
    T = a.model.block_size
    windows = _windows(array, lab, max(1, -(-n // (a.batch_size * (T - 2)))), seed)
    prefix = None if obj == "clm" else T
    feats = model.final_hidden(windows, prefix_len=prefix)  # (B, T, d)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, windows.size(0), (n,), generator=gen)
    cols = torch.randint(2, T, (n,), generator=gen)
    return feats[rows, cols], windows[rows, cols - 2]


@prediction(
    "Masked LM represents the prefix better than causal LM: a linear probe decodes the token two back more accurately",
    metric="mlm_probe_accuracy",
    expect=greater_than("clm_probe_accuracy"),
)
@prediction(
    "Prefix LM represents the prefix better than causal LM: a linear probe decodes the token two back more accurately",
    metric="prefix_lm_probe_accuracy",
    expect=greater_than("clm_probe_accuracy"),
)
def test_bidirectional_objectives_represent_the_prefix_better(lab, char_data, objective_runs, outcome, require_trained):
    """Do bidirectional objectives keep more of the text already read than causal LM (linear probe)?

    Read fixed windows with each trained model (causal attention for the causal LM, the
    whole window as a bidirectional prefix for the others) and take the final hidden
    state at random positions. Fit a multinomial linear probe (standardised features,
    full-batch AdamW) to predict the character two positions back, on training-split
    windows, and score it on validation-split windows; the majority-class accuracy is
    the floor. Paired by seed. Valid only if every model trained on its own objective
    (as in the next-token hypothesis).
    """
    n = lab.profile.architecture.probe_positions
    rows = []
    for obj, by_seed in objective_runs.items():
        for seed, run in by_seed.items():
            tx, ty = _probe_split(run.model, obj, char_data.train, lab, n, seed=100 + seed)
            vx, vy = _probe_split(run.model, obj, char_data.val, lab, n, seed=200 + seed)
            res = fit_probe(tx, ty, vx, vy, seed=seed)
            outcome.record(f"{obj}_probe_accuracy", res.accuracy, seed=seed)
            rows.append(
                {
                    "objective": obj,
                    "seed": seed,
                    "probe accuracy": round(res.accuracy, 4),
                    "train accuracy": round(res.train_accuracy, 4),
                    "majority baseline": round(res.majority, 4),
                    "positions (train/test)": f"{res.n_train}/{res.n_test}",
                }
            )
    outcome.table("probe", rows, caption="Linear probe for the character two positions back, final hidden state")
    require_trained(objective_runs, "every model (on its own objective)")
