import numpy as np
import pytest

from lab.decoding import hf_decode_latencies, lab_decode_latencies, tail_to_head_ratio
from lab.report import at_least, at_most, prediction
from lab.report.plots import line_figure

pytestmark = [pytest.mark.curriculum, pytest.mark.m06_kv_cache]

IMPLEMENTATIONS = ("recompute", "lab_kv_cache", "lab_compiled", "hf_dynamic_cache", "hf_static_cache")
NAMES = {
    "recompute": "recompute",
    "lab_kv_cache": "the lab KV cache",
    "lab_compiled": "the lab's compiled step",
    "hf_dynamic_cache": "Hugging Face generate",
}


def _require_same_decodes(outcome, rounds, names) -> None:
    """Validity of a speed comparison: every timed call of the implementations compared
    (decode_rounds) decoded the same greedy tokens, all of them, in every round."""
    seqs = {name: {tuple(tokens) for tokens, _ in rounds[name]} for name in names}
    same = len(set().union(*seqs.values())) == 1
    n = len(rounds[names[0]][0][0])
    detail = f"all {n} greedy tokens of every timed call" + (
        "" if same else "; " + ", ".join(f"{NAMES[k]}: {len(v)} distinct sequence(s)" for k, v in seqs.items())
    )
    outcome.require(" and ".join(NAMES[k] for k in names) + " decode the same tokens", same, detail)


def _seconds(rounds, name) -> list[float]:
    """Total decode time of each round of one implementation."""
    return [sum(latencies) for _, latencies in rounds[name]]


def _decode(impl, lab_model, hf_model, decoder, prompt, n):
    if impl == "recompute":
        return lab_decode_latencies(lab_model, prompt, n, use_cache=False)
    if impl == "lab_kv_cache":
        return lab_decode_latencies(lab_model, prompt, n, use_cache=True)
    if impl == "lab_compiled":
        return lab_decode_latencies(lab_model, prompt, n, use_cache=True, decoder=decoder())
    return hf_decode_latencies(
        hf_model(), prompt, n, cache_implementation="static" if impl == "hf_static_cache" else None
    )


@pytest.mark.parametrize("length_index", [0, 1, 2, 3], ids=lambda i: f"length{i}")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_decode_benchmark(
    lab,
    decode_model,
    hf_decode_model,
    compiled_decoder,
    decode_prompt,
    decode_length,
    benchmark,
    outcome,
    impl,
    length_index,
):
    """How fast is greedy decoding by full recompute, the lab KV cache and Hugging Face generate?

    The same freshly initialised Llama-style model (weights exported once to
    LlamaForCausalLM for the Hugging Face rows) greedily decodes N new tokens after a
    short prompt, N from the profile's decode lengths (100, 500, 1,000 and 2,000 on the
    cpu profile). "recompute" runs the whole sequence through the model for every new
    token (what a model without a cache must do; timed up to the profile's third decode
    length, 1,000 tokens on the cpu profile, since its cost grows with the square of the
    length); "lab_kv_cache" prefills once and then feeds one token per step;
    "lab_compiled" does the same through the lab's compiled single-token step over a
    static-shape cache (lab.models.compiled, compiled once per session, untimed); the
    Hugging Face rows call `generate` with its default dynamic cache and with its static
    cache. Timed with pytest-benchmark, one process, the profile's timing rounds (one
    untimed warm-up first up to 500 tokens); tokens/s is recorded per round.
    """
    n = decode_length(length_index)
    if impl == "recompute" and n > decode_length("long"):
        pytest.skip(f"recompute is benchmarked up to {decode_length('long')} tokens (its cost grows as n^2)")
    h = lab.profile.inference.llama.n_head
    model = decode_model(h)
    benchmark.group = f"KV cache: greedy decode of {n} tokens"
    benchmark.extra_info.update(new_tokens=n, implementation=impl)
    rounds, calls = lab.profile.inference.timing_rounds, []
    benchmark.pedantic(
        lambda: calls.append(
            _decode(impl, model, lambda: hf_decode_model(h), lambda: compiled_decoder(h), decode_prompt, n)
        ),
        rounds=rounds,
        iterations=1,
        warmup_rounds=1 if n <= 500 else 0,
    )
    for rnd, latencies in enumerate(calls[-rounds:]):
        assert len(latencies) == n
        outcome.record("tokens_per_s", n / sum(latencies), seed=rnd, unit="tokens/s")
        outcome.record("ms_per_token", 1e3 * sum(latencies) / n, seed=rnd, unit="ms")
    benchmark.extra_info["tokens_per_s"] = round(n / sum(calls[-1]), 1)
    outcome.note("'seed' indexes the benchmark round")
    outcome.cite_benchmark(benchmark.group)


