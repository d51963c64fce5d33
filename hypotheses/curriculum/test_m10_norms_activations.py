"""Curriculum 10: norms and activations — LayerNorm vs RMSNorm, GELU vs ReLU vs SwiGLU
at an exactly matched parameter count."""

import time

import pytest
import torch

from lab.ablations import compare_runs
from lab.data import get_batch
from lab.models import GPT
from lab.report import between, less_than, prediction
from lab.report.plots import heatmap_grid
from lab.seeding import seed_everything
from lab.train import make_optimizer, train_step

pytestmark = [pytest.mark.curriculum, pytest.mark.m10_norms_activations]

NORMS = ("layernorm", "rmsnorm")


@prediction(
    "RMSNorm trains as well as LayerNorm: final val loss within +-0.02 nats/char",
    metric="rmsnorm_minus_layernorm",
    expect=between(-0.02, 0.02),
)
def test_rmsnorm_matches_layernorm(lab, ablation_runs, outcome, require_trained):
    """Does RMSNorm train the shared small GPT as well as LayerNorm?

    Train the model with each norm (everything else fixed; RMSNorm drops the mean
    subtraction and the bias) and compare final validation loss, paired by seed.
    """
    runs = {norm: ablation_runs(norm=norm) for norm in NORMS}
    compare_runs(outcome, runs, title="LayerNorm vs RMSNorm: validation loss", baseline="layernorm")
    for seed in lab.seeds:
        outcome.record(
            "rmsnorm_minus_layernorm",
            runs["rmsnorm"][seed].final_val_loss - runs["layernorm"][seed].final_val_loss,
            seed=seed,
        )
    require_trained(runs, "every model")


def _step_fn(lab, data, norm):
    """One training step of the shared small GPT with this norm, as train() runs it."""
    a = lab.profile.architecture
    config = lab.arch_config(data, norm=norm)
    tc = lab.train_config(seed=0, batch_size=a.batch_size, lr=a.lr)
    gen = seed_everything(0)
    model = GPT(config).train()
    optimizer = make_optimizer(model, tc)

    def step():
        x, y = get_batch(data.train, config.block_size, tc.batch_size, gen)
        return train_step(model, optimizer, x, y, grad_clip=tc.grad_clip)

    return step


@pytest.mark.parametrize("norm", NORMS)
def test_norm_step_benchmark(lab, char_data, benchmark, outcome, norm):
    """How long does a training step of the shared small GPT take with each norm?

    One optimizer step (batch sampling, forward, backward, clipping, AdamW) per round,
    after 5 warm-up steps, timed with pytest-benchmark; both norms benchmarked in the
    same process.
    """
    benchmark.group = "m10: training step, LayerNorm vs RMSNorm"
    benchmark.extra_info["norm"] = norm
    benchmark.pedantic(
        _step_fn(lab, char_data, norm), rounds=max(10, lab.profile.architecture.steps // 10), warmup_rounds=5
    )
    outcome.cite_benchmark(benchmark.group)


@prediction(
    "RMSNorm makes a training step faster than LayerNorm (step-time ratio RMSNorm / LayerNorm < 1)",
    metric="rms_over_ln_step_time",
    expect=less_than(1.0),
)
def test_rmsnorm_step_time(lab, char_data, outcome):
    """Is a training step faster with RMSNorm than with LayerNorm, interleaved in one process?

    Build both models (seed 0), warm each up for 5 steps, then alternate blocks of 10
    steps of each for the profile's seeds x 3 rounds; each round's ratio of mean step
    times is one sample. Interleaving spreads machine noise over both alike.
    """
    steps = {norm: _step_fn(lab, char_data, norm) for norm in NORMS}
    for fn in steps.values():
        for _ in range(5):
            fn()
    rounds = 3 * len(lab.seeds)
    for r in range(rounds):
        times = {}
        for norm, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            times[norm] = (time.perf_counter() - t0) / 10
        outcome.record("rms_over_ln_step_time", times["rmsnorm"] / times["layernorm"], seed=r)
        for norm, t in times.items():
            outcome.record(f"{norm}_step_ms", t * 1e3, seed=r, unit="ms")
    outcome.note(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. The lab's RMSNorm is written "
        "out in Python ops (exactly Hugging Face's LlamaRMSNorm); LayerNorm is one fused kernel."
    )


@prediction(
    "SwiGLU beats GELU at the same parameter count (lower val loss)",
    metric="swiglu_val_loss",
    expect=less_than("gelu_val_loss"),
)
@prediction(
    "GELU beats ReLU at the same parameter count (lower val loss)",
    metric="gelu_val_loss",
    expect=less_than("relu_val_loss"),
)
def test_activations_at_matched_parameters(lab, ablation_runs, outcome, require_trained):
    """With exactly the same number of weights, do SwiGLU, GELU and ReLU MLPs rank as expected?

    GELU and ReLU MLPs have hidden width 4d (two d x 4d matrices); SwiGLU has three
    matrices of hidden width 8d/3, the same weight count when d is divisible by 3 (the
    profile's width is). Train each (everything else fixed) and compare final
    validation loss, paired by seed; the table lists the parameter counts.
    """
    runs = {mlp: ablation_runs(mlp=mlp) for mlp in ("gelu", "relu", "swiglu")}
    compare_runs(outcome, runs, title="MLP activation: validation loss", baseline="gelu")
    params = {mlp: next(iter(r.values())).model.num_params() for mlp, r in runs.items()}
    outcome.record(
        "max_param_gap", (max(params.values()) - min(params.values())) / min(params.values()), deterministic=True
    )
    require_trained(runs, "every model")


ACTIVATIONS = ("gelu", "relu", "swiglu")
# The convergence target: each seed's GPT-2 combination's final val loss plus this.
TARGET_MARGIN = 0.1  # nats/char


def _steps_to(run, target: float) -> float:
    """The optimizer step at which the run's validation loss first reaches `target`,
    interpolated linearly between evaluations; inf if it never does."""
    evals = [(e["step"], e["val_loss"]) for e in run.evals]
    for (s0, l0), (s1, l1) in zip(evals, evals[1:]):
        if l1 <= target:
            return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1)) if l0 > target else float(s0)
    return float(evals[0][0]) if evals and evals[0][1] <= target else float("inf")


