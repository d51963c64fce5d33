"""The compiled single-token decode step (lab.models.compiled.CompiledDecoder): greedy tokens
identical to the eager cached step for every position encoding, GQA/MQA and sliding windows,
one compile for every position, and a clean fallback when torch.compile is unavailable or
fails. The "eager" backend traces and runs the same captured graph without code generation
(inductor would take tens of seconds per model on a small CPU); one test compiles with
inductor."""

import warnings

import pytest
import torch

from lab.decoding import lab_greedy
from lab.models import GPT, GPTConfig
from lab.models.compiled import CompiledDecoder

BASE = dict(vocab_size=29, block_size=48, n_layer=2, n_head=4, n_embd=32, init_std=0.3)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
CONFIGS = {
    "gpt2": {},
    "llama-gqa": {**LLAMA, "n_kv_head": 2},
    "llama-mqa": {**LLAMA, "n_kv_head": 1},
    "alibi": {"pos": "alibi"},
    "sinusoidal-post-norm": {"pos": "sinusoidal", "norm_position": "post"},
    "none-no-residual": {"pos": "none", "residual": False},
    "rope-window-ring": {**LLAMA, "sliding_window": 6, "n_kv_head": 2},
    "alibi-window-ring": {"pos": "alibi", "sliding_window": 5},
    "alibi-gqa": {"pos": "alibi", "n_kv_head": 2, "mlp": "swiglu"},
}


def make(name, **extra):
    torch.manual_seed(0)
    return GPT(GPTConfig(**BASE, **CONFIGS[name], **extra)).eval()


def prompt(T=5, seed=1):
    return torch.randint(0, BASE["vocab_size"], (1, T), generator=torch.Generator().manual_seed(seed))


STATIC = ("llama-gqa", "alibi", "rope-window-ring", "alibi-window-ring")  # masks: position, distance, ring


@pytest.mark.parametrize(
    "name, static", [(n, False) for n in CONFIGS] + [(n, True) for n in STATIC], ids=lambda v: str(v)
)
def test_compiled_decode_is_token_identical_to_the_eager_cache(name, static):
    model = make(name)
    window = model.config.sliding_window
    n = 60 if window else 40  # a ring wraps several times; past block_size as well
    decoder = CompiledDecoder(model, max_len=None if window else 45, backend="eager", static=static).warm_up()
    want = model.generate(prompt(), n, temperature=0.0, use_cache=True)
    got = decoder.generate(prompt(), n, temperature=0.0)
    assert decoder.compiled and decoder.fallback_reason is None
    assert torch.equal(got, want)
    assert len(set(got[0, 5:].tolist())) > 1  # a varied sequence, not one token repeated


def test_compiled_logits_match_the_eager_step_and_sampling_is_reproducible():
    model = make("llama-gqa")
    decoder = CompiledDecoder(model, max_len=30, backend="eager")
    cache = model.new_cache(1, max_len=30)
    a, b = model.prefill(prompt(), cache), decoder.prefill(prompt())
    for t in range(10):
        token = a.argmax(-1)
        a, b = model.decode_one(token, cache), decoder.step(token)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), t
    assert decoder.length == cache.length == 15
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = model.generate(prompt(), 12, temperature=0.8, top_k=10, generator=g1)
    assert torch.equal(decoder.generate(prompt(), 12, temperature=0.8, top_k=10, generator=g2), want)


def test_one_compile_serves_every_position():
    torch._dynamo.reset()
    model = make("llama-gqa")
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    decoder = CompiledDecoder(model, max_len=40, backend=counting_backend).warm_up()
    decoder.generate(prompt(), 30, temperature=0.0)
    decoder.generate(prompt(T=9, seed=2), 20, temperature=0.0)
    assert decoder.compiled and len(calls) == 1


