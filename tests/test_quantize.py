"""lab.quantize: round-to-nearest per-channel quantization, STE fake quantization, QAT."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lab.models import GPT, GPTConfig
from lab.quantize import (
    SUPPORTED_BITS,
    FakeQuantize,
    add_fake_quant,
    check_bits,
    fake_quantize,
    hf_weight_bytes,
    load_bnb,
    qat_finetune,
    qmax,
    quantizable_linears,
    quantize_per_channel,
    quantize_rtn,
    remove_fake_quant,
    rtn_weight_bytes,
    ste_fake_quantize,
)


def _tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=11,
        block_size=8,
        n_layer=1,
        n_head=2,
        n_embd=16,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        n_kv_head=1,
    )
    return GPT(GPTConfig(**{**cfg, **overrides})).eval()


def _tokens(n=400, seed=0):
    return np.random.default_rng(seed).integers(0, 11, n).astype(np.uint16)


# ---------------------------------------------------------------- bits


@pytest.mark.parametrize("bad", [1, 9, 16, 0, -4, 4.0, "4", None, True])
def test_unsupported_bits_name_value_and_supported(bad):
    with pytest.raises(ValueError) as exc:
        check_bits(bad)
    msg = str(exc.value)
    assert repr(bad) in msg and str(list(SUPPORTED_BITS)) in msg


@pytest.mark.parametrize(
    "entry",
    [
        lambda: quantize_rtn(_tiny_gpt(), 16),
        lambda: fake_quantize(torch.ones(2, 2), 1),
        lambda: qat_finetune(_tiny_gpt(), _tokens(), 12, 1, 1e-3, 2, 4, 0),
        lambda: FakeQuantize(0),
    ],
)
def test_every_entry_point_rejects_unsupported_bits(entry):
    with pytest.raises(ValueError, match="unsupported bit width"):
        entry()


def test_qmax():
    assert [qmax(b) for b in (2, 3, 4, 8)] == [1, 3, 7, 127]


# ---------------------------------------------------------------- the quantizer


@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(1e-4, 1e3),
)
def test_rtn_error_at_most_half_a_step_per_channel(bits, rows, cols, seed, spread):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * spread * torch.rand(rows, 1, generator=g)
    codes, scale = quantize_per_channel(w, bits)
    assert codes.dtype == torch.int8 and scale.shape == (rows, 1)
    assert int(codes.abs().max()) <= qmax(bits)
    err = (w - fake_quantize(w, bits)).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-30).all())
    # the largest weight of each row is on the grid
    top = w.abs().argmax(dim=1, keepdim=True)
    assert torch.allclose(fake_quantize(w, bits).gather(1, top), w.gather(1, top), rtol=1e-6, atol=0)


def test_zero_rows_stay_zero_and_levels_are_bounded():
    w = torch.randn(3, 50)
    w[1] = 0
    q = fake_quantize(w, 3)
    assert bool((q[1] == 0).all())
    for row in (0, 2):
        assert len(torch.unique(q[row])) <= 2 * qmax(3) + 1


def test_int8_round_trip_is_close():
    w = torch.randn(64, 128) * 0.02
    rel = (fake_quantize(w, 8) - w).norm() / w.norm()
    assert rel < 0.01


def test_quantizing_twice_changes_nothing():
    w = torch.randn(8, 33)
    q = fake_quantize(w, 4)
    assert torch.equal(fake_quantize(q, 4), q)


def test_quantizer_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_per_channel(torch.ones(4), 4)
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_per_channel(torch.ones(2, 2, dtype=torch.int64), 4)


# ---------------------------------------------------------------- whole models and bytes


def test_rtn_bytes_arithmetic():
    assert rtn_weight_bytes((10, 16), 4) == 10 * 16 * 4 // 8 + 10 * 2
    assert rtn_weight_bytes((3, 5), 3) == math.ceil(3 * 5 * 3 / 8) + 3 * 2
    assert rtn_weight_bytes((4, 4), 8, scale_bytes=4) == 16 + 16


def test_quantize_rtn_copies_and_reports_bytes():
    model = _tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q, report = quantize_rtn(model, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    linears = quantizable_linears(model)
    assert "lm_head" not in dict(linears) and report.n_linears == len(linears) == 4
    assert report.n_weights == sum(m.weight.numel() for _, m in linears)
    assert report.weight_bytes == sum(rtn_weight_bytes(tuple(m.weight.shape), 4) for _, m in linears)
    assert report.float_weight_bytes == 4 * report.n_weights
    total_fp = sum(p.numel() * 4 for p in model.parameters())
    assert report.total_bytes == total_fp - report.float_weight_bytes + report.weight_bytes
    qsd = q.state_dict()
    for name, m in linears:
        assert torch.equal(qsd[name + ".weight"], fake_quantize(m.weight, 4))
    assert torch.equal(qsd["wte.weight"], before["wte.weight"])  # tied head/embedding kept
    assert q.lm_head.weight is q.wte.weight


def test_quantize_rtn_with_tied_head_quantizes_the_shared_matrix_once():
    model = _tiny_gpt()
    q, report = quantize_rtn(model, 8, skip=())
    assert report.n_linears == 5
    assert q.lm_head.weight is q.wte.weight
    assert torch.equal(q.wte.weight, fake_quantize(model.wte.weight, 8))


def test_more_bits_lose_less():
    model = _tiny_gpt()
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = model(x)[0]
    errs = [(quantize_rtn(model, b)[0](x)[0] - ref).abs().mean().item() for b in (8, 4, 2)]
    assert errs[0] < errs[1] < errs[2]


# ---------------------------------------------------------------- STE and QAT


def test_ste_forward_is_quantized_and_gradient_passes_straight_through():
    w = torch.randn(4, 9, requires_grad=True)
    out = ste_fake_quantize(w, 4)
    assert torch.equal(out.detach(), fake_quantize(w.detach(), 4))
    g = torch.randn(4, 9)
    out.backward(g)
    assert torch.equal(w.grad, g)  # identity backward


def test_fake_quant_parametrization_and_bake():
    model = _tiny_gpt()
    add_fake_quant(model, 3)
    lin = model.blocks[0].attn.c_attn
    latent = lin.parametrizations.weight.original.detach().clone()
    assert torch.equal(lin.weight.detach(), fake_quantize(latent, 3))
    x = torch.randint(0, 11, (2, 8))
    model(x, x)[1].backward()
    assert lin.parametrizations.weight.original.grad is not None
    remove_fake_quant(model, bake=True)
    assert torch.equal(model.blocks[0].attn.c_attn.weight.detach(), fake_quantize(latent, 3))


def test_fake_quant_refuses_a_tied_head():
    with pytest.raises(ValueError, match="lm_head.*shared"):
        add_fake_quant(_tiny_gpt(), 4, skip=())


def test_qat_changes_weights_returns_quantized_copy_and_is_deterministic():
    model = _tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = []
    a = qat_finetune(model, _tokens(), 4, 5, 1e-2, 4, 8, seed=3, history=hist)
    b = qat_finetune(model, _tokens(), 4, 5, 1e-2, 4, 8, seed=3)
    c = qat_finetune(model, _tokens(), 4, 5, 1e-2, 4, 8, seed=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert len(hist) == 5 and all(math.isfinite(h["loss"]) for h in hist)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert set(sa) == set(before)  # no parametrization left behind
    assert any(not torch.equal(sa[k], before[k]) for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    for _, m in quantizable_linears(a):  # deployed on the int4 grid
        assert torch.equal(m.weight, fake_quantize(m.weight, 4))
    assert not a.training


def test_plain_finetune_control_leaves_weights_off_grid():
    model = _tiny_gpt()
    ctl = qat_finetune(model, _tokens(), None, 3, 1e-2, 4, 8, seed=0)
    w = ctl.blocks[0].mlp.c_fc.weight
    assert not torch.equal(w, fake_quantize(w, 4))


def test_qat_rejects_bad_arguments():
    model = _tiny_gpt()
    with pytest.raises(ValueError, match="steps"):
        qat_finetune(model, _tokens(), 4, 0, 1e-3, 2, 4, 0)
    with pytest.raises(ValueError, match="lr"):
        qat_finetune(model, _tokens(), 4, 1, float("nan"), 2, 4, 0)
    with pytest.raises(ValueError, match="1-D numpy"):
        qat_finetune(model, [1, 2, 3], 4, 1, 1e-3, 2, 4, 0)


# ---------------------------------------------------------------- bitsandbytes


def test_bnb_unknown_method():
    with pytest.raises(ValueError, match=r"'int3'.*\['int8', 'nf4', 'fp4'\]"):
        load_bnb("/nonexistent", "int3")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    pytest.importorskip("transformers")
    from lab.models import export_hf

    return export_hf(_tiny_gpt(n_embd=64, n_head=4, n_kv_head=2), tmp_path_factory.mktemp("m14") / "export")


@pytest.mark.parametrize("method,max_bits", [("int8", 8.6), ("nf4", 4.6), ("fp4", 4.6)])
def test_bnb_loads_and_bytes_shrink(tiny_export, method, max_bits):
    pytest.importorskip("bitsandbytes")
    from lab.models.hf import load_hf_causal_lm

    hf32 = load_hf_causal_lm(tiny_export)[0]
    q = load_bnb(tiny_export, method)
    full, small = hf_weight_bytes(hf32), hf_weight_bytes(q)
    assert full.n_linears == small.n_linears == 7 and full.weight_bytes == full.float_weight_bytes
    assert small.float_weight_bytes == full.float_weight_bytes
    n = full.float_weight_bytes / 4
    assert 8 * small.weight_bytes / n <= max_bits
    x = torch.randint(0, 11, (1, 8))
    with torch.no_grad():
        a, b = hf32(input_ids=x).logits, q(input_ids=x).logits
        q(input_ids=x)  # int8 moves its row scales to the module state after a forward pass
    assert hf_weight_bytes(q).weight_bytes == small.weight_bytes
    assert (a - b).abs().max() < 0.1 * a.abs().max() + 1e-3
    if method in ("nf4", "fp4"):
        assert getattr(q.model.layers[0].self_attn.q_proj.weight.quant_state, "quant_type", None) == method
