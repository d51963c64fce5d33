"""A small GPT: a decoder-only transformer, readable top to bottom.

The semantics follow nanoGPT's model.py (GPT-2 layout and init); the parts are
separate modules so a config swaps one component without touching the others:
positions (learned, sinusoidal, RoPE, ALiBi, none), attention (MHA/GQA/MQA,
sliding window, the 1/sqrt(d) scale), norm (LayerNorm/RMSNorm, pre or post the
residual add), residual connections on or off, and the MLP (GELU, ReLU, SwiGLU,
or a top-k routed mixture of experts). The defaults are GPT-2. The Llama-style
choices follow Hugging Face's Llama conventions exactly, so such weights export
to LlamaForCausalLM.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.models.cache import KVCache
from lab.models.sampling import check_sampling_args, sample_next

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "relu", "swiglu")


def _is_pos_int(value) -> bool:
    # bool is an int subclass; True as a layer count is always a mistake
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_pos_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # the longest sequence one forward call takes
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, as in GPT-2
    tie_weights: bool = True  # lm_head shares its weight with the token embedding
    n_kv_head: int | None = None  # key/value heads: None = n_head (MHA), 1 = MQA, between = GQA
    pos: str = "learned"  # one of POSITIONS
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # one of NORMS
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # one of MLPS
    mlp_hidden: int | None = None  # None: 4 * n_embd for GELU, about 8/3 * n_embd for SwiGLU
    sliding_window: int | None = None  # each query sees this many most recent positions
    norm_position: str = "pre"  # one of NORM_POSITIONS: norm each branch's input, or the sum after it
    residual: bool = True  # False: each sub-layer replaces the stream instead of adding to it
    qk_scale: float | None = None  # attention logits = q.k * qk_scale; None = 1/sqrt(head_dim)
    init_std: float = 0.02  # std of the normal init of every weight matrix and embedding
    n_expert: int | None = None  # None: dense MLP; else a mixture of this many MLP experts
    moe_top_k: int = 2  # experts each token is routed to
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss train() adds (0 = none)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not _is_pos_int(value):
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"each head gets n_embd / n_head dimensions"
            )
        if (
            not isinstance(self.dropout, (int, float))
            or isinstance(self.dropout, bool)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"GPTConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_weights", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("n_kv_head", "mlp_hidden", "sliding_window"):
            value = getattr(self, name)
            if value is not None and not _is_pos_int(value):
                raise ValueError(f"GPTConfig.{name} must be None or a positive int, got {value!r}")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        for name, allowed in (("pos", POSITIONS), ("norm", NORMS), ("mlp", MLPS), ("norm_position", NORM_POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not _is_pos_number(getattr(self, name)):
                raise ValueError(f"GPTConfig.{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.qk_scale is not None and not _is_pos_number(self.qk_scale):
            raise ValueError(f"GPTConfig.qk_scale must be None or a finite number > 0, got {self.qk_scale!r}")
        if self.n_expert is not None:
            if not _is_pos_int(self.n_expert) or self.n_expert < 2:
                raise ValueError(f"GPTConfig.n_expert must be None or an int >= 2, got {self.n_expert!r}")
            if not _is_pos_int(self.moe_top_k) or self.moe_top_k > self.n_expert:
                raise ValueError(
                    f"GPTConfig.moe_top_k must be an int in [1, n_expert={self.n_expert}], got {self.moe_top_k!r}"
                )
        if (
            not isinstance(self.moe_aux_weight, (int, float))
            or isinstance(self.moe_aux_weight, bool)
            or not math.isfinite(self.moe_aux_weight)
            or self.moe_aux_weight < 0
        ):
            raise ValueError(f"GPTConfig.moe_aux_weight must be a finite number >= 0, got {self.moe_aux_weight!r}")
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"GPTConfig.pos='rope' needs an even head size n_embd/n_head, got {self.head_dim}")
        if self.pos == "sinusoidal" and self.n_embd % 2 != 0:
            raise ValueError(f"GPTConfig.pos='sinusoidal' needs an even n_embd, got {self.n_embd}")
        if self.sliding_window is not None and self.pos == "learned":
            raise ValueError(
                f"GPTConfig.sliding_window={self.sliding_window} needs pos 'rope' or 'none', got "
                "pos='learned' (learned positions stop at block_size, a window is meant to go past it)"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """n_kv_head with None resolved to n_head."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden_dim(self) -> int:
        """mlp_hidden with None resolved: 4 * n_embd (GELU), or 8/3 * n_embd rounded up to a
        multiple of 8 (SwiGLU: its three matrices then hold about as many weights as GELU's two)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 8 * math.ceil(math.ceil(8 * self.n_embd / 3) / 8)
        return 4 * self.n_embd

    def describe(self) -> str:
        """A short name for the architecture, e.g. 'pre-LN GPT-2 (learned pos, LayerNorm, GELU, MHA 4/4)'."""
        kv = self.kv_heads
        attention = "MHA" if kv == self.n_head else "MQA" if kv == 1 else "GQA"
        mlp = {"gelu": "GELU", "relu": "ReLU", "swiglu": "SwiGLU"}[self.mlp]
        if self.n_expert is not None:
            mlp = f"MoE {self.n_expert}x{mlp} top-{self.moe_top_k}"
        parts = [
            f"{self.pos} pos",
            {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[self.norm],
            mlp,
            f"{attention} {self.n_head}/{kv}",
        ]
        if self.sliding_window is not None:
            parts.append(f"window {self.sliding_window}")
        if self.qk_scale is not None:
            parts.append(f"qk scale {self.qk_scale:g}")
        if not self.residual:
            parts.append("no residual")
        gpt2 = (self.pos, self.norm, self.mlp, self.n_expert) == ("learned", "layernorm", "gelu", None)
        return f"{self.norm_position}-LN {'GPT-2' if gpt2 else 'GPT'} ({', '.join(parts)})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        if not isinstance(d, dict):
            raise ValueError(f"GPTConfig.from_dict expects a dict, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s) {unknown}; expected a subset of {known}")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise ValueError(f"GPTConfig.from_dict is missing required key(s) {missing}")
        return cls(**d)


# ---------------------------------------------------------------- positions


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
        # softmax weights in .pattern; the fused kernel never materialises them
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
            k, v = cache._update(layer, k, v)
        if self.keep_pattern:
            y = self._explicit(q, k, v, attn_mask, is_causal)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
                scale=self.scale,
                # query head h reads KV head h // (n_head // n_kv_head), as HF's repeat_kv
                enable_gqa=n_kv != self.n_head,
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
        # attribute name kept from GPT-2 (state-dict keys have none: it has no weights)
        self.gelu = nn.ReLU() if config.mlp == "relu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


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


class MoE(nn.Module):
    """Top-k routed mixture of MLP experts (Switch / Mixtral style).

    A linear router scores the experts for each token; the token goes to its top_k
    experts, whose outputs are mixed with the renormalised router probabilities.
    Each forward keeps `load` (fraction of routed token-slots per expert) and
    `aux_loss`, Switch Transformer's load-balancing loss E * sum_e f_e * P_e
    (f: routed fraction, P: mean router probability), which is 1 when balanced.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.top_k = config.moe_top_k
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(make_mlp(config) for _ in range(config.n_expert))
        self.load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x):
        shape, n_expert = x.shape, len(self.experts)
        flat = x.reshape(-1, shape[-1])
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot].unsqueeze(1))
        routed = torch.bincount(chosen.flatten(), minlength=n_expert).float() / chosen.numel()
        self.load = routed.detach()
        self.aux_loss = n_expert * (routed * probs.mean(0)).sum()
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.n_expert is not None else make_mlp(config)
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


