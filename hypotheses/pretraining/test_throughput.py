import statistics
import time

import pytest
import torch

from lab.data import get_batch
from lab.models import GPT
from lab.report import at_least, prediction
from lab.seeding import seed_everything
from lab.train import make_loss_fn, make_optimizer, train_step
from lab.yardsticks import nanogpt_dir, nanogpt_step_times, run_nanogpt_baby

pytestmark = pytest.mark.pretraining


def _lab_step_fn(lab, data, *, compile: bool = False, config=None):
    """One training step of the baby GPT (batch sampling included) as train() runs it: the
    trainer's optimizer and loss (compiled with TrainConfig.compile), the per-block gradient
    norms it records every step. config: the model (default the lab's baby)."""
    config, tc = config or lab.model_config(data), lab.train_config(seed=0, compile=compile)
    gen = seed_everything(0)
    model = GPT(config).to(tc.device).train()
    optimizer, loss_fn = make_optimizer(model, tc), make_loss_fn(model, tc)

    def step():
        x, y = get_batch(data.train, config.block_size, tc.batch_size, gen, tc.device)
        return train_step(model, optimizer, x, y, grad_clip=tc.grad_clip, stats={}, loss_fn=loss_fn)

    return step, tc.batch_size * config.block_size


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_training_throughput(lab, char_data, benchmark, outcome, mode):
    """How many training tokens per second does the baby GPT reach on this machine?

    Time single optimizer steps (batch sampling, forward, backward, gradient clipping,
    AdamW update) of the lab's baby GPT at the profile's scale as train() runs them,
    eager or with TrainConfig(compile=True) (torch.compile of the loss, fused AdamW; the
    compile happens in the 5 warm-up steps), with pytest-benchmark, and convert the mean
    step time to training tokens per second (batch size x block size per step).
    """
    step, tokens_per_step = _lab_step_fn(lab, char_data, compile=mode == "compiled")
    benchmark.group = "pretraining: baby GPT training step"
    benchmark.extra_info["mode"] = mode
    benchmark.extra_info["tokens_per_step"] = tokens_per_step
    benchmark.pedantic(step, rounds=lab.profile.pretraining.throughput_steps, warmup_rounds=5)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is None:  # pytest-benchmark is disabled under xdist
        outcome.note("benchmarking was disabled in this run (pytest-xdist); no timing recorded")
        return
    benchmark.extra_info["tokens_per_s"] = round(tokens_per_step / stats.mean)
    outcome.record("tokens_per_s", tokens_per_step / stats.mean, unit="tokens/s")
    outcome.record("step_time_ms", stats.mean * 1e3, unit="ms")


MODES = ("eager", "compiled")


@pytest.fixture(scope="module")
def throughput_rounds(lab, char_data):
    """{(side, mode): [tokens/s per round]}: nanoGPT's unmodified train.py (its baby config on
    this device, logging every step; mode "compiled" passes --compile=True) and the lab's
    training step on the same configuration (nanoGPT's: no biases; "compiled" is
    TrainConfig(compile=True)), the four interleaved in each of the profile's
    throughput_rounds rounds (the order rotating by round) so that machine noise hits all.
    Per round each side's throughput is batch x block tokens over the median step time
    of max(throughput_steps, 30) steps (nanoGPT's own per-iteration timer, the lab's
    perf_counter around the same work), the first 5 steps dropped (they include the
    compiles). Skips without NANOGPT_DIR."""
    path, why = nanogpt_dir()
    if path is None:
        pytest.skip(why)
    p = lab.profile.pretraining
    steps = max(p.throughput_steps, 30)
    tokens = p.batch_size * p.baby.block_size
    config = lab.model_config(char_data, bias=False)  # nanoGPT's train.py default
    lab_steps = {mode: _lab_step_fn(lab, char_data, compile=mode == "compiled", config=config)[0] for mode in MODES}

    def nanogpt(mode):
        log = run_nanogpt_baby(
            path,
            n_layer=p.baby.n_layer,
            n_head=p.baby.n_head,
            n_embd=p.baby.n_embd,
            block_size=p.baby.block_size,
            batch_size=p.batch_size,
            max_iters=steps,
            device=lab.device,
            eval_iters=1,
            eval_interval=10**6,
            lr_decay_iters=p.steps,
            compile=mode == "compiled",
        )
        return tokens / statistics.median(nanogpt_step_times(log)[5:])

    def ours(mode):
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            lab_steps[mode]()
            times.append(time.perf_counter() - t0)
        return tokens / statistics.median(times[5:])

    runs = [("nanogpt", m) for m in MODES] + [("lab", m) for m in MODES]
    out = {run: [] for run in runs}
    for rnd in range(p.throughput_rounds):
        for side, mode in runs[rnd % len(runs) :] + runs[: rnd % len(runs)]:
            out[(side, mode)].append(nanogpt(mode) if side == "nanogpt" else ours(mode))
    return out