def test_inductor_compile_is_token_identical():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "n_layer": 1}, **CONFIGS["llama-gqa"])).eval()
    decoder = CompiledDecoder(model, max_len=30, backend="inductor")
    want = model.generate(prompt(), 20, temperature=0.0, use_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        got = decoder.generate(prompt(), 20, temperature=0.0)
    assert decoder.compiled
    assert torch.equal(got, want)


def test_falls_back_to_the_eager_step_when_torch_compile_is_unavailable(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("torch.compile is not available on this platform")

    monkeypatch.setattr(torch, "compile", broken)
    model = make("llama-gqa")
    with pytest.warns(RuntimeWarning, match="not available on this platform"):
        decoder = CompiledDecoder(model, max_len=30)
    assert not decoder.compiled and "not available" in decoder.fallback_reason
    want = model.generate(prompt(), 20, temperature=0.0, use_cache=True)
    assert torch.equal(decoder.generate(prompt(), 20, temperature=0.0), want)


def test_falls_back_when_the_compiler_fails():
    model = make("llama-gqa")
    with pytest.warns(RuntimeWarning, match="no_such_backend"):  # refused when the decoder is built
        assert not CompiledDecoder(model, max_len=30, backend="no_such_backend").compiled

    def crashing_backend(gm, example_inputs):
        raise RuntimeError("the code generator crashed")

    decoder = CompiledDecoder(model, max_len=30, backend=crashing_backend)
    with pytest.warns(RuntimeWarning, match="code generator crashed"):  # on the first step, which compiles
        got = decoder.generate(prompt(), 20, temperature=0.0)
    assert not decoder.compiled and "crashed" in decoder.fallback_reason
    assert torch.equal(got, model.generate(prompt(), 20, temperature=0.0, use_cache=True))


def test_a_mixture_of_experts_falls_back_cleanly():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**BASE, n_expert=4)).eval()  # data-dependent routing: not one graph
    decoder = CompiledDecoder(model, max_len=30, backend="eager")
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = decoder.generate(prompt(), 15, temperature=0.0)
    assert not decoder.compiled
    assert torch.equal(got, model.generate(prompt(), 15, temperature=0.0, use_cache=True))


def test_training_mode_and_compile_false_decode_eagerly():
    model = make("gpt2")
    assert CompiledDecoder(model, max_len=20, compile=False).fallback_reason == "compile=False"
    model.train()
    decoder = CompiledDecoder(model, max_len=20)
    assert not decoder.compiled and "training mode" in decoder.fallback_reason
    model.eval()


def test_bad_input_is_refused_with_a_clear_message():
    model = make("llama-gqa")
    decoder = CompiledDecoder(model, max_len=12, backend="eager")
    with pytest.raises(ValueError, match="max_len"):
        CompiledDecoder(model, max_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        CompiledDecoder(model, batch_size=0)
    with pytest.raises(ValueError, match="prompt \\+ max_new_tokens"):
        decoder.generate(prompt(), 10, temperature=0.0)
    with pytest.raises(ValueError, match="batch_size=1"):
        decoder.generate(torch.zeros(2, 3, dtype=torch.long), 2)
    decoder.prefill(prompt())
    with pytest.raises(ValueError, match="one token per row"):
        decoder.step(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids outside"):
        decoder.step(torch.tensor([99]))
    for _ in range(7):
        decoder.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="max_len=12 exceeded"):
        decoder.step(torch.tensor([1]))


def test_timed_greedy_decode_through_the_decoder():
    model = make("llama-gqa")
    decoder = CompiledDecoder(model, max_len=30, backend="eager").warm_up()
    tokens, latencies = lab_greedy(model, prompt(), 20, use_cache=True, decoder=decoder)
    assert len(tokens) == len(latencies) == 20 and all(t > 0 for t in latencies)
    assert tokens == lab_greedy(model, prompt(), 20, use_cache=True)[0]
    assert tokens == lab_greedy(model, prompt(), 20, use_cache=False)[0]
    with pytest.raises(ValueError, match="decoder needs use_cache=True"):
        lab_greedy(model, prompt(), 5, use_cache=False, decoder=decoder)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa", "alibi-gqa", "rope-window-ring"])
def test_grouped_query_decode_matches_the_full_forward(name):
    # a cached GQA/MQA step attends with each KV head's query heads grouped as its queries
    # (each cached key read once): the logits are those of the full forward at that position
    model = make(name)
    seq = prompt(T=20)
    cache = model.new_cache(1, max_len=None if model.config.sliding_window else 20)
    logits = model.prefill(seq[:, :5], cache)
    for t in range(5, 20):
        full = model(seq[:, max(0, t - model.config.block_size) : t])[0][:, -1]
        assert torch.allclose(logits, full, atol=1e-5, rtol=1e-4), t
        logits = model.decode_one(seq[:, t], cache)
