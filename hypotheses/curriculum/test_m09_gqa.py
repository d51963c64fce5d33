import numpy as np
import pytest

from lab.decoding import (
    hf_cache_bytes,
    hf_context_decode,
    hf_decode_latencies,
    lab_context_decode,
    lab_decode_latencies,
    random_context,
)
from lab.models import mean_pool_kv_heads
from lab.report import at_least, between, check, greater_than, prediction
from lab.report.provenance import PeakMemory
from lab.train import evaluate

pytestmark = [pytest.mark.curriculum, pytest.mark.m09_gqa]


def _kv_name(n_kv: int, n_head: int) -> str:
    return "MHA" if n_kv == n_head else ("MQA" if n_kv == 1 else f"GQA-{n_kv}")


@check(
    "The KV-cache bytes ratio MHA / GQA (or MQA) equals n_head / n_kv_head exactly",
    metric="ratio_over_expected",
    expect=between(1.0, 1.0),
)
@pytest.mark.parametrize("kv_index", [1, 2], ids=["gqa", "mqa"])
def test_cache_bytes_ratio(lab, decode_model, outcome, kv_index):
    """Does the KV cache shrink by exactly the number of query heads per KV head?

    Build the KV cache for the same context length on the Llama-style decode model
    with n_head KV heads (MHA) and with the profile's GQA / MQA KV-head counts, and
    compare their allocated bytes. Exact, so one measurement decides; a check rather
    than a finding, since the cache holds n_kv_head heads by construction.
    """
    inf = lab.profile.inference
    h, kv = inf.llama.n_head, inf.kv_heads[kv_index]
    mha = decode_model(h).new_cache(batch_size=1).nbytes
    other = decode_model(kv).new_cache(batch_size=1).nbytes
    outcome.record("mha_cache_bytes", mha, unit="bytes", deterministic=True)
    outcome.record("cache_bytes", other, unit="bytes", deterministic=True)
    outcome.record("ratio_over_expected", (mha / other) / (h / kv), deterministic=True)


@prediction("GQA decodes at least as fast as MHA at long context", metric="gqa_speedup", expect=at_least(1.0))
@prediction("MQA decodes at least as fast as MHA at long context", metric="mqa_speedup", expect=at_least(1.0))
def test_gqa_decode_speed(lab, decode_model, decode_prompt, outcome):
    """Do GQA and MQA decode faster than MHA at long context?

    Greedily decode the profile's longest decode length with the KV cache on the three
    Llama-style decode models (same width and heads, fewer KV heads), interleaved for
    the profile's timing rounds. The statistic is tokens/s relative to MHA, per round.
    """
    inf = lab.profile.inference
    n = max(inf.decode_lengths)
    h, g, m = inf.kv_heads
    for rnd in range(inf.timing_rounds):
        tps = {
            kv: n / sum(lab_decode_latencies(decode_model(kv), decode_prompt, n, use_cache=True)) for kv in (h, g, m)
        }
        outcome.record("gqa_speedup", tps[g] / tps[h], seed=rnd)
        outcome.record("mqa_speedup", tps[m] / tps[h], seed=rnd)
        outcome.record("mha_tokens_per_s", tps[h], seed=rnd, unit="tokens/s")
    outcome.cite_benchmark(f"GQA: cached decode of {n} tokens")


@prediction(
    "At equal training budget GQA's val loss is within 0.02 nats of MHA's (seed noise)",
    metric="gqa_minus_mha",
    expect=between(-0.02, 0.02),
)
@prediction(
    "At equal training budget MQA is measurably worse than MHA",
    metric="mqa_minus_mha",
    expect=greater_than(0.0),
)
def test_gqa_quality(lab, llama_runs, outcome, require_trained):
    """What does sharing K/V heads (GQA, MQA) cost in quality at equal training budget?

    Train the Llama-style char model on tiny Shakespeare with n_head KV heads (MHA), the
    profile's GQA count and one KV head (MQA), same steps, schedule and seeds. The
    statistic is the paired per-seed difference of final validation loss to MHA.
    """
    inf = lab.profile.inference
    h, g, m = inf.kv_heads
    curves, trained = {}, {}
    for seed in lab.seeds:
        runs = {kv: llama_runs(kv, seed) for kv in (h, g, m)}
        trained.update({f"{_kv_name(kv, h)}, seed {seed}": run for kv, run in runs.items()})
        for kv, run in runs.items():
            outcome.record(f"val_loss_{_kv_name(kv, h)}", run.final_val_loss, seed=seed, unit="nats/char")
        outcome.record("gqa_minus_mha", runs[g].final_val_loss - runs[h].final_val_loss, seed=seed, unit="nats/char")
        outcome.record("mqa_minus_mha", runs[m].final_val_loss - runs[h].final_val_loss, seed=seed, unit="nats/char")
        if seed == lab.seeds[0]:
            for kv, run in runs.items():
                curves[f"{_kv_name(kv, h)} ({kv} KV heads)"] = (
                    [e["step"] for e in run.evals],
                    [e["val_loss"] for e in run.evals],
                )
    require_trained(trained, "every model")
    outcome.plot_lines(
        "val_curves",
        curves,
        xlabel="step",
        ylabel="val loss (nats/char)",
        title="MHA vs GQA vs MQA, equal budget (first seed)",
    )


