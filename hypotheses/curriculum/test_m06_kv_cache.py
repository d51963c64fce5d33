import numpy as np
import pytest

from lab.decoding import hf_decode_latencies, lab_decode_latencies, tail_to_head_ratio
from lab.report import at_least, at_most, prediction
from lab.report.plots import line_figure

pytestmark = [pytest.mark.curriculum, pytest.mark.m06_kv_cache]

IMPLEMENTATIONS = ("recompute", "lab_kv_cache", "hf_dynamic_cache", "hf_static_cache")


def _decode(impl, lab_model, hf_model, prompt, n):
    if impl == "recompute":
        return lab_decode_latencies(lab_model, prompt, n, use_cache=False)
    if impl == "lab_kv_cache":
        return lab_decode_latencies(lab_model, prompt, n, use_cache=True)
    return hf_decode_latencies(
        hf_model(), prompt, n, cache_implementation="static" if impl == "hf_static_cache" else None
    )


@pytest.mark.parametrize("length_index", [0, 1, 2, 3], ids=lambda i: f"length{i}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_decode_benchmark(
    lab, decode_model, hf_decode_model, decode_prompt, decode_length, benchmark, outcome, impl, length_index
):
    """Greedy decode speed: full recompute vs the lab KV cache vs Hugging Face generate.

    The same freshly initialised Llama-style model (weights exported once to
    LlamaForCausalLM for the Hugging Face rows) greedily decodes N new tokens after a
    short prompt, N from the profile's decode lengths (100, 500, 1,000 and 2,000 on the
    cpu profile). "recompute" runs the whole sequence through the model for every new
    token (what a model without a cache must do); "lab_kv_cache" prefills once and then
    feeds one token per step; the Hugging Face rows call `generate` with its default
    dynamic cache and with its static cache. Timed with pytest-benchmark, one process.
    """
    n = decode_length(length_index)
    model = decode_model(lab.profile.inference.llama.n_head)
    benchmark.group = f"KV cache: greedy decode of {n} tokens"
    benchmark.extra_info.update(new_tokens=n, implementation=impl)
    latencies = benchmark.pedantic(
        _decode,
        args=(impl, model, lambda: hf_decode_model(lab.profile.inference.llama.n_head), decode_prompt, n),
        rounds=1,
        iterations=1,
        warmup_rounds=1 if n <= 500 else 0,
    )
    assert len(latencies) == n
    outcome.record("tokens_per_s", n / sum(latencies), unit="tokens/s")
    outcome.record("ms_per_token", 1e3 * sum(latencies) / n, unit="ms")
    benchmark.extra_info["tokens_per_s"] = round(n / sum(latencies), 1)
    outcome.cite_benchmark(benchmark.group)


def _speedups(lab, model, prompt, n: int) -> list[float]:
    """Recompute time / cached time, one sample per round, the two interleaved."""
    out = []
    for _ in range(lab.profile.inference.timing_rounds):
        slow = sum(lab_decode_latencies(model, prompt, n, use_cache=False))
        fast = sum(lab_decode_latencies(model, prompt, n, use_cache=True))
        out.append(slow / fast)
    return out


@pytest.mark.parametrize(
    "which",
    [
        pytest.param(
            "short",
            marks=prediction(
                "The KV cache makes greedy decoding >= 10x faster than recompute for a short generation (100 tokens on the cpu profile)",
                metric="speedup",
                expect=at_least(10.0),
            ),
        ),
        pytest.param(
            "long",
            marks=prediction(
                "The KV cache makes greedy decoding >= 100x faster than recompute for a long generation (1,000 tokens on the cpu profile)",
                metric="speedup",
                expect=at_least(100.0),
            ),
        ),
    ],
)
def test_kv_cache_speedup(lab, decode_model, decode_prompt, decode_length, outcome, which):
    """The seed's claim: a KV cache speeds decoding up 10x at 100 tokens, 100x+ at 1,000.

    Decode the profile's first ("short") or third ("long") decode length greedily with
    the lab model twice per round, recomputing the full sequence every step and using
    the KV cache, interleaved, for the profile's timing rounds; the speedup per round is
    the ratio of total times. Each round is one sample of the interval.
    """
    n = decode_length(0 if which == "short" else "long")
    model = decode_model(lab.profile.inference.llama.n_head)
    for rnd, s in enumerate(_speedups(lab, model, decode_prompt, n)):
        outcome.record("speedup", s, seed=rnd)
    outcome.note(f"{n} new tokens after a {decode_prompt.shape[1]}-token prompt; 'seed' indexes the timing round")
    outcome.cite_benchmark(f"KV cache: greedy decode of {n} tokens")


