"""Curriculum 15: inference stacks — the same weights decoded greedily by the lab's
`GPT.generate`, Hugging Face `generate` (dynamic cache, static cache) and the static-cache
decode step compiled with torch.compile, plus vLLM and ExLlamaV2 where they install (CUDA
only). Correctness first (identical greedy tokens), then first-token latency and decode
throughput side by side with pytest-benchmark."""

import copy

import numpy as np
import pytest
import torch

from lab.decoding import hf_batch_greedy, lab_batch_greedy
from lab.inference_stacks import STACK_NAMES, build_stacks, compare_greedy, random_prompt
from lab.report import at_least, at_most, check, greater_than, prediction

pytestmark = [pytest.mark.curriculum, pytest.mark.m15_inference_stacks]

OTHERS = tuple(n for n in STACK_NAMES if n != "lab")  # compared against the lab's tokens


def _scale(lab):
    return lab.profile.inference_stacks


def _max_len(s) -> int:
    """Tokens the static caches hold: the longest request of the module."""
    return max(max(s.prompt_lens) + 1, min(s.prompt_lens) + s.new_tokens)


def _warm_rounds(calls: list, rounds: int) -> list:
    """The timed rounds of a benchmark.pedantic target's results (its warm-up dropped); one
    call when benchmarking is disabled (xdist, --benchmark-disable)."""
    return calls[-rounds:]


def _benchmark_median(benchmark) -> float | None:
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    return None if stats is None else stats.median


class StacksBench:
    """The stacks over the decode model's weights (built and compiled once per module) and
    the prompts every speed measurement uses."""

    def __init__(self, lab, decode_model):
        self.lab, self.s = lab, _scale(lab)
        model = copy.deepcopy(decode_model(lab.profile.inference.llama.n_head)).to(lab.device).eval()
        need = _max_len(self.s)
        if need > model.config.block_size:
            raise ValueError(
                f"the decode model's context ({model.config.block_size}) is shorter than the "
                f"longest request ({need}): lower InferenceStacksScale.prompt_lens / new_tokens"
            )
        self.stacks = build_stacks(model, max_len=need, compile_backend=self.s.compile_backend)
        self.prompt = random_prompt(max(self.s.prompt_lens), model.config.vocab_size, seed=0)

    def stack(self, name):
        st = self.stacks[name]
        if not st.available:
            pytest.skip(f"{name}: {st.reason}")
        return st

    def prompt_of(self, length: int) -> torch.Tensor:
        return self.prompt[:, :length]

    @property
    def short(self) -> torch.Tensor:
        return self.prompt_of(min(self.s.prompt_lens))

    def decode_group(self) -> str:
        return (
            f"Inference stacks: greedy decode of {self.s.new_tokens} tokens after a {min(self.s.prompt_lens)}-token "
            "prompt"
        )

    @staticmethod
    def ttft_group(length: int) -> str:
        return f"Inference stacks: first-token latency, {length}-token prompt"


@pytest.fixture(scope="module")
def bench(lab, decode_model):
    return StacksBench(lab, decode_model)


@pytest.fixture(scope="module")
def trained_stacks(lab, llama_runs):
    """trained_stacks(seed) -> {name: Stack} over the seed's trained Llama-style GQA model (2 KV heads: the
    model curriculum 09 and 14 train, so nothing extra is trained)."""
    built = {}

    def get(seed):
        if seed not in built:
            model = copy.deepcopy(llama_runs(lab.profile.inference.kv_heads[1], seed).model).to(lab.device).eval()
            built[seed] = build_stacks(model, compile_backend=_scale(lab).compile_backend)
        return built[seed]

    return get


# ------------------------------------------------------------------ benchmarks