@prediction(
    "Mean-pooling a trained MHA model's K/V heads into GQA and briefly uptraining recovers most (>= 50%) of the "
    "loss gap",
    metric="gap_closed",
    expect=at_least(0.5),
)
def test_mha_to_gqa_uptraining(lab, char_data, llama_runs, outcome, require_trained):
    """Does converting a trained MHA model to GQA and briefly uptraining recover most of its quality?

    The GQA paper's recipe: take each seed's trained MHA model, mean-pool the K and V projection heads of each
    group into the profile's GQA KV-head count (Ainslie et al. 2023), and measure val
    loss right after conversion and after uptraining for the profile's uptraining
    steps (about 10% of the original budget, same schedule shape). gap_closed =
    (loss after conversion - loss after uptraining) / (loss after conversion - MHA loss):
    1 means uptraining fully recovers the MHA quality. Valid only if the MHA models
    trained and the conversion cost something to recover (loss after conversion above
    the MHA loss in every seed).
    """
    inf, p = lab.profile.inference, lab.profile.pretraining
    h, g, _ = inf.kv_heads
    rows, gaps = [], {}
    for seed in lab.seeds:
        mha = llama_runs(h, seed)
        converted = mean_pool_kv_heads(mha.model, g)
        kw = dict(block_size=converted.config.block_size, batch_size=p.batch_size, n_batches=p.eval_batches)
        pooled = evaluate(converted, char_data.val, **kw)
        up = lab.pretrain(char_data, converted.config, seed=seed, init_from=converted, max_steps=inf.uptrain_steps)
        scratch = llama_runs(g, seed).final_val_loss
        gaps[seed] = pooled - mha.final_val_loss
        outcome.record("gap_closed", (pooled - up.final_val_loss) / gaps[seed], seed=seed)
        outcome.record("val_loss_converted", pooled, seed=seed, unit="nats/char")
        outcome.record("val_loss_uptrained", up.final_val_loss, seed=seed, unit="nats/char")
        rows.append(
            {
                "seed": seed,
                "MHA": mha.final_val_loss,
                "converted, no uptraining": pooled,
                "uptrained": up.final_val_loss,
                "GQA from scratch": scratch,
            }
        )
    outcome.table("losses", rows, caption="Validation loss (nats/char) at each stage")
    require_trained({s: llama_runs(h, s) for s in lab.seeds}, "each seed's MHA model")
    outcome.require(
        "the conversion left a gap to close",
        all(g > 0 for g in gaps.values()),
        "loss after conversion minus MHA loss, per seed: " + ", ".join(f"{g:.4f}" for g in gaps.values()),
    )


