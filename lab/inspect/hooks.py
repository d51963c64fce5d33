"""Hook points: one naming scheme for every model the lab looks inside.

TransformerLens' names, on the lab's scratch GPT, on Hugging Face decoders
(Llama, Qwen2, Mistral: anything with `model.layers[i].self_attn / mlp`) and on
Hugging Face BERT encoders (MiniLM):

    blocks.{i}.hook_resid_pre     the residual stream entering block i
    blocks.{i}.hook_attn_out      what attention writes into the stream
    blocks.{i}.hook_resid_mid     the stream between attention and the FFN
    blocks.{i}.hook_mlp_out       what the FFN writes into the stream
    blocks.{i}.hook_resid_post    the stream leaving block i
    blocks.{i}.attn.hook_q / hook_k / hook_v   (batch, pos, heads, d_head), before rotary
    blocks.{i}.attn.hook_pattern  softmax weights (batch, query heads, query pos, key pos)
    ln_final.hook_normalized      the final norm's output (decoders only)

For a post-norm block (BERT) "out" is the sub-layer's write before the add & norm,
and resid_mid / resid_post are the normed streams. Under GQA every query head's
pattern uses its shared KV head (head h reads KV head h // (heads / kv_heads)).

    with capture(model, ["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern"]) as cache:
        model(idx)
    with patch(model, {"blocks.2.hook_mlp_out": zero_ablation}):
        loss = forward_loss(model, idx, targets)

Both always remove their hooks (and restore the attention kernel) on exit.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

POINTS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
)
FINAL = "ln_final.hook_normalized"


class HookError(ValueError):
    """A hook name (or layer index) that this model does not have."""


@dataclass(frozen=True)
class Site:
    """Where a hook point lives: a module's first input ("input") or its output ("output");
    `get` reads the tensor from it, `put(value, new)` rebuilds it (None: read-only)."""

    module: nn.Module
    when: str
    get: Callable[[Any], torch.Tensor]
    put: Callable[[Any, torch.Tensor], Any] | None = None


def _same(x):
    return x


def _replace(_old, new):
    return new


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _heads(head_dim: int):
    return lambda t: t.view(*t.shape[:-1], -1, head_dim)


# ---------------------------------------------------------------- adapters


class Adapter:
    """What the hooks need to know about one model family."""

    family = ""
    causal = True

    def __init__(self, model: nn.Module):
        self.model = model

    n_layers: int
    n_heads: int
    context: int | None

    def site(self, layer: int, point: str) -> Site:
        raise NotImplementedError

    def final_site(self) -> Site | None:
        return None

    @contextmanager
    def explicit_attention(self) -> Iterator[None]:
        """Attention computed with its softmax weights materialised (fused kernels skip them)."""
        yield

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None):
        raise NotImplementedError

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream state through the final norm and the unembedding."""
        raise HookError(f"{self.family} models have no unembedding (not a language-model head)")

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of predicting targets from idx."""
        logits = self.unembed_logits(idx)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def unembed_logits(self, idx: torch.Tensor) -> torch.Tensor:
        raise HookError(f"{self.family} models have no language-model head")


class LabGPTAdapter(Adapter):
    family = "lab-gpt"

    def __init__(self, model):
        super().__init__(model)
        c = model.config
        self.n_layers, self.n_heads, self.context = c.n_layer, c.n_head, c.block_size
        self.head_dim, self.n_kv = c.head_dim, c.kv_heads

    def site(self, layer, point):
        block = self.model.blocks[layer]
        attn = block.attn
        hd, nq, nkv = self.head_dim, self.n_heads, self.n_kv

        def qkv(part):
            sizes = (nq * hd, nkv * hd, nkv * hd)
            return lambda out: _heads(hd)(out.split(sizes, dim=-1)[part])

        if point == "hook_resid_pre":
            return Site(block, "input", _same, _replace)
        if point == "hook_attn_out":
            return Site(attn, "output", _same, _replace)
        if point == "hook_resid_mid":
            # post-norm: the stream is ln_1's output; pre-norm: ln_2 reads the stream (a
            # copy of it: patching there would not change the residual add, so read-only)
            if block.post_norm:
                return Site(block.ln_1, "output", _same, _replace)
            return Site(block.ln_2, "input", _same)
        if point == "hook_mlp_out":
            return Site(block.mlp, "output", _same, _replace)
        if point == "hook_resid_post":
            return Site(block, "output", _same, _replace)
        if point.startswith("attn.hook_") and point[-1] in "qkv":
            return Site(attn.c_attn, "output", qkv("qkv".index(point[-1])))
        if point == "attn.hook_pattern":
            return Site(attn, "output", lambda _out: attn.pattern)
        raise KeyError(point)

    def final_site(self):
        return Site(self.model.ln_f, "output", _same, _replace)

    @contextmanager
    def explicit_attention(self):
        attns = [b.attn for b in self.model.blocks]
        for a in attns:
            a.keep_pattern = True
        try:
            yield
        finally:
            for a in attns:
                a.keep_pattern, a.pattern = False, None

    def forward(self, idx, attention_mask=None):
        return self.model(idx)[0]

    def unembed(self, resid):
        return self.model.lm_head(self.model.ln_f(resid))

    def unembed_logits(self, idx):
        return self.model(idx)[0]


class _HFAdapter(Adapter):
    @contextmanager
    def explicit_attention(self):
        model = self.model
        before = model.config._attn_implementation
        if before != "eager":
            model.set_attn_implementation("eager")
        try:
            yield
        finally:
            if before != "eager":
                model.set_attn_implementation(before)


class HFDecoderAdapter(_HFAdapter):
    family = "hf-decoder"

    def __init__(self, model):
        super().__init__(model)
        c = model.config
        self.layers = model.model.layers
        self.n_layers, self.n_heads = len(self.layers), c.num_attention_heads
        self.context = getattr(c, "max_position_embeddings", None)
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def site(self, layer, point):
        block = self.layers[layer]
        attn = block.self_attn
        if point == "hook_resid_pre":
            return Site(block, "input", _same, _replace)
        if point == "hook_attn_out":
            return Site(attn, "output", _first, _replace_first)
        if point == "hook_resid_mid":
            return Site(block.post_attention_layernorm, "input", _same)
        if point == "hook_mlp_out":
            return Site(block.mlp, "output", _same, _replace)
        if point == "hook_resid_post":
            return Site(block, "output", _first, _replace_first)
        if point.startswith("attn.hook_") and point[-1] in "qkv":
            return Site(getattr(attn, point[-1] + "_proj"), "output", _heads(self.head_dim))
        if point == "attn.hook_pattern":
            return Site(attn, "output", lambda out: out[1])
        raise KeyError(point)

    def final_site(self):
        return Site(self.model.model.norm, "output", _same, _replace)

    def forward(self, idx, attention_mask=None):
        return self.model(input_ids=idx, attention_mask=attention_mask, use_cache=False).logits

    def unembed(self, resid):
        return self.model.lm_head(self.model.model.norm(resid))

    def unembed_logits(self, idx):
        return self.forward(idx)


class HFEncoderAdapter(_HFAdapter):
    """BERT-style post-norm encoders (MiniLM): bidirectional, no LM head."""

    family = "hf-encoder"
    causal = False

    def __init__(self, model):
        super().__init__(model)
        c = model.config
        self.layers = model.base_model.encoder.layer
        self.n_layers, self.n_heads = len(self.layers), c.num_attention_heads
        self.context = getattr(c, "max_position_embeddings", None)
        self.head_dim = c.hidden_size // c.num_attention_heads

    def site(self, layer, point):
        block = self.layers[layer]
        if point == "hook_resid_pre":
            return Site(block, "input", _same, _replace)
        if point == "hook_attn_out":
            return Site(block.attention.output.dense, "output", _same, _replace)
        if point == "hook_resid_mid":
            return Site(block.attention, "output", _first, _replace_first)
        if point == "hook_mlp_out":
            return Site(block.output.dense, "output", _same, _replace)
        if point == "hook_resid_post":
            return Site(block, "output", _first, _replace_first)
        if point.startswith("attn.hook_") and point[-1] in "qkv":
            module = getattr(block.attention.self, {"q": "query", "k": "key", "v": "value"}[point[-1]])
            return Site(module, "output", _heads(self.head_dim))
        if point == "attn.hook_pattern":
            return Site(block.attention.self, "output", lambda out: out[1])
        raise KeyError(point)

    def forward(self, idx, attention_mask=None):
        return self.model(input_ids=idx, attention_mask=attention_mask).last_hidden_state


def adapter(model: nn.Module) -> Adapter:
    """The hook adapter for `model`: the lab's GPT, an HF decoder, or an HF BERT encoder."""
    from lab.models.gpt import GPT

    if isinstance(model, Adapter):
        return model
    if isinstance(model, GPT):
        return LabGPTAdapter(model)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(model, "lm_head"):
        return HFDecoderAdapter(model)
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(getattr(base, "encoder", None), "layer"):
        return HFEncoderAdapter(model)
    raise HookError(
        f"cannot inspect a {type(model).__name__}: expected the lab's GPT, a Hugging Face decoder "
        "(model.layers[i].self_attn / mlp, e.g. Llama, Qwen2) or a BERT-style encoder"
    )


