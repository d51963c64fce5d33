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
