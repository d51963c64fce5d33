"""Curriculum 08: mixture of experts — a routed MLP, its load-balancing loss, and what
it buys at equal active parameters."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lab.ablations import compare_runs, expert_load, normalized_entropy  # noqa: E402
from lab.cost import forward_flops, interleaved_seconds  # noqa: E402
from lab.models import GPT  # noqa: E402
from lab.report import at_most, between, check, greater_than, less_than, prediction  # noqa: E402
from lab.seeding import seed_everything  # noqa: E402

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


# "Equal FLOPs" within this: the router adds d x n_expert multiply-adds per token and layer.
FLOPS_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def cost_models(lab, char_data):
    """{"dense", "moe"}: the moe_runs models' architectures, freshly initialised (seed 0; cost
    does not depend on what the weights learned), in eval mode on the lab's device, and a
    batch of random tokens of the profile's moe_cost batch size x the context length."""
    a, c = lab.profile.architecture, lab.profile.moe_cost
    moe = dict(n_expert=a.n_expert, moe_top_k=a.moe_top_k, mlp_hidden=4 * a.model.n_embd // a.moe_top_k)
    models = {}
    for name, overrides in (("dense", {}), ("moe", moe)):
        seed_everything(0)
        models[name] = GPT(lab.arch_config(char_data, **overrides)).to(lab.device).eval()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, char_data.vocab_size, (c.batch_size, a.model.block_size), generator=gen)
    return models, idx.to(lab.device)


def _flops_per_token(cost_models) -> dict[str, float]:
    models, idx = cost_models
    return {name: forward_flops(m, idx) / idx.numel() for name, m in models.items()}


@check(
    "At equal active parameters, the MoE's forward FLOPs per token are within 5% of the dense model's",
    metric="moe_over_dense_flops",
    expect=between(0.95, 1.05),
)
def test_moe_flops_per_token_match_dense(lab, cost_models, outcome):
    """How many FLOPs per token does the MoE spend, against the dense model with its active parameters?

    Count the FLOPs of one forward pass (torch's FlopCounterMode: matmuls and attention,
    a multiply-add = 2) of the dense and the balanced MoE architecture of the equal-
    active-parameter comparison, on a batch of the profile's moe_cost batch size x the
    context length, per token. The MoE routes each token to top_k experts of hidden width
    4d/top_k, so its expert matmuls do one dense MLP's work whatever the routing, plus the
    router. A check, not a finding: it holds by construction. The parameters each model
    holds are recorded beside it: the MoE holds n_expert/top_k times the MLP weights.
    """
    flops = _flops_per_token(cost_models)
    models, _ = cost_models
    for name, value in flops.items():
        outcome.record(f"{name}_flops_per_token", value, unit="FLOPs", deterministic=True)
        outcome.record(f"{name}_params", models[name].num_params(), unit="parameters", deterministic=True)
    outcome.record("moe_over_dense_flops", flops["moe"] / flops["dense"], deterministic=True)
    outcome.record(
        "moe_over_dense_params", models["moe"].num_params() / models["dense"].num_params(), deterministic=True
    )


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_moe_forward_benchmark(lab, cost_models, benchmark, outcome, arch):
    """How long does a forward pass of the dense model and of the MoE take?

    One forward pass (no gradients) of the equal-active-parameter dense or MoE
    architecture (random init) on the profile's moe_cost batch of random tokens, timed
    with pytest-benchmark: one warm-up round, then the profile's rounds of its iterations.
    Microseconds per token are recorded per round.
    """
    models, idx = cost_models
    c = lab.profile.moe_cost
    benchmark.group = f"MoE vs dense: forward pass of {idx.shape[0]} x {idx.shape[1]} tokens"
    benchmark.extra_info.update(arch=arch, tokens=idx.numel())
    times = []

    def forward():
        fn = {arch: lambda: models[arch](idx)}
        t = interleaved_seconds(fn, rounds=1, iterations=c.iterations, device=lab.device, warm_up=False)
        times.append(t[arch][0])

    with torch.no_grad():
        benchmark.pedantic(forward, rounds=c.rounds, iterations=1, warmup_rounds=1)
    for rnd, seconds in enumerate(times[-c.rounds :]):
        outcome.record("us_per_token", 1e6 * seconds / idx.numel(), seed=rnd, unit="us")
    outcome.note("'seed' indexes the benchmark round")
    outcome.cite_benchmark(benchmark.group)


@prediction(
    "Equal FLOPs are not equal time: the MoE's forward pass takes longer per token than the dense model's "
    "(time ratio MoE / dense above 1)",
    metric="moe_over_dense_time",
    expect=greater_than(1.0),
)
def test_moe_wall_time_vs_dense(lab, cost_models, outcome):
    """At equal FLOPs per token, does the MoE's forward pass take as long as the dense model's?

    Time forward passes (no gradients) of the equal-active-parameter dense and MoE
    architectures (random init) on the profile's moe_cost batch of random tokens, the two
    interleaved within each of the profile's rounds (order alternating, one untimed pass
    each first), each round the mean of the profile's iterations. The statistic is the
    MoE / dense time per token, one sample per round. The MoE does the dense MLP's
    arithmetic as n_expert smaller matmuls behind a router, a top-k, a gather and a
    scatter-add per layer. Valid when the FLOPs per token match within 5%.
    """
    models, idx = cost_models
    flops = _flops_per_token(cost_models)
    ratio = flops["moe"] / flops["dense"]
    outcome.require(
        "equal FLOPs per token",
        abs(ratio - 1) <= FLOPS_TOLERANCE,
        f"MoE / dense forward FLOPs per token {ratio:.4f} (tolerance {FLOPS_TOLERANCE})",
    )
    c = lab.profile.moe_cost
    with torch.no_grad():
        fns = {name: (lambda m=m: m(idx)) for name, m in models.items()}
        seconds = interleaved_seconds(fns, rounds=c.rounds, iterations=c.iterations, device=lab.device)
    for rnd, (d, m) in enumerate(zip(seconds["dense"], seconds["moe"])):
        outcome.record("moe_over_dense_time", m / d, seed=rnd)
        outcome.record("dense_us_per_token", 1e6 * d / idx.numel(), seed=rnd, unit="us")
        outcome.record("moe_us_per_token", 1e6 * m / idx.numel(), seed=rnd, unit="us")
    outcome.note(f"{idx.shape[0]} x {idx.shape[1]} tokens per forward pass on {lab.device}; 'seed' indexes the round")
    outcome.cite_benchmark(f"MoE vs dense: forward pass of {idx.shape[0]} x {idx.shape[1]} tokens")