@pytest.mark.parametrize("length_index", [0, 1, 2, 3], ids=lambda i: f"length{i}")
@pytest.mark.parametrize("impl", ["lab", "hf"])
@pytest.mark.parametrize("kv_index", [0, 1, 2], ids=["mha", "gqa", "mqa"])
def test_gqa_decode_benchmark(
    lab, decode_model, hf_decode_model, decode_prompt, decode_length, benchmark, outcome, kv_index, impl, length_index
):
    """How do KV-cache memory and cached decode speed grow with context for MHA, GQA and MQA?

    Greedy decode of each of the profile's decode lengths with a KV cache, on the lab
    model and on its LlamaForCausalLM export (dynamic cache). Records the KV-cache bytes
    at full length (the lab's allocated buffers; for HF, the tensors its dynamic cache
    holds after a forward pass over the full length) and the process's peak resident
    memory during the decode. One untimed warm-up, then the profile's timing rounds;
    tokens/s is recorded per round.
    """
    inf = lab.profile.inference
    n, kv = decode_length(length_index), inf.kv_heads[kv_index]
    model = decode_model(kv)
    benchmark.group = f"GQA: cached decode of {n} tokens"
    total = decode_prompt.shape[1] + n
    if impl == "lab":

        def fn():
            return lab_decode_latencies(model, decode_prompt, n, use_cache=True)

        cache_bytes = model.new_cache(batch_size=1, max_len=total).nbytes
    else:
        hf = hf_decode_model(kv)

        def fn():
            return hf_decode_latencies(hf, decode_prompt, n)

        cache_bytes = hf_cache_bytes(hf, total)
    mem, calls = PeakMemory().start(), []
    benchmark.pedantic(lambda: calls.append(fn()), rounds=inf.timing_rounds, iterations=1, warmup_rounds=1)
    peak = mem.stop()
    runs = calls[-inf.timing_rounds :]
    benchmark.extra_info.update(
        implementation=f"{impl} {_kv_name(kv, inf.llama.n_head)}",
        new_tokens=n,
        kv_heads=kv,
        cache_bytes=cache_bytes,
        tokens_per_s=round(n / sum(runs[-1]), 1),
        peak_rss_mib=round(peak / 2**20, 1),
    )
    for rnd, latencies in enumerate(runs):
        outcome.record("tokens_per_s", n / sum(latencies), seed=rnd, unit="tokens/s")
    outcome.record("cache_bytes", cache_bytes, unit="bytes", deterministic=True)
    outcome.note("'seed' indexes the benchmark round")
    outcome.cite_benchmark(benchmark.group)


# ---------------------------------------------------------------- where decode is memory-bound


def _memory_bound_kv(inf) -> tuple[int, int, int]:
    """MHA, GQA and MQA KV-head counts of the memory-bound model (its n_head, the profile's GQA count, 1)."""
    return inf.memory_bound.n_head, inf.kv_heads[1], 1


def _crossover(contexts, ratios, level: float) -> float:
    """Context length at which the speedup first reaches `level`, interpolated linearly in
    log(context) between the two measured contexts around it; the shortest context if it
    is already there, twice the longest if it never gets there."""
    if ratios[0] >= level:
        return float(contexts[0])
    for (c0, r0), (c1, r1) in zip(zip(contexts, ratios), zip(contexts[1:], ratios[1:])):
        if r1 >= level:
            f = (level - r0) / (r1 - r0)
            return float(np.exp(np.log(c0) + f * (np.log(c1) - np.log(c0))))
    return 2.0 * contexts[-1]


CROSSOVER_SPEEDUP = 1.3  # the GQA-over-MHA speedup whose context the crossover prediction is about


