"""A compiled single-token decode step over a static-shape KV cache.

Eager cached decoding (GPT.decode_one, generate(use_cache=True)) runs a few hundred small
operators per token, and on a small model their dispatch costs more than their
arithmetic. `CompiledDecoder` removes that overhead without changing what is computed:

- the cache is the model's own `KVCache` (same buffers, same layout), so a prompt is
  prefilled by the eager forward and every later token by the compiled step;
- the step has one shape for every position: the new token's position is a tensor, its
  keys and values are written into slot `pos % capacity`, and the query attends to all
  slots under a mask of the ones it may see (the key at slot s holds position
  s + capacity * floor((pos - s) / capacity), invisible when negative, or outside a
  sliding window), so `torch.compile` traces it once and never recompiles;
- on CUDA it compiles with mode="reduce-overhead" (CUDA graphs: the whole step is one
  graph launch); the cache buffers are registered as buffers of the compiled module, so
  the graphs write them in place.

Attention over every slot with a mask sums the same terms as attention over the filled
prefix (masked keys get weight exactly 0) but in another order, so logits agree to float
rounding and greedy tokens are identical (tests/test_compiled_decode.py checks this
against the eager cache for each position encoding, GQA and sliding windows).

When torch.compile is unavailable or fails (no C++ compiler for inductor, a model the
tracer cannot capture whole, such as a mixture of experts, whose routing has
data-dependent shapes), the decoder falls back to the model's eager cached step on the
same cache, token-identical by construction, and says why in `fallback_reason`.
"""

from __future__ import annotations

import math
import types
import warnings

import torch
import torch.nn as nn

from lab.checks import NON_NEGATIVE_INT, POSITIVE_INT, check_int, optional
from lab.models.cache import KVCache
from lab.models.config import check_token_ids
from lab.models.positions import alibi_bias, sinusoidal_table
from lab.models.sampling import check_sampling_args, sample_next

__all__ = ["CompiledDecoder", "CompiledFunction", "own_copy"]


def own_copy(fn):
    """fn with a code object of its own. torch.compile keeps compiled graphs, and its
    recompile budget (8), per code object: every caller compiling the same function would
    share one cache across all models in the process, and the ninth would fail."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledFunction:
    """fn under torch.compile (its own copy: see own_copy), falling back to fn itself, with
    one RuntimeWarning, when torch.compile is unavailable or the first call (which
    compiles) fails. `compiled` says which runs; `fallback_reason` why not compiled.
    Later failures are errors of fn, raised as they are."""

    def __init__(self, fn, *, what: str, **compile_kwargs):
        self.fn, self.what, self.fallback_reason = fn, what, None
        self._calls = 0
        try:
            self._compiled = torch.compile(own_copy(fn), **compile_kwargs)
        except Exception as exc:  # torch.compile missing or refusing this platform
            self._fail(exc)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _fail(self, exc: BaseException) -> None:
        self._compiled = None
        self.fallback_reason = f"torch.compile failed ({type(exc).__name__}: {str(exc).strip()[:300]})"
        warnings.warn(f"{self.what}: {self.fallback_reason}; running it eagerly instead", RuntimeWarning, stacklevel=3)

    def __call__(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                out = self._compiled(*args, **kwargs)
            except Exception as exc:
                if self._calls:
                    raise
                self._fail(exc)
            else:
                self._calls += 1
                return out
        return self.fn(*args, **kwargs)


class _Slots:
    """The KV-cache step API CausalSelfAttention calls (update), over static buffers: write
    the new token's keys/values at one slot and hand back every slot."""

    def __init__(self, k, v, layers: torch.Tensor, slot: torch.Tensor, n_keys: int | None):
        self.k, self.v, self.layers, self.slot, self.n_keys = k, v, layers, slot, n_keys

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # one index_put_ into the whole buffer (layer and slot both as index tensors): the
        # compiler writes the slot in place, where a write into the layer's view would make
        # it copy the layer's buffer out and back
        where = (self.layers[layer : layer + 1], slice(None), slice(None), self.slot)
        self.k[where] = k[:, :, 0].to(self.k.dtype)
        self.v[where] = v[:, :, 0].to(self.v.dtype)
        if self.n_keys is None:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, : self.n_keys], self.v[layer, :, :, : self.n_keys]


