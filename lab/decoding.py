"""Timed greedy decoding, the harness behind the KV-cache, GQA and sliding-window
comparisons: the same work through the lab model (with or without its KV cache) and
through Hugging Face `generate` on exported weights, with per-token latencies."""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def lab_decode_latencies(model, prompt: torch.Tensor, n_new: int, *, use_cache: bool) -> list[float]:
    """Greedy-decode `n_new` tokens after `prompt` (shape (1, T)); the latency of each new
    token in seconds (the first includes the prefill). Without the cache every step
    recomputes the whole sequence, which is what a model without a KV cache must do."""
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    model.eval()
    times = []
    if use_cache:
        cache = model.new_cache(batch_size=prompt.shape[0], max_len=prompt.shape[1] + n_new)
        tokens = prompt
        for _ in range(n_new):
            t0 = time.perf_counter()
            logits, _ = model(tokens, cache=cache)
            tokens = logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
    else:
        seq = prompt
        for _ in range(n_new):
            t0 = time.perf_counter()
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            times.append(time.perf_counter() - t0)
    return times


class _TokenClock:
    """A `generate` streamer that timestamps every token HF emits."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def hf_decode_latencies(
    hf_model, prompt: torch.Tensor, n_new: int, *, cache_implementation: str | None = None
) -> list[float]:
    """Greedy `generate` of exactly `n_new` tokens; per-token latencies in seconds
    (`cache_implementation`: None for HF's default dynamic cache, or "static")."""
    clock = _TokenClock()
    kwargs = dict(
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        streamer=clock,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    t0 = time.perf_counter()
    hf_model.generate(prompt, **kwargs)
    stamps = clock.stamps[1:]  # the streamer first receives the prompt itself
    return [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]


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