# ---------------------------------------------------------------- names


def hook_names(model) -> list[str]:
    """Every hook point `model` has, in forward order."""
    a = adapter(model)
    names = [f"blocks.{i}.{p}" for i in range(a.n_layers) for p in POINTS]
    return names + ([FINAL] if a.final_site() is not None else [])


_BLOCK = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


def _valid_listing(a: Adapter) -> str:
    final = f", {FINAL}" if a.final_site() is not None else ""
    return (
        f"blocks.{{i}}.{{{', '.join(POINTS)}}} for i in 0..{a.n_layers - 1}{final} "
        "(glob patterns such as 'blocks.*.hook_resid_post' work too)"
    )


def resolve(model, names) -> list[str]:
    """Expand globs and check every name; HookError names the bad one and lists the valid ones."""
    a = adapter(model)
    if isinstance(names, str):
        names = [names]
    valid = hook_names(a)
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise HookError(f"hook names must be strings, got {name!r}")
        if any(ch in name for ch in "*?["):
            hits = fnmatch.filter(valid, name)
            if not hits:
                raise HookError(f"{name!r} matches no hook point; valid: {_valid_listing(a)}")
            out.extend(h for h in hits if h not in out)
            continue
        m = _BLOCK.match(name)
        if m and m.group(2) in POINTS:
            layer = int(m.group(1))
            if not 0 <= layer < a.n_layers:
                raise HookError(
                    f"layer {layer} in {name!r} is out of range: this {a.family} model has "
                    f"{a.n_layers} blocks (0..{a.n_layers - 1})"
                )
        elif name not in valid:
            raise HookError(f"no hook point {name!r}; valid: {_valid_listing(a)}")
        if name not in out:
            out.append(name)
    return out


