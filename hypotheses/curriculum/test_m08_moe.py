"""Curriculum 08: mixture of experts — a routed MLP, its load-balancing loss, and what
it buys at equal active parameters."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lab.ablations import compare_runs, expert_load, normalized_entropy  # noqa: E402
from lab.report import at_most, less_than, prediction  # noqa: E402

pytestmark = [pytest.mark.curriculum, pytest.mark.m08_moe]


@pytest.fixture(scope="module")
def moe_runs(lab, ablation_runs):
    """Dense baseline and two MoEs with the dense model's active MLP parameters: each token
    visits top_k experts of hidden width 4d/top_k (one dense MLP's worth), with and
    without the load-balancing loss."""
    a = lab.profile.architecture
    moe = dict(n_expert=a.n_expert, moe_top_k=a.moe_top_k, mlp_hidden=4 * a.model.n_embd // a.moe_top_k)
    return {
        "dense": ablation_runs(),
        "moe_aux": ablation_runs(**moe),
        "moe_noaux": ablation_runs(**moe, moe_aux_weight=0.0),
    }


def _late_entropy(run) -> np.ndarray:
    """Per layer, the normalised entropy of expert load averaged over the last 10% of steps."""
    ent = normalized_entropy(expert_load(run))  # (steps, layers)
    return ent[-max(1, len(ent) // 10) :].mean(0)


@prediction(
    "Without the load-balancing loss, expert utilisation is less even than with it (normalised load entropy, last "
    "10% of training)",
    metric="noaux_entropy",
    expect=less_than("aux_entropy"),
)
@prediction(
    "Without the load-balancing loss, routing collapses: normalised load entropy falls to 0.75 or below",
    metric="noaux_entropy",
    expect=at_most(0.75),
)
def test_routing_collapses_without_balancing(lab, moe_runs, outcome, require_trained):
    """Without the load-balancing loss, does expert routing collapse?

    Train the shared small GPT with every MLP replaced by a top-k routed mixture of
    experts (profile n_expert, top_k), once with Switch Transformer's load-balancing
    loss (weight 0.01) and once without. At every step, record the fraction of routed
    tokens each expert of each layer receives; its entropy over log(n_expert) is 1
    when balanced and 0 when one expert takes everything. The statistic is that
    normalised entropy averaged over layers and the last 10% of steps, paired by seed.
    """
    for label, key in (("aux", "moe_aux"), ("noaux", "moe_noaux")):
        for seed, run in moe_runs[key].items():
            late = _late_entropy(run)
            outcome.record(f"{label}_entropy", float(late.mean()), seed=seed)
            for layer, value in enumerate(late):
                outcome.record(f"{label}_entropy_layer{layer}", float(value), seed=seed)
    first = lab.seeds[0]
    lines = {}
    for label, key in (("with balancing loss", "moe_aux"), ("without", "moe_noaux")):
        ent = normalized_entropy(expert_load(moe_runs[key][first]))
        steps = np.arange(1, len(ent) + 1)
        window = max(1, len(ent) // 50)
        for layer in range(ent.shape[1]):
            smooth = np.convolve(ent[:, layer], np.ones(window) / window, mode="valid")
            lines[f"layer {layer}, {label}"] = (steps[window - 1 :], smooth)
    outcome.plot_lines(
        "utilisation_entropy",
        lines,
        xlabel="optimizer step",
        ylabel="normalised load entropy",
        title=f"Expert utilisation over training (seed {first})",
    )
    outcome.plot("expert_load", _load_figure(moe_runs, first), caption="Share of routed tokens per expert, layer 0")
    require_trained({k: moe_runs[k] for k in ("moe_aux", "moe_noaux")}, "every mixture of experts")


def _load_figure(moe_runs, seed):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (title, key) in zip(axes, (("with balancing loss", "moe_aux"), ("without", "moe_noaux"))):
        load = expert_load(moe_runs[key][seed])[:, 0, :]  # (steps, experts)
        ax.stackplot(np.arange(1, len(load) + 1), load.T, labels=[f"expert {e}" for e in range(load.shape[1])])
        ax.set_title(f"Layer 0 expert load, {title}")
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of routed tokens")
    axes[1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize="small")
    return fig


@prediction(
    "At equal active parameters and steps, the balanced MoE reaches lower val loss than the dense model",
    metric="moe_aux_val_loss",
    expect=less_than("dense_val_loss"),
)
def test_moe_beats_dense_at_equal_active_parameters(lab, moe_runs, outcome, require_trained):
    """At equal active parameters, does a mixture of experts beat the dense model?

    The dense model's MLP has hidden width 4d. The MoE routes each token to top_k of
    n_expert experts of hidden width 4d/top_k, so each token uses the same number of
    MLP weights (plus a d x n_expert router) while the model holds n_expert/top_k times
    as many. Same data, steps and seeds; final validation loss paired by seed.
    """
    compare_runs(outcome, moe_runs, title="Dense vs mixture of experts: validation loss", baseline="dense")
    require_trained(moe_runs, "every model")
    a = lab.profile.architecture
    d, k, e = a.model.n_embd, a.moe_top_k, a.n_expert
    outcome.note(
        f"MLP weights per layer: dense {2 * d * 4 * d:,} (all active); MoE {e * 2 * d * (4 * d // k):,} held, "
        f"{k * 2 * d * (4 * d // k):,} active per token, router {d * e:,} (biases excluded)."
    )
