"""Fine-tuning a Hugging Face causal LM with the stack a user would use: transformers
for the model, peft for LoRA adapters, bitsandbytes for the 4-bit (NF4) base of QLoRA.

    cfg = FinetuneConfig(method="lora", rank=8, lr=1e-3, steps=300)
    result = finetune(base_dir, new_data, old_data, cfg)      # cached by config hash
    result.evals[-1]["new_val"], result.evals[-1]["old_val"]  # new task, old task
    model = load_finetuned(result)                             # base + adapter, or full weights

Data are lab TokenData in the base model's own token ids (see `retokenize`). Every run
is cached under $LAB_CACHE/finetune/<key>, the key hashing the base weights, the
config, both datasets and this file, with the adapter (or fully fine-tuned weights)
beside the result, so later tracks can address "the Milton LoRA of this base".
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab.checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Rule,
    bounded_int,
    check_fields,
    check_relations,
    from_dict,
    number,
    one_of,
    optional,
)
from lab.data import TokenData, get_batch
from lab.paths import cache_dir, cache_lock
from lab.runlog import EVENTS_DIR, RunLog, hf_sample_text
from lab.seeding import seed_everything
from lab.train.schedule import lr_at

METHODS = ("full", "lora", "qlora")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = "lora"  # one of METHODS
    rank: int = 8  # LoRA rank (lora, qlora)
    alpha: float | None = None  # LoRA scale numerator; None = 2 * rank
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 1e-3
    steps: int = 300
    batch_size: int = 16
    block_size: int = 64
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    replay_fraction: float = 0.0  # share of each batch drawn from the old task's training text
    eval_interval: int = 50
    eval_batches: int = 10
    seed: int = 0

    def __post_init__(self):
        check_fields(
            self,
            {
                "method": one_of(METHODS),
                "rank": POSITIVE_INT,
                "steps": POSITIVE_INT,
                "batch_size": POSITIVE_INT,
                "block_size": POSITIVE_INT,
                "eval_interval": POSITIVE_INT,
                "eval_batches": POSITIVE_INT,
                "seed": NON_NEGATIVE_INT,
                "warmup_steps": bounded_int(0, self.steps, "steps"),
                "lr": POSITIVE,
                "alpha": optional(POSITIVE),
                "replay_fraction": number(0, 1, high_open=True),
                "weight_decay": NON_NEGATIVE,
                "grad_clip": NON_NEGATIVE,
                "min_lr_ratio": NON_NEGATIVE,
                "target_modules": Rule(
                    "a non-empty tuple of module names",
                    lambda t: isinstance(t, tuple) and bool(t) and all(isinstance(m, str) and m for m in t),
                ),
            },
        )
        check_relations(
            self,
            [
                (
                    round(self.batch_size * self.replay_fraction) < self.batch_size,
                    "replay_fraction",
                    f"small enough to leave new-task rows in a batch of {self.batch_size}",
                    self.replay_fraction,
                )
            ],
        )

    @property
    def lora_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def label(self) -> str:
        return (
            "full fine-tuning"
            if self.method == "full"
            else f"{'QLoRA' if self.method == 'qlora' else 'LoRA'} r={self.rank}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        return from_dict(cls, d, convert={"target_modules": tuple})


@dataclass
class FinetuneResult:
    config: FinetuneConfig
    key: str
    base_dir: str
    base_hash: str
    evals: list[dict]  # step, train_loss (new task), new_val, old_val, elapsed_s
    history: list[dict]  # step, lr, loss, grad_norm
    layer_stats: list[dict]  # per eval: step, per layer: adam_m, adam_v, delta (relative weight change)
    trainable_params: int
    total_params: int
    base_weight_bytes: int  # the frozen (or trained) base weights as stored in memory
    state_bytes: int  # weights + gradients + AdamW moments of what trains
    diverged: bool = False
    wall_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return cache_dir("finetune", self.key)

    @property
    def final(self) -> dict:
        return self.evals[-1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneResult:
        return from_dict(cls, d, convert={"config": FinetuneConfig.from_dict})


# ------------------------------------------------------------------ data


def retokenize(text: str, tokenizer) -> tuple[str, int]:
    """`text` with every character the (char-level) tokenizer cannot encode removed, and
    how many were removed; a fine-tuning corpus must speak the base model's vocabulary."""
    known = set(tokenizer.decode(list(range(tokenizer.vocab_size))))
    kept = "".join(ch for ch in text if ch in known)
    return kept, len(text) - len(kept)


# ------------------------------------------------------------------ model loading