@pytest.mark.parametrize("length_index", [0, 1, 2, 3], ids=lambda i: f"prompt{i}")
@pytest.mark.parametrize("stack", STACK_NAMES)
def test_first_token_benchmark(lab, bench, benchmark, outcome, stack, length_index):
    """How long does each stack take to the first token (prefill plus one greedy token)?

    Every stack decodes one token greedily after the same random prompt, at each of the
    profile's prompt lengths (16, 128 and 512 tokens on the cpu profile), on the same
    random-init Llama-style weights (the Hugging Face stacks on its export). Timed with
    pytest-benchmark, one warm-up round, then the profile's rounds; each round is one sample.
    """
    lengths = bench.s.prompt_lens
    if length_index >= len(lengths):
        pytest.skip(f"the {lab.profile.name} profile has only {len(lengths)} prompt lengths")
    st, n = bench.stack(stack), lengths[length_index]
    prompt = bench.prompt_of(n)
    benchmark.group = bench.ttft_group(n)
    calls = []
    benchmark.pedantic(lambda: calls.append(st.decode(prompt, 1)), rounds=bench.s.rounds, iterations=1, warmup_rounds=1)
    runs = _warm_rounds(calls, bench.s.rounds)
    for rnd, r in enumerate(runs):
        outcome.record("first_token_ms", 1e3 * r.first_token_s, seed=rnd, unit="ms")
    median = _benchmark_median(benchmark)
    if median is not None:
        outcome.record("benchmark_median_ms", 1e3 * median, unit="ms")
    benchmark.extra_info.update(stack=stack, prompt_tokens=n, first_token_ms=round(1e3 * runs[-1].first_token_s, 2))
    outcome.note(f"{st.description}; 'seed' indexes the benchmark round")
    outcome.cite_benchmark(benchmark.group)


@pytest.mark.parametrize("stack", STACK_NAMES)
def test_decode_benchmark(lab, bench, benchmark, outcome, stack):
    """How many tokens per second does each stack decode greedily?

    Every stack greedily decodes the profile's new tokens (128 on the cpu profile) after
    the shortest prompt, on the same weights. tokens/s counts the tokens after the first
    over their time (the prefill is excluded). The static caches hold the module's longest
    request. Timed with pytest-benchmark, one warm-up round, then the profile's rounds.
    """
    st, n = bench.stack(stack), bench.s.new_tokens
    benchmark.group = bench.decode_group()
    calls = []
    benchmark.pedantic(
        lambda: calls.append(st.decode(bench.short, n)), rounds=bench.s.rounds, iterations=1, warmup_rounds=1
    )
    runs = _warm_rounds(calls, bench.s.rounds)
    for rnd, r in enumerate(runs):
        outcome.record("tokens_per_s", r.tokens_per_s, seed=rnd, unit="tokens/s")
        outcome.record("first_token_ms", 1e3 * r.first_token_s, seed=rnd, unit="ms")
    median = _benchmark_median(benchmark)
    if median is not None:
        outcome.record("benchmark_median_s", median, unit="s")
        outcome.record("benchmark_tokens_per_s", n / median, unit="tokens/s")
    benchmark.extra_info.update(stack=stack, new_tokens=n, tokens_per_s=round(runs[-1].tokens_per_s, 1))
    outcome.note(f"{st.description}; 'seed' indexes the benchmark round")
    outcome.cite_benchmark(benchmark.group)


# ------------------------------------------------------------------ correctness


@check(
    "{stack} produces exactly the lab model's greedy tokens on the same trained weights (no prompt differs)",
    metric="mismatched_sequences",
    expect=at_most(0),
)
@pytest.mark.parametrize("stack", OTHERS)
def test_greedy_tokens_identical(lab, char_data, trained_stacks, outcome, stack):
    """Does every stack decode exactly the lab model's greedy tokens?

    Correctness before speed: for each seed's trained Llama-style char model
    (profile.inference), take the profile's validation prompts (prompt_len characters at
    fixed random offsets) and decode greedily to the end of the model's context with the
    lab's GPT.generate and with the stack. mismatched_sequences counts the (seed, prompt)
    pairs whose new tokens differ anywhere: one exact count (fixed weights and prompts),
    so one mismatch fails the check. A check, not a finding: the stacks compute the same
    function of the same weights. agreement (per seed) is the share of prompts that
    match; the first differing position is tabled. Float rounding differs between the
    stacks (fused kernels, another attention implementation), so a near tie may flip a
    token: the table tells such a flip from a bug.
    """
    s, inf = _scale(lab), lab.profile.inference
    val = char_data.val
    g = np.random.default_rng(1234)
    starts = g.integers(0, len(val) - inf.prompt_len, size=s.agreement_prompts)
    prompts = [torch.from_numpy(val[a : a + inf.prompt_len].astype(np.int64))[None] for a in starts]
    rows, mismatched = [], 0
    for seed in lab.seeds:
        stacks = trained_stacks(seed)
        if not stacks[stack].available:
            pytest.skip(f"{stack}: {stacks[stack].reason}")
        n_new = inf.llama.block_size - inf.prompt_len
        cmp = compare_greedy({"lab": stacks["lab"], stack: stacks[stack]}, prompts, n_new)[stack]
        outcome.record("agreement", cmp.agreement, seed=seed)
        mismatched += cmp.sequences - cmp.identical
        ref = cmp.reference_tokens
        outcome.record("distinct_new_tokens", float(np.mean([len(set(t)) for t in ref])), seed=seed)
        rows += [
            {
                "seed": seed,
                "prompt": i,
                "first mismatch": "none" if f is None else f,
                "lab text": char_data.tokenizer.decode(ref[i])[:40],
            }
            for i, f in enumerate(cmp.first_mismatch)
        ]
    outcome.record("mismatched_sequences", mismatched, deterministic=True)
    outcome.table("first_mismatch", rows, caption=f"{n_new} new tokens per prompt; first index where {stack} differs")