@prediction(
    "Where decode is memory-bound (the wide model after the longest context, 16,384 tokens on the cpu profile), "
    "GQA decodes >= 1.3x faster than MHA on the lab model",
    metric="lab_gqa_speedup_longest",
    expect=at_least(1.3),
)
@prediction(
    "There MQA decodes at least as fast as GQA on the lab model",
    metric="lab_mqa_over_gqa_longest",
    expect=at_least(1.0),
)
@prediction(
    "The lab's GQA-over-MHA decode speedup grows with context length (longest context minus shortest > 0)",
    metric="lab_gqa_speedup_growth",
    expect=greater_than(0.0),
)
@prediction(
    "The lab's GQA-over-MHA decode speedup first reaches 1.3x between 1,024 and 8,192 tokens of context",
    metric="lab_crossover_context",
    expect=between(1024, 8192),
)
@prediction(
    "Through Hugging Face generate (dynamic cache) GQA decodes >= 1.2x faster than MHA after the longest context",
    metric="hf_gqa_speedup_longest",
    expect=at_least(1.2),
)
def test_gqa_memory_bound(lab, memory_bound_model, hf_memory_bound_model, outcome):
    """Where does the size of the KV cache start to decide decode speed, and what does GQA buy there?

    The small decode model is bound by per-operator overhead, so fewer KV heads barely
    change its speed. Here a wider random-init Llama-style model (profile.inference.
    memory_bound: 2 layers, width 512, 8 heads of 64 on the cpu profile) decodes
    greedily after a context of each of the profile's context lengths (256 to 16,384
    tokens on the cpu profile), whose keys and values are random draws loaded straight
    into the cache (decode speed does not depend on them; the context is never run),
    with n_head KV heads (MHA), the profile's GQA count and one (MQA), on the lab model
    and through Hugging Face generate with the same keys and values in its dynamic cache.
    Each decode times the profile's context_new_tokens tokens; per round every (context,
    KV heads, stack) is decoded once, interleaved. MHA reads 4x the cache bytes of GQA
    (2 KV heads) per token, so once the cache outweighs the weights and the per-token
    overhead, speed should follow the cache size. Statistics per round: tokens/s ratios,
    and the context where the lab's GQA/MHA ratio first reaches 1.3 (interpolated in
    log context). Valid only if the lab and Hugging Face decode the same tokens.
    """
    inf = lab.profile.inference
    contexts, n_new = list(inf.context_lengths), inf.context_new_tokens
    kvs = _memory_bound_kv(inf)
    h, g, m = kvs
    stacks = {"lab": lab_context_decode, "hf": hf_context_decode}
    models = {("lab", kv): memory_bound_model(kv) for kv in kvs} | {("hf", kv): hf_memory_bound_model(kv) for kv in kvs}
    for (stack, kv), model in models.items():  # warm up each stack once
        stacks[stack](model, random_context(memory_bound_model(kv), contexts[0], seed=1), 2)
    tps = {}  # (round, stack, kv, context) -> tokens/s
    mismatched = []
    for rnd in range(inf.timing_rounds):
        for ctx in contexts:
            for kv in kvs:
                context = random_context(memory_bound_model(kv), ctx, seed=rnd)
                decoded = {}
                for stack in ("lab", "hf") if rnd % 2 == 0 else ("hf", "lab"):
                    tokens, latencies = stacks[stack](models[(stack, kv)], context, n_new)
                    decoded[stack] = tokens
                    tps[(rnd, stack, kv, ctx)] = n_new / sum(latencies)
                if decoded["lab"] != decoded["hf"]:
                    mismatched.append(f"round {rnd}, context {ctx}, {kv} KV heads")
                del context
    outcome.require(
        "the lab and Hugging Face decode the same tokens after the same context",
        not mismatched,
        f"{n_new} greedy tokens per decode" + (f"; differ at {', '.join(mismatched[:5])}" if mismatched else ""),
    )
    longest, shortest = contexts[-1], contexts[0]
    for rnd in range(inf.timing_rounds):

        def speedup(stack, kv, ctx, rnd=rnd):
            return tps[(rnd, stack, kv, ctx)] / tps[(rnd, stack, h, ctx)]

        outcome.record("lab_gqa_speedup_longest", speedup("lab", g, longest), seed=rnd)
        outcome.record(
            "lab_mqa_over_gqa_longest", tps[(rnd, "lab", m, longest)] / tps[(rnd, "lab", g, longest)], seed=rnd
        )
        outcome.record("lab_gqa_speedup_growth", speedup("lab", g, longest) - speedup("lab", g, shortest), seed=rnd)
        ratios = [speedup("lab", g, c) for c in contexts]
        outcome.record(
            "lab_crossover_context", _crossover(contexts, ratios, CROSSOVER_SPEEDUP), seed=rnd, unit="tokens"
        )
        outcome.record("hf_gqa_speedup_longest", speedup("hf", g, longest), seed=rnd)
        outcome.record("hf_mqa_speedup_longest", speedup("hf", m, longest), seed=rnd)
        outcome.record("lab_mqa_speedup_longest", speedup("lab", m, longest), seed=rnd)
    median = {
        key: float(np.median([tps[(r, *key)] for r in range(inf.timing_rounds)]))
        for key in {(s, kv, c) for (_, s, kv, c) in tps}
    }
    lines = {
        f"{stack} {_kv_name(kv, h)}": (contexts, [median[(stack, kv, c)] for c in contexts])
        for stack in ("lab", "hf")
        for kv in kvs
    }
    outcome.plot_lines(
        "tokens_per_s_vs_context",
        lines,
        xlabel="context length (tokens in the KV cache)",
        ylabel="decode tokens/s (median over rounds)",
        logx=True,
        logy=True,
        title="Decode speed against context: MHA / GQA / MQA, lab and Hugging Face",
    )
    speedups = {
        f"{stack} {_kv_name(kv, h)} / MHA": (
            contexts,
            [
                float(np.median([tps[(r, stack, kv, c)] / tps[(r, stack, h, c)] for r in range(inf.timing_rounds)]))
                for c in contexts
            ],
        )
        for stack in ("lab", "hf")
        for kv in (g, m)
    }
    outcome.plot_lines(
        "speedup_vs_context",
        speedups,
        xlabel="context length (tokens in the KV cache)",
        ylabel="tokens/s over MHA's (median over rounds)",
        logx=True,
        hlines={f"{CROSSOVER_SPEEDUP}x": CROSSOVER_SPEEDUP, "1x": 1.0},
        title="What fewer KV heads buy, by context length",
    )
    mb = inf.memory_bound
    rows = []
    for c in contexts:
        row = {"context": c}
        for kv in kvs:
            cache_mib = 2 * mb.n_layer * kv * c * (mb.n_embd // mb.n_head) * 4 / 2**20
            row[f"{_kv_name(kv, h)} cache (MiB)"] = round(cache_mib, 1)
            for stack in ("lab", "hf"):
                row[f"{stack} {_kv_name(kv, h)} tok/s"] = round(median[(stack, kv, c)], 1)
        rows.append(row)
    outcome.table(
        "by_context", rows, caption="Median tokens/s over rounds; cache = keys + values at that context (float32)"
    )
    weights_mib = sum(p.numel() for p in memory_bound_model(h).parameters()) * 4 / 2**20
    outcome.note(
        f"{mb.n_layer} layers, width {mb.n_embd}, {mb.n_head} heads; {weights_mib:.0f} MiB of weights (float32) read "
        f"every token; {n_new} tokens timed per decode; 'seed' indexes the timing round"
    )
    outcome.cite_benchmark(f"GQA memory-bound: decode after a {longest}-token context")


@pytest.mark.parametrize("impl", ["lab", "hf"])
@pytest.mark.parametrize("kv_index", [0, 1, 2], ids=["mha", "gqa", "mqa"])
def test_gqa_memory_bound_benchmark(lab, memory_bound_model, hf_memory_bound_model, benchmark, outcome, kv_index, impl):
    """How fast do MHA, GQA and MQA decode after the longest context of the memory-bound setting?

    The wide random-init model of test_gqa_memory_bound decodes the profile's
    context_new_tokens greedily after a random context of the profile's longest context
    length (16,384 tokens on the cpu profile), on the lab model or through Hugging Face
    generate (dynamic cache) holding the same keys and values. One untimed warm-up, then
    the profile's timing rounds; tokens/s per round.
    """
    inf = lab.profile.inference
    kv, ctx, n_new = _memory_bound_kv(inf)[kv_index], max(inf.context_lengths), inf.context_new_tokens
    model = memory_bound_model(kv)
    context = random_context(model, ctx, seed=0)
    run = (
        (lambda: lab_context_decode(model, context, n_new))
        if impl == "lab"
        else (lambda: hf_context_decode(hf_memory_bound_model(kv), context, n_new))
    )
    benchmark.group = f"GQA memory-bound: decode after a {ctx}-token context"
    calls = []
    benchmark.pedantic(lambda: calls.append(run()[1]), rounds=inf.timing_rounds, iterations=1, warmup_rounds=1)
    runs = calls[-inf.timing_rounds :]
    mb = inf.memory_bound
    cache_bytes = 2 * mb.n_layer * kv * ctx * (mb.n_embd // mb.n_head) * context[0].element_size()
    benchmark.extra_info.update(
        implementation=f"{impl} {_kv_name(kv, mb.n_head)}",
        context=ctx,
        new_tokens=n_new,
        kv_heads=kv,
        cache_bytes=cache_bytes,
        tokens_per_s=round(n_new / sum(runs[-1]), 1),
    )
    for rnd, latencies in enumerate(runs):
        outcome.record("tokens_per_s", n_new / sum(latencies), seed=rnd, unit="tokens/s")
    outcome.record("cache_bytes", cache_bytes, unit="bytes", deterministic=True)
    outcome.note("'seed' indexes the benchmark round")
    outcome.cite_benchmark(benchmark.group)
