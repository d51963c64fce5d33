import pytest

from lab.report import greater_than, prediction

pytestmark = pytest.mark.pretraining


@prediction(
    "With a 10x smaller training split the final train/val gap is larger than with the full split",
    metric="gap_small_split",
    expect=greater_than("gap_full_split"),
)
def test_small_split_overfits_more(lab, char_data, baby_runs, outcome, require_trained):
    """Does overfitting grow when the training data shrinks tenfold?

    Train the baby GPT for the profile's steps on the full training split and on its
    first 10% (the validation split is unchanged), once per seed. The gap is validation
    loss minus training loss, both averaged over the same fixed evaluation batches at
    the last step. The small split is seen ~10x more often per character, so the model
    can memorise it. Valid only if every model trained (validation loss below the
    unigram entropy of the training text by a margin).
    """
    p = lab.profile.pretraining
    small = lab.data("tinyshakespeare", char_data.tokenizer, train_fraction=p.small_split_fraction)
    config = lab.model_config(char_data)
    curves, trained = {}, {}
    for seed in lab.seeds:
        full_run, small_run = baby_runs[seed], lab.pretrain(small, config, seed=seed)
        trained.update({f"full split, seed {seed}": full_run, f"small split, seed {seed}": small_run})
        outcome.record(
            "gap_full_split", full_run.final_val_loss - full_run.final_train_loss, seed=seed, unit="nats/char"
        )
        outcome.record(
            "gap_small_split", small_run.final_val_loss - small_run.final_train_loss, seed=seed, unit="nats/char"
        )
        outcome.record("val_loss_small_split", small_run.final_val_loss, seed=seed, unit="nats/char")
        if seed == lab.seeds[0]:
            for name, run in (("full split", full_run), (f"{p.small_split_fraction:.0%} split", small_run)):
                curves[f"{name}: train"] = ([e["step"] for e in run.evals], [e["train_loss"] for e in run.evals])
                curves[f"{name}: val"] = ([e["step"] for e in run.evals], [e["val_loss"] for e in run.evals])
    require_trained(trained, "every model")
    outcome.plot_lines(
        "overfitting",
        curves,
        xlabel="step",
        ylabel="loss (nats/char)",
        title="Train vs validation loss, full vs 10x smaller training split (seed 0)",
        caption="The gap between each pair of curves is the overfitting the prediction is about.",
    )
