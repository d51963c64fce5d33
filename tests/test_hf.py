"""lab.models.hf: exact export of lab GPTs to Hugging Face, and loading HF causal LMs offline."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable: never try one

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lab.models import GPT, GPTConfig  # noqa: E402
from lab.models.hf import (  # noqa: E402
    ModelUnavailableError,
    export_hf,
    load_hf_causal_lm,
    load_lab_from_hf,
)

TINY = dict(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64)
HAS_LLAMA_FIELDS = all(name in GPTConfig.__dataclass_fields__ for name in ("n_kv_head", "pos", "norm", "mlp"))
needs_llama = pytest.mark.skipif(
    not HAS_LLAMA_FIELDS, reason="GPTConfig has no n_kv_head/pos/norm/mlp fields yet (Llama-style GPT)"
)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)


def make_model(seed=0, jitter=0.05, **overrides) -> GPT:
    """A tiny eval-mode GPT whose every parameter (biases and norm weights too) is non-trivial."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model


def tokens(seed=1, B=2, T=32):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(path, x):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return hf, hf(x).logits


def lab_logits(model, x):
    with torch.no_grad():
        return model(x)[0]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.delenv("LAB_HF_ALLOW_DOWNLOAD", raising=False)


# ---------------------------------------------------------------- GPT-2 export


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_style_export_gives_identical_logits(tmp_path, bias, tie):
    model = make_model(bias=bias, tie_weights=tie)
    path = export_hf(model, tmp_path / "export")
    assert path == tmp_path / "export"
    assert {"config.json", "model.safetensors", "lab_config.json"} <= set(os.listdir(path))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert config["activation_function"] == "gelu"  # exact GELU, not GPT-2's tanh "gelu_new"
    assert config["tie_word_embeddings"] is tie
    assert GPTConfig.from_dict(json.loads((path / "lab_config.json").read_text())) == model.config

    x = tokens()
    hf, logits = hf_logits(path, x)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(logits, lab_logits(model, x), atol=1e-5, rtol=0)
    if not bias:  # GPT-2 always has biases: they are exported as exact zeros
        assert all(not bool(p.any()) for n, p in hf.named_parameters() if n.endswith(".bias"))


def test_gpt2_export_round_trips_to_the_lab(tmp_path):
    model = make_model(bias=False)
    path = export_hf(model, tmp_path / "export")
    back = load_lab_from_hf(path)
    assert back.config == model.config
    x = tokens()
    torch.testing.assert_close(lab_logits(back, x), lab_logits(model, x), atol=0, rtol=0)

    # without lab_config.json the GPTConfig comes from config.json (biases become explicit zeros)
    (path / "lab_config.json").unlink()
    derived = load_lab_from_hf(path)
    assert derived.config.bias is True and derived.config.n_layer == model.config.n_layer
    torch.testing.assert_close(lab_logits(derived, x), lab_logits(model, x), atol=1e-6, rtol=0)


def test_export_in_bfloat16_stores_bfloat16(tmp_path):
    from safetensors import safe_open

    model = make_model()
    path = export_hf(model, tmp_path / "export", dtype=torch.bfloat16)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    x = tokens()
    _, logits = hf_logits(path, x)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - lab_logits(model, x)).abs().mean() < 0.05


# ---------------------------------------------------------------- Llama export


@needs_llama
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # MHA
        dict(n_kv_head=2),  # GQA
        dict(n_kv_head=1),  # MQA
        dict(n_kv_head=2, tie_weights=False),
        dict(bias=True),  # attention_bias and mlp_bias
        dict(rope_theta=500.0, norm_eps=1e-6, mlp_hidden=100),
    ],
    ids=["mha", "gqa", "mqa", "gqa-untied", "bias", "theta-eps-hidden"],
)
def test_llama_style_export_gives_identical_logits(tmp_path, overrides):
    model = make_model(**{**LLAMA, **overrides})
    path = export_hf(model, tmp_path / "export")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] == model.config.kv_heads
    assert config["rope_parameters"]["rope_theta"] == model.config.rope_theta

    x = tokens()
    hf, logits = hf_logits(path, x)
    assert type(hf).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits, lab_logits(model, x), atol=1e-5, rtol=0)

    back = load_lab_from_hf(path)
    assert back.config == model.config
    (path / "lab_config.json").unlink()
    assert load_lab_from_hf(path).config == model.config  # derived from config.json alone


