"""The lab's hook values against an interpretability library's: nnsight reads the same
points (lab.inspect.nnsight_side.NNSIGHT_NAMES) from the Hugging Face exports of the lab GPT
(GPT-2 and Llama layouts, GQA included) and from MiniLM, and every value equals what
lab.inspect.run_with_cache gives for the same weights and input."""

import pytest
import torch

from lab.inspect import run_with_cache
from lab.inspect.nnsight_side import NNSIGHT_NAMES, family, lab_head_outputs, nnsight_values
from lab.models import GPT, GPTConfig, export_hf

pytest.importorskip("nnsight")

ATOL = 1e-5  # float32; the lab GPT and its export order some sums differently
POINTS = [
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "hook_attn_out",
    "attn.hook_pattern",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
]
LAB_POINTS = [p for p in POINTS if p != "attn.hook_z"]


def _lab_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=24, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


LAYOUTS = {
    "gpt2": {},
    "llama-gqa": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
}


def _compare(lab_cache, lib, n_layers, *, final=True):
    for i in range(n_layers):
        for p in LAB_POINTS:
            name = f"blocks.{i}.{p}"
            torch.testing.assert_close(lib[name], lab_cache[name], atol=ATOL, rtol=0, msg=name)
        z = lab_head_outputs(lab_cache[f"blocks.{i}.attn.hook_pattern"], lab_cache[f"blocks.{i}.attn.hook_v"])
        torch.testing.assert_close(lib[f"blocks.{i}.attn.hook_z"], z, atol=ATOL, rtol=0, msg=f"blocks.{i}.attn.hook_z")
    if final:
        torch.testing.assert_close(
            lib["ln_final.hook_normalized"], lab_cache["ln_final.hook_normalized"], atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lab_hooks_equal_nnsights_on_the_hf_export(layout, tmp_path):
    from lab.models.hf import load_hf_causal_lm

    model = _lab_gpt(**LAYOUTS[layout])
    hf = load_hf_causal_lm(export_hf(model, tmp_path / "export"))[0]
    assert family(hf) == ("gpt2" if layout == "gpt2" else "llama")
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    _, lab_cache = run_with_cache(model, idx, [f"blocks.*.{p}" for p in LAB_POINTS] + ["ln_final.hook_normalized"])
    lib = nnsight_values(hf, idx, [*POINTS, "ln_final.hook_normalized"])
    _compare(lab_cache, lib, 2)
    assert hf.config._attn_implementation != "eager" or layout  # restored to what it was


def test_lab_hooks_equal_nnsights_on_minilm():
    from lab.inspect.pretrained import load_minilm

    model, tok = load_minilm()
    enc = tok(
        ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question."],
        padding=True,
        return_tensors="pt",
    )
    _, lab_cache = run_with_cache(
        model, enc["input_ids"], [f"blocks.*.{p}" for p in LAB_POINTS], attention_mask=enc["attention_mask"]
    )
    lib = nnsight_values(model, enc["input_ids"], POINTS, attention_mask=enc["attention_mask"])
    _compare(lab_cache, lib, model.config.num_hidden_layers, final=False)


def test_every_lab_point_has_an_nnsight_name_and_unknown_points_are_refused(tmp_path):
    from lab.inspect import POINTS as LAB

    for fam, table in NNSIGHT_NAMES.items():
        missing = [p for p in LAB if p not in table and not (fam == "gpt2" and p[-1] in "qkv")]
        assert missing == [], (fam, missing)
    with pytest.raises(ValueError, match="no nnsight mapping for a GPT"):
        family(_lab_gpt())
    from lab.models.hf import load_hf_causal_lm

    hf = load_hf_causal_lm(export_hf(_lab_gpt(), tmp_path / "e"))[0]
    with pytest.raises(ValueError, match="hook_foo"):
        nnsight_values(hf, torch.zeros(1, 4, dtype=torch.long), ["hook_foo"])


# ----------------------------------------------------------------- the mapping table


def test_the_inspection_guide_carries_the_mapping_table():
    """docs/guide/inspect.md shows mapping_table() as it is: the names come from the code."""
    from pathlib import Path

    from lab.inspect.nnsight_side import TRANSFORMERLENS_NAMES, mapping_table

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "inspect.md").read_text()
    assert mapping_table() in guide, (
        "regenerate the table: python -c 'from lab.inspect.nnsight_side import *; print(mapping_table())'"
    )
    assert TRANSFORMERLENS_NAMES["gpt2"] == TRANSFORMERLENS_NAMES["llama"]  # one column for the decoders
    for fam, names in TRANSFORMERLENS_NAMES.items():
        assert set(names) == set(NNSIGHT_NAMES[fam]) - {"attn.hook_qkv"} | (
            {"attn.hook_q", "attn.hook_k", "attn.hook_v"} if fam == "gpt2" else set()
        )