class _StaticStep(nn.Module):
    """One token at a tensor position through the model, over the cache's buffers: with
    `static`, all slots under a mask (one shape for every position); else the slots `keys`
    (a prefix 0..n-1 of them, whose length the compiler treats as symbolic), which hold
    exactly the keys the token sees, as the eager cached step reads them."""

    def __init__(self, model, cache: KVCache, static: bool):
        super().__init__()
        self.model = model
        self.static = static
        c = model.config
        self.capacity = cache.capacity
        self.window = c.sliding_window
        self.register_buffer("k", cache.k, persistent=False)
        self.register_buffer("v", cache.v, persistent=False)
        device = cache.k.device
        self.register_buffer("slots", torch.arange(self.capacity, device=device), persistent=False)
        self.register_buffer("layers", torch.arange(c.n_layer, device=device), persistent=False)
        self.rope_table = c.pos == "rope" and cache.max_len is not None
        if self.rope_table:  # the model's own tables, up to the last position the cache reaches
            cos, sin = model._rope_at(0, cache.max_len, device)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        elif c.pos == "rope":  # a ring without max_len: positions are unbounded, so compute them
            even = torch.arange(0, c.head_dim, 2, dtype=torch.int64, device=device).float()
            self.register_buffer("inv_freq", 1.0 / (c.rope_theta ** (even / c.head_dim)), persistent=False)
        if c.pos == "alibi":
            self.register_buffer("alibi_slopes", model._alibi_slopes.to(device), persistent=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        model, c, cap = self.model, self.model.config, self.capacity
        p = pos.view(1)
        x = model.wte(token)
        if c.pos == "learned":
            x = x + model.wpe(p)
        elif c.pos == "sinusoidal":
            x = x + (c.init_std * math.sqrt(2)) * sinusoidal_table(p, c.n_embd).to(x.dtype)
        x = model.drop(x)
        rope = None
        if self.rope_table:
            rope = (self.cos.index_select(0, p), self.sin.index_select(0, p))
        elif c.pos == "rope":  # as lab.models.positions.rope_tables computes a row
            freqs = torch.outer(p.float(), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            rope = (emb.cos(), emb.sin())
        # the position each slot holds once this token is written (negative: never filled)
        kpos = keys + cap * torch.div(p - keys, cap, rounding_mode="floor")
        mask = None
        if self.static:
            visible = kpos >= 0
            if self.window is not None:
                visible = visible & (kpos > p - self.window)
            mask = visible.view(1, cap)
        if c.pos == "alibi":
            bias = alibi_bias(self.alibi_slopes, p, kpos).to(x.dtype)  # (heads, 1, keys)
            mask = bias if mask is None else bias.masked_fill(~mask, -math.inf)
        slots = _Slots(self.k, self.v, self.layers, torch.remainder(p, cap), None if self.static else keys.shape[0])
        for i, block in enumerate(model.blocks):
            x = block(x, rope, mask, False, slots, i)
        return model.lm_head(model.ln_f(x)[:, -1])


def _run_step(step: _StaticStep, token: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return step(token, pos, keys)


class CompiledDecoder:
    """Decode one sequence batch through `model` with a compiled single-token step.

        decoder = CompiledDecoder(model, max_len=prompt_len + n_new)
        out = decoder.generate(prompt, n_new, temperature=0)  # as model.generate(...)
        logits = decoder.prefill(prompt); logits = decoder.step(next_token)  # by hand

    max_len bounds the tokens the cache holds (default block_size; with a sliding window,
    None keeps a ring of sliding_window slots). backend and mode go to torch.compile
    (defaults: inductor; mode "reduce-overhead", i.e. CUDA graphs, on CUDA). static=True
    attends over every slot under a mask (one shape: what CUDA graphs need; the default on
    CUDA); static=False reads only the filled slots, with their count symbolic in the one
    compiled graph (the default on CPU, where attending to empty slots costs real time).
    compile=False builds the same decoder without compiling: the eager cached step on the
    same cache. The model is used as it is (its weights are not copied): decode in eval mode.
    """

    def __init__(
        self,
        model,
        max_len: int | None = None,
        batch_size: int = 1,
        *,
        backend: str | None = None,
        mode: str | None = None,
        static: bool | None = None,
        compile: bool = True,
    ):
        POSITIVE_INT.check("batch_size", batch_size)
        optional(POSITIVE_INT).check("max_len", max_len)
        c = model.config
        if max_len is None and c.sliding_window is None:
            max_len = c.block_size
        self.model, self.max_len = model, max_len
        # one spare slot where it fits: reading every slot of a buffer would be a shape of its
        # own to the compiler (a second compile when the cache fills up)
        limit = c.block_size if c.sliding_window is None else c.sliding_window
        room = max_len + 1 if max_len is not None and max_len < limit else max_len
        self.cache: KVCache = model.new_cache(batch_size, room)
        device = self.cache.k.device
        self.fallback_reason: str | None = None
        self._step_fn = None
        self._cuda_graphs = False
        if not compile:
            self.fallback_reason = "compile=False"
            return
        if model.training:
            self.fallback_reason = "the model is in training mode (dropout): call model.eval() to compile its decode"
            return
        if backend is None:
            backend = "inductor"
        if mode is None and device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"
        self.static = device.type == "cuda" if static is None else bool(static)
        self._cuda_graphs = device.type == "cuda" and mode == "reduce-overhead"
        self._pos = torch.zeros((), dtype=torch.long, device=device)
        try:
            self._module = _StaticStep(model, self.cache, self.static)
            step = torch.compile(own_copy(_run_step), backend=backend, mode=mode, fullgraph=True, dynamic=False)
            self._step_fn = lambda token, pos, keys: step(self._module, token, pos, keys)
        except Exception as exc:  # torch.compile missing or refusing this platform
            self._fail(exc)

    # ------------------------------------------------------------ state

    @property
    def compiled(self) -> bool:
        """True while the compiled step is in use (False after a fallback)."""
        return self._step_fn is not None

    @property
    def length(self) -> int:
        """Tokens in the cache: the position of the next token."""
        return self.cache.length

    def reset(self) -> None:
        """Forget every token (the buffers, and the compiled step, are kept)."""
        self.cache.reset()

    def _fail(self, exc: BaseException) -> None:
        self._step_fn = None
        self.fallback_reason = f"torch.compile failed ({type(exc).__name__}: {str(exc).strip()[:300]})"
        warnings.warn(
            f"CompiledDecoder: {self.fallback_reason}; decoding with the eager cached step instead",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------ decoding

    @torch.no_grad()
    def warm_up(self) -> CompiledDecoder:
        """Compile now (the first compiled call traces and compiles: seconds on a CPU) and
        empty the cache. Returns self."""
        token = torch.zeros(self.cache.batch_size, 1, dtype=torch.long, device=self.cache.k.device)
        # at position 1 (a symbolic key count is never specialised to 1); and a full ring
        # reads every slot, a shape of its own
        positions = [1, self.cache.capacity] if self.cache.rolling and not self.static else [1]
        for pos in positions:
            for _ in range(3 if self._cuda_graphs else 1):  # CUDA graph trees record on a later call
                self.reset()
                self.cache.end(pos)
                self._step(token)
        self.reset()
        return self

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Feed idx (B, T) into the cache with the eager forward (in chunks of block_size);
        return the next-token logits (B, vocab)."""
        block = self.model.config.block_size
        self._check_room(idx.size(1))
        for s in range(0, idx.size(1), block):
            logits = self.model.prefill(idx[:, s : s + block], self.cache)
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,) or (B, 1), into the cache; return the next-token
        logits (B, vocab)."""
        if isinstance(token, torch.Tensor) and token.dim() == 1:
            token = token.unsqueeze(1)
        cache = self.cache
        check_token_ids(token, "token", vocab_size=self.model.config.vocab_size)
        if token.shape != (cache.batch_size, 1):
            raise ValueError(f"step takes one token per row, shape ({cache.batch_size}, 1), got {tuple(token.shape)}")
        if token.device != cache.k.device:
            raise ValueError(f"the cache lives on {cache.k.device}, got a token on {token.device}")
        self._check_room(1)
        return self._step(token)

    def _check_room(self, n_new: int) -> None:
        if self.max_len is not None and self.cache.length + n_new > self.max_len:
            raise ValueError(
                f"decoder max_len={self.max_len} exceeded: the cache holds {self.cache.length} tokens, "
                f"{n_new} more make {self.cache.length + n_new}"
            )

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        if self._step_fn is not None:
            try:
                return self._compiled_step(token)
            except Exception as exc:
                if self._calls:  # it compiled and ran before: this is not a compiler failure
                    raise
                self._fail(exc)  # the first call compiles: a failure there falls back
        return self.model._next_logits(token, self.cache)

    _calls = 0

    def _compiled_step(self, token: torch.Tensor) -> torch.Tensor:
        n = self.cache.length
        self._pos.fill_(n)
        keys = self._module.slots
        if not self.static:  # the filled slots; their number is symbolic in the compiled step
            keys = keys[: min(n + 1, self.cache.capacity)]
            torch._dynamo.maybe_mark_dynamic(keys, 0)
        logits = self._step_fn(token, self._pos, keys)
        self.cache.end(1)
        self._calls += 1
        # CUDA graphs reuse their output buffer on the next replay
        return logits.clone() if self._cuda_graphs else logits

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """model.generate(idx, max_new_tokens, use_cache=True, ...) through this decoder:
        the cache is emptied, the prompt prefilled, then one compiled step per token."""
        check_token_ids(idx, vocab_size=self.model.config.vocab_size)
        NON_NEGATIVE_INT.check("max_new_tokens", max_new_tokens)
        check_sampling_args(temperature, top_k, top_p)
        B, T0 = idx.shape
        if B != self.cache.batch_size:
            raise ValueError(f"decoder was built for batch_size={self.cache.batch_size}, got a batch of {B}")
        total = T0 + max_new_tokens
        if self.max_len is not None:
            check_int("prompt + max_new_tokens", total, 1, self.max_len)
        out = torch.empty(B, total, dtype=idx.dtype, device=idx.device)
        out[:, :T0] = idx
        if max_new_tokens == 0:
            return out
        self.reset()
        logits = self.prefill(idx)
        for t in range(T0, total):
            next_id = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            out[:, t] = next_id
            if t + 1 < total:
                logits = self._step(next_id.unsqueeze(1))
        return out
