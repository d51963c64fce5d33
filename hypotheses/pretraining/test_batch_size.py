import numpy as np
import pytest

from lab.report import greater_than, less_than, prediction
from lab.session import uniform_loss
from lab.train import TrainingDivergedError

pytestmark = pytest.mark.pretraining


def _runs(lab, data, config, seed) -> dict[int, object]:
    """{batch size: TrainResult or TrainingDivergedError}: the baby GPT at each of the
    profile's batch sizes, each for the learning-rate sweep's tokens (sweep_steps x
    pretraining batch_size sequences of the context length)."""
    p = lab.profile.pretraining
    tokens = p.sweep_steps * p.batch_size
    out = {}
    for b in lab.profile.batch_size.batch_sizes:
        if tokens % b:
            raise ValueError(f"batch size {b} does not divide the {tokens} sequences of the comparison")
        try:
            out[b] = lab.pretrain(data, config, seed=seed, lr=p.lr, batch_size=b, max_steps=tokens // b)
        except TrainingDivergedError as exc:
            out[b] = exc
    return out


def _step_noise(run) -> float:
    """Spread of the minibatch training loss from one step to the next over the second half
    of training: std(loss[t+1] - loss[t]) / sqrt(2), the per-step noise if it is independent."""
    losses = np.array([h["train_loss"] for h in run.history])[len(run.history) // 2 :]
    return float(np.diff(losses).std(ddof=1) / np.sqrt(2))


@prediction(
    "At equal tokens, the smallest batch (4 sequences on the cpu profile, 3x the steps) ends with lower validation "
    "loss than the largest (48 sequences, a quarter of the steps)",
    metric="val_loss_smallest_batch",
    expect=less_than("val_loss_largest_batch"),
)
@prediction(
    "Smaller batches train noisier: the step-to-step spread of the minibatch loss is larger at the smallest batch "
    "than at the largest",
    metric="step_noise_smallest_batch",
    expect=greater_than("step_noise_largest_batch"),
)
def test_batch_size_at_equal_tokens(lab, char_data, outcome, require_trained):
    """At equal tokens, how does the batch size change training?

    Train the baby GPT at each batch size of the profile's grid (4, 12 and 48 sequences
    on the cpu profile), each for the same tokens as the learning-rate sweep's runs
    (sweep_steps x the pretraining batch size sequences), so a smaller batch takes
    proportionally more optimizer steps; the same peak learning rate, warmup + cosine
    schedule and seeds. Read the final validation loss, and the noise of training: the
    spread of the minibatch training loss from one step to the next over the second
    half of training. Paired by seed. A diverged run scores ln V. Valid only if every
    run trained.
    """
    config = lab.model_config(char_data)
    sizes = lab.profile.batch_size.batch_sizes
    runs, curves, rows = {}, {}, []
    for seed in lab.seeds:
        by_size = _runs(lab, char_data, config, seed)
        for b, run in by_size.items():
            runs.setdefault(f"batch {b}", {})[seed] = run
            diverged = isinstance(run, TrainingDivergedError)
            val = uniform_loss(config.vocab_size) if diverged else run.final_val_loss
            noise = float("nan") if diverged else _step_noise(run)
            for which, size in (("smallest", sizes[0]), ("largest", sizes[-1])):
                if b == size:
                    outcome.record(f"val_loss_{which}_batch", val, seed=seed, unit="nats/char")
                    if not diverged:
                        outcome.record(f"step_noise_{which}_batch", noise, seed=seed, unit="nats")
            rows.append({"seed": seed, "batch": b, "steps": len(getattr(run, "history", [])), "final val loss": val})
            if seed == lab.seeds[0] and not diverged:
                tokens = [e["step"] * b * config.block_size for e in run.evals]
                curves[f"batch {b}"] = (tokens, [e["val_loss"] for e in run.evals])
    outcome.table("runs", rows, caption="Every run: batch size, optimizer steps, final validation loss")
    outcome.plot_lines(
        "val_by_tokens",
        curves,
        xlabel="training tokens",
        ylabel="val loss (nats/char)",
        title=f"Validation loss by tokens seen, seed {lab.seeds[0]}",
    )
    require_trained(runs, "every run")
