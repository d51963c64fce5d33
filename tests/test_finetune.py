"""Fine-tuning through transformers + peft (+ bitsandbytes): configs, errors, caching,
adapters, QLoRA, and the HF tokenizer bridge. Tiny models; seconds."""

import importlib.util
import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lab.data import load_corpus, prepare  # noqa: E402
from lab.finetune import (  # noqa: E402
    FinetuneConfig,
    FinetuneResult,
    base_hash,
    check_targets,
    finetune,
    hf_loss,
    linear_module_names,
    load_base,
    load_finetuned,
    prepare_model,
    retokenize,
)
from lab.models import GPT, GPTConfig, export_hf  # noqa: E402
from lab.models.hf import ModelUnavailableError, resolve_hf_checkpoint  # noqa: E402
from lab.tokenizers import get_tokenizer  # noqa: E402

SHAKESPEARE = load_corpus("tinyshakespeare")
TOK = get_tokenizer("char", text=SHAKESPEARE)
OLD = prepare(text=SHAKESPEARE[:30_000], tokenizer=TOK)
NEW = prepare(text=SHAKESPEARE[-30_000:].upper(), tokenizer=TOK)  # a "new style": capitals only
TINY = dict(steps=6, batch_size=4, block_size=16, eval_interval=3, eval_batches=2, lr=1e-2)


def _export(path, seed=0):
    config = GPTConfig(
        vocab_size=TOK.vocab_size,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_embd=32,
        n_kv_head=2,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
    )
    torch.manual_seed(seed)
    export_hf(GPT(config), path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("base") / "hf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -4}, "rank"),
        ({"method": "prefix"}, "method"),
        ({"lr": 0}, "lr"),
        ({"replay_fraction": 1.0}, "replay_fraction"),
        ({"target_modules": ()}, "target_modules"),
        ({"target_modules": ["q_proj"]}, "target_modules"),
        ({"steps": 0}, "steps"),
    ],
)
def test_config_rejects_bad_values_naming_them(changes, field):
    with pytest.raises(ValueError, match=rf"FinetuneConfig\.{field} must be"):
        FinetuneConfig(**changes)


def test_unknown_target_modules_list_the_names_that_exist(base):
    model = load_base(base, "lora")
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(
        linear_module_names(model)
    )
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no Linear layer.*'q_proj'"):
        check_targets(model, ("q_proj", "c_attn"))
    with pytest.raises(ValueError, match="c_attn"):
        prepare_model(base, FinetuneConfig(target_modules=("c_attn",)))


def test_lora_trains_only_adapters_and_is_cached(base, cache):
    cfg = FinetuneConfig(method="lora", rank=4, **TINY)
    result = finetune(base, NEW, OLD, cfg, progress=False)
    assert [e["step"] for e in result.evals] == [0, 3, 6]
    assert result.evals[-1]["new_val"] < result.evals[0]["new_val"]
    assert 0 < result.trainable_params < result.total_params
    # LoRA A (r x d_in) and B (d_out x r) for q, k, v, o in 2 layers (k, v project to 2 KV heads of 8)
    assert result.trainable_params == 2 * (4 * (32 + 32) + 4 * (32 + 16) * 2 + 4 * (32 + 32))
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((result.run_dir / "result.json").read_text())["key"] == result.key
    again = finetune(base, NEW, OLD, cfg, progress=False)  # from the cache, no training
    assert again.evals == result.evals and again.key == result.key
    layers = result.layer_stats[-1]["layers"]
    assert sorted(layers) == ["0", "1"] and all({"adam_m", "adam_v", "delta"} <= set(v) for v in layers.values())
    assert result.layer_stats[0]["layers"]["0"]["delta"] == 0.0  # B starts at zero

    model = load_finetuned(result)
    kw = dict(block_size=16, batch_size=4, n_batches=2)
    assert hf_loss(model, NEW.val, **kw) == pytest.approx(result.final["new_val"], abs=1e-5)
    merged = load_finetuned(result, merge=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert hf_loss(merged, NEW.val, **kw) == pytest.approx(result.final["new_val"], abs=1e-4)


def test_a_different_config_is_a_different_run(base, cache):
    a = finetune(base, NEW, OLD, FinetuneConfig(rank=4, **TINY), progress=False)
    b = finetune(base, NEW, OLD, FinetuneConfig(rank=4, **{**TINY, "seed": 1}), progress=False)
    c = finetune(base, NEW, OLD, FinetuneConfig(rank=4, replay_fraction=0.5, **TINY), progress=False)
    assert len({a.key, b.key, c.key}) == 3
    assert a.history != b.history and a.history != c.history


def test_an_adapter_is_refused_on_another_base(base, cache, tmp_path):
    result = finetune(base, NEW, OLD, FinetuneConfig(rank=4, **TINY), progress=False)
    other = _export(tmp_path / "other", seed=1)
    assert base_hash(other) != result.base_hash
    with pytest.raises(ValueError, match=rf"trained on base {result.base_hash}"):
        load_finetuned(result, base_dir=other)


def test_full_finetuning_trains_everything(base, cache):
    result = finetune(base, NEW, OLD, FinetuneConfig(method="full", **TINY), progress=False)
    assert result.trainable_params == result.total_params
    assert result.layer_stats[-1]["layers"]["1"]["delta"] > 0
    model = load_finetuned(result)
    assert hf_loss(model, NEW.val, block_size=16, batch_size=4, n_batches=2) == pytest.approx(
        result.final["new_val"], abs=1e-5
    )


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_qlora_uses_a_4bit_base(base, cache):
    lora = finetune(base, NEW, OLD, FinetuneConfig(method="lora", rank=4, **TINY), progress=False)
    qlora = finetune(base, NEW, OLD, FinetuneConfig(method="qlora", rank=4, **TINY), progress=False)
    assert qlora.base_weight_bytes < 0.6 * lora.base_weight_bytes
    assert qlora.trainable_params == lora.trainable_params
    assert qlora.final["new_val"] < qlora.evals[0]["new_val"]
    model = load_finetuned(qlora)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())


