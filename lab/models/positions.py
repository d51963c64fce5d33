"""Where each token is: the positional encodings (learned, sinusoidal, RoPE, ALiBi, none)
and the attention masks that depend on position (causal, sliding window, prefix, cache).

Learned and sinusoidal positions are added to the input; RoPE rotates queries and keys;
ALiBi biases the attention logits by distance. RoPE follows Hugging Face's Llama exactly,
so such weights export to LlamaForCausalLM.
"""

from __future__ import annotations

import math

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (Hugging Face Llama's convention)."""
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(n: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (n, head_dim) float32, for positions 0..n-1, computed as HF Llama does."""
    even = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (theta ** (even / head_dim))
    freqs = torch.outer(torch.arange(n, dtype=torch.int64, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., head_dim) by the angles of its positions; cos/sin broadcast against x."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s fixed encoding, (len(positions), dim) float32: sin on even dims,
    cos on odd, wavelengths from 2*pi to 10000*2*pi. Defined for every position."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    angles = positions.float().unsqueeze(1) * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): the geometric sequence 2^(-8/n)^(h+1)
    for n a power of two; otherwise the paper's recipe interleaves the next power's."""

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_two(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    extra = alibi_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.cat((torch.tensor(power_of_two(closest)), extra))


def alibi_bias(slopes: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Float (n_head, len(qpos), len(kpos)): -slope * |distance| from each query to each key
    (absolute, so keys a bidirectional prefix shows ahead of a query are penalised alike)."""
    distance = (qpos.unsqueeze(1) - kpos.unsqueeze(0)).abs().float()
    return -slopes.to(qpos.device).view(-1, 1, 1) * distance


def band_mask(T: int, window: int | None, device=None) -> torch.Tensor | None:
    """Bool (T, T): query i sees key j iff i - window < j <= i; None when plain causal does."""
    if window is None or window >= T:
        return None
    ones = torch.ones(T, T, dtype=torch.bool, device=device)
    return ones.tril() & ones.triu(-(window - 1))


def attention_mask(
    T: int,
    start: int,
    *,
    window: int | None,
    prefix_len: torch.Tensor | None = None,
    cache=None,
    alibi_slopes: torch.Tensor | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for scaled_dot_product_attention over T new queries at
    positions start..start+T-1: (None, True) when plain causal attention does; else a bool
    mask (True = may attend), (T, S), or per row (B, 1, T, T) with a prefix; or, for
    ALiBi, a float bias. With a KV cache, its current step (cache.begin(T)) decides which
    keys each query sees."""
    if cache is None:
        attn_mask = band_mask(T, window, device)
        if prefix_len is not None:
            visible = attn_mask if attn_mask is not None else torch.ones(T, T, dtype=torch.bool, device=device).tril()
            in_prefix = torch.arange(T, device=device) < prefix_len.unsqueeze(1)  # (B, keys)
            attn_mask = (visible | in_prefix.unsqueeze(1)).unsqueeze(1)  # (B, 1, T, T)
        is_causal = attn_mask is None
    else:
        attn_mask, is_causal = cache.step.attn_mask, cache.step.is_causal
    if alibi_slopes is None:
        return attn_mask, is_causal
    qpos = torch.arange(start, start + T, device=device)
    bias = alibi_bias(alibi_slopes, qpos, qpos if cache is None else cache.key_positions()).to(dtype)
    if is_causal:
        attn_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if attn_mask is not None:
        bias = bias.masked_fill(~attn_mask, -math.inf)
    return bias, False