class GPT(nn.Module):
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
        if not _is_pos_int(block_size):
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
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

    def aux_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing loss of the last forward (MoE models), else None."""
        if self.config.n_expert is None or self.config.moe_aux_weight == 0:
            return None
        self._check_routed()
        return self.config.moe_aux_weight * sum(b.mlp.aux_loss for b in self.blocks)

    def _check_routed(self):
        if any(b.mlp.load is None for b in self.blocks):
            raise ValueError("no routing recorded yet: run a forward pass of this MoE model first")

    def expert_load(self) -> list[list[float]] | None:
        """Per MoE layer, the fraction of the last forward's routed tokens each expert got."""
        if self.config.n_expert is None:
            return None
        self._check_routed()
        return [b.mlp.load.tolist() for b in self.blocks]

    @torch.no_grad()
    def attention_patterns(self, idx: torch.Tensor, **forward_kwargs) -> list[torch.Tensor]:
        """Attention weights (B, n_head, T, T) of every layer on idx, computed explicitly."""
        attns = [b.attn for b in self.blocks]
        for a in attns:
            a.keep_pattern = True
        try:
            self(idx, **forward_kwargs)
            return [a.pattern for a in attns]
        finally:
            for a in attns:
                a.keep_pattern, a.pattern = False, None

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model, on its device and in its dtype.

        max_len bounds the tokens it will hold (default block_size); with a sliding
        window the cache is a ring of sliding_window slots and max_len may be None.
        """
        w = self.wte.weight
        cache = KVCache(self.config, batch_size, max_len, device=w.device, dtype=w.dtype)
        cache._owner = self._cache_token
        return cache

    # ------------------------------------------------------------ input checks

    def _check_idx(self, idx, name="idx"):
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 2:
            got = (
                f"{idx.dtype} tensor of shape {tuple(idx.shape)}"
                if isinstance(idx, torch.Tensor)
                else type(idx).__name__
            )
            raise ValueError(f"{name} must be a 2-D int64 tensor of shape (B, T), got {got}")
        if idx.numel() == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(idx.shape)}")

    def _check_vocab(self, idx):
        # out-of-range ids would otherwise be an opaque IndexError (or a CUDA assert)
        if bool(((idx < 0) | (idx >= self.config.vocab_size)).any()):
            raise ValueError(
                f"idx holds token ids outside [0, {self.config.vocab_size}): min {int(idx.min())}, max {int(idx.max())}"
            )

    def _check_tokens(self, idx, cache):
        self._check_idx(idx)
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length T={T} exceeds the model's block_size={self.config.block_size}")
        self._check_vocab(idx)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ValueError(f"cache must be a KVCache (see GPT.new_cache), got {type(cache).__name__}")
            cache._check(self.config, self._cache_token, idx)

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
        prefix_len = self._check_prefix(prefix_len, idx, cache)
        if targets is not None:
            self._check_idx(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        logits = self.lm_head(self._hidden(idx, cache, prefix_len))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def final_hidden(self, idx: torch.Tensor, *, prefix_len: torch.Tensor | int | None = None) -> torch.Tensor:
        """(B, T, n_embd): the final (normed) hidden states the unembedding reads."""
        self._check_tokens(idx, None)
        return self._hidden(idx, None, self._check_prefix(prefix_len, idx, None))

    def _check_prefix(self, prefix_len, idx, cache) -> torch.Tensor | None:
        """prefix_len as a (B,) long tensor, or None; ValueError naming what is wrong."""
        if prefix_len is None:
            return None
        if cache is not None:
            raise ValueError("prefix_len (prefix-LM / bidirectional attention) cannot be used with a KV cache")
        B, T = idx.shape
        if isinstance(prefix_len, int) and not isinstance(prefix_len, bool):
            prefix_len = torch.full((B,), prefix_len, dtype=torch.long, device=idx.device)
        if not isinstance(prefix_len, torch.Tensor) or prefix_len.shape != (B,) or prefix_len.is_floating_point():
            raise ValueError(f"prefix_len must be None, an int or an int tensor of shape ({B},), got {prefix_len!r}")
        if bool(((prefix_len < 0) | (prefix_len > T)).any()):
            raise ValueError(f"prefix_len values must lie in [0, T={T}], got {prefix_len.tolist()}")
        return prefix_len

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

        if cache is None:
            attn_mask = band_mask(T, config.sliding_window, idx.device)
            if prefix_len is not None:
                visible = (
                    attn_mask if attn_mask is not None else torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
                )
                in_prefix = torch.arange(T, device=idx.device) < prefix_len.unsqueeze(1)  # (B, keys)
                attn_mask = (visible | in_prefix.unsqueeze(1)).unsqueeze(1)  # (B, 1, T, T)
            is_causal = attn_mask is None
            kpos = None
        else:
            step = cache._begin(T)
            attn_mask, is_causal = step.attn_mask, step.is_causal
            kpos = cache._key_positions() if config.pos == "alibi" else None
        if config.pos == "alibi":
            qpos = torch.arange(start, start + T, device=idx.device)
            bias = alibi_bias(self._alibi_slopes, qpos, qpos if kpos is None else kpos).to(x.dtype)
            if is_causal:
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            if attn_mask is not None:
                bias = bias.masked_fill(~attn_mask, -math.inf)
            attn_mask, is_causal = bias, False
        for i, block in enumerate(self.blocks):
            x = block(x, rope, attn_mask, is_causal, cache, i)
        if cache is not None:
            cache._end(T)
        return self.ln_f(x)

    def _rope_at(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, head_dim) for positions start..start+T-1."""
        need = start + T
        if self._rope is None or self._rope[0].device != device or self._rope[0].size(0) < need:
            n = max(need, self.config.block_size, 0 if self._rope is None else 2 * self._rope[0].size(0))
            self._rope = rope_tables(n, self.config.head_dim, self.config.rope_theta, device)
        cos, sin = self._rope
        return cos[start:need], sin[start:need]

    # ------------------------------------------------------------ incremental decoding

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed idx (B, T) into cache; return the logits (B, vocab) that predict the next token."""
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache (see GPT.new_cache), got {type(cache).__name__}")
        self._check_tokens(idx, cache)
        return self._step_logits(idx, cache)

    @torch.no_grad()
    def decode_one(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row, (B,) or (B, 1), into cache; return next-token logits (B, vocab)."""
        if isinstance(token, torch.Tensor) and token.dim() == 1:
            token = token.unsqueeze(1)
        if isinstance(token, torch.Tensor) and token.dim() == 2 and token.size(1) != 1:
            raise ValueError(f"decode_one takes one token per row, got shape {tuple(token.shape)}")
        return self.prefill(token, cache)

    def _step_logits(self, idx, cache) -> torch.Tensor:
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
        self._check_idx(idx)
        self._check_vocab(idx)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        check_sampling_args(temperature, top_k, top_p)
        for name, value in (("use_cache", use_cache), ("crop", crop)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
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
                context = out[:, max(0, t - block_size) : t]
                out[:, t] = sample(self._step_logits(context, None))
            return out

        if not use_cache:
            for t in range(T0, total):
                out[:, t] = sample(self._step_logits(out[:, :t], None))
            return out

        cache = self.new_cache(B, max_len=None if window is not None else total)
        # one forward call takes at most block_size tokens: prefill a long prompt in chunks
        for s in range(0, T0, block_size):
            logits = self._step_logits(idx[:, s : s + block_size], cache)
        for t in range(T0, total):
            next_id = sample(logits)
            out[:, t] = next_id
            if t + 1 < total:
                logits = self._step_logits(next_id.unsqueeze(1), cache)
        return out
