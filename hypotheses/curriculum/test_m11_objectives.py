"""Curriculum 11: pretraining objectives — causal LM (GPT), prefix LM (T5/UniLM) and
masked LM (BERT) on the same data, model and compute."""

import numpy as np
import pytest
import torch

from lab.ablations import compare_runs
from lab.data import get_batch, unigram_entropy
from lab.inspect.probes import fit_probe
from lab.report import greater_than, less_than, prediction
from lab.train.objectives import next_token_nll, objective_batch

pytestmark = [pytest.mark.curriculum, pytest.mark.m11_objectives]

OBJECTIVES = ("clm", "prefix_lm", "mlm")


@pytest.fixture(scope="module")
def objective_runs(ablation_runs, char_data, lab):
    """The shared small GPT trained with each objective for the profile's objectives.steps
    (at the architecture budget the masked LM stays at the unigram entropy); the MLM
    model's vocabulary has one extra id, its [MASK]."""
    steps = lab.profile.objectives.steps
    return {
        "clm": ablation_runs(train=dict(max_steps=steps)),
        "prefix_lm": ablation_runs(train=dict(objective="prefix_lm", max_steps=steps)),
        "mlm": ablation_runs(
            train=dict(objective="mlm", max_steps=steps), vocab_size=char_data.tokenizer.vocab_size + 1
        ),
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

    Train the shared small GPT with each objective on the same data, steps and seeds
    (the profile's objectives.steps: 2000 on the cpu profile, four times the
    architecture budget, at which the masked LM stays at the unigram entropy): causal
    LM (every next token, causal attention); prefix LM (per row a random prefix seen
    bidirectionally, only the rest predicted); masked LM (15% of positions
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


def _rate_label(rate: float) -> str:
    return f"mask{round(100 * rate):02d}"


@pytest.fixture(scope="module")
def masking_runs(ablation_runs, char_data, lab):
    """{rate: {seed: run}}: the shared small GPT trained as a masked LM at each of the
    profile's masking rates, for the objective comparison's budget (objectives.steps)."""
    vocab = char_data.tokenizer.vocab_size + 1
    steps = lab.profile.objectives.steps
    return {
        rate: ablation_runs(train=dict(objective="mlm", mask_prob=rate, max_steps=steps), vocab_size=vocab)
        for rate in lab.profile.masking.rates
    }


@torch.no_grad()
def _masked_loss(model, windows, rate: float, seed: int) -> float:
    """Mean cross-entropy (nats) of the masked characters when `rate` of the positions of
    `windows` are masked, the masks drawn from a fixed generator: the same masks for every
    model."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    inputs, targets, prefix = objective_batch(
        "mlm", windows, windows, generator=gen, mask_prob=rate, mask_id=model.config.vocab_size - 1
    )
    return float(model(inputs, targets, prefix_len=prefix)[1])


@prediction(
    "At the same budget, masking 15% of characters trains a better masked LM than masking 5% (lower loss on the "
    "masked characters at one fixed 15% evaluation masking)",
    metric="mask15_loss",
    expect=less_than("mask05_loss"),
)
@prediction(
    "Masking 25% of characters beats masking 15% at the same budget (the same evaluation)",
    metric="mask25_loss",
    expect=less_than("mask15_loss"),
)
def test_masking_rate_sweep(lab, char_data, masking_runs, outcome, require_trained):
    """How does the masking rate change what a masked LM learns at a fixed budget?

    Train the shared small GPT as a masked LM (bidirectional attention, masked positions
    replaced by [MASK], only those predicted) at each masking rate of the profile's grid
    (5%, 15%, 25% and 40% on the cpu profile), the same data and seeds, for the
    objective comparison's steps (objectives.steps, 2000 on the cpu profile). A higher
    rate gives more predicted characters per step but less context to predict them from.
    Score every model on the same task: the loss on the masked characters of fixed
    validation windows with 15% of positions masked by one fixed generator (the same
    masks for every model). Paired by seed. This sweep varies the rate of all-[MASK]
    replacement; BERT's 80/10/10 is test_bert_masking_vs_all_mask. Valid only if every
    model trained on its own objective (its own validation loss below the unigram
    entropy by a margin).
    """
    a, m = lab.profile.architecture, lab.profile.masking
    windows = _windows(char_data.val, lab, a.eval_batches, seed=1234)
    curves = {}
    for rate, by_seed in masking_runs.items():
        for seed, run in by_seed.items():
            loss = _masked_loss(run.model, windows, m.eval_rate, seed=4321)
            outcome.record(f"{_rate_label(rate)}_loss", loss, seed=seed, unit="nats/char")
            curves.setdefault(f"seed {seed}", ([], []))
            curves[f"seed {seed}"][0].append(100 * rate)
            curves[f"seed {seed}"][1].append(loss)
    outcome.plot_lines(
        "loss_by_rate",
        curves,
        xlabel="training masking rate (%)",
        ylabel=f"masked-character loss at {100 * m.eval_rate:g}% masking (nats/char)",
        title="Masked LM by masking rate",
    )
    require_trained({_rate_label(r): runs for r, runs in masking_runs.items()}, "every masked LM")


STRATEGIES = ("mask", "bert")
STRATEGY_RATE = 0.15


@pytest.fixture(scope="module")
def strategy_runs(ablation_runs, char_data, lab):
    """{strategy: {seed: run}}: the shared small GPT trained as a masked LM at 15% masking
    with each masking strategy (all [MASK], BERT's 80/10/10) for the profile's
    masking_strategy.steps: longer than the architecture budget, at which masked LMs do
    not beat the unigram entropy."""
    vocab = char_data.tokenizer.vocab_size + 1
    steps = lab.profile.masking_strategy.steps
    return {
        s: ablation_runs(
            train=dict(objective="mlm", mask_prob=STRATEGY_RATE, mask_strategy=s, max_steps=steps), vocab_size=vocab
        )
        for s in STRATEGIES
    }


@torch.no_grad()
def _unchanged_loss(model, windows, rate: float, seed: int) -> float:
    """Mean cross-entropy (nats) of the characters at the positions _masked_loss chooses
    (the same generator, so the same positions) when every one keeps its own character:
    BERT's 10% "unchanged" case, with nothing in the window masked."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    _, targets, prefix = objective_batch(
        "mlm", windows, windows, generator=gen, mask_prob=rate, mask_id=model.config.vocab_size - 1
    )
    return float(model(windows, targets, prefix_len=prefix)[1])


@prediction(
    "Scored on fully-masked validation windows (every chosen position [MASK], 15%), the all-[MASK] model's "
    "masked-character loss is lower than the 80/10/10 model's",
    metric="mask_masked_loss",
    expect=less_than("bert_masked_loss"),
)
@prediction(
    "On windows where the chosen positions keep their own character (the 10% case), the 80/10/10 model's loss is "
    "lower than the all-[MASK] model's",
    metric="bert_unchanged_loss",
    expect=less_than("mask_unchanged_loss"),
)
def test_bert_masking_vs_all_mask(lab, char_data, strategy_runs, outcome, require_trained):
    """Does BERT's 80/10/10 replacement trade masked-position accuracy for using the visible token?

    Train the shared small GPT as a masked LM (bidirectional attention, 15% of positions
    chosen, only those predicted) with two masking strategies, the same data, steps and
    seeds: all-[MASK] (every chosen position replaced by [MASK]) and BERT's 80/10/10 (of
    the chosen positions 80% [MASK], 10% a uniformly random character, 10% unchanged).
    Both train for the profile's masking_strategy.steps (2000 on the cpu profile, four
    times the architecture budget, which leaves masked LMs at the unigram entropy). Score
    every model on fixed validation windows with 15% of positions chosen by one fixed
    generator (the same positions for every model) in two ways: fully masked (every
    chosen position [MASK], the all-[MASK] model's training distribution) and unchanged
    (every chosen position keeps its own character and nothing is masked; the all-[MASK]
    model never saw a predicted position unmasked). The loss is the mean cross-entropy
    of the chosen characters. Paired by seed. Valid only if every model trained (its
    validation loss, which masks every chosen position for both strategies, below the
    unigram entropy by a margin).
    """
    a = lab.profile.architecture
    windows = _windows(char_data.val, lab, a.eval_batches, seed=1234)
    rows = []
    for strategy, by_seed in strategy_runs.items():
        for seed, run in by_seed.items():
            if isinstance(run, Exception):
                continue  # a diverged run: require_trained below makes the verdict invalid
            masked = _masked_loss(run.model, windows, STRATEGY_RATE, seed=4321)
            unchanged = _unchanged_loss(run.model, windows, STRATEGY_RATE, seed=4321)
            outcome.record(f"{strategy}_masked_loss", masked, seed=seed, unit="nats/char")
            outcome.record(f"{strategy}_unchanged_loss", unchanged, seed=seed, unit="nats/char")
            rows.append(
                {
                    "strategy": "all [MASK]" if strategy == "mask" else "80/10/10",
                    "seed": seed,
                    "fully masked loss": round(masked, 4),
                    "unchanged loss": round(unchanged, 4),
                    "own val loss": round(run.final_val_loss, 4),
                }
            )
    outcome.table("strategy_losses", rows, caption="Loss on the chosen characters (nats/char), 15% chosen")
    require_trained(strategy_runs, "every masked LM")
