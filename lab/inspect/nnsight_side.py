"""The lab's hook points read a second way, through an interpretability library: nnsight
(which wraps any torch module), on the Hugging Face models the lab studies: the lab GPT's
exports (GPT2LMHeadModel, LlamaForCausalLM / MistralForCausalLM) and BERT encoders (MiniLM).

nnsight names a value by where it lives in the model: a module's `.input` (its first
positional argument) or `.output`. `NNSIGHT_NAMES` maps each lab hook point to that place,
per architecture (the table in docs/guide/inspect.md is this table); `nnsight_values` runs one
traced forward and returns the values in the lab's shapes, so they compare one to one with
`lab.inspect.run_with_cache` (tests/test_inspect_libraries.py).

Besides the lab's points, nnsight exposes each head's output before the output projection
(the projection's input, heads concatenated): `attn.hook_z`, (batch, pos, heads, d_head),
TransformerLens' name for it; the lab computes it as pattern @ v (`lab_head_outputs`).
nnsight reads modules in execution order only, so the points are read layer by layer in
the order the forward pass reaches them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["NNSIGHT_NAMES", "TRANSFORMERLENS_NAMES", "family", "lab_head_outputs", "mapping_table", "nnsight_values"]

# lab hook point -> (module path, "input" / "output", index into a tuple output or None), per
# architecture; {i} is the layer. In execution order within a layer.
NNSIGHT_NAMES: dict[str, dict[str, tuple[str, str, int | None]]] = {
    "gpt2": {
        "hook_resid_pre": ("transformer.h.{i}", "input", None),
        "attn.hook_qkv": ("transformer.h.{i}.attn.c_attn", "output", None),
        "attn.hook_z": ("transformer.h.{i}.attn.c_proj", "input", None),
        "hook_attn_out": ("transformer.h.{i}.attn", "output", 0),
        "attn.hook_pattern": ("transformer.h.{i}.attn", "output", 1),
        "hook_resid_mid": ("transformer.h.{i}.ln_2", "input", None),
        "hook_mlp_out": ("transformer.h.{i}.mlp", "output", None),
        "hook_resid_post": ("transformer.h.{i}", "output", 0),
        "ln_final.hook_normalized": ("transformer.ln_f", "output", None),
    },
    "llama": {
        "hook_resid_pre": ("model.layers.{i}", "input", None),
        "attn.hook_q": ("model.layers.{i}.self_attn.q_proj", "output", None),
        "attn.hook_k": ("model.layers.{i}.self_attn.k_proj", "output", None),
        "attn.hook_v": ("model.layers.{i}.self_attn.v_proj", "output", None),
        "attn.hook_z": ("model.layers.{i}.self_attn.o_proj", "input", None),
        "hook_attn_out": ("model.layers.{i}.self_attn", "output", 0),
        "attn.hook_pattern": ("model.layers.{i}.self_attn", "output", 1),
        "hook_resid_mid": ("model.layers.{i}.post_attention_layernorm", "input", None),
        "hook_mlp_out": ("model.layers.{i}.mlp", "output", None),
        "hook_resid_post": ("model.layers.{i}", "output", 0),
        "ln_final.hook_normalized": ("model.norm", "output", None),
    },
    "bert": {
        "hook_resid_pre": ("encoder.layer.{i}", "input", None),
        "attn.hook_q": ("encoder.layer.{i}.attention.self.query", "output", None),
        "attn.hook_k": ("encoder.layer.{i}.attention.self.key", "output", None),
        "attn.hook_v": ("encoder.layer.{i}.attention.self.value", "output", None),
        "attn.hook_pattern": ("encoder.layer.{i}.attention.self", "output", 1),
        "attn.hook_z": ("encoder.layer.{i}.attention.output.dense", "input", None),
        "hook_attn_out": ("encoder.layer.{i}.attention.output.dense", "output", None),
        "hook_resid_mid": ("encoder.layer.{i}.attention", "output", 0),
        "hook_mlp_out": ("encoder.layer.{i}.output.dense", "output", None),
        "hook_resid_post": ("encoder.layer.{i}", "output", 0),
    },
}


# lab hook point -> TransformerLens 4's name for the same value ({i}: the layer), read from its
# TransformerBridge over the same Hugging Face model (tests/test_inspect_libraries.py). On the
# decoders the names are the lab's. On BERT the bridge's hook_attn_out is the attention
# sub-layer's normed output (the lab's hook_resid_mid) and the projection's own write is
# attn.o.hook_out.
_TL_DECODER = {p: f"blocks.{{i}}.{p}" for p in NNSIGHT_NAMES["llama"] if p != "ln_final.hook_normalized"}
TRANSFORMERLENS_NAMES: dict[str, dict[str, str]] = {
    "gpt2": {**_TL_DECODER, "ln_final.hook_normalized": "ln_final.hook_normalized"},
    "llama": {**_TL_DECODER, "ln_final.hook_normalized": "ln_final.hook_normalized"},
    "bert": {
        **{p: f"blocks.{{i}}.{p}" for p in NNSIGHT_NAMES["bert"]},
        "hook_attn_out": "blocks.{i}.attn.o.hook_out",
        "hook_resid_mid": "blocks.{i}.ln1.hook_out",
    },
}

# the rows of the mapping table, in forward order
_TABLE_POINTS = (
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
    "ln_final.hook_normalized",
)
_GPT2_QKV = {"attn.hook_q": "[..., :d]", "attn.hook_k": "[..., d:2d]", "attn.hook_v": "[..., 2d:]"}


def _nnsight_spelling(fam: str, point: str) -> str:
    """How a traced model reads `point`: module path with [i] for the layer, .input / .output
    and the tuple index. nnsight serves every module's .output, so a submodule named `output`
    (BERT's) is reached as E_output."""
    table = NNSIGHT_NAMES[fam]
    if fam == "gpt2" and point in _GPT2_QKV:
        (path, where, index), tail = table["attn.hook_qkv"], _GPT2_QKV[point]
    elif point in table:
        (path, where, index), tail = table[point], ""
    else:
        return "-"
    parts = [("E_output" if part == "output" else part) for part in path.replace(".{i}", "[i]").split(".")]
    return f"`{'.'.join(parts)}.{where}{'' if index is None else f'[{index}]'}{tail}`"


def mapping_table() -> str:
    """The markdown table of docs/guide/inspect.md: each lab hook point, TransformerLens'
    name for it, and where nnsight reads it on the GPT-2 and Llama exports and on MiniLM."""
    rows = [
        "| lab hook point | TransformerLens (decoders) | TransformerLens (BERT) "
        "| nnsight, GPT-2 export | nnsight, Llama export | nnsight, MiniLM (BERT) |",
        "|---|---|---|---|---|---|",
    ]
    for point in _TABLE_POINTS:
        lab = f"`{point}`" if point.startswith("ln_final") else f"`blocks.{{i}}.{point}`"
        if point == "attn.hook_z":
            lab += " (lab: `lab_head_outputs`)"
        tl = [
            f"`{TRANSFORMERLENS_NAMES[f][point]}`" if point in TRANSFORMERLENS_NAMES[f] else "-"
            for f in ("llama", "bert")
        ]
        nn = [_nnsight_spelling(f, point) for f in ("gpt2", "llama", "bert")]
        rows.append(f"| {lab} | {' | '.join([*tl, *nn])} |")
    return "\n".join(rows) + "\n"


def family(model) -> str:
    """'gpt2', 'llama' (Llama, Mistral, Qwen2: model.layers[i].self_attn) or 'bert'."""
    if getattr(getattr(model, "config", None), "model_type", None) == "gpt2" and hasattr(model, "transformer"):
        return "gpt2"
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return "llama"
    if hasattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer"):
        return "bert"
    raise ValueError(
        f"no nnsight mapping for a {type(model).__name__}: expected GPT2LMHeadModel, a Llama-style decoder "
        "(model.layers[i].self_attn) or a BERT encoder"
    )


def _envoy(root, path: str):
    """The envoy at a module path. A submodule named like an envoy property (BERT's
    `attention.output`) is looked up among the children, not read as the property."""
    node = root
    for part in path.split("."):
        children = getattr(node, "_child_map", {})
        node = node[int(part)] if part.isdigit() else children[part] if part in children else getattr(node, part)
    return node


def _n_layers(model, fam: str) -> int:
    c = model.config
    return c.n_layer if fam == "gpt2" else c.num_hidden_layers


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], n, t.shape[-1] // n)


