"""Generation for the lab GPT: prefill and one-token steps through a KV cache, and
generate() with its three paths (the cache, full recompute, nanoGPT's crop to the last
block_size tokens). GPT inherits these methods from GenerationMixin."""

from __future__ import annotations

import torch

from lab.checks import BOOL, NON_NEGATIVE_INT
from lab.models.cache import KVCache
from lab.models.config import check_token_ids
from lab.models.sampling import check_sampling_args, sample_next


class GenerationMixin:
    """Incremental decoding and sampling; mixed into GPT (needs its new_cache, _hidden,
    _check_tokens and lm_head)."""

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model, on its device and in its dtype.

        max_len bounds the tokens it will hold (default block_size); with a sliding
        window the cache is a ring of sliding_window slots and max_len may be None.
        """
        w = self.wte.weight
        return KVCache(self.config, batch_size, max_len, device=w.device, dtype=w.dtype, owner=self._cache_token)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed idx (B, T) into cache; return the logits (B, vocab) that predict the next token."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache (see GPT.new_cache), got {type(cache).__name__}")
        self._check_tokens(idx, cache)
        return self._next_logits(idx, cache)

    @torch.no_grad()
    def decode_one(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row, (B,) or (B, 1), into cache; return next-token logits (B, vocab)."""
        if isinstance(token, torch.Tensor) and token.dim() == 1:
            token = token.unsqueeze(1)
        if isinstance(token, torch.Tensor) and token.dim() == 2 and token.size(1) != 1:
            raise ValueError(f"decode_one takes one token per row, got shape {tuple(token.shape)}")
        return self.prefill(token, cache)

    def _next_logits(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        # only the last position predicts a new token: skip the others' vocab projection
        return self.lm_head(self._hidden(idx, cache)[:, -1])

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
        use_cache: bool = True,
        crop: bool = False,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        use_cache=True prefills a KV cache with the prompt and then feeds one token
        per step; use_cache=False recomputes the whole sequence every step. Both
        give the same tokens. A sequence longer than block_size needs a sliding
        window (and the cache), or crop=True: nanoGPT's behaviour of conditioning
        on the last block_size tokens, recomputed every step. The module's
        train/eval mode is left as is: call model.eval() to sample without dropout.
        """
        check_token_ids(idx, vocab_size=self.config.vocab_size)
        NON_NEGATIVE_INT.check("max_new_tokens", max_new_tokens)
        check_sampling_args(temperature, top_k, top_p)
        BOOL.check("use_cache", use_cache)
        BOOL.check("crop", crop)
        block_size, window = self.config.block_size, self.config.sliding_window
        B, T0 = idx.shape
        total = T0 + max_new_tokens

        def sample(logits):
            return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

        out = torch.empty(B, total, dtype=idx.dtype, device=idx.device)
        out[:, :T0] = idx
        if max_new_tokens == 0:
            return out
        if total > block_size and (window is None or not use_cache):
            if not crop:
                why = "without a sliding window" if window is None else "with use_cache=False"
                raise ValueError(
                    f"generation longer than the context (block_size={block_size}) {why}: prompt "
                    f"{T0} + max_new_tokens {max_new_tokens} = {total}; pass crop=True to condition "
                    "on the last block_size tokens (nanoGPT's behaviour)"
                )
            for t in range(T0, total):
                out[:, t] = sample(self._next_logits(out[:, max(0, t - block_size) : t], None))
            return out
        if not use_cache:
            for t in range(T0, total):
                out[:, t] = sample(self._next_logits(out[:, :t], None))
            return out
        cache = self.new_cache(B, max_len=None if window is not None else total)
        # one forward call takes at most block_size tokens: prefill a long prompt in chunks
        for s in range(0, T0, block_size):
            logits = self._next_logits(idx[:, s : s + block_size], cache)
        for t in range(T0, total):
            next_id = sample(logits)
            out[:, t] = next_id
            if t + 1 < total:
                logits = self._next_logits(next_id.unsqueeze(1), cache)
        return out