@needs_llama
def test_sliding_window_llama_style_exports_to_mistral(tmp_path):
    model = make_model(**LLAMA, n_kv_head=2, sliding_window=5)
    path = export_hf(model, tmp_path / "export")
    x = tokens()
    hf, logits = hf_logits(path, x)
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == 5
    torch.testing.assert_close(logits, lab_logits(model, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- unsupported, atomic


@needs_llama
@pytest.mark.parametrize(
    "overrides, names",
    [
        (dict(pos="rope"), ["pos='rope'", "norm='layernorm'", "mlp='gelu'"]),
        (dict(n_kv_head=2), ["n_kv_head=2"]),
        (dict(LLAMA, pos="none"), ["pos='none'"]),
        (dict(LLAMA, bias=True, sliding_window=4), ["bias=True", "sliding_window=4"]),
    ],
)
def test_unsupported_combination_raises_naming_components(tmp_path, overrides, names):
    model = make_model(**overrides)
    with pytest.raises(ValueError, match="no supported architecture expresses it exactly") as err:
        export_hf(model, tmp_path / "export")
    for name in names:
        assert name in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_config_field_is_refused(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class FutureConfig(GPTConfig):
        qk_norm: bool = False

    model = GPT(FutureConfig(**TINY, qk_norm=True))
    with pytest.raises(ValueError, match=r"qk_norm=True"):
        export_hf(model, tmp_path / "export")


def test_export_replaces_an_earlier_export_and_leaves_no_temp_dirs(tmp_path):
    first, second = make_model(seed=0), make_model(seed=1)
    path = export_hf(first, tmp_path / "export")
    export_hf(second, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    x = tokens()
    _, logits = hf_logits(path, x)
    torch.testing.assert_close(logits, lab_logits(second, x), atol=1e-5, rtol=0)


def test_failed_export_leaves_the_earlier_export_untouched(tmp_path, monkeypatch):
    path = export_hf(make_model(seed=0), tmp_path / "export")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def boom(self, *args, **kwargs):
        (args[0] / "model.safetensors").write_bytes(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        export_hf(make_model(seed=1), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(ValueError, match="refusing to replace"):
        export_hf(make_model(), precious)
    assert (precious / "thesis.txt").read_text() == "do not delete"


# ---------------------------------------------------------------- load_hf_causal_lm


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    model = make_model()
    return model, export_hf(model, tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    if not HAS_LLAMA_FIELDS:
        pytest.skip("GPTConfig has no n_kv_head/pos/norm/mlp fields yet (Llama-style GPT)")
    # default init scale: logits of a realistic size for the quantization checks
    model = make_model(jitter=0.0, **LLAMA, n_kv_head=2)
    return model, export_hf(model, tmp_path_factory.mktemp("hf") / "llama")


def test_load_local_path_without_tokenizer(gpt2_export):
    model, path = gpt2_export
    hf, tok = load_hf_causal_lm(path)
    assert tok is None and not hf.training
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lab_logits(model, x), atol=1e-5, rtol=0)


def test_load_local_path_returns_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = export_hf(make_model(), tmp_path / "export")
    vocab = {f"w{i}": i for i in range(TINY["vocab_size"] - 1)} | {"[UNK]": TINY["vocab_size"] - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(path)
    _, tok = load_hf_causal_lm(str(path))
    assert tok is not None and tok("w3 w7")["input_ids"] == [3, 7]


def test_unknown_hub_id_offline_raises_model_unavailable():
    name = "lab-tests/no-such-model-anywhere"
    with pytest.raises(ModelUnavailableError) as err:
        load_hf_causal_lm(name)
    msg = str(err.value)
    assert name in msg
    assert "no model hub is reachable" in msg and "local Hugging Face cache" in msg
    assert "local directory" in msg and "HF_HOME" in msg and "LAB_HF_ALLOW_DOWNLOAD" in msg
    assert isinstance(err.value, RuntimeError)


def test_missing_local_directory_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_hf_causal_lm(str(tmp_path / "nope" / "model"))


@pytest.mark.parametrize("bad", ["4-bit", "int8", 4, "fp16"])
def test_bad_quantization_value_lists_allowed_values(gpt2_export, bad):
    with pytest.raises(ValueError, match=r"quantization must be one of \[None, '8bit', '4bit'\]"):
        load_hf_causal_lm(gpt2_export[1], quantization=bad)


def test_missing_bitsandbytes_is_a_clear_error(gpt2_export, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        load_hf_causal_lm(gpt2_export[1], quantization="4bit")


def _close_enough(quantized, reference):
    corr = torch.corrcoef(torch.stack([quantized.flatten(), reference.flatten()]))[0, 1]
    rel = (quantized - reference).abs().mean() / reference.abs().mean()
    return corr.item(), rel.item()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_bitsandbytes_quantized_load_on_cpu(llama_export, quantization):
    pytest.importorskip("bitsandbytes")
    model, path = llama_export
    hf, _ = load_hf_causal_lm(path, quantization=quantization)
    layer = hf.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[quantization]
    if quantization == "4bit":
        assert layer.weight.quant_state.quant_type == "nf4"
    x = tokens()
    with torch.no_grad():
        logits = hf(x).logits.float()
    corr, rel = _close_enough(logits, lab_logits(model, x))
    assert corr > 0.99 and rel < 0.2, (corr, rel)


# ---------------------------------------------------------------- generate


def _greedy_both(model, path, prompt_len=8, new=16):
    prompt = tokens(seed=3, B=2, T=prompt_len)
    lab = model.generate(prompt, new, temperature=0)
    hf, _ = load_hf_causal_lm(path)
    out = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return lab, out


def test_hf_greedy_generate_matches_lab_gpt2(gpt2_export):
    lab, hf = _greedy_both(*gpt2_export)
    assert torch.equal(lab, hf)


@needs_llama
def test_hf_greedy_generate_matches_lab_llama(llama_export):
    lab, hf = _greedy_both(*llama_export)
    assert torch.equal(lab, hf)


@needs_llama
def test_hf_greedy_generate_matches_lab_sliding_window_past_block_size(tmp_path):
    model = make_model(**LLAMA, n_kv_head=2, sliding_window=6, block_size=16)
    path = export_hf(model, tmp_path / "export")
    lab, hf = _greedy_both(model, path, prompt_len=8, new=24)  # 32 tokens > block_size 16
    assert torch.equal(lab, hf)
