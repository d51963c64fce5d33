"""GPTConfig: every choice the lab GPT offers, validated by a table of rules; and the
checks of what a model with that config takes as input.

The defaults are GPT-2 (learned positions, pre-LayerNorm, GELU, multi-head attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from lab.checks import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    bounded_int,
    check_fields,
    check_relations,
    describe,
    from_dict,
    integer,
    is_int,
    number,
    one_of,
    optional,
)

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm", "none")  # none: the identity (curriculum 04's no-normalisation arm)
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "relu", "swiglu")


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
        check_fields(
            self,
            {
                "vocab_size": POSITIVE_INT,
                "block_size": POSITIVE_INT,
                "n_layer": POSITIVE_INT,
                "n_head": POSITIVE_INT,
                "n_embd": POSITIVE_INT,
                "dropout": number(0, 1, high_open=True),
                "bias": BOOL,
                "tie_weights": BOOL,
                "residual": BOOL,
                "n_kv_head": optional(POSITIVE_INT),
                "mlp_hidden": optional(POSITIVE_INT),
                "sliding_window": optional(POSITIVE_INT),
                "pos": one_of(POSITIONS),
                "norm": one_of(NORMS),
                "mlp": one_of(MLPS),
                "norm_position": one_of(NORM_POSITIONS),
                "rope_theta": POSITIVE,
                "norm_eps": POSITIVE,
                "init_std": POSITIVE,
                "qk_scale": optional(POSITIVE),
                "n_expert": optional(integer(2)),
                "moe_aux_weight": NON_NEGATIVE,
            },
        )
        if self.n_expert is not None:
            check_fields(self, {"moe_top_k": bounded_int(1, self.n_expert, "n_expert")})
        window = self.sliding_window
        check_relations(
            self,
            [
                (self.n_embd % self.n_head == 0, "n_embd", f"divisible by n_head ({self.n_head})", self.n_embd),
                (self.n_head % self.kv_heads == 0, "n_head", f"divisible by n_kv_head ({self.kv_heads})", self.n_head),
                (self.pos != "rope" or self.head_dim % 2 == 0, "n_embd / n_head", "even for pos='rope'", self.head_dim),
                (self.pos != "sinusoidal" or self.n_embd % 2 == 0, "n_embd", "even for pos='sinusoidal'", self.n_embd),
                (
                    window is None or self.pos != "learned",
                    "pos",
                    f"one that reaches past block_size (not 'learned') with sliding_window={window}",
                    self.pos,
                ),
            ],
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
            {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "none": "no norm"}[self.norm],
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
        return from_dict(cls, d)


# ---------------------------------------------------------------- what a model takes


def check_token_ids(idx, name: str = "idx", vocab_size: int | None = None) -> None:
    """ValueError unless idx is a non-empty (B, T) int64 tensor, with ids in [0, vocab_size)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 2:
        raise ValueError(f"{name} must be a 2-D int64 tensor of shape (B, T), got {describe(idx)}")
    if idx.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(idx.shape)}")
    # out-of-range ids would otherwise be an opaque IndexError (or a CUDA assert)
    if vocab_size is not None and bool(((idx < 0) | (idx >= vocab_size)).any()):
        raise ValueError(
            f"{name} holds token ids outside [0, {vocab_size}): min {int(idx.min())}, max {int(idx.max())}"
        )


def check_prefix_len(prefix_len, idx: torch.Tensor) -> torch.Tensor | None:
    """prefix_len (None, an int, or a (B,) int tensor) as a (B,) long tensor, or None."""
    if prefix_len is None:
        return None
    B, T = idx.shape
    if is_int(prefix_len):
        prefix_len = torch.full((B,), prefix_len, dtype=torch.long, device=idx.device)
    if not isinstance(prefix_len, torch.Tensor) or prefix_len.shape != (B,) or prefix_len.is_floating_point():
        raise ValueError(f"prefix_len must be None, an int or an int tensor of shape ({B},), got {prefix_len!r}")
    if bool(((prefix_len < 0) | (prefix_len > T)).any()):
        raise ValueError(f"prefix_len values must lie in [0, T={T}], got {prefix_len.tolist()}")
    return prefix_len
