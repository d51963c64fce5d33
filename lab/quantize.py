"""Post-training weight quantization and quantization-aware training (curriculum 14).

Round-to-nearest (RTN), symmetric, per output channel: each row of a Linear weight
(one output channel) gets its own scale ``s = max|w_row| / qmax`` with
``qmax = 2**(bits-1) - 1``, and every weight becomes ``s * clamp(round(w / s), -qmax, qmax)``.
The range is the restricted symmetric one (int4: -7..7, 15 levels; 2 bits: -1, 0, 1), so
zero is exact and the largest weight of each row is exact.

    from lab.quantize import quantize_rtn, qat_finetune, load_bnb

    q_model, report = quantize_rtn(model, bits=4)     # a copy; weights dequantized ("fake quant")
    report.weight_bytes                               # what the int4 codes + fp16 scales would take
    qat = qat_finetune(model, data.train, bits=4, steps=200, lr=3e-4, batch_size=16,
                       block_size=64, seed=0)         # trained through fake int4 weights (STE)
    hf8 = load_bnb(export_dir, "int8")                # bitsandbytes LLM.int8 / "nf4" / "fp4"
    hf_weight_bytes(hf8).weight_bytes

The quantized copy keeps float weights that lie exactly on the integer grid, so it runs
through the same code as the original model and its loss is the quantized model's loss;
the bytes are what storing the integer codes and the scales would take. The output head
is left in full precision by default (``skip=("lm_head",)``), as bitsandbytes does
through transformers; in the lab GPT it is tied to the token embedding, so quantizing it
would quantize the embedding too.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lab.checks import check_int, check_number, is_int
from lab.data import get_batch
from lab.seeding import seed_everything
from lab.train.schedule import lr_at

__all__ = [
    "BNB_METHODS",
    "DEFAULT_SKIP",
    "SUPPORTED_BITS",
    "FakeQuantize",
    "QuantReport",
    "add_fake_quant",
    "check_bits",
    "dequantize",
    "fake_quantize",
    "hf_weight_bytes",
    "load_bnb",
    "qat_finetune",
    "qmax",
    "quantizable_linears",
    "quantize_per_channel",
    "quantize_rtn",
    "remove_fake_quant",
    "rtn_weight_bytes",
    "ste_fake_quantize",
]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_SKIP = ("lm_head",)
BNB_METHODS = ("int8", "nf4", "fp4")
SCALE_BYTES = 2  # one fp16 scale per output channel


def check_bits(bits) -> int:
    """`bits` as an int, or ValueError naming the value and the supported widths."""
    if not is_int(bits, numpy=True) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported bit width {bits!r}: round-to-nearest symmetric quantization supports "
            f"bits in {list(SUPPORTED_BITS)} (integers; 1 bit leaves no level but 0 in a "
            "symmetric grid, and above 8 bits use a float dtype instead)"
        )
    return int(bits)


def qmax(bits: int) -> int:
    """Largest integer code: 2**(bits-1) - 1 (int8: 127, int4: 7, 2 bits: 1)."""
    return 2 ** (check_bits(bits) - 1) - 1


# ---------------------------------------------------------------- the quantizer


def quantize_per_channel(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a 2-D weight (out_features, in_features): int8 codes in
    [-qmax, qmax] and one float32 scale per row, shape (out_features, 1). A row of zeros
    gets scale 0 and codes 0."""
    q = qmax(bits)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = f"a {w.dim()}-D {w.dtype} tensor" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"expected a 2-D floating weight (out_features, in_features), got {got}")
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=1, keepdim=True) / q
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w32 / safe), -q, q)
    codes = torch.where(scale > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """w rounded to its per-row int grid and mapped back to w's dtype (no gradient)."""
    codes, scale = quantize_per_channel(w, bits)
    return dequantize(codes, scale, w.dtype)


def ste_fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """fake_quantize in the forward pass, identity in the backward pass (the
    straight-through estimator): the gradient reaches the latent float weights as if
    rounding were not there."""
    return w + (fake_quantize(w, bits) - w).detach()


class FakeQuantize(nn.Module):
    """A parametrization (torch.nn.utils.parametrize) that makes a Linear's weight its
    STE fake-quantized self: `add_fake_quant` registers it on every quantizable Linear."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ste_fake_quantize(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


# ---------------------------------------------------------------- whole models


def quantizable_linears(model: nn.Module, skip=DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear whose name is not in `skip` (exact names, or
    names ending in '.' + an entry)."""
    skip = tuple(skip or ())
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
            out.append((name, module))
    return out


@dataclass(frozen=True)
class QuantReport:
    """What an RTN quantization did and what it would store."""

    bits: int
    n_linears: int  # matrices quantized
    n_weights: int  # their elements
    weight_bytes: int  # their storage quantized: ceil(bits * n / 8) codes + one fp16 scale per row, per matrix
    float_weight_bytes: int  # the same matrices at their original dtype
    total_bytes: int  # whole model: quantized matrices + every other parameter and buffer as stored

    @property
    def compression(self) -> float:
        return self.float_weight_bytes / self.weight_bytes


def rtn_weight_bytes(shape: tuple[int, int], bits: int, scale_bytes: int = SCALE_BYTES) -> int:
    """Bytes of one (out, in) matrix stored as packed `bits`-bit codes plus a scale per row."""
    out_f, in_f = shape
    return math.ceil(check_bits(bits) * out_f * in_f / 8) + out_f * scale_bytes


def _storage_bytes(model: nn.Module, exclude: set[int] = frozenset()) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in exclude:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantize_rtn(
    model: nn.Module, bits: int, *, skip=DEFAULT_SKIP, scale_bytes: int = SCALE_BYTES
) -> tuple[nn.Module, QuantReport]:
    """(copy of `model` with every quantizable Linear weight rounded to `bits`-bit
    symmetric per-output-channel codes and dequantized, report). Biases, norms and
    embeddings (and the names in `skip`) stay as they are. A weight shared by two modules
    is quantized, and counted, once. The original model is not touched."""
    bits = check_bits(bits)
    q_model = copy.deepcopy(model)
    done: set[int] = set()
    n_lin = n_w = qbytes = fbytes = 0
    for _, module in quantizable_linears(q_model, skip):
        w = module.weight
        if id(w) in done:
            continue
        done.add(id(w))
        w.copy_(fake_quantize(w, bits))
        n_lin += 1
        n_w += w.numel()
        qbytes += rtn_weight_bytes(tuple(w.shape), bits, scale_bytes)
        fbytes += w.numel() * w.element_size()
    if n_lin == 0:
        raise ValueError(f"no nn.Linear to quantize in {type(model).__name__} (skip={tuple(skip or ())!r})")
    total = _storage_bytes(q_model, exclude=done) + qbytes
    return q_model, QuantReport(bits, n_lin, n_w, qbytes, fbytes, total)


def add_fake_quant(model: nn.Module, bits: int, *, skip=DEFAULT_SKIP) -> nn.Module:
    """Register a FakeQuantize parametrization on every quantizable Linear of `model`
    (in place; returns it). A weight shared with another module (a tied output head) is
    refused: parametrizing one user of a shared matrix would silently untie it."""
    bits = check_bits(bits)
    linears = quantizable_linears(model, skip)
    if not linears:
        raise ValueError(f"no nn.Linear to fake-quantize in {type(model).__name__} (skip={tuple(skip or ())!r})")
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, module in linears:
        users = owners.get(id(module.weight), [])
        if len(users) > 1:
            raise ValueError(
                f"{name}.weight is shared by {users}; fake-quantizing a tied matrix is not "
                f"supported: add {name!r} to skip"
            )
    for _, module in linears:
        parametrize.register_parametrization(module, "weight", FakeQuantize(bits))
    return model


def remove_fake_quant(model: nn.Module, *, bake: bool = True) -> nn.Module:
    """Remove every FakeQuantize parametrization (in place; returns the model). With
    bake, each weight becomes its quantized value (the deployable model); without, the
    latent float weight is kept."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, FakeQuantize) for p in module.parametrizations["weight"]
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)
    return model


def _logits(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0]
    if hasattr(out, "logits"):
        return out.logits
    return out


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def qat_finetune(
    model: nn.Module,
    data_array: np.ndarray,
    bits: int | None,
    steps: int,
    lr: float,
    batch_size: int,
    block_size: int,
    seed: int,
    *,
    skip=DEFAULT_SKIP,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    history: list | None = None,
) -> nn.Module:
    """Fine-tune a copy of `model` for `steps` AdamW updates on random windows of
    `data_array` while every quantizable Linear computes with STE fake-quantized
    `bits`-bit weights; return the copy with the quantized weights baked in (eval mode).

    bits=None runs the identical loop (same batches, optimizer and schedule) without
    fake quantization: the control for "is it the quantization-aware part that helps, or
    just more training?". The learning rate warms up over `warmup_steps` and decays by
    cosine to lr * min_lr_ratio (lab.train.schedule.lr_at). Batches come from
    lab.data.get_batch with a generator seeded by `seed`, so a seed gives the same
    weights. `history`, if given, receives {"step", "lr", "loss"} per update. The model
    may be a lab GPT or a Hugging Face causal LM (anything whose output is logits, a
    (logits, ...) tuple or has .logits)."""
    if bits is not None:
        bits = check_bits(bits)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("block_size", block_size)):
        check_int(name, value, 1, numpy=True)
    check_int("seed", seed, 0, numpy=True)
    check_number("lr", lr, 0, low_open=True)
    if not isinstance(data_array, np.ndarray) or data_array.ndim != 1:
        raise ValueError(f"data_array must be a 1-D numpy array of token ids, got {type(data_array).__name__}")

    seed_everything(int(seed))
    gen = torch.Generator().manual_seed(int(seed))
    tuned = copy.deepcopy(model)
    if bits is not None:
        add_fake_quant(tuned, bits, skip=skip)
    device = _model_device(tuned)
    tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        for step in range(steps):
            step_lr = lr_at(step, lr=float(lr), warmup_steps=warmup_steps, max_steps=steps, min_lr_ratio=min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = step_lr
            x, y = get_batch(data_array, block_size, batch_size, gen, device)
            logits = _logits(tuned(x))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"qat_finetune: non-finite loss {loss.item()} at step {step} (lr={step_lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if history is not None:
                history.append({"step": step, "lr": step_lr, "loss": loss.item()})
    finally:
        if bits is not None:
            remove_fake_quant(tuned, bake=True)
    return tuned.eval()


# ---------------------------------------------------------------- bitsandbytes


def load_bnb(path, method: str, *, device: str = "cpu"):
    """A Hugging Face checkpoint directory (e.g. from lab.models.export_hf) loaded with
    bitsandbytes: "int8" (LLM.int8, through lab.models.hf.load_hf_causal_lm), "nf4" (4-bit
    NormalFloat, double-quantized absmax, through load_hf_causal_lm) or "fp4" (4-bit
    float, otherwise configured like nf4: blocks of 64, double quantization, float32
    compute). transformers keeps the output head in full precision. Returns the model
    in eval mode."""
    if method not in BNB_METHODS:
        raise ValueError(f"unsupported bitsandbytes method {method!r}; expected one of {list(BNB_METHODS)}")
    from lab.models.hf import load_hf_causal_lm

    if method in ("int8", "nf4"):
        return load_hf_causal_lm(path, quantization="8bit" if method == "int8" else "4bit", device=device)[0]
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("method='fp4' needs the 'bitsandbytes' package: pip install bitsandbytes")
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, quantization_config=qc, device_map={"": str(device)}
    )
    from lab.models.hf import portable_4bit

    return portable_4bit(model).eval()


@dataclass(frozen=True)
class HFBytes:
    weight_bytes: int  # the Linear matrices outside `skip`: stored weight + quantization state
    float_weight_bytes: int  # the same matrices at 4 bytes per weight (float32)
    total_bytes: int  # every parameter and buffer, plus quantization state
    n_linears: int


def _quant_state_bytes(module: nn.Module) -> int:
    """Bytes of bitsandbytes' per-block / per-row scales beside a module's quantized
    weight (the fixed 16-entry code tables of NF4/FP4 are part of the format and not
    counted). LLM.int8's row scales (SCB) sit on the weight until the first forward
    pass and on the module's state after it."""
    n = 0
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is not None:
        for t in (qs.absmax, qs.offset):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
        if getattr(qs, "state2", None) is not None and isinstance(qs.state2.absmax, torch.Tensor):
            n += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    scb = getattr(weight, "SCB", None)
    if not isinstance(scb, torch.Tensor):
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if isinstance(scb, torch.Tensor):
        n += scb.numel() * scb.element_size()
    return n


def hf_weight_bytes(model: nn.Module, *, skip=DEFAULT_SKIP) -> HFBytes:
    """Storage of a (possibly bitsandbytes-quantized) Hugging Face model, measured from
    its tensors: bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear, their weights
    are the packed uint8 / int8 codes, and their scales live in the quant state."""
    qbytes = fbytes = n = 0
    counted: set[int] = set()
    for _, module in quantizable_linears(model, skip):
        w = module.weight
        if id(w) in counted:
            continue
        counted.add(id(w))
        n += 1
        qbytes += w.numel() * w.element_size() + _quant_state_bytes(module)
        shape = getattr(getattr(w, "quant_state", None), "shape", None)
        elements = math.prod(shape) if shape is not None else math.prod((module.out_features, module.in_features))
        fbytes += elements * 4
    extra = sum(_quant_state_bytes(m) for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor))
    return HFBytes(qbytes, fbytes, _storage_bytes(model) + extra, n)
