"""Tests of the KV cache: cached decoding must match recomputing the whole sequence."""

from __future__ import annotations

import copy

import pytest
import torch

from lab.models import GPT, GPTConfig, KVCache, sample_next

BASE = dict(vocab_size=19, block_size=24, n_layer=2, n_head=4, n_embd=32)
ATOL = 1e-5

# (name, extra config): every attention kind with learned and rotary positions,
# and sliding windows (which need rotary or no positions)
VARIANTS = [
    ("mha-learned", dict()),
    ("gqa-learned", dict(n_kv_head=2)),
    ("mqa-learned", dict(n_kv_head=1)),
    ("mha-rope", dict(pos="rope")),
    ("gqa-rope", dict(pos="rope", n_kv_head=2)),
    ("mqa-rope", dict(pos="rope", n_kv_head=1)),
    ("gqa-rope-window", dict(pos="rope", n_kv_head=2, sliding_window=5)),
    ("mqa-rope-window", dict(pos="rope", n_kv_head=1, sliding_window=7)),
    ("mha-nope-window", dict(pos="none", sliding_window=6)),
    ("llama-style", dict(pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False)),
]


def make(seed: int = 0, **extra) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**BASE, **extra})).eval()


def cached_logits(model: GPT, idx: torch.Tensor, prefill: int, chunk: int) -> torch.Tensor:
    """Logits of every position of idx, fed as a prefill and then `chunk` tokens per step."""
    cache = model.new_cache(idx.size(0))
    outs, t = [], 0
    with torch.no_grad():
        for size in [prefill] + [chunk] * idx.size(1):
            if t >= idx.size(1):
                break
            outs.append(model(idx[:, t : t + size], cache=cache)[0])
            t += size
    assert cache.length == idx.size(1)
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------- cached == uncached


@pytest.mark.parametrize("name, extra", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_logits_match_a_full_forward(name, extra, batch):
    model = make(**extra)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, BASE["vocab_size"], (batch, BASE["block_size"]), generator=g)
    with torch.no_grad():
        full, _ = model(idx)  # with a window: the band mask
    # one token at a time, multi-token steps that wrap a ring buffer, and a prefill
    # longer than any window
    for prefill, chunk in [(1, 1), (9, 1), (4, 3), (13, 5)]:
        got = cached_logits(model, idx, prefill, chunk)
        torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("extra", [dict(pos="rope", n_kv_head=2), dict(pos="none", n_kv_head=1)])
