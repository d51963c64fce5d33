"""A small GPT: a decoder-only transformer, readable top to bottom.

The semantics follow nanoGPT's model.py (GPT-2 layout and init); a config swaps one
component without touching the others: positions (lab.models.positions), attention
(MHA/GQA/MQA, sliding window, the 1/sqrt(d) scale), norm (LayerNorm/RMSNorm, pre or
post the residual add), residual connections on or off, and the MLP (GELU, ReLU,
SwiGLU, or a mixture of experts, lab.models.moe). The defaults are GPT-2; the
Llama-style choices follow Hugging Face's Llama exactly, so such weights export to
LlamaForCausalLM. The config and its validation live in lab.models.config, generation
in lab.models.generate, the KV cache in lab.models.cache.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.checks import POSITIVE_INT
from lab.models.cache import KVCache
from lab.models.config import GPTConfig, check_prefix_len, check_token_ids
from lab.models.generate import GenerationMixin
from lab.models.moe import MoE
from lab.models.positions import alibi_slopes, apply_rope, attention_mask, rope_tables, sinusoidal_table

# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 exactly as Hugging Face's
    LlamaRMSNorm does. Written out because torch's fused CPU kernel costs ~4x more per
    call on the one-row inputs of cached decoding."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    if config.norm == "none":
        return nn.Identity()
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.scale = config.qk_scale  # None: SDPA's 1/sqrt(head_dim)
        # set keep_pattern to compute attention explicitly and keep the (B, n_head, T, S)
        # softmax weights in .pattern (lab.inspect's attn.hook_pattern); the fused kernel
        # never materialises them
        self.keep_pattern = False
        self.pattern: torch.Tensor | None = None
        # one fused projection laid out [q (n_head) | k (n_kv_head) | v (n_kv_head)] heads
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, attn_mask=None, is_causal=True, cache=None, layer=0):
        B, T, C = x.shape
        hd, n_kv = self.head_dim, self.n_kv_head
        qk, v = self.c_attn(x).split(((self.n_head + n_kv) * hd, n_kv * hd), dim=2)
        qk = qk.view(B, T, self.n_head + n_kv, hd)
        if rope is not None:
            # q and k heads share their positions: rotate them in one go
            cos, sin = rope
            qk = apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1))
        # (B, T, heads, hd) -> (B, heads, T, hd)
        q, k = qk.transpose(1, 2).split((self.n_head, n_kv), dim=1)
        v = v.view(B, T, n_kv, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.keep_pattern:
            y = self._explicit(q, k, v, attn_mask, is_causal)
        elif T == 1 and n_kv != self.n_head and not is_causal and not self.training:
            # one new query per head (cached decoding): the query heads that share a KV head
            # become that head's queries, so each cached key and value is read once instead
            # of once per query head (SDPA's CPU enable_gqa expands them)
            qg = q.reshape(B, n_kv, self.n_head // n_kv, hd)
            if attn_mask is not None and attn_mask.dim() == 3:  # ALiBi: a bias per query head
                attn_mask = attn_mask.reshape(n_kv, self.n_head // n_kv, -1)
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask, 0.0, False, scale=self.scale)
            y = y.reshape(B, self.n_head, 1, hd)
        else:
            # query head h reads KV head h // (n_head // n_kv_head), as HF's repeat_kv
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask, dropout_p, is_causal, scale=self.scale, enable_gqa=n_kv != self.n_head
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _explicit(self, q, k, v, attn_mask, is_causal):
        """softmax(q k^T * scale + mask) v written out, keeping the weights in self.pattern."""
        groups = self.n_head // self.n_kv_head
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
        scores = (q @ k.transpose(-2, -1)).float() * scale
        if is_causal:
            T, S = scores.shape[-2:]
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
        pattern = scores.softmax(dim=-1)
        self.pattern = pattern.detach()
        if self.training and self.dropout > 0:
            pattern = F.dropout(pattern, self.dropout)
        return pattern.to(v.dtype) @ v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden_dim
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = nn.ReLU() if config.mlp == "relu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class SwiGLU(nn.Module):
    """c_proj(silu(gate) * up), with gate and up fused in c_fc as [gate | up] (HF Llama's MLP)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden_dim
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


def make_mlp(config: GPTConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else MLP(config)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config, make_mlp) if config.n_expert is not None else make_mlp(config)
        self.post_norm = config.norm_position == "post"
        self.residual = config.residual

    def forward(self, x, rope=None, attn_mask=None, is_causal=True, cache=None, layer=0):
        if self.post_norm or not self.residual:
            return self._ablated(x, rope, attn_mask, is_causal, cache, layer)
        x = x + self.attn(self.ln_1(x), rope, attn_mask, is_causal, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x

    def _ablated(self, x, rope, attn_mask, is_causal, cache, layer):
        """Post-norm (the original Transformer: norm(x + f(x))) and/or no residual add."""

        def sublayer(x, norm, f):
            if self.post_norm:
                return norm(x + f(x) if self.residual else f(x))
            return x + f(norm(x)) if self.residual else f(norm(x))

        x = sublayer(x, self.ln_1, lambda h: self.attn(h, rope, attn_mask, is_causal, cache, layer))
        return sublayer(x, self.ln_2, self.mlp)


# ---------------------------------------------------------------- model


class GPT(GenerationMixin, nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"GPT expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # post-norm blocks already end in a norm (the original Transformer has no final one)
        self.ln_f = nn.Identity() if config.norm_position == "post" else make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        # identifies this model to its KV caches (a deep copy gets a new one)
        self._cache_token = object()
        self._rope = None  # float32 cos/sin tables, grown on demand; not state
        self._alibi_slopes = alibi_slopes(config.n_head) if config.pos == "alibi" else None

        self.apply(self._init_weights)
        # GPT-2: each block adds two residual branches, so shrink their output
        # projections to keep the residual stream's variance flat with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def arch(self) -> str:
        return self.config.describe()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; with non_embedding, lookup tables are left out.

        Position embeddings are always lookup-only. Token embeddings count when
        tied, because they then also do the work of the output layer.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n

    def with_context(self, block_size: int) -> GPT:
        """A copy of this model (same weights, device, dtype, mode) that takes sequences up
        to block_size. Positions the model was trained on are unchanged; longer contexts
        test length extrapolation. Learned position embeddings have no rows past the trained
        block_size, so for them a longer context is an error rather than a guess."""
        POSITIVE_INT.check("block_size", block_size)
        c = self.config
        if c.pos == "learned" and block_size > c.block_size:
            raise ValueError(
                f"learned position embeddings exist only for positions 0..{c.block_size - 1}; a "
                f"{block_size}-token context would need rows the model never trained. Use pos="
                "'sinusoidal', 'rope', 'alibi' or 'none' to evaluate past the trained length"
            )
        w = self.wte.weight
        model = GPT(replace(c, block_size=block_size)).to(device=w.device, dtype=w.dtype)
        state = self.state_dict()
        if c.pos == "learned":
            state["wpe.weight"] = state["wpe.weight"][:block_size]
        model.load_state_dict(state)
        return model.train(self.training)

    # ------------------------------------------------------------ mixture of experts

    def aux_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing loss of the last forward (MoE models), else None."""
        if self.config.n_expert is None or self.config.moe_aux_weight == 0:
            return None
        self._check_routed()
        return self.config.moe_aux_weight * sum(b.mlp.aux_loss for b in self.blocks)

    def expert_load(self) -> list[list[float]] | None:
        """Per MoE layer, the fraction of the last forward's routed tokens each expert got."""
        if self.config.n_expert is None:
            return None
        self._check_routed()
        return [b.mlp.load.tolist() for b in self.blocks]

    def _check_routed(self):
        if any(b.mlp.load is None for b in self.blocks):
            raise ValueError("no routing recorded yet: run a forward pass of this MoE model first")

    # ------------------------------------------------------------ forward

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        prefix_len: torch.Tensor | int | None = None,
    ):
        """Logits (B, T, vocab) for every position, and mean cross-entropy (nats) if targets given.

        Targets equal to -1 are ignored in the loss. With a cache, idx holds only
        the new tokens: they sit at positions cache.length onward, attend to the
        cached ones too, and are added to the cache.

        prefix_len (an int, or (B,) per row) makes the first prefix_len positions
        visible to every query (prefix LM); prefix_len=T is full bidirectional
        attention (masked LM). None is causal.
        """
        self._check_tokens(idx, cache)
        if prefix_len is not None and cache is not None:
            raise ValueError("prefix_len (prefix-LM / bidirectional attention) cannot be used with a KV cache")
        prefix_len = check_prefix_len(prefix_len, idx)
        if targets is not None:
            check_token_ids(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        return self._logits_and_loss(idx, targets, cache, prefix_len)

    def _logits_and_loss(self, idx, targets=None, cache=None, prefix_len=None):
        """forward() without its input checks (for callers that checked once, such as the
        trainer, whose token arrays are checked before training: per-batch checks would
        wait on the device every step). prefix_len is None or a (B,) tensor."""
        logits = self.lm_head(self._hidden(idx, cache, prefix_len))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, *, prefix_len: torch.Tensor | int | None = None) -> torch.Tensor:
        """(B, T, n_embd): the final (normed) hidden states the unembedding reads, with gradients."""
        self._check_tokens(idx, None)
        return self._hidden(idx, None, check_prefix_len(prefix_len, idx))

    @torch.no_grad()
    def final_hidden(self, idx: torch.Tensor, *, prefix_len: torch.Tensor | int | None = None) -> torch.Tensor:
        """hidden_states without gradients."""
        return self.hidden_states(idx, prefix_len=prefix_len)

    def _check_tokens(self, idx, cache):
        check_token_ids(idx, vocab_size=self.config.vocab_size)
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence length T={idx.size(1)} exceeds the model's block_size={self.config.block_size}")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ValueError(f"cache must be a KVCache (see GPT.new_cache), got {type(cache).__name__}")
            cache.check(self.config, self._cache_token, idx)

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None, prefix_len=None) -> torch.Tensor:
        """Final normed hidden states (B, T, n_embd) of checked tokens idx."""
        config = self.config
        T = idx.size(1)
        start = 0 if cache is None else cache.length
        # positions are added to the input (learned, sinusoidal), rotate q and k (rope),
        # or bias the attention logits by distance (alibi)
        x = self.wte(idx)
        if config.pos == "learned":
            x = x + self.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        elif config.pos == "sinusoidal":
            # scaled to the token embeddings' RMS so neither swamps the other at init
            # (Vaswani et al. scale the embeddings up by sqrt(d) instead)
            table = sinusoidal_table(torch.arange(start, start + T, device=idx.device), config.n_embd)
            x = x + (config.init_std * math.sqrt(2)) * table.to(x.dtype)
        x = self.drop(x)
        rope = self._rope_at(start, T, idx.device) if config.pos == "rope" else None
        if cache is not None:
            cache.begin(T)
        attn_mask, is_causal = attention_mask(
            T,
            start,
            window=config.sliding_window,
            prefix_len=prefix_len,
            cache=cache,
            alibi_slopes=self._alibi_slopes,
            device=idx.device,
            dtype=x.dtype,
        )
        for i, block in enumerate(self.blocks):
            x = block(x, rope, attn_mask, is_causal, cache, i)
        if cache is not None:
            cache.end(T)
        return self.ln_f(x)

    def _rope_at(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, head_dim) for positions start..start+T-1."""
        need = start + T
        if self._rope is None or self._rope[0].device != device or self._rope[0].size(0) < need:
            n = max(need, self.config.block_size, 0 if self._rope is None else 2 * self._rope[0].size(0))
            self._rope = rope_tables(n, self.config.head_dim, self.config.rope_theta, device)
        cos, sin = self._rope
        return cos[start:need], sin[start:need]
