import pytest
import torch

from lab.report import at_most, prediction

pytestmark = pytest.mark.pretraining

NANOGPT_README_VAL_LOSS = 1.88  # nanoGPT README, the same config trained on a CPU


@prediction(
    "nanoGPT's baby config reaches val loss <= 1.88 nats on tiny Shakespeare (nanoGPT README's CPU figure)",
    metric="val_loss",
    expect=at_most(NANOGPT_README_VAL_LOSS),
)
def test_baby_gpt_matches_nanogpt_readme(lab, char_data, baby_runs, outcome):
    """The baby GPT reproduces nanoGPT's reported CPU validation loss.

    nanoGPT's README trains a 4-layer, 4-head, 128-dim GPT with block size 64, batch 12,
    dropout 0, lr 1e-3 (100 warmup steps, cosine to 1e-4), AdamW beta2 0.99, weight
    decay 0.1, grad clip 1.0, for 2,000 iterations on a CPU and reports a validation
    loss of 1.88. We train the same configuration with the lab's own model and trainer
    (the cpu profile; other profiles scale it), once per seed, and read the validation
    loss at the last step, averaged over the profile's fixed evaluation batches
    (nanoGPT averages 20 random batches, a noisier estimate).
    """
    p = lab.profile.pretraining
    outcome.note(
        f"config: {p.baby.n_layer} layers, {p.baby.n_head} heads, {p.baby.n_embd} dims, block {p.baby.block_size}, "
        f"batch {p.batch_size}, {p.steps} steps, lr {p.lr}"
    )
    for seed, run in baby_runs.items():
        outcome.record("val_loss", run.final_val_loss, seed=seed, unit="nats/char")
        outcome.record("train_loss", run.final_train_loss, seed=seed, unit="nats/char")
        outcome.record("train_tokens_per_s", run.tokens_per_s, seed=seed, unit="tokens/s")
    seeds = sorted(baby_runs)
    lines = {}
    for s in seeds:
        ev = baby_runs[s].evals
        lines[f"train, seed {s}"] = ([e["step"] for e in ev], [e["train_loss"] for e in ev])
        lines[f"val, seed {s}"] = ([e["step"] for e in ev], [e["val_loss"] for e in ev])
    outcome.plot_lines(
        "loss_curves", lines, xlabel="step", ylabel="loss (nats/char)",
        hlines={"nanoGPT README: 1.88": NANOGPT_README_VAL_LOSS},
        title="Baby GPT on tiny Shakespeare", caption="Train and validation loss at each evaluation point, per seed.",
    )
    run = baby_runs[seeds[0]]
    prompt = torch.tensor([char_data.tokenizer.encode("ROMEO:\n")], dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    sample = run.model.generate(prompt, 200, temperature=0.8, top_k=20, generator=gen)
    outcome.note("Sample (seed 0 model, T=0.8, top-k 20): " + char_data.tokenizer.decode(sample[0].tolist()).replace("\n", " / "))
