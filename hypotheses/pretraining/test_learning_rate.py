import math

import numpy as np
import pytest

from lab.report import at_least, greater_than, prediction
from lab.report.plots import line_figure
from lab.session import uniform_loss
from lab.train import TrainingDivergedError

pytestmark = pytest.mark.pretraining


def _final_val_loss(lab, data, config, *, seed, lr, steps) -> tuple[float, bool]:
    """Final val loss; a run that diverges scores ln V, the loss of having learned nothing."""
    try:
        return lab.pretrain(data, config, seed=seed, lr=lr, max_steps=steps).final_val_loss, False
    except TrainingDivergedError:
        return uniform_loss(config.vocab_size), True


@prediction(
    "Final val loss is U-shaped in the learning rate: both ends of the sweep are worse than the best interior rate",
    metric="u_depth",
    expect=greater_than(0.0),
)
@prediction(
    "The smallest rate (1e-5) underfits badly: at least 0.5 nats above the best rate",
    metric="low_lr_gap",
    expect=at_least(0.5),
)
def test_learning_rate_sweep_is_u_shaped(lab, char_data, outcome, require_trained):
    """Does too low a learning rate underfit and too high a rate destabilize training?

    Train the baby GPT for the profile's sweep steps at each learning rate of the
    profile's grid (spanning 1e-5 to 1e-1 on a log scale, same warmup and cosine
    schedule, same seeds), and read the final validation loss. Per seed, the U depth is
    min(loss at the smallest rate, loss at the largest rate) minus the best loss among
    the interior rates: positive when both ends are worse than the middle. The low-rate
    gap is the loss at the smallest rate minus the best loss over the grid. A run whose
    loss becomes NaN/inf is scored as ln V (a model that learned nothing) and noted.
    Valid only if each seed's best rate trained a model (loss below the unigram entropy
    of the training text by a margin): otherwise the budget, not the rate, decides.
    """
    p = lab.profile.pretraining
    lrs = sorted(p.sweep_lrs)
    config = lab.model_config(char_data)
    losses = np.zeros((len(lab.seeds), len(lrs)))
    for i, seed in enumerate(lab.seeds):
        for j, lr in enumerate(lrs):
            losses[i, j], diverged = _final_val_loss(lab, char_data, config, seed=seed, lr=lr, steps=p.sweep_steps)
            if diverged:
                outcome.note(
                    f"lr={lr:g}, seed {seed}: training diverged (non-finite loss); scored as ln V = {losses[i, j]:.3f}"
                )
    require_trained({f"seed {s}": losses[i].min() for i, s in enumerate(lab.seeds)}, "each seed's best-rate model")
    for i, seed in enumerate(lab.seeds):
        row = losses[i]
        outcome.record("u_depth", min(row[0], row[-1]) - row[1:-1].min(), seed=seed, unit="nats/char")
        outcome.record("low_lr_gap", row[0] - row.min(), seed=seed, unit="nats/char")
        outcome.record("best_lr", lrs[int(row.argmin())], seed=seed)
    mean, sd = losses.mean(axis=0), losses.std(axis=0, ddof=1) if len(lab.seeds) > 1 else np.zeros(len(lrs))
    outcome.table(
        "losses",
        [{"lr": f"{lr:g}", "mean val loss": float(m), "sd over seeds": float(s)} for lr, m, s in zip(lrs, mean, sd)],
        caption=f"Final validation loss after {p.sweep_steps} steps, mean over {len(lab.seeds)} seeds",
    )
    fig = line_figure(
        {"mean over seeds": (lrs, mean)},
        xlabel="peak learning rate",
        ylabel="final val loss (nats/char)",
        logx=True,
        title=f"Learning-rate sweep, {p.sweep_steps} steps",
        hlines={"ln V (uniform)": math.log(config.vocab_size)},
    )
    ax = fig.axes[0]
    ax.errorbar(lrs, mean, yerr=sd, fmt="none", capsize=4, color="C0")
    for seed_losses in losses:
        ax.scatter(lrs, seed_losses, s=10, alpha=0.5, color="gray")
    outcome.plot("sweep", fig, caption="Final validation loss vs learning rate (gray: individual seeds, bars: sd).")
