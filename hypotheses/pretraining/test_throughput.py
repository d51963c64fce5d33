import statistics
import time

import pytest
import torch

from lab.data import get_batch
from lab.models import GPT
from lab.report import at_least, prediction
from lab.seeding import seed_everything
from lab.train import make_optimizer, train_step
from lab.yardsticks import nanogpt_dir, nanogpt_step_times, run_nanogpt_baby

pytestmark = pytest.mark.pretraining


def _lab_step_fn(lab, data):
    """One training step of the baby GPT (batch sampling included), as train() does it."""
    config, tc = lab.model_config(data), lab.train_config(seed=0)
    gen = seed_everything(0)
    model = GPT(config).to(tc.device).train()
    optimizer = make_optimizer(model, tc)

    def step():
        x, y = get_batch(data.train, config.block_size, tc.batch_size, gen, tc.device)
        return train_step(model, optimizer, x, y, grad_clip=tc.grad_clip)

    return step, tc.batch_size * config.block_size


def test_training_throughput(lab, char_data, benchmark, outcome):
    """Training throughput of the baby GPT on this machine.

    Time single optimizer steps (batch sampling, forward, backward, gradient clipping,
    AdamW update) of nanoGPT's baby config at the profile's scale with
    pytest-benchmark, after 5 warm-up steps, and convert the mean step time to
    training tokens per second (batch size x block size per step).
    """
    step, tokens_per_step = _lab_step_fn(lab, char_data)
    benchmark.group = "pretraining: baby GPT training step"
    benchmark.extra_info["tokens_per_step"] = tokens_per_step
    benchmark.pedantic(step, rounds=lab.profile.pretraining.throughput_steps, warmup_rounds=5)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is None:  # pytest-benchmark is disabled under xdist
        outcome.note("benchmarking was disabled in this run (pytest-xdist); no timing recorded")
        return
    benchmark.extra_info["tokens_per_s"] = round(tokens_per_step / stats.mean)
    outcome.record("tokens_per_s", tokens_per_step / stats.mean, unit="tokens/s")
    outcome.record("step_time_ms", stats.mean * 1e3, unit="ms")


@prediction(
    "The lab trainer's throughput is at least nanoGPT's own train.py on the baby config, same machine",
    metric="throughput_ratio",
    expect=at_least(1.0),
)
def test_throughput_vs_nanogpt(lab, char_data, outcome):
    """Lab trainer vs nanoGPT's own train.py, side by side.

    Run nanoGPT's unmodified train.py (its baby config, on this device, no compile,
    logging every step) and the lab's training step on the same configuration,
    alternating the two in 3 rounds so that machine noise hits both. Per round, each
    side's throughput is batch x block tokens over the median step time (nanoGPT's own
    per-iteration timer, the lab's perf_counter around the same work, first 5 steps
    dropped), and the ratio lab / nanoGPT is one sample. Needs NANOGPT_DIR (a checkout
    with data/shakespeare_char prepared); skipped otherwise.
    """
    path, why = nanogpt_dir()
    if path is None:
        pytest.skip(why)
    p = lab.profile.pretraining
    steps = max(p.throughput_steps, 30)
    tokens = p.batch_size * p.baby.block_size
    for rnd in range(3):
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
        )
        nano = tokens / statistics.median(nanogpt_step_times(log)[5:])
        step, _ = _lab_step_fn(lab, char_data)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        ours = tokens / statistics.median(times[5:])
        outcome.record("nanogpt_tokens_per_s", nano, seed=rnd, unit="tokens/s")
        outcome.record("lab_tokens_per_s", ours, seed=rnd, unit="tokens/s")
        outcome.record("throughput_ratio", ours / nano, seed=rnd)
    outcome.note(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 'seed' here indexes the round")
