"""Curriculum 10: norms and activations — LayerNorm vs RMSNorm, GELU vs ReLU vs SwiGLU
at an exactly matched parameter count."""

import time

import pytest
import torch

from lab.ablations import compare_runs
from lab.data import get_batch
from lab.models import GPT
from lab.report import between, less_than, prediction
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