@pytest.mark.parametrize(
    "which",
    [
        pytest.param(
            "short",
            marks=prediction(
                "The KV cache makes greedy decoding >= 10x faster than recompute for a short generation (100 tokens "
                "on the cpu profile)",
                metric="speedup",
                expect=at_least(10.0),
            ),
        ),
        pytest.param(
            "long",
            marks=prediction(
                "The KV cache makes greedy decoding >= 100x faster than recompute for a long generation (1,000 "
                "tokens on the cpu profile)",
                metric="speedup",
                expect=at_least(100.0),
            ),
        ),
    ],
)
def test_kv_cache_speedup(lab, decode_rounds, decode_prompt, decode_length, outcome, which):
    """Does a KV cache speed greedy decoding up 10x at 100 tokens and 100x or more at 1,000?

    The seed's claim. Decode the profile's first ("short") or third ("long") decode
    length greedily with the lab model, recomputing the full sequence every step and
    using the (eager) KV cache, interleaved with the other implementations of
    decode_rounds for the profile's timing rounds; the speedup per round is the ratio of
    total times. Each round is one sample of the interval. Valid only if both decode the
    same greedy tokens in every timed call.
    """
    n = decode_length(0 if which == "short" else "long")
    rounds = decode_rounds(n)
    _require_same_decodes(outcome, rounds, ["lab_kv_cache", "recompute"])
    for rnd, (slow, fast) in enumerate(zip(_seconds(rounds, "recompute"), _seconds(rounds, "lab_kv_cache"))):
        outcome.record("speedup", slow / fast, seed=rnd)
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
def test_per_token_cost_vs_position(lab, decode_rounds, decode_prompt, decode_length, outcome):
    """Does per-token decode latency grow with position, with and without the KV cache?

    Greedily decode the profile's third decode length (1,000 tokens on the cpu profile)
    with and without the KV cache, timing every token. The statistic is the mean latency of the last 10% of steps over
    the first 10% (prefill excluded): about 1 for a cost that is flat in position.
    The timings are decode_rounds' (the profile's timing rounds, one sample each). Valid
    only if both decode the same greedy tokens in every timed call.
    """
    n = decode_length("long")
    rounds = decode_rounds(n)
    _require_same_decodes(outcome, rounds, ["lab_kv_cache", "recompute"])
    curves = {}
    for rnd, ((_, cached), (_, recompute)) in enumerate(zip(rounds["lab_kv_cache"], rounds["recompute"])):
        outcome.record("cached_tail_to_head", tail_to_head_ratio(cached), seed=rnd)
        outcome.record("recompute_tail_to_head", tail_to_head_ratio(recompute), seed=rnd)
        if rnd == 0:
            k = max(1, n // 50)

            def smooth(xs, k=k):
                return np.convolve(np.asarray(xs[1:]) * 1e3, np.ones(k) / k, mode="valid")

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
def test_lab_cache_vs_hf_generate(lab, decode_rounds, decode_length, outcome):
    """Is the lab's KV-cache decode as fast as Hugging Face `generate` (dynamic cache) on the same weights?

    Decode the profile's third decode length (1,000 tokens on the cpu profile) greedily
    with the lab model and its (eager) KV cache, and with LlamaForCausalLM.generate on
    the exported weights (its default dynamic cache), interleaved with the other
    implementations of decode_rounds for the profile's timing rounds. The statistic is HF
    time / lab time per round: >= 1 means the lab is no slower. Valid only if both decode
    the same greedy tokens in every timed call.
    """
    n = decode_length("long")
    rounds = decode_rounds(n)
    _require_same_decodes(outcome, rounds, ["lab_kv_cache", "hf_dynamic_cache"])
    for rnd, (lab_t, hf_t) in enumerate(zip(_seconds(rounds, "lab_kv_cache"), _seconds(rounds, "hf_dynamic_cache"))):
        outcome.record("hf_over_lab_time", hf_t / lab_t, seed=rnd)
        outcome.record("lab_tokens_per_s", n / lab_t, seed=rnd, unit="tokens/s")
        outcome.record("hf_tokens_per_s", n / hf_t, seed=rnd, unit="tokens/s")
    outcome.cite_benchmark(f"KV cache: greedy decode of {n} tokens")


@prediction(
    "The lab's compiled single-token decode step (static-shape cache) makes greedy decoding of 1,000 tokens >= 20x "
    "faster than recompute",
    metric="compiled_speedup",
    expect=at_least(20.0),
)
@prediction(
    "The lab's compiled decode step is >= 2x faster than Hugging Face generate (dynamic cache) on the same weights",
    metric="hf_over_compiled_time",
    expect=at_least(2.0),
)
@prediction(
    "The compiled decode step is >= 2x faster than the lab's eager KV-cache decode",
    metric="eager_over_compiled_time",
    expect=at_least(2.0),
)
def test_compiled_decode_speed(lab, decode_rounds, compiled_decoder, decode_length, outcome):
    """How much faster does a compiled single-token step make the lab's cached decode?

    Cached decoding of a small model is bound by per-operator overhead (a few hundred
    small ops per token), not by arithmetic. lab.models.compiled.CompiledDecoder traces one
    decode step over a static-shape cache (the new token's position is a tensor, it
    attends to every slot under a mask) and compiles it once with torch.compile (inductor
    on the cpu profile; CUDA graphs on CUDA); the prompt is still prefilled eagerly.
    Decode the profile's third decode length (1,000 tokens on the cpu profile) greedily by
    recompute, the eager KV cache, the compiled step and Hugging Face generate (dynamic
    cache), interleaved in decode_rounds for the profile's timing rounds (the compile
    happened once before, untimed). Each statistic is a ratio of total times per round.
    Valid only if the step compiled (no fallback to eager) and all four decode the same
    greedy tokens in every timed call.
    """
    n = decode_length("long")
    rounds = decode_rounds(n)
    decoder = compiled_decoder(lab.profile.inference.llama.n_head)
    outcome.require(
        "the decode step compiled",
        decoder.compiled,
        "CompiledDecoder ran its compiled step" if decoder.compiled else f"it fell back: {decoder.fallback_reason}",
    )
    _require_same_decodes(outcome, rounds, ["lab_compiled", "lab_kv_cache", "recompute", "hf_dynamic_cache"])
    secs = {name: _seconds(rounds, name) for name in rounds}
    for rnd, fast in enumerate(secs["lab_compiled"]):
        outcome.record("compiled_speedup", secs["recompute"][rnd] / fast, seed=rnd)
        outcome.record("hf_over_compiled_time", secs["hf_dynamic_cache"][rnd] / fast, seed=rnd)
        outcome.record("eager_over_compiled_time", secs["lab_kv_cache"][rnd] / fast, seed=rnd)
        outcome.record("compiled_tokens_per_s", n / fast, seed=rnd, unit="tokens/s")
    outcome.note(
        f"{n} new tokens; torch.compile backend {lab.profile.inference_stacks.compile_backend!r}; 'seed' indexes "
        "the timing round"
    )
    outcome.cite_benchmark(f"KV cache: greedy decode of {n} tokens")