TL_REASON = "TransformerLens is an optional extra: pip install -e '.[transformerlens]' -c constraints.txt"


def _tl_bridge(hf, path, tokenizer):
    tl = pytest.importorskip("transformer_lens", reason=TL_REASON)
    return tl.TransformerBridge.boot_transformers(str(path), hf_model=hf, device="cpu", tokenizer=tokenizer)


def _compare_tl(lab_cache, tl_cache, fam, n_layers, *, final=True):
    from lab.inspect.nnsight_side import TRANSFORMERLENS_NAMES

    names = TRANSFORMERLENS_NAMES[fam]
    for i in range(n_layers):
        for p in LAB_POINTS:
            got = tl_cache[names[p].format(i=i)]
            torch.testing.assert_close(got, lab_cache[f"blocks.{i}.{p}"], atol=ATOL, rtol=0, msg=f"{p} vs {names[p]}")
        z = lab_head_outputs(lab_cache[f"blocks.{i}.attn.hook_pattern"], lab_cache[f"blocks.{i}.attn.hook_v"])
        torch.testing.assert_close(tl_cache[names["attn.hook_z"].format(i=i)], z, atol=ATOL, rtol=0)
    if final:
        torch.testing.assert_close(tl_cache[names["ln_final.hook_normalized"]], lab_cache["ln_final.hook_normalized"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformerlens_names_read_the_labs_values_on_the_hf_export(layout, tmp_path):
    """TransformerLens 4's TransformerBridge over the export: at the name the table gives, the
    value the lab's hook point holds."""
    from lab.data import load_corpus
    from lab.models.hf import load_hf_causal_lm
    from lab.tokenizers.char import CharTokenizer

    # the bridge probes the tokenizer with text of its own: Shakespeare's alphabet covers it
    tok = CharTokenizer.from_text(load_corpus("tinyshakespeare"))
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=4, n_embd=32, **LAYOUTS[layout])
    model = GPT(config).eval()
    path = export_hf(model, tmp_path / "export", tokenizer=tok)
    hf = load_hf_causal_lm(path)[0]
    bridge = _tl_bridge(hf, path, None)
    idx = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    _, lab_cache = run_with_cache(model, idx, [f"blocks.*.{p}" for p in LAB_POINTS] + ["ln_final.hook_normalized"])
    _, tl_cache = bridge.run_with_cache(idx)
    _compare_tl(lab_cache, tl_cache, family(hf), 2)


def test_transformerlens_names_read_the_labs_values_on_minilm():
    """The BERT column: TransformerLens' bridge wants a BertForMaskedLM, so MiniLM's encoder
    goes into one (the untrained MLM head reads nothing the hooks hold)."""
    from transformers import BertForMaskedLM

    from lab.inspect.pretrained import load_minilm, minilm_path

    model, tok = load_minilm()
    mlm = BertForMaskedLM(model.config).eval()
    missing, unexpected = mlm.bert.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("pooler.") for k in unexpected)  # the MLM model has no pooler
    bridge = _tl_bridge(mlm, minilm_path(), tok)
    enc = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    _, lab_cache = run_with_cache(model, enc["input_ids"], [f"blocks.*.{p}" for p in LAB_POINTS])
    _, tl_cache = bridge.run_with_cache(enc["input_ids"])
    _compare_tl(lab_cache, tl_cache, "bert", model.config.num_hidden_layers, final=False)