def test_sliding_window_generation_runs_past_block_size(extra):
    # rotary/no positions have no block_size-shaped weights, so a twin with a longer
    # block_size holds the same weights and can compute the reference in one pass
    model = make(**extra, sliding_window=5)
    twin = GPT(GPTConfig(**{**BASE, **extra, "sliding_window": 5, "block_size": 80})).eval()
    twin.load_state_dict(model.state_dict())
    idx = torch.randint(0, BASE["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = twin(idx)
    cache = model.new_cache(2)
    nbytes = cache.nbytes
    with torch.no_grad():
        outs = [model(idx[:, :20], cache=cache)[0]]
        outs += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(20, 70)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)
    assert cache.length == 70 and cache.capacity == 5 and cache.nbytes == nbytes

    g = dict(temperature=0.9, top_k=8)
    prompt = idx[:, :30]  # longer than block_size: prefilled in chunks
    a = model.generate(prompt, 40, generator=torch.Generator().manual_seed(0), **g)
    b = twin.generate(prompt, 40, generator=torch.Generator().manual_seed(0), use_cache=False, **g)
    assert a.shape == (2, 70) and torch.equal(a, b)


@pytest.mark.parametrize("name, extra", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_generate_gives_the_same_tokens_with_and_without_cache(name, extra):
    model = make(**extra)
    prompt = torch.randint(0, BASE["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(3))
    for kwargs in [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)]:
        a = model.generate(prompt, 20, use_cache=True, generator=torch.Generator().manual_seed(7), **kwargs)
        b = model.generate(prompt, 20, use_cache=False, generator=torch.Generator().manual_seed(7), **kwargs)
        assert torch.equal(a, b), kwargs


def test_prefill_and_decode_one_match_forward():
    model = make(pos="rope", n_kv_head=2)
    idx = torch.randint(0, BASE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(4))
    full, _ = model(idx)
    cache = model.new_cache(2)
    torch.testing.assert_close(model.prefill(idx[:, :6], cache), full[:, 5], atol=ATOL, rtol=0)
    for t in range(6, 10):
        token = idx[:, t] if t % 2 else idx[:, t : t + 1]  # (B,) or (B, 1)
        torch.testing.assert_close(model.decode_one(token, cache), full[:, t], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="one token per row"):
        model.decode_one(idx[:, :2], model.new_cache(2))


def test_reset_reuses_the_buffers():
    model = make()
    idx = torch.randint(0, BASE["vocab_size"], (1, 8))
    cache = model.new_cache()
    first, _ = model(idx, cache=cache)
    cache.reset()
    assert cache.length == 0
    again, _ = model(idx, cache=cache)
    torch.testing.assert_close(first, again, atol=0, rtol=0)


# ---------------------------------------------------------------- memory


def test_cache_bytes_shrink_by_the_kv_head_ratio():
    mha = make().new_cache(2)
    gqa = make(n_kv_head=2).new_cache(2)
    mqa = make(n_kv_head=1).new_cache(2)
    # k and v, layers, batch, heads, block_size, head_dim, 4 bytes per float32
    assert mha.nbytes == 2 * BASE["n_layer"] * 2 * 4 * BASE["block_size"] * 8 * 4
    assert mha.nbytes == 2 * gqa.nbytes == 4 * mqa.nbytes


def test_cache_capacity_and_max_len():
    model = make()
    assert model.new_cache().capacity == BASE["block_size"]
    short = model.new_cache(max_len=10)
    assert short.capacity == 10 and short.nbytes * BASE["block_size"] == model.new_cache().nbytes * 10
    windowed = make(pos="rope", sliding_window=6)
    assert windowed.new_cache().capacity == 6 and windowed.new_cache().rolling
    assert windowed.new_cache(max_len=4).capacity == 4 and not windowed.new_cache(max_len=4).rolling
    assert KVCache(windowed.config, 3).capacity == 6


def test_rolling_cache_memory_stays_constant_past_the_window():
    model = make(pos="rope", n_kv_head=2, sliding_window=4)
    cache = model.new_cache()
    sizes = []
    with torch.no_grad():
        for t in range(60):  # well past the window and past block_size
            model(torch.tensor([[t % BASE["vocab_size"]]]), cache=cache)
            sizes.append(cache.nbytes)
    assert cache.length == 60
    assert set(sizes) == {2 * BASE["n_layer"] * 1 * 2 * 4 * 8 * 4}


# ---------------------------------------------------------------- errors


def test_cache_refuses_another_model():
    model = make()
    cache = model.new_cache()
    idx = torch.zeros(1, 3, dtype=torch.long)
    built_for = r"cache was built for a model with config \{n_kv_head=None\}, got \{n_kv_head=2\}"
    with pytest.raises(ValueError, match=built_for):
        make(n_kv_head=2)(idx, cache=cache)
    with pytest.raises(ValueError, match="another model instance"):
        make()(idx, cache=cache)  # same config, different weights
    with pytest.raises(ValueError, match="another model instance"):
        copy.deepcopy(model)(idx, cache=cache)
    # a cache made directly binds to the first model that uses it
    free = KVCache(model.config)
    model(idx, cache=free)
    with pytest.raises(ValueError, match="another model instance"):
        make()(idx, cache=free)


def test_cache_refuses_more_tokens_than_the_context():
    model = make()
    cache = model.new_cache()
    model(torch.zeros(1, 20, dtype=torch.long), cache=cache)
    too_long = r"longer than the context \(block_size=24\) without a sliding window"
    with pytest.raises(ValueError, match=too_long):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    assert cache.length == 20  # a refused step changes nothing
    small = model.new_cache(max_len=4)
    with pytest.raises(ValueError, match="max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=small)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(max_len=0), "max_len"),
        (dict(max_len=25), r"max_len=25 exceeds the context \(block_size=24\)"),
        (dict(dtype=torch.int64), "dtype"),
    ],
)
def test_cache_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVCache(GPTConfig(**BASE), **kwargs)


def test_cache_checks_batch_and_type():
    model = make()
    with pytest.raises(ValueError, match="batch_size=2, got a batch of 1"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache(2))
    with pytest.raises(ValueError, match="KVCache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache={})
    with pytest.raises(ValueError, match="GPTConfig"):
        KVCache(BASE)


# ---------------------------------------------------------------- generate past block_size


def test_generate_past_block_size_needs_crop_without_a_window():
    model = make()
    prompt = torch.zeros(1, 20, dtype=torch.long)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=r"block_size=24.*20 \+ max_new_tokens 5 = 25.*crop=True"):
            model.generate(prompt, 5, use_cache=use_cache)
    model.generate(prompt, 4)  # exactly block_size is fine


def test_generate_crop_reproduces_nanogpt():
    model = make()
    prompt = torch.randint(0, BASE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, 30, top_k=6, generator=torch.Generator().manual_seed(1), crop=True)

    # nanoGPT's loop: crop to the last block_size tokens, full forward, sample the last position
    g, x = torch.Generator().manual_seed(1), prompt
    with torch.no_grad():
        for _ in range(30):
            logits, _ = model(x[:, -BASE["block_size"] :])
            x = torch.cat((x, sample_next(logits[:, -1], top_k=6, generator=g).unsqueeze(1)), dim=1)
    assert torch.equal(out, x)


def test_uncached_generation_past_block_size_with_a_window_needs_crop():
    model = make(pos="rope", sliding_window=4)
    prompt = torch.zeros(1, 20, dtype=torch.long)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(prompt, 10, use_cache=False)
    assert model.generate(prompt, 10, use_cache=False, crop=True).shape == (1, 30)


def test_generate_validates_flags():
    model = make()
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, use_cache=1)
    with pytest.raises(ValueError, match="crop"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, crop="yes")
    with pytest.raises(ValueError, match="outside"):
        model.generate(torch.full((1, 2), 99, dtype=torch.long), 2)