# ------------------------------------------------------------------ speed hypotheses


def _interleaved_tps(bench, names, rounds, outcome) -> dict[str, list[float]]:
    """Decode tokens/s of each stack, one sample per round, the stacks interleaved within a
    round (one untimed warm-up call each first). Validity: every timed call decoded the
    same greedy tokens (the stacks did the same work)."""
    stacks = {n: bench.stack(n) for n in names}
    for st in stacks.values():
        st.decode(bench.short, 2)
    out, tokens = {n: [] for n in names}, {n: set() for n in names}
    for _ in range(rounds):
        for n, st in stacks.items():
            run = st.decode(bench.short, bench.s.new_tokens)
            out[n].append(run.tokens_per_s)
            tokens[n].add(tuple(run.tokens))
    outcome.require(
        "the timed stacks decode the same tokens",
        len(set().union(*tokens.values())) == 1,
        f"{bench.s.new_tokens} greedy tokens per call, every round: "
        + ", ".join(f"{n}: {len(t)} distinct sequence(s)" for n, t in tokens.items())
        + ("" if len(set().union(*tokens.values())) == 1 else " (they differ across stacks or rounds)"),
    )
    return out


@prediction(
    "Without compile, Hugging Face's static cache decodes at least as fast as its dynamic cache",
    metric="static_over_dynamic",
    expect=at_least(1.0),
)
def test_static_vs_dynamic_cache(lab, bench, outcome):
    """Does Hugging Face's static cache decode as fast as its dynamic cache, both uncompiled?

    Greedily decode the profile's new tokens after the shortest prompt with transformers
    generate, eager attention, with the default dynamic cache (hf-eager) and with
    cache_implementation="static" sized for the module's longest request (hf-static),
    interleaved for the profile's rounds. The statistic is the static / dynamic tokens/s
    ratio per round. A static cache preallocates and writes in place but attends over all
    its slots (masked) every step; its designed payoff is a fixed shape for torch.compile.
    Valid only if both decode the same greedy tokens in every timed call.
    """
    tps = _interleaved_tps(bench, ("hf-eager", "hf-static"), bench.s.rounds, outcome)
    for rnd, (d, st) in enumerate(zip(tps["hf-eager"], tps["hf-static"])):
        outcome.record("static_over_dynamic", st / d, seed=rnd)
        outcome.record("dynamic_tokens_per_s", d, seed=rnd, unit="tokens/s")
        outcome.record("static_tokens_per_s", st, seed=rnd, unit="tokens/s")
    outcome.note(f"static cache of {_max_len(bench.s)} tokens; 'seed' indexes the timing round")
    outcome.cite_benchmark(bench.decode_group())


@prediction(
    "torch.compile of the static-cache decode step decodes >= 1.2x faster than the same stack uncompiled, after "
    "warm-up",
    metric="compiled_over_static",
    expect=at_least(1.2),
)
@prediction(
    "torch.compile (static cache) decodes >= 1.2x faster than eager Hugging Face generate with its dynamic cache",
    metric="compiled_over_eager",
    expect=at_least(1.2),
)
def test_compile_speedup(lab, bench, outcome):
    """How much faster does torch.compile make decoding, after its compile (warm-up excluded)?

    Greedily decode the profile's new tokens after the shortest prompt with hf-eager
    (dynamic cache), hf-static (static cache, uncompiled) and torch-compile (the same
    static cache, transformers compiling the per-token forward with torch.compile; the
    prefill stays eager), interleaved for the profile's rounds after one untimed call each
    (the compile itself happened when the stack was built). The statistics are
    tokens/s ratios per round. The cpu profile compiles with inductor; smoke with the
    "eager" backend, which only traces. Valid only if the three decode the same greedy
    tokens in every timed call.
    """
    tps = _interleaved_tps(bench, ("hf-eager", "hf-static", "torch-compile"), bench.s.rounds, outcome)
    for rnd in range(bench.s.rounds):
        c = tps["torch-compile"][rnd]
        outcome.record("compiled_over_static", c / tps["hf-static"][rnd], seed=rnd)
        outcome.record("compiled_over_eager", c / tps["hf-eager"][rnd], seed=rnd)
        outcome.record("compiled_tokens_per_s", c, seed=rnd, unit="tokens/s")
    outcome.note(f"torch.compile backend {bench.s.compile_backend!r}; 'seed' indexes the timing round")
    outcome.cite_benchmark(bench.decode_group())


