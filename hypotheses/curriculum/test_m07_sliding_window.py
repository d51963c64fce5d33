import numpy as np
import pytest
import torch

from lab.decoding import lab_decode_latencies, tail_to_head_ratio
from lab.report import at_most, check, greater_than, prediction
from lab.train import per_position_loss

pytestmark = [pytest.mark.curriculum, pytest.mark.m07_long_context]


@check(
    "A rolling-buffer KV cache's memory stays constant as generation runs past the window (ratio of bytes at 8 "
    "windows to half a window = 1)",
    metric="rolling_growth",
    expect=at_most(1.0),
)
def test_rolling_cache_memory_is_bounded(lab, decode_model, decode_prompt, outcome):
    """Does a rolling-buffer KV cache keep its memory constant as generation runs past the window?

    Decode greedily with the sliding-window decode model one token at a time past 8x the
    window, reading the rolling cache's allocated bytes at 0.5, 1, 2, 4 and 8 windows of
    context; compare with the bytes a full cache needs for the same context (its per-token
    bytes times the context length). Exact, and a check rather than a finding: the
    rolling buffer is allocated for one window by construction.
    """
    inf = lab.profile.inference
    w, h = inf.window, inf.llama.n_head
    model = decode_model(h, sliding_window=w)
    cache = model.new_cache(batch_size=1)
    checkpoints = [max(1, w // 2), w, 2 * w, 4 * w, 8 * w]
    sizes, full = {}, {}
    token = decode_prompt[:, :1]
    with torch.no_grad():
        while cache.length < max(checkpoints):
            logits, _ = model(token, cache=cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
            if cache.length in checkpoints:
                sizes[cache.length] = cache.nbytes
    per_token = decode_model(h).new_cache(batch_size=1, max_len=1).nbytes  # a full cache grows by this per token
    for length in sizes:
        full[length] = length * per_token
    lengths = sorted(sizes)
    outcome.record("rolling_growth", sizes[lengths[-1]] / sizes[lengths[0]], deterministic=True)
    outcome.record("full_growth", full[lengths[-1]] / full[lengths[0]], deterministic=True)
    outcome.plot_lines(
        "cache_bytes",
        {
            f"rolling buffer (window {w})": (lengths, [sizes[n] / 1024 for n in lengths]),
            "full KV cache": (lengths, [full[n] / 1024 for n in lengths]),
        },
        xlabel="tokens of context",
        ylabel="KV-cache KiB",
        title="KV-cache memory vs context length",
    )


@prediction(
    "A sliding-window model has higher loss than full attention on positions beyond its window",
    metric="window_loss_beyond",
    expect=greater_than("full_loss_beyond"),
)
def test_window_hurts_beyond_the_window(lab, char_data, llama_runs, outcome, require_trained):
    """Does a sliding-window model lose more than full attention at positions beyond its window?

    Train the Llama-style char model with full causal attention and with sliding-window
    attention (the profile's window), same budget and seeds, and measure validation loss
    at each position of the block on the same fixed batches. The statistic is the mean
    loss over positions at or beyond the window, where the windowed model can no longer
    see the start of the block.
    """
    inf, p = lab.profile.inference, lab.profile.pretraining
    w, h = inf.window, inf.llama.n_head
    curves, trained = {}, {}
    for seed in lab.seeds:
        full, windowed = llama_runs(h, seed), llama_runs(h, seed, sliding_window=w)
        trained.update({f"full attention, seed {seed}": full, f"window {w}, seed {seed}": windowed})
        kw = dict(block_size=full.model.config.block_size, batch_size=p.batch_size, n_batches=p.eval_batches)
        full_pos = per_position_loss(full.model, char_data.val, **kw)
        win_pos = per_position_loss(windowed.model, char_data.val, **kw)
        outcome.record("full_loss_beyond", float(full_pos[w:].mean()), seed=seed, unit="nats/char")
        outcome.record("window_loss_beyond", float(win_pos[w:].mean()), seed=seed, unit="nats/char")
        outcome.record("window_loss_within", float(win_pos[:w].mean()), seed=seed, unit="nats/char")
        if seed == lab.seeds[0]:
            curves["full attention"] = (np.arange(len(full_pos)), full_pos)
            curves[f"sliding window {w}"] = (np.arange(len(win_pos)), win_pos)
    require_trained(trained, "every model")
    outcome.plot_lines(
        "per_position",
        curves,
        xlabel="position in block",
        ylabel="val loss (nats/char)",
        title="Per-position validation loss (first seed)",
    )


@prediction(
    "With a rolling cache, per-token decode cost does not grow with total length (last 10% of steps <= 1.5x the "
    "first 10%)",
    metric="tail_to_head",
    expect=at_most(1.5),
)
def test_rolling_decode_cost_is_flat(lab, decode_model, decode_prompt, outcome):
    """With a rolling cache, does per-token decode cost stay flat as generation grows?

    Greedily decode the profile's longest decode length (far past the window) with the
    sliding-window decode model and its rolling cache, timing each token; the statistic
    is the mean latency of the last 10% of steps over the first 10%, per timing round.
    """
    inf = lab.profile.inference
    n = max(inf.decode_lengths)
    model = decode_model(inf.llama.n_head, sliding_window=inf.window)
    for rnd in range(inf.timing_rounds):
        outcome.record(
            "tail_to_head", tail_to_head_ratio(lab_decode_latencies(model, decode_prompt, n, use_cache=True)), seed=rnd
        )