@prediction(
    "Llama's combination (RMSNorm + SwiGLU) ends with lower val loss than GPT-2's (LayerNorm + GELU)",
    metric="rmsnorm_swiglu_val_loss",
    expect=less_than("layernorm_gelu_val_loss"),
)
@prediction(
    "Llama's combination converges faster: it reaches GPT-2's final val loss + 0.1 nats in fewer steps",
    metric="rmsnorm_swiglu_steps",
    expect=less_than("layernorm_gelu_steps"),
)
def test_norm_activation_grid(lab, ablation_runs, outcome, require_trained):
    """How do norm and activation combine, for convergence speed and stability?

    Train the shared small GPT with every combination of norm (LayerNorm, RMSNorm) and
    MLP activation (GELU, ReLU, SwiGLU at the same weight count), everything else
    fixed, the same data order, budget and seeds. Per seed, the convergence target is
    the GPT-2 combination's (LayerNorm + GELU) final validation loss + 0.1 nats; each
    run's speed is the step at which its validation loss first reaches that target
    (linear between evaluations; a run that never does counts the whole budget). For
    stability, the largest pre-clip gradient norm of each run and whether it diverged.
    Final loss and speed are compared between Llama's and GPT-2's combinations, paired
    by seed; the whole grid is tabled and drawn.
    """
    a = lab.profile.architecture
    grid = {(n, m): ablation_runs(norm=n, mlp=m) for n in NORMS for m in ACTIVATIONS}
    rows, losses = [], torch.zeros(len(NORMS), len(ACTIVATIONS))
    for (n, m), by_seed in grid.items():
        ok = {s: r for s, r in by_seed.items() if not isinstance(r, Exception)}
        steps = []
        for seed, run in ok.items():
            target = grid[("layernorm", "gelu")][seed].final_val_loss + TARGET_MARGIN
            steps.append(min(_steps_to(run, target), float(a.steps)))
            outcome.record(f"{n}_{m}_val_loss", run.final_val_loss, seed=seed, unit="nats/char")
            outcome.record(f"{n}_{m}_steps", steps[-1], seed=seed, unit="steps")
            outcome.record(f"{n}_{m}_max_grad_norm", max(h["grad_norm"] for h in run.history), seed=seed)
        mean_loss = sum(r.final_val_loss for r in ok.values()) / max(1, len(ok))
        losses[NORMS.index(n), ACTIVATIONS.index(m)] = mean_loss
        rows.append(
            {
                "norm": n,
                "activation": m,
                "final val loss (mean)": round(mean_loss, 4),
                "steps to target (mean)": round(sum(steps) / max(1, len(steps)), 1),
                "largest grad norm": round(
                    max((max(h["grad_norm"] for h in r.history) for r in ok.values()), default=0), 3
                ),
                "diverged": len(by_seed) - len(ok),
            }
        )
    outcome.table(
        "grid", rows, caption=f"Norm x activation; target = LayerNorm + GELU's final val loss + {TARGET_MARGIN}"
    )
    fig = heatmap_grid(
        [[losses.numpy()]], vmin=None, title="Final val loss (mean over seeds): norm (rows) x activation"
    )
    ax = fig.axes[0]
    ax.set_xticks(range(len(ACTIVATIONS)), ACTIVATIONS)
    ax.set_yticks(range(len(NORMS)), NORMS)
    outcome.plot("grid", fig, caption="Final validation loss of every combination")
    require_trained({f"{n} + {m}": runs for (n, m), runs in grid.items()}, "every combination")