def base_hash(base_dir) -> str:
    """Hash of a checkpoint directory's weight files: what an adapter was trained on."""
    base_dir = Path(base_dir)
    files = sorted(base_dir.glob("*.safetensors")) + sorted(base_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {base_dir}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def linear_module_names(model) -> list[str]:
    """Distinct leaf names of the model's Linear layers (what target_modules can name)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model, targets) -> None:
    """ValueError naming the target modules that match nothing, and the names that exist."""
    existing = linear_module_names(model)
    missing = [t for t in targets if t not in existing]
    if missing:
        raise ValueError(
            f"target module name(s) {missing} match no Linear layer in this model; "
            f"its Linear layers are named {existing}"
        )


def load_base(base_dir, method: str, device: str = "cpu"):
    """The base model for a method: full precision for full/lora, 4-bit NF4 for qlora."""
    from lab.models.hf import load_hf_causal_lm

    model, _ = load_hf_causal_lm(base_dir, quantization="4bit" if method == "qlora" else None, device=device)
    return model


def prepare_model(base_dir, cfg: FinetuneConfig, device: str = "cpu"):
    """Base model with LoRA adapters (lora, qlora) or all weights trainable (full)."""
    model = load_base(base_dir, cfg.method, device)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    check_targets(model, cfg.target_modules)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored (4-bit weights count as packed)."""
    return (
        int(model.get_memory_footprint())
        if hasattr(model, "get_memory_footprint")
        else sum(p.numel() * p.element_size() for p in model.parameters())
    )


def state_bytes(model) -> int:
    """Weights as stored + a gradient and two AdamW moments per trainable parameter."""
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weight_bytes(model) + 3 * trainable


# ------------------------------------------------------------------ training


@torch.no_grad()
def hf_loss(model, array: np.ndarray, *, block_size: int, batch_size: int, n_batches: int, seed: int = 1234) -> float:
    """Mean next-token loss (nats/token) of an HF causal LM on fixed random windows of `array`."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        losses = []
        for _ in range(n_batches):
            x, y = get_batch(array, block_size, batch_size, gen, device)
            logits = model(input_ids=x).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item())
    finally:
        model.train(was_training)
    return float(np.mean(losses))


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _layer_stats(model, optimizer, initial: dict[str, torch.Tensor], cfg: FinetuneConfig) -> dict:
    """Per layer: mean |Adam m|, mean sqrt(Adam v) over trainable weights, and the relative
    change of the layer's weights (LoRA: ||scale * B A|| / ||W0||; full: ||W - W0|| / ||W0||)."""
    sums: dict[int, dict[str, float]] = {}

    def add(layer, key, value):
        sums.setdefault(layer, {}).setdefault(key, []).append(value)

    for name, p in model.named_parameters():
        layer = _layer_of(name)
        if not p.requires_grad or layer is None:
            continue
        state = optimizer.state.get(p, {})
        if "exp_avg" in state:
            add(layer, "adam_m", state["exp_avg"].abs().mean().item())
            add(layer, "adam_v", state["exp_avg_sq"].sqrt().mean().item())
    scale = cfg.lora_alpha / cfg.rank
    for name, module in model.named_modules():
        layer = _layer_of(name)
        if layer is None:
            continue
        if cfg.method == "full" and isinstance(module, torch.nn.Linear) and name in initial:
            w0 = initial[name]
            add(layer, "delta", ((module.weight.detach().float() - w0).norm() / w0.norm()).item())
        elif cfg.method != "full" and hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            w0 = initial.get(name)
            if w0 is not None:
                add(layer, "delta", ((scale * b @ a).norm() / w0.norm()).item())
    return {str(layer): {k: float(np.mean(v)) for k, v in d.items()} for layer, d in sorted(sums.items())}


def _initial_weights(model, cfg) -> dict[str, torch.Tensor]:
    """Float copies of the Linear weights whose change is tracked (dequantised for 4-bit)."""
    out = {}
    for name, module in model.named_modules():
        if _layer_of(name) is None:
            continue
        if cfg.method == "full" and isinstance(module, torch.nn.Linear):
            out[name] = module.weight.detach().float().clone()
        elif cfg.method != "full" and hasattr(module, "lora_A"):
            base = module.get_base_layer()
            w = base.weight
            if type(w).__name__ == "Params4bit":
                import bitsandbytes.functional as bnbf

                w = bnbf.dequantize_4bit(w.data, w.quant_state)
            out[name] = w.detach().float().clone()
    return out


def _run_key(base: str, cfg: FinetuneConfig, new: TokenData, old: TokenData) -> str:
    spec = {
        "base": base,
        "config": cfg.to_dict(),
        "new": new.identity,
        "old": old.identity,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def finetune(
    base_dir,
    new: TokenData,
    old: TokenData,
    cfg: FinetuneConfig,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the checkpoint at base_dir on `new` (measuring `old` too), or load the cached run.

    AdamW on the trainable weights, linear warmup + cosine decay, gradient clipping.
    Evaluates new-task train/val and old-task val loss on fixed batches at step 0,
    every eval_interval steps and at the end. A non-finite loss stops the run there:
    the result is marked diverged, keeping what was measured (a learning-rate sweep
    wants that data point, not an exception).
    """
    if not isinstance(cfg, FinetuneConfig):
        raise ValueError(f"cfg must be a FinetuneConfig, got {type(cfg).__name__}")
    for name, d in (("new", new), ("old", old)):
        if not isinstance(d, TokenData):
            raise ValueError(f"{name} must be a lab TokenData, got {type(d).__name__}")
    bh = base_hash(base_dir)
    key = _run_key(bh, cfg, new, old)
    run_dir = cache_dir("finetune", key)
    # one process fine-tunes a given run; another (an xdist worker) waits and reuses it
    with cache_lock(run_dir, what="fine-tuning run"):
        done = run_dir / "result.json"
        if done.exists():
            return FinetuneResult.from_dict(json.loads(done.read_text()))
        return _train(base_dir, bh, key, run_dir, new, old, cfg, device=device, progress=progress)


def _train(
    base_dir, bh: str, key: str, run_dir: Path, new: TokenData, old: TokenData, cfg: FinetuneConfig, *, device, progress
) -> FinetuneResult:
    seed_everything(cfg.seed)
    model = prepare_model(base_dir, cfg, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    initial = _initial_weights(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_old = round(cfg.batch_size * cfg.replay_fraction)
    evals, history, layer_stats = [], [], []
    shutil.rmtree(run_dir / EVENTS_DIR, ignore_errors=True)  # curves of an attempt that died before its result
    desc = f"{cfg.label} of {Path(base_dir).name} on {new.corpus}, seed {cfg.seed}"
    log = RunLog(run_dir / EVENTS_DIR, desc=desc, total=cfg.steps, progress=progress)
    t0 = time.perf_counter()

    def run_eval(step):
        kw = dict(block_size=cfg.block_size, batch_size=cfg.batch_size, n_batches=cfg.eval_batches)
        evals.append(
            {
                "step": step,
                "train_loss": hf_loss(model, new.train, **kw),
                "new_val": hf_loss(model, new.val, **kw),
                "old_val": hf_loss(model, old.val, **kw),
                "elapsed_s": time.perf_counter() - t0,
            }
        )
        layer_stats.append({"step": step, "layers": _layer_stats(model, optimizer, initial, cfg)})
        e = evals[-1]
        log.eval(step, val_loss=e["new_val"], old_val=e["old_val"], train_loss=e["train_loss"])
        if log.writes_events:
            log.text("sample", hf_sample_text(model, new, block_size=cfg.block_size), step)

    diverged = False
    with log:
        run_eval(0)
        for step in range(1, cfg.steps + 1):
            t_step = time.perf_counter()
            lr = lr_at(
                step - 1, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(new.train, cfg.block_size, cfg.batch_size - n_old, gen, device)
            if n_old:
                xo, yo = get_batch(old.train, cfg.block_size, n_old, gen, device)
                x, y = torch.cat((x, xo)), torch.cat((y, yo))
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            loss_value = loss.item()
            history.append({"step": step, "lr": lr, "loss": loss_value, "grad_norm": grad_norm})
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                diverged = True
                break
            optimizer.step()
            tokens_per_s = x.numel() / (time.perf_counter() - t_step)  # loss.item() waited for the device
            log.step(step, loss=loss_value, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                run_eval(step)

    trainable = sum(p.numel() for p in params)
    result = FinetuneResult(
        config=cfg,
        key=key,
        base_dir=str(base_dir),
        base_hash=bh,
        evals=evals,
        history=history,
        layer_stats=layer_stats,
        trainable_params=trainable,
        total_params=sum(p.numel() for p in model.parameters()),
        base_weight_bytes=weight_bytes(model),
        state_bytes=state_bytes(model),
        diverged=diverged,
        wall_time_s=time.perf_counter() - t0,
    )
    _save(model, result, run_dir)
    return result


def _save(model, result: FinetuneResult, run_dir: Path) -> None:
    """Write weights (adapter or full model) and result.json into run_dir all at once."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}-"))
    try:
        model.save_pretrained(tmp / ("weights" if result.config.method == "full" else "adapter"))
        (tmp / "result.json").write_text(json.dumps(result.to_dict()))
        if (run_dir / EVENTS_DIR).exists():  # the run's TensorBoard curves stay with it
            shutil.move(run_dir / EVENTS_DIR, tmp / EVENTS_DIR)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        tmp.replace(run_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_finetuned(result: FinetuneResult, *, base_dir=None, merge: bool = False, device: str = "cpu"):
    """The fine-tuned model of a cached run: base + adapter (merged into the base when
    merge=True and the base is not 4-bit), or the fully fine-tuned weights.

    base_dir defaults to the run's base; an adapter is refused on any other base."""
    base_dir = Path(base_dir or result.base_dir)
    run_dir = result.run_dir
    if result.config.method == "full":
        from lab.models.hf import load_hf_causal_lm

        return load_hf_causal_lm(run_dir / "weights", device=device)[0]
    have = base_hash(base_dir)
    if have != result.base_hash:
        raise ValueError(
            f"adapter {run_dir / 'adapter'} was trained on base {result.base_hash}, but {base_dir} holds "
            f"base {have}: an adapter only applies to the weights it was trained on"
        )
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_dir, result.config.method, device), run_dir / "adapter")
    model.eval()
    if merge and result.config.method == "lora":
        return model.merge_and_unload()
    return model
