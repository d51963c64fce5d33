"""Bridge to Hugging Face transformers: export a lab GPT, load any causal LM.

`export_hf` writes a lab `GPT` as a standard Hugging Face checkpoint directory
(`config.json` + `model.safetensors`, plus `lab_config.json` with the lab
`GPTConfig`, and the tokenizer as `tokenizer.json` when it is given) in
whichever stock architecture computes *exactly* the same function:

* GPT-2 layout (learned positions, LayerNorm, GELU MLP, multi-head attention)
  -> `GPT2LMHeadModel`, with `activation_function="gelu"` (exact erf GELU,
  not GPT-2's tanh `gelu_new`). Weights are transposed into GPT-2's Conv1D
  layout; a model without biases gets exact zero biases.
* Llama layout (RoPE, RMSNorm, SwiGLU, any number of KV heads)
  -> `LlamaForCausalLM` (`attention_bias`/`mlp_bias` follow the lab `bias`).
  With a sliding window (and no biases) -> `MistralForCausalLM`.

Anything else raises `ValueError` naming the parts no supported architecture
expresses. `load_lab_from_hf` is the inverse. `load_hf_causal_lm` loads any
causal LM (local directory or hub id, offline first), optionally quantized to
8 or 4 bits with bitsandbytes.

transformers is imported lazily, so `lab.models` works without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lab.models.config import GPTConfig
from lab.models.gpt import GPT

__all__ = [
    "ModelUnavailableError",
    "export_hf",
    "load_hf_causal_lm",
    "load_lab_from_hf",
]

LAB_CONFIG_NAME = "lab_config.json"
ALLOW_DOWNLOAD_ENV = "LAB_HF_ALLOW_DOWNLOAD"
QUANTIZATIONS = (None, "8bit", "4bit")

# GPTConfig fields this module understands, with the value that keeps the
# original GPT-2 model. A field outside this table whose value differs from its
# dataclass default changes the model in a way the exporter can't know about.
_KNOWN_FIELDS = {
    "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "tie_weights",
    "n_kv_head", "pos", "rope_theta", "norm", "norm_eps", "mlp", "mlp_hidden", "sliding_window",
    # initialisation only; and MoE settings that do nothing unless n_expert (not known) is set
    "init_std", "moe_top_k", "moe_aux_weight",
}  # fmt: skip


class ModelUnavailableError(RuntimeError):
    """A model id could not be resolved to local files (no hub is reachable)."""


# ------------------------------------------------------------------ config view


def _spec(config: GPTConfig) -> dict:
    """The architecture-relevant settings of a GPTConfig, defaults filled in."""
    n_kv = getattr(config, "n_kv_head", None)
    mlp = getattr(config, "mlp", "gelu")
    return {
        "pos": getattr(config, "pos", "learned"),
        "norm": getattr(config, "norm", "layernorm"),
        "norm_eps": float(getattr(config, "norm_eps", 1e-5)),
        "mlp": mlp,
        "n_kv_head": config.n_head if n_kv is None else n_kv,
        "rope_theta": float(getattr(config, "rope_theta", 10000.0)),
        "sliding_window": getattr(config, "sliding_window", None),
        "head_dim": config.n_embd // config.n_head,
    }


def _unknown_fields(config: GPTConfig) -> list[str]:
    out = []
    for f in dataclasses.fields(config):
        if f.name in _KNOWN_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if getattr(config, f.name) != default:
            out.append(f"{f.name}={getattr(config, f.name)!r}")
    return out


def _choose_arch(config: GPTConfig) -> str:
    """'gpt2', 'llama' or 'mistral'; ValueError naming what nothing expresses."""
    s = _spec(config)
    unknown = _unknown_fields(config)
    if unknown:
        raise ValueError(
            f"cannot export to Hugging Face: GPTConfig field(s) {', '.join(unknown)} are not "
            "known to lab.models.hf, so no exact mapping to a Hugging Face architecture exists"
        )
    gpt2_needs = {
        "pos": (s["pos"] == "learned", "'learned'"),
        "norm": (s["norm"] == "layernorm", "'layernorm'"),
        "mlp": (s["mlp"] == "gelu", "'gelu'"),
        "n_kv_head": (s["n_kv_head"] == config.n_head, f"n_head ({config.n_head}), i.e. no GQA/MQA"),
        "sliding_window": (s["sliding_window"] is None, "None"),
    }
    llama_needs = {
        "pos": (s["pos"] == "rope", "'rope'"),
        "norm": (s["norm"] == "rmsnorm", "'rmsnorm'"),
        "mlp": (s["mlp"] == "swiglu", "'swiglu'"),
    }
    gpt2_bad = [k for k, (ok, _) in gpt2_needs.items() if not ok]
    llama_bad = [k for k, (ok, _) in llama_needs.items() if not ok]
    if not gpt2_bad:
        return "gpt2"
    if not llama_bad:
        if s["sliding_window"] is None:
            return "llama"
        if not config.bias:
            return "mistral"

    def describe(bad, needs):
        return ", ".join(f"{k}={s[k]!r} (needs {needs[k][1]})" for k in bad)

    llama_why = (
        describe(llama_bad, llama_needs)
        if llama_bad
        else f"bias=True with sliding_window={s['sliding_window']!r} (MistralForCausalLM, the "
        "sliding-window form of Llama, has no biases)"
    )
    name = config.describe() if hasattr(config, "describe") else "this model"
    raise ValueError(
        f"cannot export {name} to Hugging Face: no supported architecture expresses it exactly. "
        f"For GPT2LMHeadModel these components don't fit: {describe(gpt2_bad, gpt2_needs)}. "
        f"For LlamaForCausalLM/MistralForCausalLM: {llama_why}."
    )


def _mlp_hidden(model: GPT) -> int:
    out = model.blocks[0].mlp.c_fc.weight.shape[0]
    return out // 2 if _spec(model.config)["mlp"] == "swiglu" else out


def _hf_config(model: GPT, arch: str):
    import transformers

    c, s = model.config, _spec(model.config)
    common = dict(
        vocab_size=c.vocab_size,
        tie_word_embeddings=c.tie_weights,
        bos_token_id=None,  # the lab has no special tokens: never stop generate() early
        eos_token_id=None,
        pad_token_id=None,
    )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=_mlp_hidden(model),
            activation_function="gelu",  # exact erf GELU (nn.GELU()), not "gelu_new"
            layer_norm_epsilon=s["norm_eps"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            **common,
        )
    kwargs = dict(
        hidden_size=c.n_embd,
        intermediate_size=_mlp_hidden(model),
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=s["n_kv_head"],
        head_dim=s["head_dim"],
        max_position_embeddings=c.block_size,
        rms_norm_eps=s["norm_eps"],
        # transformers 5: rope_theta lives in rope_parameters
        rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]},
        hidden_act="silu",
        attention_dropout=0.0,
        **common,
    )
    if arch == "llama":
        return transformers.LlamaConfig(attention_bias=c.bias, mlp_bias=c.bias, pretraining_tp=1, **kwargs)
    return transformers.MistralConfig(sliding_window=s["sliding_window"], **kwargs)


# ------------------------------------------------------------------ weight maps


def _gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    lab = dict(model.state_dict())
    used: set[str] = set()

    def take(name):
        used.add(name)
        return lab[name]

    def bias_or_zeros(name, n):
        if name in lab:
            return take(name)
        return torch.zeros(n, dtype=model.wte.weight.dtype)

    sd = {"transformer.wte.weight": take("wte.weight"), "transformer.wpe.weight": take("wpe.weight")}
    for i in range(model.config.n_layer):
        lp, hp = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            w = take(lp + ln + ".weight")
            sd[hp + ln + ".weight"] = w
            sd[hp + ln + ".bias"] = bias_or_zeros(lp + ln + ".bias", w.shape[0])
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = take(lp + lin + ".weight")  # nn.Linear (out, in) -> Conv1D (in, out)
            sd[hp + lin + ".weight"] = w.t().contiguous()
            sd[hp + lin + ".bias"] = bias_or_zeros(lp + lin + ".bias", w.shape[0])
    sd["transformer.ln_f.weight"] = take("ln_f.weight")
    sd["transformer.ln_f.bias"] = bias_or_zeros("ln_f.bias", model.config.n_embd)
    sd["lm_head.weight"] = take("lm_head.weight")
    _check_all_used(lab, used)
    return sd


def _llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    lab = dict(model.state_dict())
    c, s = model.config, _spec(model.config)
    used: set[str] = set()

    def take(name):
        used.add(name)
        return lab[name]

    q_n = c.n_head * s["head_dim"]
    kv_n = s["n_kv_head"] * s["head_dim"]
    hidden = _mlp_hidden(model)
    sd = {"model.embed_tokens.weight": take("wte.weight")}
    for i in range(c.n_layer):
        lp, hp = f"blocks.{i}.", f"model.layers.{i}."
        sd[hp + "input_layernorm.weight"] = take(lp + "ln_1.weight")
        sd[hp + "post_attention_layernorm.weight"] = take(lp + "ln_2.weight")
        suffixes = ("weight", "bias") if c.bias else ("weight",)
        for suf in suffixes:
            qkv = take(f"{lp}attn.c_attn.{suf}")
            if qkv.shape[0] != q_n + 2 * kv_n:
                raise ValueError(
                    f"blocks.{i}.attn.c_attn has {qkv.shape[0]} outputs; expected "
                    f"{q_n} (q) + 2 x {kv_n} (k, v) for the [q | k | v] layout"
                )
            q, k, v = qkv.split([q_n, kv_n, kv_n], dim=0)
            sd[f"{hp}self_attn.q_proj.{suf}"] = q.contiguous()
            sd[f"{hp}self_attn.k_proj.{suf}"] = k.contiguous()
            sd[f"{hp}self_attn.v_proj.{suf}"] = v.contiguous()
            sd[f"{hp}self_attn.o_proj.{suf}"] = take(f"{lp}attn.c_proj.{suf}")
            gate, up = take(f"{lp}mlp.c_fc.{suf}").split([hidden, hidden], dim=0)  # [gate | up]
            sd[f"{hp}mlp.gate_proj.{suf}"] = gate.contiguous()
            sd[f"{hp}mlp.up_proj.{suf}"] = up.contiguous()
            sd[f"{hp}mlp.down_proj.{suf}"] = take(f"{lp}mlp.c_proj.{suf}")
    sd["model.norm.weight"] = take("ln_f.weight")
    sd["lm_head.weight"] = take("lm_head.weight")
    _check_all_used(lab, used)
    return sd


def _check_all_used(lab: dict, used: set[str]) -> None:
    left = sorted(k for k in lab if k not in used)
    if left:
        raise ValueError(
            f"cannot export to Hugging Face: lab parameter(s)/buffer(s) {left} have no place in "
            "the target architecture, so the export would not be exact"
        )


def _to_hf_model(model: GPT, dtype=None):
    import transformers

    arch = _choose_arch(model.config)
    hf_config = _hf_config(model, arch)
    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[arch]
    sd = (_gpt2_state_dict if arch == "gpt2" else _llama_state_dict)(model)
    sd = {k: v.detach().to("cpu") for k, v in sd.items()}
    hf = cls(hf_config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # a tied lm_head may be absent from the HF state dict; anything else is a bug
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_weights)]
    if missing or unexpected:
        raise RuntimeError(
            f"internal error mapping lab weights onto {cls.__name__}: missing {missing}, unexpected {unexpected}"
        )
    if model.config.tie_weights:
        hf.tie_weights()
    if dtype is not None:
        hf = hf.to(dtype)
    return hf.eval()


# ------------------------------------------------------------------ export


def _looks_like_export(path: Path) -> bool:
    return path.is_dir() and (
        not any(path.iterdir()) or (path / "config.json").is_file() or (path / LAB_CONFIG_NAME).is_file()
    )


def export_hf(model: GPT, path, *, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face causal-LM checkpoint directory at `path`.

    The directory holds config.json, model.safetensors (via save_pretrained)
    and lab_config.json; with `tokenizer` (the lab's CharTokenizer or BPETokenizer the
    model was trained with) also tokenizer.json and tokenizer_config.json, so
    `AutoTokenizer.from_pretrained(path)` and `pipeline("text-generation", model=path)`
    load the directory as it is (see lab.tokenizers.fast). It is built in a temporary
    sibling and renamed into place, so a failed export leaves any earlier export at
    `path` untouched. `dtype` (e.g. torch.bfloat16) casts the stored weights; default: as is.
    Dropout is a training setting and is exported as 0 (it is kept in lab_config.json).
    Raises ValueError when no supported architecture computes exactly what the model does,
    or when the tokenizer has more ids than the model has rows.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"export_hf expects a lab GPT, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    _choose_arch(model.config)  # fail fast, before touching the filesystem
    hf_tokenizer = None
    if tokenizer is not None:
        from lab.tokenizers.fast import to_hf_tokenizer

        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size} "
                "embedding rows: it was not trained with this tokenizer"
            )
        hf_tokenizer = to_hf_tokenizer(tokenizer)  # ValueError for a tokenizer it cannot convert
        hf_tokenizer.model_max_length = model.config.block_size
    if path.exists() and not _looks_like_export(path):
        raise ValueError(
            f"refusing to replace {path}: it exists and is not an empty directory or an "
            "earlier Hugging Face export (no config.json)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    hf = _to_hf_model(model, dtype)

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        (tmp / LAB_CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if hf_tokenizer is not None:
            hf_tokenizer.save_pretrained(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "export")  # move the previous export aside
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / "export", path)  # put it back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


# ------------------------------------------------------------------ import


def _lab_config_from_hf(hf_config) -> GPTConfig:
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    mt = hf_config.model_type
    if mt == "gpt2":
        if hf_config.activation_function != "gelu":
            raise ValueError(
                f"GPT-2 checkpoint uses activation_function={hf_config.activation_function!r}; "
                "the lab GPT's MLP is exact GELU ('gelu'), so it can't load this exactly"
            )
        if hf_config.scale_attn_by_inverse_layer_idx or hf_config.reorder_and_upcast_attn:
            raise ValueError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, ...) are not supported")
        d = dict(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.n_positions,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            bias=True,
            tie_weights=bool(hf_config.tie_word_embeddings),
        )
        inner = hf_config.n_inner or 4 * hf_config.n_embd
        extra = {"norm_eps": hf_config.layer_norm_epsilon}
        if inner != 4 * hf_config.n_embd:
            extra["mlp_hidden"] = inner
    elif mt in ("llama", "mistral"):
        if "pos" not in names:
            raise ValueError("this lab GPTConfig has no Llama-style options (pos/norm/mlp) yet")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported by the lab GPT")
        if hf_config.hidden_act != "silu":
            raise ValueError(f"hidden_act={hf_config.hidden_act!r}; the lab SwiGLU uses 'silu'")
        bias = bool(getattr(hf_config, "attention_bias", False))
        if bias != bool(getattr(hf_config, "mlp_bias", False)):
            raise ValueError("attention_bias and mlp_bias differ; the lab GPT has one bias switch")
        hd = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if hd * hf_config.num_attention_heads != hf_config.hidden_size:
            raise ValueError("head_dim * num_attention_heads != hidden_size is not supported by the lab GPT")
        d = dict(
            vocab_size=hf_config.vocab_size,
            block_size=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_embd=hf_config.hidden_size,
            bias=bias,
            tie_weights=bool(hf_config.tie_word_embeddings),
        )
        extra = dict(
            n_kv_head=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            pos="rope",
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            norm="rmsnorm",
            norm_eps=hf_config.rms_norm_eps,
            mlp="swiglu",
            mlp_hidden=hf_config.intermediate_size,
            sliding_window=getattr(hf_config, "sliding_window", None) if mt == "mistral" else None,
        )
    else:
        raise ValueError(f"cannot load model_type {mt!r} as a lab GPT; supported: gpt2, llama, mistral")
    if extra.get("n_kv_head") == d["n_head"]:
        extra["n_kv_head"] = None
    for k, v in extra.items():
        if k in names:
            d[k] = v
        elif not (k == "norm_eps" and v == 1e-5):
            raise ValueError(f"this lab GPTConfig has no field {k!r} to hold {v!r}")
    config = GPTConfig(**d)
    if "mlp_hidden" in d and hasattr(config, "mlp_hidden_dim"):
        # None (the default width) when that is what the checkpoint has
        plain = GPTConfig(**{**d, "mlp_hidden": None})
        if plain.mlp_hidden_dim == d["mlp_hidden"]:
            config = plain
    return config


def load_lab_from_hf(path, *, dtype: torch.dtype | None = None) -> GPT:
    """Load a GPT2/Llama/Mistral checkpoint directory (e.g. from export_hf) as a lab GPT.

    Uses lab_config.json when present (it keeps dropout and the exact lab
    options), else derives the GPTConfig from config.json. Returns an eval-mode
    model in float32 unless `dtype` is given.
    """
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory with a Hugging Face checkpoint")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if (path / LAB_CONFIG_NAME).is_file():
        config = GPTConfig.from_dict(json.loads((path / LAB_CONFIG_NAME).read_text()))
    else:
        config = _lab_config_from_hf(hf.config)
    model = GPT(config)
    arch = _choose_arch(config)
    expected = _gpt2_state_dict(model) if arch == "gpt2" else None
    hf_sd = hf.state_dict()
    if config.tie_weights and "lm_head.weight" not in hf_sd:
        hf_sd["lm_head.weight"] = hf.get_input_embeddings().weight
    lab_sd = {}
    lab_keys = set(model.state_dict())
    if arch == "gpt2":
        for k in expected:
            v = hf_sd[k]
            lab_k = k.removeprefix("transformer.")
            if lab_k.startswith("h."):
                lab_k = "blocks." + lab_k[2:]
            if lab_k.endswith(".weight") and lab_k.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc"):
                v = v.t()  # Conv1D (in, out) -> nn.Linear (out, in)
            if lab_k in lab_keys:
                lab_sd[lab_k] = v
            elif bool(v.any()):
                raise ValueError(f"{k} is non-zero but the lab config has bias=False")
    else:
        c = config
        lab_sd["wte.weight"] = hf_sd["model.embed_tokens.weight"]
        lab_sd["ln_f.weight"] = hf_sd["model.norm.weight"]
        lab_sd["lm_head.weight"] = hf_sd["lm_head.weight"]
        for i in range(c.n_layer):
            lp, hp = f"blocks.{i}.", f"model.layers.{i}."
            lab_sd[lp + "ln_1.weight"] = hf_sd[hp + "input_layernorm.weight"]
            lab_sd[lp + "ln_2.weight"] = hf_sd[hp + "post_attention_layernorm.weight"]
            for suf in ("weight", "bias") if c.bias else ("weight",):
                a = f"{hp}self_attn."
                lab_sd[f"{lp}attn.c_attn.{suf}"] = torch.cat(
                    [hf_sd[f"{a}{n}_proj.{suf}"] for n in ("q", "k", "v")], dim=0
                )
                lab_sd[f"{lp}attn.c_proj.{suf}"] = hf_sd[f"{a}o_proj.{suf}"]
                m = f"{hp}mlp."
                lab_sd[f"{lp}mlp.c_fc.{suf}"] = torch.cat(
                    [hf_sd[f"{m}gate_proj.{suf}"], hf_sd[f"{m}up_proj.{suf}"]], dim=0
                )
                lab_sd[f"{lp}mlp.c_proj.{suf}"] = hf_sd[f"{m}down_proj.{suf}"]
    model.load_state_dict(lab_sd, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# ------------------------------------------------------------------ loading any causal LM


def _download_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "") == "1"


def _unavailable(name: str, err: BaseException) -> ModelUnavailableError:
    how = (
        "downloading was allowed but failed"
        if _download_allowed()
        else f"no model hub is reachable from here (offline; set {ALLOW_DOWNLOAD_ENV}=1 to allow downloads)"
    )
    try:
        from huggingface_hub.constants import HF_HUB_CACHE as cache
    except ImportError:  # pragma: no cover
        cache = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return ModelUnavailableError(
        f"model {name!r} is not available: {how}, and it is not in the local Hugging Face cache "
        f"({cache}). Provide it as a local directory "
        "path (e.g. one written by lab.models.hf.export_hf or save_pretrained), or copy its files "
        f"into a Hugging Face cache and point HF_HOME at it. ({type(err).__name__}: {err})"
    )


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
)  # fmt: skip


def portable_4bit(model: torch.nn.Module) -> torch.nn.Module:
    """Keep bitsandbytes' 4-bit layers on their portable CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a faster kernel the
    first time a layer runs in eval mode without gradients. That kernel needs widths
    divisible by 64 (small lab models fail with a reshape error) and rounds the block
    scales to bfloat16, so the same weights would give different numbers on different
    machines. Returns the model."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_hf_causal_lm(
    name_or_path,
    *,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """Load a Hugging Face causal LM; returns (model in eval mode, tokenizer or None).

    `name_or_path` is a local checkpoint directory or a hub id. Loading is
    offline (local_files_only) unless LAB_HF_ALLOW_DOWNLOAD=1; an id that isn't
    in the local cache raises ModelUnavailableError. `quantization` is None,
    "8bit" (LLM.int8) or "4bit" (NF4 with double quantization, computing in
    `dtype` or float32) via bitsandbytes. The tokenizer is None when the
    checkpoint has none (e.g. a lab export).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be None or a torch.dtype, got {dtype!r}")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_hf_causal_lm needs the 'transformers' package: pip install transformers") from e

    kwargs: dict = {"local_files_only": not _download_allowed()}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is not None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(
                f"quantization={quantization!r} needs the 'bitsandbytes' package: pip install bitsandbytes"
            )
        if quantization == "4bit":
            qc = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype or torch.float32,
                bnb_4bit_use_double_quant=True,
            )
        else:
            qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
        kwargs["quantization_config"] = qc
        kwargs["device_map"] = {"": str(device)}  # quantized weights are placed while loading

    local = Path(os.fspath(name_or_path)).expanduser()
    is_local = local.exists()
    if is_local and not local.is_dir():
        raise ValueError(f"{local} is a file; expected a Hugging Face checkpoint directory")
    source = str(local) if is_local else str(name_or_path)
    if not is_local and (
        source.startswith((os.sep, ".", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source
    ):
        raise FileNotFoundError(f"no checkpoint directory at {source!r} (and it is not a hub id)")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        if is_local:
            raise
        raise _unavailable(source, e) from e
    if quantization is None:
        model = model.to(device)
    else:
        portable_4bit(model)
    model.eval()

    tokenizer = None
    tok_kwargs = {"local_files_only": kwargs["local_files_only"]}
    if is_local:
        if any((local / f).is_file() for f in _TOKENIZER_FILES):
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **tok_kwargs)
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **tok_kwargs)
        except (OSError, ValueError):
            tokenizer = None  # the model repo ships no (loadable) tokenizer
    return model, tokenizer


def resolve_hf_checkpoint(name_or_path) -> tuple[Path, object | None]:
    """(local directory, tokenizer or None) for a checkpoint path or a hub id in the local
    cache, without loading the weights. Raises ModelUnavailableError for an id that is
    not cached (downloading only with LAB_HF_ALLOW_DOWNLOAD=1), FileNotFoundError for a
    path that does not exist."""
    local = Path(os.fspath(name_or_path)).expanduser()
    if not local.exists():
        source = str(name_or_path)
        if source.startswith((os.sep, ".", "~")) or source.count("/") > 1:
            raise FileNotFoundError(f"no checkpoint directory at {source!r} (and it is not a hub id)")
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(source, local_files_only=not _download_allowed()))
        except Exception as e:  # noqa: BLE001 - the hub raises several unrelated types
            raise _unavailable(source, e) from e
    if not local.is_dir() or not (local / "config.json").is_file():
        raise ValueError(f"{local} is not a Hugging Face checkpoint directory (no config.json)")
    tokenizer = None
    if any((local / f).is_file() for f in _TOKENIZER_FILES):
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(local), local_files_only=True)
    return local, tokenizer
