import pytest
import torch

from lab.models import GPT, GPTConfig, mean_pool_kv_heads

CFG = dict(
    vocab_size=17, block_size=16, n_layer=2, n_head=4, n_embd=32, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False
)


def test_pooling_identical_heads_changes_nothing():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).eval()
    hd = 8
    with torch.no_grad():
        for block in model.blocks:
            w = block.attn.c_attn.weight
            q, k, v = w.split(32, dim=0)
            # make heads 0,1 and 2,3 identical in K and V: pooling them into 2 groups is exact
            for t in (k, v):
                t.view(4, hd, 32)[1] = t.view(4, hd, 32)[0]
                t.view(4, hd, 32)[3] = t.view(4, hd, 32)[2]
    gqa = mean_pool_kv_heads(model, 2)
    assert gqa.config.n_kv_head == 2
    x = torch.randint(0, 17, (2, 16))
    torch.testing.assert_close(gqa(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)
    assert gqa.blocks[0].attn.c_attn.weight.shape[0] == 32 + 2 * 2 * hd


def test_pooling_to_n_head_is_identity_and_bad_input_is_clear():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG)).eval()
    x = torch.randint(0, 17, (1, 16))
    torch.testing.assert_close(mean_pool_kv_heads(model, 4)(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="must divide n_head=4, got 3"):
        mean_pool_kv_heads(model, 3)
    with pytest.raises(ValueError, match="expected a multi-head model"):
        mean_pool_kv_heads(mean_pool_kv_heads(model, 2), 1)
