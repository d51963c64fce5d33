"""The decode-timing harness used by the KV-cache, GQA and sliding-window comparisons."""

import pytest
import torch

from lab.decoding import hf_decode_latencies, lab_decode_latencies, tail_to_head_ratio
from lab.models import GPT, GPTConfig

CFG = dict(
    vocab_size=23, block_size=48, n_layer=2, n_head=4, n_embd=32, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(**CFG, n_kv_head=2)).eval()


def test_lab_latencies_one_per_token_with_and_without_cache(model):
    prompt = torch.randint(0, 23, (1, 5), generator=torch.Generator().manual_seed(1))
    for use_cache in (True, False):
        lat = lab_decode_latencies(model, prompt, 20, use_cache=use_cache)
        assert len(lat) == 20 and all(t > 0 for t in lat)
    with pytest.raises(ValueError, match="n_new must be >= 1"):
        lab_decode_latencies(model, prompt, 0, use_cache=True)


def test_hf_latencies_on_the_exported_weights(model, tmp_path):
    pytest.importorskip("transformers")
    from lab.models import export_hf, load_hf_causal_lm

    hf = load_hf_causal_lm(export_hf(model, tmp_path / "m"))[0].eval()
    prompt = torch.randint(0, 23, (1, 5), generator=torch.Generator().manual_seed(1))
    for impl in (None, "static"):
        lat = hf_decode_latencies(hf, prompt, 12, cache_implementation=impl)
        assert len(lat) == 12 and all(t > 0 for t in lat)


def test_tail_to_head_ratio():
    assert tail_to_head_ratio([9.0] + [1.0] * 20) == pytest.approx(1.0)
    assert tail_to_head_ratio([9.0] + [1.0] * 10 + [3.0] * 10) == pytest.approx(3.0)


def test_hf_cache_bytes_measures_the_dynamic_cache(model, tmp_path):
    pytest.importorskip("transformers")
    from lab.decoding import hf_cache_bytes
    from lab.models import export_hf, load_hf_causal_lm

    hf = load_hf_causal_lm(export_hf(model, tmp_path / "m"))[0].eval()
    # 2 layers x (K and V) x 2 KV heads x 10 tokens x head_dim 8 x 4 bytes, same as the lab cache
    assert hf_cache_bytes(hf, 10) == 2 * 2 * 2 * 10 * 8 * 4 == model.new_cache(max_len=10).nbytes


def test_decoding_after_a_random_context_lab_and_hf_agree(tmp_path):
    pytest.importorskip("transformers")
    from lab.decoding import hf_context_decode, lab_context_decode, random_context
    from lab.models import export_hf, load_hf_causal_lm

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**CFG, "block_size": 80}, n_kv_head=2, init_std=0.3)).eval()
    hf = load_hf_causal_lm(export_hf(model, tmp_path / "m"))[0].eval()
    context = random_context(model, 60, seed=3)
    assert context[0].shape == (2, 1, 2, 60, 8) and context[0].dtype == torch.float32
    assert not torch.equal(context[0], random_context(model, 60, seed=4)[0])
    tokens, latencies = lab_context_decode(model, context, 12)
    hf_tokens, hf_latencies = hf_context_decode(hf, context, 12)
    assert len(latencies) == len(hf_latencies) == 12
    assert tokens == hf_tokens and len(set(tokens)) > 1
    with pytest.raises(ValueError, match="context_len"):
        random_context(model, 0)


def test_a_cache_loads_a_context_and_refuses_what_does_not_fit():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG, n_kv_head=2)).eval()
    k, v = torch.randn(2, 1, 2, 10, 8), torch.randn(2, 1, 2, 10, 8)
    cache = model.new_cache(1, max_len=12)
    cache.load_(k, v)
    assert cache.length == 10 and torch.equal(cache.k[:, :, :, :10], k)
    model(torch.tensor([[1]]), cache=cache)  # decodes after it
    assert cache.length == 11
    with pytest.raises(ValueError, match="does not fit"):
        model.new_cache(1, max_len=8).load_(k, v)
    with pytest.raises(ValueError, match="must have shape"):
        cache.load_(k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="both have shape"):
        cache.load_(k, v[..., :5, :])


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_the_memory_bound_setting_fits_every_profile(name):
    from lab.profiles import get_profile

    inf = get_profile(name).inference
    mb = inf.memory_bound
    assert mb.block_size >= max(inf.context_lengths) + inf.context_new_tokens
    assert list(inf.context_lengths) == sorted(set(inf.context_lengths)) and len(inf.context_lengths) >= 2
    for kv in (mb.n_head, inf.kv_heads[1], 1):  # MHA, GQA, MQA as test_gqa_memory_bound builds them
        GPTConfig(vocab_size=65, block_size=mb.block_size, n_layer=mb.n_layer, n_head=mb.n_head, n_embd=mb.n_embd,
                  pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=kv)  # fmt: skip
    assert mb.n_head // inf.kv_heads[1] >= 2  # GQA shares each KV head between queries
    if name != "smoke":  # the cache of MHA at the longest context outweighs the weights read per token
        hd = mb.n_embd // mb.n_head
        cache = 2 * mb.n_layer * mb.n_head * max(inf.context_lengths) * hd
        weights = mb.n_layer * 12 * mb.n_embd**2
        assert cache > 4 * weights