def _record_rounds(outcome, rounds, lab_mode, nanogpt_mode, metric):
    for rnd, (ours, nano) in enumerate(zip(rounds[("lab", lab_mode)], rounds[("nanogpt", nanogpt_mode)])):
        outcome.record(metric, ours / nano, seed=rnd)


@prediction(
    "The lab trainer's throughput is at least nanoGPT's own train.py on the baby config, same machine",
    metric="throughput_ratio",
    expect=at_least(1.0),
)
def test_throughput_vs_nanogpt(lab, throughput_rounds, outcome):
    """Does the lab trainer run at least as fast as nanoGPT's own train.py, side by side?

    nanoGPT's unmodified train.py with its README CPU command (no compile) and the lab's
    eager training step as train() runs it, on the same configuration (nanoGPT's: no
    biases), timed in throughput_rounds (interleaved with both compiled runs). The ratio
    lab / nanoGPT of tokens/s is one sample per round. Needs NANOGPT_DIR (a checkout with
    data/shakespeare_char prepared); skipped otherwise.
    """
    for side in ("lab", "nanogpt"):
        for rnd, v in enumerate(throughput_rounds[(side, "eager")]):
            outcome.record(f"{side}_tokens_per_s", v, seed=rnd, unit="tokens/s")
    _record_rounds(outcome, throughput_rounds, "eager", "eager", "throughput_ratio")
    _record_rounds(outcome, throughput_rounds, "compiled", "eager", "lab_compiled_over_nanogpt_eager")
    outcome.note(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'seed' here indexes the round")


@prediction(
    "With torch.compile on both sides (nanoGPT --compile=True, the lab's TrainConfig(compile=True)), the lab "
    "trainer's throughput is at least nanoGPT's on the baby config",
    metric="compiled_throughput_ratio",
    expect=at_least(1.0),
)
def test_compiled_throughput_vs_nanogpt(lab, throughput_rounds, outcome):
    """Does the lab trainer stay at least as fast as nanoGPT's train.py when both compile?

    nanoGPT's train.py with --compile=True (torch.compile of its model) and the lab's
    training step with TrainConfig(compile=True) (torch.compile of the loss, forward and
    backward, and the fused AdamW), on the same configuration (nanoGPT's: no biases),
    timed in throughput_rounds (interleaved with both eager runs; compile time excluded:
    the first 5 steps of every run are dropped, and the lab compiles once per module).
    The ratio lab / nanoGPT of tokens/s is one sample per round. Needs NANOGPT_DIR;
    skipped otherwise.
    """
    for side in ("lab", "nanogpt"):
        for rnd, v in enumerate(throughput_rounds[(side, "compiled")]):
            outcome.record(f"{side}_compiled_tokens_per_s", v, seed=rnd, unit="tokens/s")
    _record_rounds(outcome, throughput_rounds, "compiled", "compiled", "compiled_throughput_ratio")
    outcome.note(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'seed' here indexes the round")


@prediction(
    "Matrix multiplies (GEMM: mm, addmm, bmm) take at least half of the baby GPT's eager training step",
    metric="gemm_share",
    expect=at_least(0.5),
)
def test_where_the_training_step_spends_its_time(lab, char_data, outcome):
    """Where does the baby GPT's training step spend its time?

    The lab's eager training step as train() runs it (batch sampling, forward, backward,
    gradient clipping, AdamW update, the per-block gradient norms), on the baby config,
    profiled with torch.profiler after 5 warm-up steps: each operator's self time (time
    in the operator itself, not in what it calls) per step, grouped by kind of work
    (lab.step_profile.KINDS: matrix multiplies, the attention kernel, the optimizer
    update, normalisation, activation, softmax and loss, embedding, elementwise and
    copies, the rest). One window of throughput_steps steps per round, throughput_rounds
    rounds; the share of each kind is one sample per round.
    """
    from lab.step_profile import profile_step

    p = lab.profile.pretraining
    step, _ = _lab_step_fn(lab, char_data)
    profiles = [profile_step(step, steps=p.throughput_steps, warmup=5) for _ in range(p.throughput_rounds)]
    kinds = sorted({k for prof in profiles for k in prof.by_kind()})
    for rnd, prof in enumerate(profiles):
        shares = prof.shares()
        outcome.record("gemm_share", shares.get("matmul (GEMM)", 0.0), seed=rnd)
        outcome.record("step_self_time_ms", prof.total_us / 1e3, seed=rnd, unit="ms")
        for kind in kinds:
            if kind != "matmul (GEMM)":
                outcome.record(f"share: {kind}", shares.get(kind, 0.0), seed=rnd)
    last = profiles[-1]
    outcome.table(
        "step_by_kind",
        [
            {"kind": k, "ms per step": round(us / 1e3, 3), "share": round(us / last.total_us, 4)}
            for k, us in last.by_kind().items()
        ],
        caption=f"Self time per step by kind of work, last round ({p.throughput_steps} profiled steps)",
    )
    outcome.table("top_operators", last.top(15), caption="The 15 operators with the most self time, last round")
    outcome.note(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'seed' here indexes the profiled round; "
        "self times exclude the profiler's own overhead only approximately (it adds a little to every operator)"
    )
