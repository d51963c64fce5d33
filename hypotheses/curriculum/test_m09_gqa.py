import pytest

from lab.decoding import hf_cache_bytes, hf_decode_latencies, lab_decode_latencies
from lab.models import mean_pool_kv_heads
from lab.report import at_least, between, greater_than, prediction
from lab.report.provenance import PeakMemory
from lab.train import evaluate

pytestmark = [pytest.mark.curriculum, pytest.mark.m09_gqa]


def _kv_name(n_kv: int, n_head: int) -> str:
    return "MHA" if n_kv == n_head else ("MQA" if n_kv == 1 else f"GQA-{n_kv}")


@prediction(
    "The KV-cache bytes ratio MHA / GQA (or MQA) equals n_head / n_kv_head exactly",
    metric="ratio_over_expected",
    expect=between(1.0, 1.0),
)
@pytest.mark.parametrize("kv_index", [1, 2], ids=["gqa", "mqa"])
def test_cache_bytes_ratio(lab, decode_model, outcome, kv_index):
    """KV-cache memory shrinks by the number of query heads per KV head.

    Build the KV cache for the same context length on the Llama-style decode model
    with n_head KV heads (MHA) and with the profile's GQA / MQA KV-head counts, and
    compare their allocated bytes. Exact, so one measurement decides.
    """
    inf = lab.profile.inference
    h, kv = inf.llama.n_head, inf.kv_heads[kv_index]
    mha = decode_model(h).new_cache(batch_size=1).nbytes
    other = decode_model(kv).new_cache(batch_size=1).nbytes
    outcome.record("mha_cache_bytes", mha, unit="bytes")
    outcome.record("cache_bytes", other, unit="bytes")
    outcome.record("ratio_over_expected", (mha / other) / (h / kv))


@prediction("GQA decodes at least as fast as MHA at long context", metric="gqa_speedup", expect=at_least(1.0))
@prediction("MQA decodes at least as fast as MHA at long context", metric="mqa_speedup", expect=at_least(1.0))
def test_gqa_decode_speed(lab, decode_model, decode_prompt, outcome):
    """Decode tokens/s at long context: MHA vs GQA vs MQA.

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
def test_gqa_quality(lab, llama_runs, outcome):
    """Quality cost of sharing K/V heads, at equal training budget.

    Train the Llama-style char model on tiny Shakespeare with n_head KV heads (MHA), the
    profile's GQA count and one KV head (MQA), same steps, schedule and seeds. The
    statistic is the paired per-seed difference of final validation loss to MHA.
    """
    inf = lab.profile.inference
    h, g, m = inf.kv_heads
    curves = {}
    for seed in lab.seeds:
        runs = {kv: llama_runs(kv, seed) for kv in (h, g, m)}
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
    outcome.plot_lines(
        "val_curves",
        curves,
        xlabel="step",
        ylabel="val loss (nats/char)",
        title="MHA vs GQA vs MQA, equal budget (first seed)",
    )


@prediction(
    "Mean-pooling a trained MHA model's K/V heads into GQA and briefly uptraining recovers most (>= 50%) of the loss gap",
    metric="gap_closed",
    expect=at_least(0.5),
)
def test_mha_to_gqa_uptraining(lab, char_data, llama_runs, outcome):
    """The GQA paper's recipe: convert a trained MHA checkpoint, then uptrain.

    Take each seed's trained MHA model, mean-pool the K and V projection heads of each
    group into the profile's GQA KV-head count (Ainslie et al. 2023), and measure val
    loss right after conversion and after uptraining for the profile's uptraining
    steps (about 10% of the original budget, same schedule shape). gap_closed =
    (loss after conversion - loss after uptraining) / (loss after conversion - MHA loss):
    1 means uptraining fully recovers the MHA quality.
    """
    inf, p = lab.profile.inference, lab.profile.pretraining
    h, g, _ = inf.kv_heads
    rows = []
    for seed in lab.seeds:
        mha = llama_runs(h, seed)
        converted = mean_pool_kv_heads(mha.model, g)
        kw = dict(block_size=converted.config.block_size, batch_size=p.batch_size, n_batches=p.eval_batches)
        pooled = evaluate(converted, char_data.val, **kw)
        up = lab.pretrain(char_data, converted.config, seed=seed, init_from=converted, max_steps=inf.uptrain_steps)
        scratch = llama_runs(g, seed).final_val_loss
        outcome.record("gap_closed", (pooled - up.final_val_loss) / (pooled - mha.final_val_loss), seed=seed)
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


@pytest.mark.parametrize("length_index", [0, 1, 2, 3], ids=lambda i: f"length{i}")
@pytest.mark.parametrize("impl", ["lab", "hf"])
@pytest.mark.parametrize("kv_index", [0, 1, 2], ids=["mha", "gqa", "mqa"])
def test_gqa_decode_benchmark(
    lab, decode_model, hf_decode_model, decode_prompt, decode_length, benchmark, outcome, kv_index, impl, length_index
):
    """Cache memory and cached decode speed vs context length for MHA / GQA / MQA,
    on the lab model and on its Hugging Face export.

    Greedy decode of each of the profile's decode lengths with a KV cache, on the lab
    model and on its LlamaForCausalLM export (dynamic cache). Records the KV-cache bytes
    at full length (the lab's allocated buffers; for HF, the tensors its dynamic cache
    holds after a forward pass over the full length) and the process's peak resident
    memory during the decode.
    """
    inf = lab.profile.inference
    n, kv = decode_length(length_index), inf.kv_heads[kv_index]
    model = decode_model(kv)
    benchmark.group = f"GQA: cached decode of {n} tokens"
    total = decode_prompt.shape[1] + n
    if impl == "lab":
        fn = lambda: lab_decode_latencies(model, decode_prompt, n, use_cache=True)
        cache_bytes = model.new_cache(batch_size=1, max_len=total).nbytes
    else:
        hf = hf_decode_model(kv)
        fn = lambda: hf_decode_latencies(hf, decode_prompt, n)
        cache_bytes = hf_cache_bytes(hf, total)
    mem = PeakMemory().start()
    latencies = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=1)
    peak = mem.stop()
    benchmark.extra_info.update(
        implementation=f"{impl} {_kv_name(kv, inf.llama.n_head)}",
        new_tokens=n,
        kv_heads=kv,
        cache_bytes=cache_bytes,
        tokens_per_s=round(n / sum(latencies), 1),
        peak_rss_mib=round(peak / 2**20, 1),
    )
    outcome.record("tokens_per_s", n / sum(latencies), unit="tokens/s")
    outcome.record("cache_bytes", cache_bytes, unit="bytes")
    outcome.cite_benchmark(benchmark.group)
