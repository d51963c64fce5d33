import math

import pytest

from lab.report import less_than, prediction

pytestmark = pytest.mark.pretraining


def bits_per_char(loss_per_token: float, tokens: int, chars: int) -> float:
    return loss_per_token * tokens / chars / math.log(2)


@prediction(
    "At equal training compute, a BPE-token model reaches fewer bits per character than a char model",
    metric="bpe_bpc",
    expect=less_than("char_bpc"),
)
def test_bpe_beats_char_at_equal_compute(lab, char_data, baby_runs, outcome, require_trained):
    """Does a BPE-token model reach fewer bits per character than a char model at equal compute?

    Train the same baby GPT (layers, width, block size in tokens, batch, steps, schedule)
    on tiny Shakespeare tokenized two ways: characters, and the lab's byte-level BPE
    trained on the training split (the profile's vocabulary size). The transformer
    layers cost the same per step; only the embedding and output layers grow with the
    vocabulary. Validation loss per token is converted to bits per character using the
    exact number of tokens and characters in the validation split, so both models are
    scored on the same text. Prediction: each BPE token carries about two characters,
    so the BPE model sees ~2x more text per step and a ~2x longer context, which should
    outweigh its harder per-token task. Valid only if every model trained: its
    validation loss below the unigram entropy of its own training tokens by a margin.
    """
    bpe_data = lab.data("tinyshakespeare", "bpe")
    bpe_config = lab.model_config(bpe_data)
    char_ratio = len(char_data.val) / char_data.val_chars
    bpe_ratio = len(bpe_data.val) / bpe_data.val_chars
    outcome.record("bpe_chars_per_token", 1 / bpe_ratio, unit="chars/token", deterministic=True)
    curves, bpe_losses = {}, {}
    for seed in lab.seeds:
        bpe_run = lab.pretrain(bpe_data, bpe_config, seed=seed)
        char_run = baby_runs[seed]
        bpe_losses[f"seed {seed}"] = bpe_run.final_val_loss
        outcome.record(
            "char_bpc",
            bits_per_char(char_run.final_val_loss, len(char_data.val), char_data.val_chars),
            seed=seed,
            unit="bits/char",
        )
        outcome.record(
            "bpe_bpc",
            bits_per_char(bpe_run.final_val_loss, len(bpe_data.val), bpe_data.val_chars),
            seed=seed,
            unit="bits/char",
        )
        outcome.record("bpe_val_loss_per_token", bpe_run.final_val_loss, seed=seed, unit="nats/token")
        if seed == lab.seeds[0]:
            curves["char"] = (
                [e["step"] for e in char_run.evals],
                [e["val_loss"] * char_ratio / math.log(2) for e in char_run.evals],
            )
            curves[f"BPE (vocab {bpe_data.vocab_size})"] = (
                [e["step"] for e in bpe_run.evals],
                [e["val_loss"] * bpe_ratio / math.log(2) for e in bpe_run.evals],
            )
    require_trained(baby_runs, "each seed's char model")
    require_trained(bpe_losses, "each seed's BPE model", bpe_data)
    outcome.plot_lines(
        "bpc_curves",
        curves,
        xlabel="step",
        ylabel="val bits per character",
        title="Char vs BPE at equal steps and model size (seed 0)",
        caption="Validation bits per character during training, first seed.",
    )