@prediction(
    "First-token latency of {stack} grows with prompt length (longest prompt slower than shortest)",
    metric="ttft_growth",
    expect=greater_than(1.0),
)
@pytest.mark.parametrize("stack", STACK_NAMES)
def test_first_token_grows_with_prompt(lab, bench, outcome, stack):
    """Does the time to first token grow with the prompt length, on every stack?

    Decode one greedy token after prompts of each of the profile's lengths (16, 128 and 512
    tokens on the cpu profile), shortest to longest, once per round for the profile's
    rounds after one untimed call per length. ttft_growth is the longest prompt's
    first-token latency over the shortest's, per round: the prefill processes every prompt
    token (attention over all pairs), so it should cost more the longer the prompt.
    """
    st, lengths = bench.stack(stack), bench.s.prompt_lens
    for n in lengths:
        st.decode(bench.prompt_of(n), 1)
    ms = {n: [] for n in lengths}
    for rnd in range(bench.s.rounds):
        for n in lengths:
            ms[n].append(1e3 * st.decode(bench.prompt_of(n), 1).first_token_s)
        outcome.record("ttft_growth", ms[lengths[-1]][rnd] / ms[lengths[0]][rnd], seed=rnd)
    for n in lengths:
        for rnd, v in enumerate(ms[n]):
            outcome.record(f"first_token_ms_{n}", v, seed=rnd, unit="ms")
    outcome.plot_lines(
        "ttft_vs_prompt",
        {stack: (list(lengths), [float(np.median(ms[n])) for n in lengths])},
        xlabel="prompt tokens",
        ylabel="first-token latency (ms, median over rounds)",
        logx=True,
        logy=True,
        title=f"Time to first token, {stack}",
    )
    for n in lengths:
        outcome.cite_benchmark(bench.ttft_group(n))


# ------------------------------------------------------------------ throughput by batch size


def _batch_prompts(lab, vocab_size: int) -> torch.Tensor:
    """(largest batch, prompt_len) random token ids (seed 0) on the lab's device; a batch of
    n takes the first n rows."""
    b = lab.profile.batching
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (max(b.batch_sizes), b.prompt_len), generator=gen).to(lab.device)


@pytest.mark.parametrize("which", ["batch1", "largest"])
@pytest.mark.parametrize("stack", ["lab", "hf"])
def test_batch_decode_benchmark(lab, decode_model, hf_decode_model, benchmark, outcome, stack, which):
    """How long does a batched greedy decode take, one sequence against the largest batch?

    The throughput-by-batch-size comparison's decode (the random-init decode model, the
    profile's new tokens after a random prompt per row, no padding) at batch 1 or the
    profile's largest batch, through the lab model's KV cache or Hugging Face generate,
    timed with pytest-benchmark: one warm-up round, then the profile's rounds. Tokens/s
    of the whole batch are recorded per round.
    """
    b = lab.profile.batching
    size = b.batch_sizes[0] if which == "batch1" else b.batch_sizes[-1]
    h = lab.profile.inference.llama.n_head
    prompts = _batch_prompts(lab, decode_model(h).config.vocab_size)[:size]
    if stack == "lab":
        model = copy.deepcopy(decode_model(h)).to(lab.device).eval()
        run = lambda: lab_batch_greedy(model, prompts, b.new_tokens)  # noqa: E731
    else:
        hf = copy.deepcopy(hf_decode_model(h)).to(lab.device).eval()
        run = lambda: hf_batch_greedy(hf, prompts, b.new_tokens)  # noqa: E731
    benchmark.group = f"Batched greedy decode of {b.new_tokens} tokens per sequence"
    benchmark.extra_info.update(stack=stack, batch_size=size)
    calls = []
    benchmark.pedantic(lambda: calls.append(run()), rounds=b.rounds, iterations=1, warmup_rounds=1)
    for rnd, (tokens, seconds) in enumerate(_warm_rounds(calls, b.rounds)):
        outcome.record("tokens_per_s", tokens.numel() / seconds, seed=rnd, unit="tokens/s")
    outcome.note(f"batch of {size}; 'seed' indexes the benchmark round")
    outcome.cite_benchmark(benchmark.group)


