"""Tests of the GPT's swappable components: positions (incl. sinusoidal and ALiBi), prefix-LM
masks, explicit attention patterns, norm placement and residuals, the qk scale, MLP kinds,
mixture of experts, longer contexts and what the Hugging Face export refuses."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.inspect import capture
from lab.models import GPT, GPTConfig, export_hf
from lab.models.config import POSITIONS
from lab.models.gpt import make_mlp
from lab.models.moe import MoE
from lab.models.positions import alibi_slopes, sinusoidal_table
from lab.train import TrainConfig, make_optimizer, train, train_step

BASE = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
ATOL = 1e-5


def make(seed: int = 0, **extra) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**BASE, **extra})).eval()


def tokens(shape=(2, 16), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, BASE["vocab_size"], shape, generator=g)


def logits(model: GPT, idx: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, **kw)[0]


def attention_patterns(model: GPT, idx: torch.Tensor, **kw) -> list[torch.Tensor]:
    """Each layer's (B, n_head, T, T) softmax weights, read at lab.inspect's pattern hook."""
    with torch.no_grad(), capture(model, "blocks.*.attn.hook_pattern") as cache:
        model(idx, **kw)
    return [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(len(model.blocks))]


# ---------------------------------------------------------------- causality


_MODELS: dict = {}


def cached_model(pos: str, window: int | None) -> GPT:
    key = (pos, window)
    if key not in _MODELS:
        # init_std 0.1 so that every token visibly moves the logits it may reach
        _MODELS[key] = make(pos=pos, sliding_window=window, init_std=0.1)
    return _MODELS[key]


@settings(max_examples=60, deadline=None)
@given(
    pos=st.sampled_from(POSITIONS),
    window=st.sampled_from([None, 1, 3]),
    T=st.integers(2, 16),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_causal_masking_is_exact_for_every_position_encoding(pos, window, T, data, seed):
    window = None if pos == "learned" else window
    model = cached_model(pos, window)
    t = data.draw(st.integers(0, T - 2), label="t")
    idx = tokens((2, T), seed)
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1 + tokens((2, T - t - 1), seed + 1) % 49) % 50
    assert not torch.equal(changed[:, t + 1 :], idx[:, t + 1 :])
    a, b = logits(model, idx), logits(model, changed)
    # exactly equal, not merely close: a masked key contributes an exact 0
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.equal(a[:, t + 1 :], b[:, t + 1 :])  # the change was seen downstream


@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "alibi", "none"])
def test_sliding_window_hides_keys_older_than_the_window(pos, window):
    model = cached_model(pos, window)
    idx = tokens((2, 16))
    changed = idx.clone()
    changed[:, 3] = (idx[:, 3] + 7) % 50
    a, b = logits(model, idx), logits(model, changed)
    # with n_layer layers, token 3 reaches positions up to 3 + n_layer * (window - 1)
    reach = 3 + BASE["n_layer"] * (window - 1)
    assert torch.equal(a[:, :3], b[:, :3])
    assert not torch.equal(a[:, 3:4], b[:, 3:4])
    assert torch.equal(a[:, reach + 1 :], b[:, reach + 1 :])


# ---------------------------------------------------------------- prefix LM


@pytest.mark.parametrize("pos", POSITIONS)
def test_prefix_is_bidirectional_and_the_rest_causal(pos):
    model = make(pos=pos, init_std=0.1)
    idx, k = tokens((2, 12)), 6
    base = logits(model, idx, prefix_len=k)
    for j in range(1, k):  # inside the prefix: earlier positions see position j
        changed = idx.clone()
        changed[:, j] = (idx[:, j] + 5) % 50
        out = logits(model, changed, prefix_len=k)
        assert (out[:, :j] - base[:, :j]).abs().amax(dim=-1).min() > 1e-6, j
    for j in range(k, 12):  # after it: causal, exactly
        changed = idx.clone()
        changed[:, j] = (idx[:, j] + 5) % 50
        out = logits(model, changed, prefix_len=k)
        assert torch.equal(out[:, :j], base[:, :j]), j
        assert not torch.equal(out[:, j:], base[:, j:]), j


def test_prefix_len_zero_is_causal_and_per_row_prefixes_apply_per_row():
    model = make(pos="rope", init_std=0.1)
    idx = tokens((2, 12))
    causal = logits(model, idx)
    assert torch.equal(logits(model, idx, prefix_len=0), causal)
    assert torch.equal(logits(model, idx, prefix_len=1), causal)  # a 1-token prefix changes nothing
    per_row = torch.tensor([3, 9])
    base = logits(model, idx, prefix_len=per_row)
    changed = idx.clone()
    changed[:, 5] = (idx[:, 5] + 5) % 50
    out = logits(model, changed, prefix_len=per_row)
    assert torch.equal(out[0, :5], base[0, :5])  # row 0: position 5 is past its prefix of 3
    assert not torch.allclose(out[1, :5], base[1, :5], atol=1e-6)  # row 1: inside its prefix of 9
    # a tensor of equal prefixes is the int
    assert torch.equal(logits(model, idx, prefix_len=torch.tensor([4, 4])), logits(model, idx, prefix_len=4))


def test_full_prefix_makes_the_attention_pattern_bidirectional():
    model = make(pos="alibi")
    idx = tokens((2, 10))
    for p in attention_patterns(model, idx, prefix_len=10):
        assert (p.triu(1)[..., 0, 1:] > 0).all()
        assert (p > 0).all()
    k = 4
    for p in attention_patterns(model, idx, prefix_len=k):
        above = torch.ones(10, 10, dtype=torch.bool).triu(1)
        in_prefix = torch.zeros(10, 10, dtype=torch.bool)
        in_prefix[:, :k] = True
        assert (p[..., above & in_prefix] > 0).all()
        assert (p[..., above & ~in_prefix] == 0).all()


@pytest.mark.parametrize(
    "prefix_len, match",
    [
        (11, r"prefix_len values must lie in \[0, T=10\]"),
        (-1, "prefix_len"),
        (2.5, "prefix_len"),
        (torch.tensor([1, 2, 3]), "prefix_len"),
        (torch.tensor([1.0, 2.0]), "prefix_len"),
    ],
)
def test_prefix_len_is_validated(prefix_len, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        model(tokens((2, 10)), prefix_len=prefix_len)


def test_prefix_len_with_a_cache_is_refused():
    model = make(pos="rope")
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="prefix_len.*cache"):
        model(tokens((2, 5)), cache=cache, prefix_len=3)


# ---------------------------------------------------------------- attention patterns


PATTERN_VARIANTS = [
    ("mha", dict()),
    ("gqa", dict(n_kv_head=2)),
    ("mqa", dict(n_kv_head=1)),
    ("alibi", dict(pos="alibi")),
    ("alibi-gqa-window", dict(pos="alibi", n_kv_head=2, sliding_window=5)),
    ("qk-scale-1", dict(qk_scale=1.0)),
    ("rope-window", dict(pos="rope", sliding_window=3)),
]


@pytest.mark.parametrize("name, extra", PATTERN_VARIANTS, ids=[v[0] for v in PATTERN_VARIANTS])
def test_attention_patterns_are_causal_distributions(name, extra):
    model = make(**extra)
    idx = tokens((2, 12))
    patterns = attention_patterns(model, idx)
    assert len(patterns) == BASE["n_layer"]
    for p in patterns:
        assert p.shape == (2, BASE["n_head"], 12, 12)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, BASE["n_head"], 12))
        assert torch.equal(p.triu(1), torch.zeros_like(p))  # nothing above the diagonal
        assert (p.diagonal(dim1=-2, dim2=-1) > 0).all()  # every query sees itself
        window = extra.get("sliding_window")
        if window is not None:
            assert torch.equal(p.tril(-window), torch.zeros_like(p))
    # attention_patterns leaves the model on the fused path
    assert all(not b.attn.keep_pattern and b.attn.pattern is None for b in model.blocks)


@pytest.mark.parametrize("name, extra", PATTERN_VARIANTS, ids=[v[0] for v in PATTERN_VARIANTS])
@pytest.mark.parametrize("prefix_len", [None, 5])
def test_explicit_attention_gives_the_fused_kernels_output(name, extra, prefix_len):
    model = make(**extra)
    idx = tokens((2, 12))
    fused = logits(model, idx, prefix_len=prefix_len)
    for b in model.blocks:
        b.attn.keep_pattern = True
    try:
        explicit = logits(model, idx, prefix_len=prefix_len)
    finally:
        for b in model.blocks:
            b.attn.keep_pattern = False
    torch.testing.assert_close(explicit, fused, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(n_kv_head=2), dict(n_kv_head=1), dict(qk_scale=0.5), dict(n_kv_head=2, qk_scale=1.0)],
    ids=["mha", "gqa", "mqa", "scale-0.5", "gqa-scale-1"],
)
def test_first_layer_pattern_matches_a_hand_computation(extra):
    """softmax(q k^T * scale) with query head h reading KV head h // (n_head / n_kv_head)."""
    model = make(**extra, init_std=0.1)
    c = model.config
    idx = tokens((2, 10))
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(10))
        qkv = model.blocks[0].attn.c_attn(model.blocks[0].ln_1(x))
        hd, n_kv = c.head_dim, c.kv_heads
        q = qkv[..., : c.n_head * hd].view(2, 10, c.n_head, hd).transpose(1, 2)
        k = qkv[..., c.n_head * hd : (c.n_head + n_kv) * hd].view(2, 10, n_kv, hd).transpose(1, 2)
        scale = c.qk_scale if c.qk_scale is not None else hd**-0.5
        groups = c.n_head // n_kv
        expected = torch.stack(
            [(q[:, h] @ k[:, h // groups].transpose(-1, -2)) * scale for h in range(c.n_head)], dim=1
        )
        expected = expected.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), -math.inf).softmax(-1)
    torch.testing.assert_close(attention_patterns(model, idx)[0], expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- ALiBi


def paper_alibi_slopes(n: int) -> list[float]:
    """The reference recipe from Press et al.'s code (ofirpress/attention_with_linear_biases)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_alibi_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_power_of_two():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    assert alibi_slopes(1).tolist() == [2.0**-8]


def test_alibi_slopes_non_power_of_two_follow_the_paper():
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    for n in range(1, 33):
        slopes = alibi_slopes(n)
        assert slopes.shape == (n,) and (slopes > 0).all() and len(set(slopes.tolist())) == n
        torch.testing.assert_close(slopes, torch.tensor(paper_alibi_slopes(n)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("prefix_len", [None, 4, 10])
def test_alibi_biases_layer_one_by_minus_slope_times_distance(prefix_len):
    """With every token the same, all keys score alike in layer 0, so its pattern is
    exactly softmax over visible keys j of -slope_h * |i - j| (keys ahead of a query,
    visible inside a bidirectional prefix, are penalised by their distance too)."""
    model = make(pos="alibi", init_std=0.1)
    idx = torch.full((1, 10), 7)
    pattern = attention_patterns(model, idx, prefix_len=prefix_len)[0][0]  # (n_head, T, T)
    slopes = alibi_slopes(BASE["n_head"])
    i, j = torch.arange(10).unsqueeze(1), torch.arange(10).unsqueeze(0)
    bias = -slopes.view(-1, 1, 1) * (i - j).abs().float()
    visible = (j <= i) | (j < (prefix_len or 0))
    expected = bias.masked_fill(~visible, -math.inf).softmax(-1)
    torch.testing.assert_close(pattern, expected, atol=1e-6, rtol=1e-5)


def test_alibi_with_zero_slopes_is_no_positions():
    alibi, nope = make(pos="alibi"), make(pos="none")  # the same parameters, the same init
    idx = tokens()
    assert not torch.allclose(logits(alibi, idx), logits(nope, idx), atol=1e-6)
    alibi._alibi_slopes = torch.zeros(BASE["n_head"])
    torch.testing.assert_close(logits(alibi, idx), logits(nope, idx), atol=ATOL, rtol=1e-4)


CACHE_VARIANTS = [
    ("alibi", dict(pos="alibi")),
    ("alibi-window", dict(pos="alibi", sliding_window=5)),
    ("alibi-gqa-window", dict(pos="alibi", n_kv_head=2, sliding_window=3)),
    ("sinusoidal", dict(pos="sinusoidal")),
    ("sinusoidal-window", dict(pos="sinusoidal", sliding_window=4)),
    ("moe", dict(n_expert=4)),
    ("post-norm", dict(norm_position="post")),
    ("no-residual-rope", dict(pos="rope", residual=False)),
]


@pytest.mark.parametrize("name, extra", CACHE_VARIANTS, ids=[v[0] for v in CACHE_VARIANTS])
def test_prefill_then_decode_one_matches_the_full_forward(name, extra):
    model = make(**extra, init_std=0.1)
    idx = tokens((2, 16))
    full = logits(model, idx)
    cache = model.new_cache(2)
    steps = [model.prefill(idx[:, :4], cache)]
    for t in range(4, 16):  # with a window of 5 or less the ring wraps several times
        steps.append(model.decode_one(idx[:, t], cache))
    assert cache.length == 16
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 3:], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name, extra", CACHE_VARIANTS, ids=[v[0] for v in CACHE_VARIANTS])
@pytest.mark.parametrize("prefill, chunk", [(7, 4), (2, 5), (16, 1)])
def test_chunked_cached_forward_matches_the_full_forward(name, extra, prefill, chunk):
    """Multi-token steps, including ones that wrap the ring buffer of a windowed cache."""
    model = make(**extra, init_std=0.1)
    idx = tokens((2, 16))
    full = logits(model, idx)
    cache = model.new_cache(2)
    outs, t = [], 0
    with torch.no_grad():
        while t < 16:
            size = prefill if t == 0 else chunk
            outs.append(model(idx[:, t : t + size], cache=cache)[0])
            t += size
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=ATOL, rtol=1e-4)


def test_alibi_window_generation_runs_past_block_size_and_agrees_with_cropping_when_short():
    model = make(pos="alibi", sliding_window=4)
    prompt = tokens((1, 3))
    out = model.generate(prompt, 40, top_k=1)  # greedy, 43 tokens > block_size 16
    assert out.shape == (1, 43) and torch.equal(out[:, :3], prompt)
    short_cached = model.generate(prompt, 10, top_k=1)
    short_uncached = model.generate(prompt, 10, top_k=1, use_cache=False)
    assert torch.equal(short_cached, short_uncached)


# ---------------------------------------------------------------- longer contexts


@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "alibi", "none"])
def test_with_context_keeps_the_trained_positions_and_takes_longer_inputs(pos):
    model = make(pos=pos, init_std=0.1)
    longer = model.with_context(32)
    assert longer.config == replace(model.config, block_size=32)
    assert model.config.block_size == 16  # the original is untouched
    assert longer.lm_head.weight is longer.wte.weight
    assert not longer.training
    idx = tokens((2, 32))
    torch.testing.assert_close(logits(longer, idx[:, :16]), logits(model, idx[:, :16]), atol=0, rtol=0)
    # causal: the first 16 positions of a 32-token input are still the trained model's
    long_out = logits(longer, idx)
    assert long_out.shape == (2, 32, BASE["vocab_size"])
    torch.testing.assert_close(long_out[:, :16], logits(model, idx[:, :16]), atol=ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="block_size=16"):
        model(idx)
    # the copy owns its weights
    with torch.no_grad():
        longer.wte.weight.add_(1.0)
    assert not torch.equal(longer.wte.weight, model.wte.weight)


def test_with_context_refuses_learned_positions_past_their_length():
    model = make()
    with pytest.raises(ValueError, match="learned position embeddings"):
        model.with_context(32)
    shorter = model.with_context(8)  # a shorter context needs no new rows
    idx = tokens((2, 8))
    torch.testing.assert_close(logits(shorter, idx), logits(model, idx), atol=0, rtol=0)
    assert shorter.wpe.weight.shape == (8, BASE["n_embd"])


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True, "32"])
def test_with_context_validates_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        make(pos="rope").with_context(block_size)


def test_with_context_keeps_the_training_mode():
    model = make(pos="rope").train()
    assert model.with_context(24).training


# ---------------------------------------------------------------- norm position and residuals


def _block_input(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 10, BASE["n_embd"], generator=g)


@pytest.mark.parametrize(
    "norm_position, residual",
    [("pre", True), ("pre", False), ("post", True), ("post", False)],
)
def test_block_computes_its_norm_placement_and_residual_exactly(norm_position, residual):
    model = make(norm_position=norm_position, residual=residual, init_std=0.1)
    block, x = model.blocks[0], _block_input()

    def attn(h):  # causal, no positions
        return block.attn(h)

    with torch.no_grad():
        if norm_position == "pre" and residual:
            h = x + attn(block.ln_1(x))
            expected = h + block.mlp(block.ln_2(h))
        elif norm_position == "pre":
            expected = block.mlp(block.ln_2(attn(block.ln_1(x))))
        elif residual:  # the original Transformer: norm(x + f(x))
            h = block.ln_1(x + attn(x))
            expected = block.ln_2(h + block.mlp(h))
        else:
            expected = block.ln_2(block.mlp(block.ln_1(attn(x))))
        torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-5)


def test_post_norm_has_no_final_norm_and_differs_from_pre_norm():
    pre, post = make(), make(norm_position="post")
    assert isinstance(post.ln_f, nn.Identity) and isinstance(pre.ln_f, nn.LayerNorm)
    for (name, p), (name2, q) in zip(post.named_parameters(), pre.named_parameters()):
        assert name == name2 and torch.equal(p, q)  # the same seed gives the same weights
    idx = tokens()
    assert not torch.allclose(logits(pre, idx), logits(post, idx), atol=1e-4)
    # post-norm's hidden states leave the last block normalised (LayerNorm at init: gain 1, bias 0)
    with torch.no_grad():
        h = post._hidden(idx, None)
    torch.testing.assert_close(h.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)


def test_post_norm_with_rmsnorm_has_no_final_norm_either():
    assert isinstance(make(norm_position="post", norm="rmsnorm").ln_f, nn.Identity)


def test_no_residual_changes_the_output():
    idx = tokens()
    with_res, without = make(), make(residual=False)
    assert not torch.allclose(logits(with_res, idx), logits(without, idx), atol=1e-4)
    # without a residual, the token embedding only reaches the output through the blocks
    assert not torch.allclose(
        logits(make(norm_position="post"), idx), logits(make(norm_position="post", residual=False), idx), atol=1e-4
    )


def test_describe_names_the_ablations():
    assert GPTConfig(**BASE).describe().startswith("pre-LN GPT-2 (")
    assert GPTConfig(**BASE).describe() == "pre-LN GPT-2 (learned pos, LayerNorm, GELU, MHA 4/4)"
    assert GPTConfig(**BASE, norm_position="post").describe().startswith("post-LN GPT-2 (")
    assert "no residual" in GPTConfig(**BASE, residual=False).describe()
    assert "qk scale 1" in GPTConfig(**BASE, qk_scale=1.0).describe()
    assert GPTConfig(**BASE, pos="alibi").describe().startswith("pre-LN GPT (alibi pos")
    assert "ReLU" in GPTConfig(**BASE, mlp="relu").describe()
    assert "MoE 4xGELU top-2" in GPTConfig(**BASE, n_expert=4).describe()


# ---------------------------------------------------------------- qk scale and init


def test_default_qk_scale_is_one_over_sqrt_head_dim():
    idx = tokens()
    default = logits(make(init_std=0.1), idx)
    explicit = logits(make(init_std=0.1, qk_scale=1 / math.sqrt(BASE["n_embd"] // BASE["n_head"])), idx)
    torch.testing.assert_close(default, explicit, atol=1e-6, rtol=1e-5)
    unscaled = logits(make(init_std=0.1, qk_scale=1.0), idx)
    assert not torch.allclose(default, unscaled, atol=1e-4)


def test_qk_scale_sharpens_attention():
    idx = tokens()

    def entropy(model):
        p = attention_patterns(model, idx)[0][:, :, -1]  # the last query sees every key
        return -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()

    assert entropy(make(init_std=0.2, qk_scale=4.0)) < entropy(make(init_std=0.2))


def test_init_std_sets_the_weight_scale():
    big = make(init_std=0.1, n_embd=64)
    assert big.wte.weight.std().item() == pytest.approx(0.1, rel=0.1)
    assert big.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.1, rel=0.1)
    # residual projections shrink by sqrt(2 * n_layer), as GPT-2's
    assert big.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(0.1 / 2, rel=0.1)


@pytest.mark.parametrize(
    "field, value",
    [
        ("qk_scale", 0.0),
        ("qk_scale", -1.0),
        ("qk_scale", float("inf")),
        ("init_std", 0.0),
        ("init_std", float("nan")),
        ("residual", 1),
        ("residual", "no"),
        ("norm_position", "both"),
        ("n_expert", 1),
        ("n_expert", 2.0),
        ("moe_aux_weight", -0.1),
        ("moe_aux_weight", float("nan")),
    ],
)
def test_config_rejects_bad_new_values(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**BASE, **{field: value})


def test_config_rejects_moe_top_k_above_n_expert():
    with pytest.raises(ValueError, match=r"moe_top_k must be an int in \[1, n_expert=4\], got 5"):
        GPTConfig(**BASE, n_expert=4, moe_top_k=5)
    with pytest.raises(ValueError, match="moe_top_k"):
        GPTConfig(**BASE, n_expert=4, moe_top_k=0)
    with pytest.raises(ValueError, match=r"n_expert must be None or an int >= 2, got 1"):
        GPTConfig(**BASE, n_expert=1)


def test_config_rejects_sinusoidal_with_odd_n_embd():
    with pytest.raises(ValueError, match=r"n_embd must be even for pos='sinusoidal', got 9"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=3, n_embd=9, pos="sinusoidal")


def test_new_config_fields_round_trip():
    config = GPTConfig(
        **BASE,
        pos="alibi",
        mlp="relu",
        norm_position="post",
        residual=False,
        qk_scale=0.5,
        init_std=0.05,
        n_expert=3,
        moe_top_k=1,
        moe_aux_weight=0.1,
        sliding_window=4,
    )
    assert GPTConfig.from_dict(config.to_dict()) == config


# ---------------------------------------------------------------- positions


def test_sinusoidal_table_is_vaswanis_encoding():
    d = 16
    table = sinusoidal_table(torch.arange(40), d)
    assert table.shape == (40, d)
    for pos in (0, 1, 7, 39):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    # defined for any position: a later offset is the same rows
    torch.testing.assert_close(sinusoidal_table(torch.arange(30, 40), d), table[30:])


def test_sinusoidal_has_no_position_parameters_but_sees_order():
    model = make(pos="sinusoidal", init_std=0.1)
    assert model.wpe is None
    assert model.num_params(non_embedding=False) == make(pos="none").num_params(non_embedding=False)
    # a repeated token: without positions every position computes the same hidden state,
    # with sinusoidal positions they differ
    idx = torch.full((1, 8), 3)
    with torch.no_grad():
        nope = make(pos="none")._hidden(idx, None)
        sin = model._hidden(idx, None)
    torch.testing.assert_close(nope[0, 0].expand(8, -1), nope[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(sin[0, 0].expand(8, -1), sin[0], atol=1e-4)


# ---------------------------------------------------------------- MLPs


def test_relu_and_gelu_differ_with_the_same_parameters():
    gelu, relu = make(init_std=0.1), make(mlp="relu", init_std=0.1)
    assert isinstance(relu.blocks[0].mlp.act, nn.ReLU)
    assert gelu.num_params() == relu.num_params()
    for p, q in zip(gelu.parameters(), relu.parameters()):
        assert torch.equal(p, q)
    idx = tokens()
    assert not torch.allclose(logits(gelu, idx), logits(relu, idx), atol=1e-6)
    mlp, x = relu.blocks[0].mlp, _block_input()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x))))


def test_swiglu_matches_gelu_parameter_count_when_n_embd_is_48():
    shape = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=48, bias=False)
    gelu = GPT(GPTConfig(**shape))
    swiglu = GPT(GPTConfig(**shape, mlp="swiglu"))
    assert swiglu.config.mlp_hidden_dim == 128  # 8/3 * 48

    def count(model):
        return sum(p.numel() for p in model.blocks[0].mlp.parameters())

    assert count(swiglu) == count(gelu) == 2 * 48 * 4 * 48
    assert swiglu.num_params() == gelu.num_params()


def test_swiglu_computes_silu_gate_times_up():
    mlp, x = make(mlp="swiglu", init_std=0.1).blocks[0].mlp, _block_input()
    hidden = mlp.c_proj.in_features
    with torch.no_grad():
        h = mlp.c_fc(x)
        expected = mlp.c_proj(F.silu(h[..., :hidden]) * h[..., hidden:])
        torch.testing.assert_close(mlp(x), expected)


# ---------------------------------------------------------------- mixture of experts


def moe_config(**extra) -> GPTConfig:
    return GPTConfig(**{**BASE, "n_expert": 4, "moe_top_k": 2, **extra})


def test_moe_forward_shape_and_expert_load():
    torch.manual_seed(0)
    model = GPT(moe_config()).eval()
    out = logits(model, tokens((3, 16)))
    assert out.shape == (3, 16, BASE["vocab_size"])
    load = model.expert_load()
    assert len(load) == BASE["n_layer"]
    for layer in load:
        assert len(layer) == 4 and all(f >= 0 for f in layer)
        assert sum(layer) == pytest.approx(1.0, abs=1e-6)
        # 3 * 16 tokens, 2 slots each: fractions are multiples of 1/96
        assert all(f * 96 == pytest.approx(round(f * 96), abs=1e-4) for f in layer)
    assert GPT(GPTConfig(**BASE)).expert_load() is None


@pytest.mark.parametrize("top_k, mlp", [(1, "gelu"), (2, "gelu"), (3, "swiglu"), (4, "relu")])
def test_moe_layer_equals_a_dense_per_token_mixture(top_k, mlp):
    config = moe_config(moe_top_k=top_k, mlp=mlp, init_std=0.1)
    torch.manual_seed(0)
    moe = MoE(config, make_mlp)
    x = _block_input().reshape(-1, BASE["n_embd"])
    with torch.no_grad():
        out = moe(x.view(2, 10, -1)).reshape(-1, BASE["n_embd"])
        probs = moe.router(x).softmax(-1)
        expected, counts = torch.zeros_like(x), torch.zeros(4)
        for n in range(len(x)):
            w, chosen = probs[n].topk(top_k)
            w = w / w.sum()
            for weight, e in zip(w, chosen):
                expected[n] += weight * moe.experts[int(e)](x[n : n + 1])[0]
                counts[e] += 1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(moe.load, counts / counts.sum())
    if top_k == 4:
        assert moe.load.tolist() == [0.25] * 4


def test_expert_load_and_aux_loss_before_any_forward_are_clear():
    model = GPT(moe_config())
    for query in (model.expert_load, model.aux_loss):
        with pytest.raises(ValueError, match="forward pass"):
            query()


def test_aux_loss_is_none_without_weight_or_experts():
    torch.manual_seed(0)
    idx = tokens()
    for model in (GPT(GPTConfig(**BASE)), GPT(moe_config(moe_aux_weight=0.0))):
        model(idx)
        assert model.aux_loss() is None


def test_aux_loss_is_the_weight_per_layer_when_the_router_is_uniform():
    """Switch's E * sum_e f_e * P_e is exactly 1 when every P_e = 1/E."""
    torch.manual_seed(0)
    model = GPT(moe_config(moe_aux_weight=0.05))
    with torch.no_grad():
        for b in model.blocks:
            b.mlp.router.weight.zero_()
    model(tokens())
    assert model.aux_loss().item() == pytest.approx(0.05 * BASE["n_layer"], rel=1e-6)
    assert model.aux_loss().requires_grad


def test_aux_loss_is_larger_when_routing_collapses():
    torch.manual_seed(0)
    model = GPT(moe_config(moe_aux_weight=1.0, moe_top_k=1))
    idx = tokens()
    model(idx)
    balanced = model.aux_loss().item()
    # make expert 0 win every token by a mile: add 50 to its router logit
    for b in model.blocks:
        b.mlp.router.register_forward_hook(lambda m, i, o: o + torch.tensor([50.0, 0, 0, 0]))
    model(idx)
    collapsed = model.aux_loss().item()
    assert all(layer == [1.0, 0.0, 0.0, 0.0] for layer in model.expert_load())
    assert collapsed == pytest.approx(4.0 * BASE["n_layer"], rel=1e-4)  # E * 1 * ~1 per layer
    assert balanced < collapsed


@pytest.mark.parametrize("aux_weight", [0.0, 0.01])
def test_router_gradient_comes_from_the_aux_loss_with_top_1(aux_weight):
    """With top-1 routing the renormalised gate weight is 1, so only the
    load-balancing loss can train the router."""
    torch.manual_seed(0)
    model = GPT(moe_config(moe_top_k=1, moe_aux_weight=aux_weight))
    optimizer = make_optimizer(model, TrainConfig(max_steps=1, batch_size=2, lr=1e-3))
    stats = {}
    train_step(model, optimizer, tokens(seed=2), tokens(seed=3), grad_clip=1.0, stats=stats)
    grads = [b.mlp.router.weight.grad for b in model.blocks]
    assert all(g is not None for g in grads)
    biggest = max(g.abs().max().item() for g in grads)
    if aux_weight:
        assert biggest > 1e-5
        assert stats["aux_loss"] == pytest.approx(model.aux_loss().item(), rel=1e-5)
    else:
        assert biggest < 1e-7
        assert "aux_loss" not in stats
    assert len(stats["expert_load"]) == BASE["n_layer"]
    assert len(stats["block_grad_norms"]) == BASE["n_layer"]


def test_router_gets_gradient_with_top_2_and_no_aux_loss():
    torch.manual_seed(0)
    model = GPT(moe_config(moe_aux_weight=0.0))
    model(tokens(), tokens(seed=2))[1].backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().max() > 1e-6


def toy_data(vocab: int = 12) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    t = np.tile(np.arange(vocab), 300)
    noise = rng.random(len(t)) < 0.05
    t[noise] = rng.integers(0, vocab, noise.sum())
    t = t.astype(np.uint16)
    return SimpleNamespace(train=t[:3000], val=t[3000:], identity=f"toy-{vocab}")


def test_moe_model_trains_and_records_routing():
    mc = GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=16, n_expert=3, moe_top_k=2)
    tc = TrainConfig(max_steps=4, batch_size=4, lr=3e-3, eval_interval=4, eval_batches=2)
    result = train(mc, tc, toy_data(), progress=False)
    assert len(result.history) == 4
    for record in result.history:
        assert set(record) == {"step", "lr", "train_loss", "grad_norm", "block_grad_norms", "expert_load", "aux_loss"}
        assert len(record["expert_load"]) == 2 and all(len(layer) == 3 for layer in record["expert_load"])
        assert all(sum(layer) == pytest.approx(1.0) for layer in record["expert_load"])
        # aux loss is weight * (>= ~1 per layer), added for the gradient only
        assert 0 < record["aux_loss"] < 0.01 * 2 * 3 + 1e-6
        assert math.isfinite(record["train_loss"])
    assert math.isfinite(result.final_val_loss)


# ---------------------------------------------------------------- Hugging Face export


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(pos="alibi"), "pos='alibi'"),
        (dict(pos="sinusoidal"), "pos='sinusoidal'"),
        (dict(mlp="relu"), "mlp='relu'"),
        (dict(norm_position="post"), "norm_position='post'"),
        (dict(residual=False), "residual=False"),
        (dict(n_expert=4), "n_expert=4"),
        (dict(qk_scale=1.0), "qk_scale=1.0"),
        (dict(pos="rope", norm="rmsnorm", mlp="swiglu", norm_position="post"), "norm_position='post'"),
        (dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_expert=2), "n_expert=2"),
    ],
)
def test_hf_export_refuses_what_no_hf_architecture_computes(extra, match, tmp_path):
    target = tmp_path / "export"
    with pytest.raises(ValueError, match=match):
        export_hf(make(**extra), target)
    assert not target.exists()


def test_hf_export_accepts_a_different_init_std(tmp_path):
    pytest.importorskip("transformers")
    export_hf(make(init_std=0.1), tmp_path / "export")
    assert (tmp_path / "export" / "config.json").is_file()