def nnsight_values(
    model, idx: torch.Tensor, points: Iterable[str], *, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """{"blocks.{i}.<point>": value} for every layer and each of `points` (lab names, plus
    "attn.hook_z"; "ln_final.hook_normalized" once), read by nnsight from one forward pass of
    the Hugging Face `model` on `idx`, in the lab's shapes: q/k/v and z as (batch, pos, heads,
    d_head), patterns as (batch, heads, query, key). The model runs with eager attention and
    output_attentions=True (the fused kernel never materialises the pattern)."""
    from nnsight import NNsight

    fam = family(model)
    table = NNSIGHT_NAMES[fam]
    points = list(points)
    split_qkv = ("attn.hook_q", "attn.hook_k", "attn.hook_v") if fam == "gpt2" else ()
    unknown = [p for p in points if p not in table and p not in split_qkv]
    if unknown:
        raise ValueError(f"no nnsight mapping for {unknown} on a {fam} model; mapped: {sorted(table)}")
    c = model.config
    n_heads = c.n_head if fam == "gpt2" else c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    wanted = set(points)
    if fam == "gpt2" and wanted & {"attn.hook_q", "attn.hook_k", "attn.hook_v"}:
        wanted.add("attn.hook_qkv")
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    saved = {}
    try:
        traced = NNsight(model)
        kwargs = {"input_ids": idx, "output_attentions": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if fam != "bert":
            kwargs["use_cache"] = False
        with torch.no_grad(), traced.trace(**kwargs):
            for i in range(_n_layers(model, fam)):
                seen = {}
                for point, (path, where, index) in table.items():
                    if point not in wanted or point == "ln_final.hook_normalized":
                        continue
                    key = (path, where)
                    if key not in seen:
                        node = _envoy(traced, path.format(i=i))
                        seen[key] = (node.input if where == "input" else node.output).save()
                    saved[(i, point)] = (seen[key], index)
            if "ln_final.hook_normalized" in wanted:
                path, where, index = table["ln_final.hook_normalized"]
                saved[(None, "ln_final.hook_normalized")] = (_envoy(traced, path).output.save(), index)
    finally:
        model.set_attn_implementation(before)
    out = {}
    for (i, point), (value, index) in saved.items():
        if index is not None and isinstance(value, tuple | list):
            value = value[index]
        elif isinstance(value, tuple | list):
            value = value[0]
        if point == "ln_final.hook_normalized":
            out[point] = value
            continue
        if point == "attn.hook_qkv":
            q, k, v = value.split(value.shape[-1] // 3, dim=-1)
            for name, t in zip(("attn.hook_q", "attn.hook_k", "attn.hook_v"), (q, k, v)):
                if name in points:
                    out[f"blocks.{i}.{name}"] = _heads(t, n_heads)
            continue
        if point in ("attn.hook_q", "attn.hook_z"):
            value = _heads(value, n_heads)
        elif point in ("attn.hook_k", "attn.hook_v"):
            value = _heads(value, n_kv)
        out[f"blocks.{i}.{point}"] = value
    return out


def lab_head_outputs(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each head's output before the output projection, (batch, pos, heads, d_head), from the
    lab's hook values: pattern (batch, heads, q, k) @ v (batch, pos, kv_heads, d_head), each
    query head reading its KV head (h // (heads / kv_heads), as under GQA)."""
    heads, kv = pattern.shape[1], v.shape[2]
    v = v.repeat_interleave(heads // kv, dim=2).transpose(1, 2)  # (B, heads, pos, d_head)
    return (pattern @ v).transpose(1, 2)