def _batch_tokens_per_s(lab, model, hf, outcome) -> dict[str, dict[int, list[float]]]:
    """{stack: {batch size: [tokens/s of the whole batch, one per round]}} for the lab
    model's KV cache and Hugging Face generate (dynamic cache), every batch size and stack
    interleaved within a round, after one untimed call each. Validity: at every batch size
    the two decoded the same tokens in every timed call."""
    b = lab.profile.batching
    prompts = _batch_prompts(lab, model.config.vocab_size)
    run = {
        "lab": lambda p: lab_batch_greedy(model, p, b.new_tokens),
        "hf": lambda p: hf_batch_greedy(hf, p, b.new_tokens),
    }
    for f in run.values():
        for size in b.batch_sizes:
            f(prompts[:size])
    tps = {name: {size: [] for size in b.batch_sizes} for name in run}
    differ = set()
    for _ in range(b.rounds):
        for size in b.batch_sizes:
            decoded = {}
            for name, f in run.items():
                tokens, seconds = f(prompts[:size])
                tps[name][size].append(tokens.numel() / seconds)
                decoded[name] = tokens
            if not torch.equal(decoded["lab"], decoded["hf"]):
                differ.add(size)
    outcome.require(
        "lab and Hugging Face decode the same tokens",
        not differ,
        f"{b.new_tokens} greedy tokens per row at batch sizes {list(b.batch_sizes)}, every round"
        + (f"; they differ at batch size(s) {sorted(differ)}" if differ else ""),
    )
    return tps


@prediction(
    "Batched greedy decoding through the lab model's KV cache decodes at least {bound}x the tokens/s at the largest "
    "batch (32 sequences on the cpu profile) as one sequence at a time",
    metric="lab_batch_speedup",
    expect=at_least(4.0),
)
@prediction(
    "Hugging Face generate decodes at least {bound}x the tokens/s at the largest batch as one sequence at a time",
    metric="hf_batch_speedup",
    expect=at_least(4.0),
)
def test_throughput_grows_with_batch_size(lab, decode_model, hf_decode_model, outcome):
    """How does decode throughput grow with the batch size?

    Greedily decode the profile's new tokens after a random prompt for every row of a
    batch (rows of equal length, no padding), for every batch size of the profile (1 to 32
    on the cpu profile), with the lab model's KV cache and with Hugging Face generate
    (dynamic cache, the same exported weights): the inference hypotheses' random-init
    Llama-style decode model, whose speed does not depend on what it learned. Batch
    sizes and stacks are interleaved within each of the profile's rounds after one
    untimed call each. Throughput is all new tokens of the batch over the seconds the
    call took (prefill included). The statistic, per stack, is the largest batch's
    tokens/s over batch 1's, one sample per round: a small model decoding one token at a
    time is bound by per-step overhead, which a batch shares. Valid only if the two stacks
    decode the same tokens at every batch size.
    """
    h = lab.profile.inference.llama.n_head
    model = copy.deepcopy(decode_model(h)).to(lab.device).eval()
    hf = copy.deepcopy(hf_decode_model(h)).to(lab.device).eval()
    tps = _batch_tokens_per_s(lab, model, hf, outcome)
    sizes = lab.profile.batching.batch_sizes
    lines = {}
    for name, by_size in tps.items():
        for rnd, (one, most) in enumerate(zip(by_size[sizes[0]], by_size[sizes[-1]])):
            outcome.record(f"{name}_batch_speedup", most / one, seed=rnd)
        for size in sizes:
            for rnd, value in enumerate(by_size[size]):
                outcome.record(f"{name}_tokens_per_s_batch{size}", value, seed=rnd, unit="tokens/s")
        lines[name] = (list(sizes), [float(np.median(by_size[s])) for s in sizes])
    outcome.plot_lines(
        "throughput",
        lines,
        xlabel="batch size (sequences)",
        ylabel="tokens/s, whole batch (median over rounds)",
        title="Decode throughput by batch size",
        logx=True,
        logy=True,
    )
    outcome.note(f"on {lab.device}; 'seed' indexes the timing round")
    outcome.cite_benchmark(f"Batched greedy decode of {lab.profile.batching.new_tokens} tokens per sequence")