@prediction(
    "With the KV cache, per-token decode cost is flat in position (last 10% of steps <= 1.5x the first 10%)",
    metric="cached_tail_to_head",
    expect=at_most(1.5),
)
@prediction(
    "Without a cache, per-token cost grows with position (last 10% of steps >= 2x the first 10%)",
    metric="recompute_tail_to_head",
    expect=at_least(2.0),
)
def test_per_token_cost_vs_position(lab, decode_model, decode_prompt, decode_length, outcome):
    """Per-token latency as generation proceeds, with and without the cache.

    Greedily decode the profile's third decode length (1,000 tokens on the cpu profile)
    with and without the KV cache, timing every token. The statistic is the mean latency of the last 10% of steps over
    the first 10% (prefill excluded): about 1 for a cost that is flat in position.
    Repeated for the profile's timing rounds (one sample each).
    """
    n = decode_length("long")
    model = decode_model(lab.profile.inference.llama.n_head)
    curves = {}
    for rnd in range(lab.profile.inference.timing_rounds):
        cached = lab_decode_latencies(model, decode_prompt, n, use_cache=True)
        recompute = lab_decode_latencies(model, decode_prompt, n, use_cache=False)
        outcome.record("cached_tail_to_head", tail_to_head_ratio(cached), seed=rnd)
        outcome.record("recompute_tail_to_head", tail_to_head_ratio(recompute), seed=rnd)
        if rnd == 0:
            k = max(1, n // 50)
            smooth = lambda xs: np.convolve(np.asarray(xs[1:]) * 1e3, np.ones(k) / k, mode="valid")
            for name, lat in (("KV cache", cached), ("recompute", recompute)):
                ys = smooth(lat)
                curves[name] = (np.arange(1, len(ys) + 1) + decode_prompt.shape[1], ys)
    fig = line_figure(
        curves,
        xlabel="position of the new token",
        ylabel="latency per token (ms)",
        logy=True,
        title=f"Per-token decode latency, {n} tokens",
    )
    outcome.plot("latency_vs_position", fig, caption=f"Moving average over {max(1, n // 50)} steps, first round.")
    outcome.cite_benchmark(f"KV cache: greedy decode of {n} tokens")


@prediction(
    "The lab's cached greedy decode is no slower than Hugging Face generate on the same weights",
    metric="hf_over_lab_time",
    expect=at_least(1.0),
)
def test_lab_cache_vs_hf_generate(lab, decode_model, hf_decode_model, decode_prompt, decode_length, outcome):
    """Lab KV-cache decode vs Hugging Face `generate` (dynamic cache), same weights.

    Decode the profile's third decode length (1,000 tokens on the cpu profile) greedily
    with the lab model and its KV cache, and with LlamaForCausalLM.generate on the
    exported weights (its default dynamic cache), interleaved for the profile's timing
    rounds. The statistic is HF time / lab time per round: >= 1 means the lab is no
    slower.
    """
    n = decode_length("long")
    h = lab.profile.inference.llama.n_head
    model, hf = decode_model(h), hf_decode_model(h)
    hf_decode_latencies(hf, decode_prompt, 8)  # warm up generate's first-call overhead
    for rnd in range(lab.profile.inference.timing_rounds):
        lab_t = sum(lab_decode_latencies(model, decode_prompt, n, use_cache=True))
        hf_t = sum(hf_decode_latencies(hf, decode_prompt, n))
        outcome.record("hf_over_lab_time", hf_t / lab_t, seed=rnd)
        outcome.record("lab_tokens_per_s", n / lab_t, seed=rnd, unit="tokens/s")
        outcome.record("hf_tokens_per_s", n / hf_t, seed=rnd, unit="tokens/s")
    outcome.cite_benchmark(f"KV cache: greedy decode of {n} tokens")