def _site(a: Adapter, name: str) -> Site:
    if name == FINAL:
        return a.final_site()
    layer, point = _BLOCK.match(name).groups()
    return a.site(int(layer), point)


def _register(site: Site, read: Callable | None, write: Callable | None):
    """Register one forward (pre-)hook that reads and/or rewrites the site's tensor."""
    if site.when == "input":

        def pre(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if read is not None:
                read(site.get(x))
            if write is None:
                return None
            new = site.put(x, write(site.get(x)))
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return site.module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_module, _args, out):
        if read is not None:
            read(site.get(out))
        if write is not None:
            return site.put(out, write(site.get(out)))
        return None

    return site.module.register_forward_hook(post)


# ---------------------------------------------------------------- capture / patch


class ActivationCache(dict):
    """{hook name: tensor} from one or more forward passes (later passes overwrite)."""

    def __missing__(self, key):
        raise KeyError(f"{key!r} was not captured (captured: {sorted(self)}); did the forward pass run?")

    def stack(self, point: str) -> torch.Tensor:
        """(layers, ...) tensor of blocks.{i}.{point} for every captured layer i, in order."""
        keys = sorted((int(m.group(1)), k) for k in self if (m := _BLOCK.match(k)) and m.group(2) == point)
        if not keys:
            raise KeyError(f"no blocks.*.{point} in this cache (captured: {sorted(self)})")
        return torch.stack([self[k] for _, k in keys])


@contextmanager
def capture(model, names, *, detach: bool = True) -> Iterator[ActivationCache]:
    """Record the named hook points during the forward passes run inside the block."""
    a = adapter(model)
    names = resolve(a, names)
    cache = ActivationCache()
    with ExitStack() as stack:
        if any(n.endswith("attn.hook_pattern") for n in names):
            stack.enter_context(a.explicit_attention())
        for name in names:

            def read(t, name=name):
                cache[name] = t.detach() if detach else t

            handle = _register(_site(a, name), read, None)
            stack.callback(handle.remove)
        yield cache


@contextmanager
def patch(model, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace the named activations by fn(activation) during the forward passes inside the block."""
    a = adapter(model)
    with ExitStack() as stack:
        for name, fn in edits.items():
            for target in resolve(a, [name]):
                site = _site(a, target)
                if site.put is None:
                    raise HookError(f"{target!r} can be read but not patched on a {a.family} model")
                handle = _register(site, None, fn)
                stack.callback(handle.remove)
        yield


def zero_ablation(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t)


def mean_ablation(mean: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Replace an activation by `mean` (e.g. its average over a reference batch), broadcast."""
    return lambda t: mean.to(t.dtype).expand_as(t)


def check_length(model, n_tokens: int) -> None:
    """ValueError when a text of n_tokens does not fit the model's context."""
    a = adapter(model)
    if a.context is not None and n_tokens > a.context:
        raise ValueError(
            f"text is {n_tokens} tokens but this {a.family} model's context is {a.context} tokens; "
            "shorten the text or split it"
        )


@torch.no_grad()
def run_with_cache(model, idx: torch.Tensor, names, attention_mask: torch.Tensor | None = None):
    """(output, cache): one forward pass of idx recording the named hook points. The output
    is the logits for decoders and the final hidden states for encoders."""
    a = adapter(model)
    if idx.dim() != 2:
        raise ValueError(f"idx must be (batch, tokens), got shape {tuple(idx.shape)}")
    check_length(a, idx.size(1))
    was_training = a.model.training
    a.model.eval()  # dropout would make the activations random
    try:
        with capture(a, names) as cache:
            out = a.forward(idx, attention_mask)
    finally:
        a.model.train(was_training)
    return out, cache