def test_4bit_without_bitsandbytes_is_a_clear_error(base, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ImportError, match="bitsandbytes"):
        prepare_model(base, FinetuneConfig(method="qlora"))


def test_divergence_is_recorded_not_raised(base, cache):
    result = finetune(
        base, NEW, OLD, FinetuneConfig(method="full", grad_clip=0.0, **{**TINY, "lr": 1e12}), progress=False
    )
    assert result.diverged
    assert result.history[-1]["step"] <= TINY["steps"]


def test_result_round_trips_through_json(base, cache):
    result = finetune(base, NEW, OLD, FinetuneConfig(rank=4, **TINY), progress=False)
    again = FinetuneResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result


def test_retokenize_drops_unknown_characters():
    text, dropped = retokenize("Of Man's first disobedience [1] (2)", TOK)
    assert text == "Of Man's first disobedience  " and dropped == 6


def test_resolve_hf_checkpoint(base, tmp_path, monkeypatch):
    path, tokenizer = resolve_hf_checkpoint(base)
    assert path == base and tokenizer is None  # a lab export carries no tokenizer
    with pytest.raises(FileNotFoundError):
        resolve_hf_checkpoint(tmp_path / "nothing" / "here")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("LAB_HF_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelUnavailableError, match="not available"):
        resolve_hf_checkpoint("nobody/no-such-model")


def test_hf_tokenizer_bridge_encodes_corpora(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lab.tokenizers.hf import HFTokenizer

    chars = sorted(set(SHAKESPEARE))
    raw = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=raw)
    tok = HFTokenizer(fast, "char-test")
    assert tok.vocab_size == len(chars) and tok.name == "hf:char-test"
    ids = tok.encode("First Citizen:")
    assert ids == TOK.encode("First Citizen:")
    assert tok.identity == HFTokenizer(fast, "char-test").identity
    data = prepare(text=SHAKESPEARE[:5000], tokenizer=tok)
    assert data.train.max() < tok.vocab_size
    with pytest.raises(ValueError, match="transformers tokenizer"):
        HFTokenizer(object(), "x")


def test_interleave_for_split_takes_every_tenth_chunk():
    from lab.data import interleave_for_split, split_text

    text = "".join(f"{i:03d}" * 10 for i in range(100))  # 100 chunks of 30 chars
    reordered, fraction = interleave_for_split(text, chunk=30, every=10)
    train, val = split_text(reordered, fraction)
    assert val == "".join(text[i * 30 : (i + 1) * 30] for i in range(9, 100, 10))
    assert sorted(train + val) == sorted(text) and len(val) == 300
    with pytest.raises(ValueError, match="too few"):
        interleave_for_split("abc", chunk=30, every=10)
    with pytest.raises(ValueError, match="every must be"):
        interleave_for_split(text, every=1)
