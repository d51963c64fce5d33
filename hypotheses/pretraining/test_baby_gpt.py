import pytest
import torch

from lab.report import at_most, prediction
from lab.yardsticks import nanogpt_dir, nanogpt_val_losses, run_nanogpt_baby

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
        "loss_curves",
        lines,
        xlabel="step",
        ylabel="loss (nats/char)",
        hlines={"nanoGPT README: 1.88": NANOGPT_README_VAL_LOSS},
        title="Baby GPT on tiny Shakespeare",
        caption="Train and validation loss at each evaluation point, per seed.",
    )
    run = baby_runs[seeds[0]]
    prompt = torch.tensor([char_data.tokenizer.encode("ROMEO:\n")], dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    sample = run.model.generate(prompt, 200, temperature=0.8, top_k=20, generator=gen, crop=True)
    outcome.note(
        "Sample (seed 0 model, T=0.8, top-k 20): " + char_data.tokenizer.decode(sample[0].tolist()).replace("\n", " / ")
    )


@prediction(
    "nanoGPT's own train.py, run here on the same config, reaches val loss <= 1.88 (its README's figure)",
    metric="nanogpt_val_loss",
    expect=at_most(NANOGPT_README_VAL_LOSS),
)
def test_nanogpt_itself_on_this_machine(lab, outcome):
    """The yardstick itself: nanoGPT's train.py with its README CPU command.

    Run nanoGPT's unmodified train.py with the README's CPU command for the baby
    config (eval_iters 20, at the profile's scale and steps) and read the validation
    loss it reports at the last step. nanoGPT seeds itself (1337), so this is one
    deterministic measurement. It tells whether the lab's result above and nanoGPT's
    README agree on this machine. Needs NANOGPT_DIR; skipped otherwise.
    """
    path, why = nanogpt_dir()
    if path is None:
        pytest.skip(why)
    p = lab.profile.pretraining
    log = run_nanogpt_baby(
        path,
        n_layer=p.baby.n_layer,
        n_head=p.baby.n_head,
        n_embd=p.baby.n_embd,
        block_size=p.baby.block_size,
        batch_size=p.batch_size,
        max_iters=p.steps,
        device=lab.device,
        eval_iters=20,
        eval_interval=p.eval_interval,
    )
    losses = nanogpt_val_losses(log)
    outcome.record("nanogpt_val_loss", losses[max(losses)], unit="nats/char")
    steps = sorted(losses)
    outcome.plot_lines(
        "nanogpt_val",
        {"nanoGPT val loss (eval_iters 20)": (steps, [losses[s] for s in steps])},
        xlabel="iteration",
        ylabel="val loss (nats/char)",
        hlines={"1.88": NANOGPT_README_VAL_LOSS},
        title="nanoGPT's own train.py on this machine",
    )
