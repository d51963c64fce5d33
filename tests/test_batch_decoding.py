"""Batched greedy decoding behind curriculum 15's throughput-by-batch-size hypothesis."""

import pytest
import torch

from lab.decoding import hf_batch_greedy, lab_batch_greedy, lab_greedy
from lab.models import GPT, GPTConfig

CFG = dict(
    vocab_size=23, block_size=48, n_layer=2, n_head=4, n_embd=32, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(**CFG, n_kv_head=2)).eval()


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(1))


def test_each_row_of_a_batch_decodes_as_it_would_alone(model, prompts):
    tokens, seconds = lab_batch_greedy(model, prompts, 10)
    assert tokens.shape == (3, 10) and seconds > 0
    for row, prompt in zip(tokens, prompts):
        assert row.tolist() == lab_greedy(model, prompt[None], 10, use_cache=True)[0]


def test_hf_batch_decodes_the_lab_tokens(model, prompts, tmp_path):
    pytest.importorskip("transformers")
    from lab.models import export_hf, load_hf_causal_lm

    hf = load_hf_causal_lm(export_hf(model, tmp_path / "m"))[0].eval()
    tokens, seconds = hf_batch_greedy(hf, prompts, 10)
    assert seconds > 0
    assert torch.equal(tokens, lab_batch_greedy(model, prompts, 10)[0])


def test_batch_greedy_refuses_no_tokens(model, prompts):
    with pytest.raises(ValueError, match="n_new"):
        lab_batch_greedy(model, prompts, 0)
