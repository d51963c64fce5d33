"""A key/value cache for incremental decoding with lab.models.gpt.GPT.

Keys and values live in two buffers preallocated once, of shape
(n_layer, batch, n_kv_head, capacity, head_dim); new tokens are written in place.
Without a sliding window the capacity is max_len (default block_size). With a
sliding window the buffer is a ring of `sliding_window` slots: position p is
stored in slot p % capacity, so memory stays bounded however long generation
runs. Keys are cached after RoPE, so a key's slot order never matters to the
softmax: attention masks slots by the position they hold, not by their index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab.checks import POSITIVE_INT, optional
from lab.models.config import GPTConfig

# stands for "nothing here yet": far enough back to fall outside any window
_EMPTY_SLOT = -(2**62)


@dataclass
class CacheStep:
    """How one forward call of T new tokens reads and writes the cache (same for every layer)."""

    # "fresh": empty cache; "in_place": write, then read the buffer; "concat": read buffer + new
    mode: str
    attn_mask: torch.Tensor | None  # bool (T, n_keys), True = may attend; None = see "is_causal"
    is_causal: bool
    n_keys: int  # "in_place": how many leading slots to read
    write_from: int  # index into the new tokens of the first one kept
    write_slots: slice | torch.Tensor  # where the kept tokens go
    kpos: torch.Tensor | None = None  # "concat": position of each key read


class KVCache:
    """Per-layer keys and values of the tokens a GPT has seen so far.

    Make one with model.new_cache(batch_size, max_len) and pass it as
    model(idx, cache=cache) with only the new tokens in idx. The cache binds to
    the first model it is used with and refuses any other.

    A forward call drives it through its step API: check(config, owner, idx) first,
    begin(T) to plan the step (which keys each new query sees, where the new keys go),
    update(layer, k, v) in every attention layer, key_positions() for distance biases,
    and end(T) once every layer has run.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int = 1,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        owner: object | None = None,
    ):
        if not isinstance(config, GPTConfig):
            raise ValueError(f"KVCache expects a GPTConfig, got {type(config).__name__}")
        POSITIVE_INT.check("batch_size", batch_size)
        optional(POSITIVE_INT).check("max_len", max_len)
        window = config.sliding_window
        if max_len is not None:
            if window is None and max_len > config.block_size:
                raise ValueError(
                    f"max_len={max_len} exceeds the context (block_size={config.block_size}) "
                    "of a model without a sliding window"
                )
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")

        self.config = config
        self.batch_size = batch_size
        if window is None:
            self.max_len = config.block_size if max_len is None else max_len
            self._capacity = self.max_len
        else:
            # a ring of `window` slots holds every key any query can still see;
            # a shorter max_len never wraps, so a smaller buffer suffices
            self.max_len = max_len
            self._capacity = window if max_len is None else min(window, max_len)
        self.rolling = window is not None and self._capacity == window
        shape = (config.n_layer, batch_size, config.kv_heads, self._capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._length = 0
        self._owner = owner  # the model's cache token (GPT.new_cache), else set on first use
        self.step: CacheStep | None = None  # the plan of the forward call in progress

    # ------------------------------------------------------------ public

    @property
    def length(self) -> int:
        """Tokens seen so far; also the position of the next token."""
        return self._length

    @property
    def capacity(self) -> int:
        """Slots per layer and batch row (max_len, or sliding_window for a ring buffer)."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes allocated for all keys and values."""
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        """Forget every token, keeping the buffers (and the model the cache is bound to)."""
        self._length = 0

    def load_(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace the contents with the keys and values of positions 0..L-1, each of shape
        (n_layer, batch_size, n_kv_head, L, head_dim) as cached (keys after RoPE): a context
        of L tokens without running it through the model (e.g. random ones, to time decoding
        at a long context). Not for a ring buffer that L would wrap."""
        want = (self.config.n_layer, self.batch_size, self.config.kv_heads)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 5 or tuple(t.shape[:3]) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape {want + ('L', self.config.head_dim)}, got {got}")
            if t.shape[-1] != self.config.head_dim or t.shape != k.shape:
                raise ValueError(
                    f"k and v must both have shape {want + ('L', self.config.head_dim)}, got {tuple(t.shape)}"
                )
        n = k.shape[3]
        if n > self._capacity or (self.max_len is not None and n > self.max_len):
            raise ValueError(f"a context of {n} tokens does not fit this cache (capacity {self._capacity})")
        self.k[:, :, :, :n] = k
        self.v[:, :, :, :n] = v
        self._length = n

    def __repr__(self) -> str:
        return (
            f"KVCache(batch_size={self.batch_size}, length={self.length}, capacity={self.capacity}, "
            f"rolling={self.rolling}, nbytes={self.nbytes})"
        )

    # ------------------------------------------------------------ the step API GPT.forward uses

    def check(self, config: GPTConfig, owner: object, idx: torch.Tensor) -> None:
        """Raise ValueError unless the new tokens idx (B, T) from this model fit in this cache."""
        batch_size, n_new = idx.shape
        if config != self.config:
            mine, theirs = self.config.to_dict(), config.to_dict()
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(
                f"cache was built for a model with config {{{_show(mine, diff)}}}, got {{{_show(theirs, diff)}}}"
            )
        if self._owner is not None and self._owner is not owner:
            raise ValueError(
                "cache was built for another model instance (same config: "
                f"{config.describe()}); make one with model.new_cache()"
            )
        if batch_size != self.batch_size:
            raise ValueError(f"cache was built for batch_size={self.batch_size}, got a batch of {batch_size}")
        if idx.device != self.k.device:
            raise ValueError(f"cache lives on {self.k.device}, got idx on {idx.device}")
        if self.max_len is not None and self._length + n_new > self.max_len:
            total = self._length + n_new
            if self.config.sliding_window is None and self.max_len == self.config.block_size:
                raise ValueError(
                    f"generation longer than the context (block_size={self.max_len}) without a sliding "
                    f"window: the cache holds {self._length} tokens, {n_new} more make {total}"
                )
            raise ValueError(
                f"cache max_len={self.max_len} exceeded: it holds {self._length} tokens, {n_new} more make {total}"
            )
        self._owner = owner

    def begin(self, T: int) -> CacheStep:
        """Plan how T new tokens attend to the cache and where they are stored."""
        p0, cap, window = self._length, self._capacity, self.config.sliding_window
        device = self.k.device
        keep = min(T, cap)
        first = (p0 + T - keep) % cap  # slot of the first kept token
        write_slots = (
            slice(first, first + keep)
            if first + keep <= cap
            else torch.arange(first, first + keep, device=device) % cap
        )
        if p0 == 0:
            # nothing cached: attend among the new tokens exactly as without a cache
            mask = None
            if window is not None and window < T:
                mask = _visible(torch.arange(T, device=device), 0, T, window)
            step = CacheStep("fresh", mask, mask is None, T, T - keep, write_slots)
        elif T == 1 or p0 + T <= cap:
            # no new token overwrites a key another new token still needs: the
            # one-token case only evicts position p0 - window, already out of sight
            n = min(p0 + T, cap)
            mask = None
            if T > 1:
                mask = _visible(torch.arange(n, device=device), p0, T, window)
            step = CacheStep("in_place", mask, False, n, 0, write_slots)
        else:
            # a multi-token step that wraps the ring: read the old slots and the new
            # tokens side by side, then keep the newest `cap`
            slots = torch.arange(cap, device=device)
            held = slots + cap * torch.div(p0 - 1 - slots, cap, rounding_mode="floor")
            held = torch.where(held >= 0, held, torch.full_like(held, _EMPTY_SLOT))
            kpos = torch.cat((held, torch.arange(p0, p0 + T, device=device)))
            mask = _visible(kpos, p0, T, window)
            step = CacheStep("concat", mask, False, cap + T, T - keep, write_slots, kpos)
        self.step = step
        return step

    def key_positions(self) -> torch.Tensor:
        """Position of each key the current step attends to (for distance-based biases)."""
        step, p0, cap = self.step, self._length, self._capacity
        device = self.k.device
        if step.mode == "concat":
            return step.kpos
        if step.mode == "fresh":
            return torch.arange(step.n_keys, device=device)
        if step.n_keys < cap:
            return torch.arange(step.n_keys, device=device)
        # a full ring once the newest position `last` is written: slot s holds the
        # newest position p <= last with p = s mod cap (a wrapped in-place step has T = 1)
        last = p0 + max(1, step.n_keys - p0) - 1
        slots = torch.arange(cap, device=device)
        return slots + cap * torch.div(last - slots, cap, rounding_mode="floor")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values (B, n_kv_head, T, head_dim); return those to attend to."""
        step, ck, cv = self.step, self.k[layer], self.v[layer]
        if step.mode == "in_place":
            self._write(ck, cv, k, v, step)
            return ck[:, :, : step.n_keys], cv[:, :, : step.n_keys]
        if step.mode == "concat":
            k_all, v_all = torch.cat((ck, k), dim=2), torch.cat((cv, v), dim=2)
            self._write(ck, cv, k, v, step)
            return k_all, v_all
        self._write(ck, cv, k, v, step)
        return k, v

    @staticmethod
    def _write(ck, cv, k, v, step: CacheStep) -> None:
        k, v = k[:, :, step.write_from :], v[:, :, step.write_from :]
        if isinstance(step.write_slots, slice):
            ck[:, :, step.write_slots] = k
            cv[:, :, step.write_slots] = v
        else:
            ck.index_copy_(2, step.write_slots, k.to(ck.dtype))
            cv.index_copy_(2, step.write_slots, v.to(cv.dtype))

    def end(self, T: int) -> None:
        self._length += T
        self.step = None


def _visible(kpos: torch.Tensor, p0: int, T: int, window: int | None) -> torch.Tensor:
    """Bool (T, len(kpos)): query at position p0 + t may see the key at position kpos[j]."""
    qpos = torch.arange(p0, p0 + T, device=kpos.device).unsqueeze(1)
    mask = kpos.unsqueeze(0) <= qpos
    if window is not None:
        mask &= kpos.unsqueeze(0) > qpos - window
    return mask


def _show(d: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={d.get(k)!r}" for k in keys)
