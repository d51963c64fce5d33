import pytest

from lab.data import bigram_conditional_entropy, split_text, unigram_entropy
from lab.report import less_than, prediction

pytestmark = pytest.mark.pretraining


@prediction(
    "A trained char-level GPT beats the corpus' unigram entropy",
    metric="val_loss",
    expect=less_than("unigram_entropy"),
)
@prediction(
    "A trained char-level GPT beats the corpus' bigram conditional entropy",
    metric="val_loss",
    expect=less_than("bigram_entropy"),
)
def test_val_loss_beats_ngram_entropies(lab, char_data, baby_runs, outcome):
    """Does a trained char-level GPT predict better than unigram and bigram statistics?

    Compute, exactly from the training split of tiny Shakespeare, the unigram entropy
    H(X) and the bigram conditional entropy H(X_t | X_{t-1}) in nats per character:
    the losses of the best context-free and best one-character-context predictors
    fitted to that split. Train the baby GPT (the profile's steps) once per seed and
    compare its validation loss with both. Beating the bigram number needs the model to
    use more than one character of context.
    """
    train_text, _ = split_text(lab.corpus("tinyshakespeare"))
    h1 = outcome.record("unigram_entropy", unigram_entropy(train_text), unit="nats/char", deterministic=True)
    h2 = outcome.record("bigram_entropy", bigram_conditional_entropy(train_text), unit="nats/char", deterministic=True)
    for seed, run in baby_runs.items():
        outcome.record("val_loss", run.final_val_loss, seed=seed, unit="nats/char")
    seeds = sorted(baby_runs)
    outcome.plot_lines(
        "val_curves",
        {
            f"val loss, seed {s}": (
                [e["step"] for e in baby_runs[s].evals],
                [e["val_loss"] for e in baby_runs[s].evals],
            )
            for s in seeds
        },
        xlabel="step",
        ylabel="loss (nats/char)",
        hlines={"unigram entropy H(X)": h1, "bigram entropy H(X_t|X_t-1)": h2},
        title="Baby GPT validation loss vs n-gram entropies",
        caption="Validation loss during training against the exact unigram and bigram entropies of the training split.",
    )
