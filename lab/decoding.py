"""Timed greedy decoding, the harness behind the KV-cache, GQA and sliding-window
comparisons: the same work through the lab model (with or without its KV cache, eager or
through its compiled single-token step) and through Hugging Face `generate` on exported
weights, with per-token latencies; and decoding after a long random context, where the
cache's size, not the per-token overhead, decides the speed (the GQA memory-bound
comparison)."""

from __future__ import annotations

import inspect
import time

import torch

from lab.checks import POSITIVE_INT, check_int


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def lab_greedy(
    model, prompt: torch.Tensor, n_new: int, *, use_cache: bool, decoder=None
) -> tuple[list[int], list[float]]:
    """Greedy-decode `n_new` tokens after `prompt` (shape (1, T)): the new tokens and the
    latency of each in seconds (the first includes the prefill). Without the cache every
    step recomputes the whole sequence, which is what a model without a KV cache must do.
    With `decoder` (a lab.models.compiled.CompiledDecoder over `model`, warmed up), the
    cache is the decoder's: the prompt is prefilled eagerly, every later token goes through
    its compiled single-token step."""
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    model.eval()
    device = model.lm_head.weight.device
    times, new = [], []
    if decoder is not None:
        if not use_cache or decoder.model is not model:
            raise ValueError("decoder needs use_cache=True and must decode this model")
        decoder.reset()
        step = lambda tokens, i: decoder.prefill(tokens) if i == 0 else decoder._step(tokens)  # noqa: E731
    elif use_cache:
        cache = model.new_cache(batch_size=prompt.shape[0], max_len=prompt.shape[1] + n_new)
        step = lambda tokens, i: model(tokens, cache=cache)[0][:, -1]  # noqa: E731
    else:
        seen = {"seq": prompt}

        def step(tokens, i):  # the whole sequence so far, every time
            if i:
                seen["seq"] = torch.cat((seen["seq"], tokens), dim=1)
            return model(seen["seq"])[0][:, -1]

    tokens = prompt
    for i in range(n_new):
        t0 = time.perf_counter()
        tokens = step(tokens, i).argmax(-1, keepdim=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        new.append(tokens)
    return torch.cat(new, dim=1)[0].tolist(), times


def lab_decode_latencies(model, prompt: torch.Tensor, n_new: int, *, use_cache: bool, decoder=None) -> list[float]:
    """The per-token latencies of lab_greedy (seconds; the first includes the prefill)."""
    return lab_greedy(model, prompt, n_new, use_cache=use_cache, decoder=decoder)[1]


class TokenClock:
    """A `generate` streamer that keeps every new token and the time it arrived. Reading
    the token (`tolist`) waits for the device, so GPU times are real."""

    def __init__(self):
        self.tokens: list[int] = []
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        ids = value.reshape(-1).tolist()
        now = time.perf_counter()
        if not self._prompt_seen:  # generate first hands the streamer the prompt itself
            self._prompt_seen = True
            return
        self.tokens.extend(ids)
        self.stamps.extend([now] * len(ids))

    def end(self):
        pass


@torch.no_grad()
def hf_greedy(hf_model, prompt: torch.Tensor, n_new: int, **generate_kwargs) -> tuple[list[int], list[float]]:
    """Greedy `generate` of exactly `n_new` tokens after `prompt` (1, T): the new tokens and
    the latency of each in seconds (the first includes the prefill). `generate_kwargs` go
    to `generate` (cache_implementation, compile_config, ...)."""
    clock = TokenClock()
    kwargs = dict(
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        streamer=clock,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    t0 = time.perf_counter()
    hf_model.generate(prompt, **kwargs, **generate_kwargs)
    return clock.tokens, [b - a for a, b in zip([t0, *clock.stamps[:-1]], clock.stamps)]


def hf_decode_latencies(
    hf_model, prompt: torch.Tensor, n_new: int, *, cache_implementation: str | None = None
) -> list[float]:
    """Per-token latencies of hf_greedy (`cache_implementation`: None for HF's default
    dynamic cache, or "static")."""
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
    return hf_greedy(hf_model, prompt, n_new, **extra)[1]


def tail_to_head_ratio(latencies: list[float], fraction: float = 0.1) -> float:
    """Mean latency of the last `fraction` of steps over the first `fraction` (prefill
    step excluded): ~1 when per-token cost is flat in position, >1 when it grows."""
    body = latencies[1:]
    k = max(1, int(len(body) * fraction))
    return (sum(body[-k:]) / k) / (sum(body[:k]) / k)


@torch.no_grad()
def hf_cache_bytes(hf_model, n_tokens: int) -> int:
    """Bytes of the keys and values Hugging Face's default (dynamic) cache holds after
    `n_tokens` tokens: measured from the cache object, not computed from the config."""
    out = hf_model(torch.zeros(1, n_tokens, dtype=torch.long), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))


# ---------------------------------------------------------------- decoding after a long context


def random_context(model, context_len: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (n_layer, 1, n_kv_head, context_len, head_dim) of a context that was
    never run: standard normal draws, in the model's dtype and device. The speed of a decode
    step does not depend on what the cache holds, only on how much of it there is."""
    check_int("context_len", context_len, 1)
    c, w = model.config, model.lm_head.weight
    shape = (c.n_layer, 1, c.kv_heads, context_len, c.head_dim)
    g = torch.Generator(device=w.device).manual_seed(seed)
    draw = lambda: torch.randn(shape, generator=g, device=w.device, dtype=w.dtype)  # noqa: E731
    return draw(), draw()


@torch.no_grad()
def lab_context_decode(model, context: tuple[torch.Tensor, torch.Tensor], n_new: int) -> tuple[list[int], list[float]]:
    """Greedy-decode `n_new` tokens with the KV cache after `context` (keys, values from
    random_context), starting from token 0: (the new tokens, each one's latency in seconds).
    Every step reads the whole cache, so a long context makes it memory-bound."""
    POSITIVE_INT.check("n_new", n_new)
    model.eval()
    k, v = context
    cache = model.new_cache(batch_size=1, max_len=k.shape[3] + n_new)
    cache.load_(k, v)
    device = model.lm_head.weight.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    tokens, times = [], []
    for _ in range(n_new):
        t0 = time.perf_counter()
        logits, _ = model(token, cache=cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))  # reads the token: waits for the device
        times.append(time.perf_counter() - t0)
    return tokens, times


@torch.no_grad()
def hf_context_decode(
    hf_model, context: tuple[torch.Tensor, torch.Tensor], n_new: int
) -> tuple[list[int], list[float]]:
    """lab_context_decode through Hugging Face `generate` (dynamic cache) on the exported
    weights: its cache holds the same keys and values, the token after them is 0, and the
    tokens and per-token latencies come back the same way. Lab and HF both cache keys after
    RoPE in the same layout, so the two decode the same tokens."""
    from transformers import DynamicCache

    POSITIVE_INT.check("n_new", n_new)
    k, v = context
    cache = DynamicCache(config=hf_model.config)
    for layer in range(k.shape[0]):
        cache.update(k[layer].clone(), v[layer].clone(), layer)
    n = k.shape[3]
    ids = torch.zeros(1, n + 1, dtype=torch.long, device=k.device)
    # transformers renamed generate's past_key_values to cache (the old name warns)
    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    return hf_greedy(hf_model, ids, n_new, **{name: cache})


# ------------------------------------------------------------------ batched decoding


@torch.no_grad()
def lab_batch_greedy(model, prompts: torch.Tensor, n_new: int) -> tuple[torch.Tensor, float]:
    """Greedy-decode `n_new` tokens after each row of `prompts` (B, T) at once through the
    lab model's KV cache: the new tokens (B, n_new) on the CPU and the seconds the whole
    batch took (cache allocation and prefill included)."""
    check_int("n_new", n_new, 1)
    model.eval()
    device = model.lm_head.weight.device
    _sync(device)
    t0 = time.perf_counter()
    cache = model.new_cache(batch_size=prompts.shape[0], max_len=prompts.shape[1] + n_new)
    tokens, new = prompts, []
    for _ in range(n_new):
        tokens = model(tokens, cache=cache)[0][:, -1].argmax(-1, keepdim=True)
        new.append(tokens)
    _sync(device)
    return torch.cat(new, dim=1).cpu(), time.perf_counter() - t0


@torch.no_grad()
def hf_batch_greedy(hf_model, prompts: torch.Tensor, n_new: int, **generate_kwargs) -> tuple[torch.Tensor, float]:
    """Greedy `generate` of exactly `n_new` tokens after each row of `prompts` (B, T, equal
    lengths, so no padding): the new tokens (B, n_new) on the CPU and the seconds the call
    took. `generate_kwargs` go to `generate`."""
    check_int("n_new", n_new, 1)
    device = hf_model.device
    _sync(device)
    t0 = time.perf_counter()
    out = hf_model.generate(
        prompts,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompts),
        **generate_kwargs,
    )
    _sync(device)
    return out[:, prompts.shape[1] :].cpu(), time.perf_counter() - t0
