"""Training loop: AdamW, warmup + cosine, gradient clipping, real validation loss,
best/last checkpoints and exact resume.

Data comes as any object with `train` and `val` (1-D integer numpy arrays of
token ids) and `identity` (a string naming the corpus and tokenizer).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lab.data import get_batch
from lab.models import GPT, GPTConfig
from lab.seeding import seed_everything
from lab.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from lab.train.objectives import OBJECTIVES, objective_batch
from lab.train.schedule import lr_at


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still recorded)
    eval_interval: int = 250
    eval_batches: int = 20
    seed: int = 0
    device: str = "cpu"
    checkpoint_interval: int = 0  # 0: checkpoint only at eval points and at the end
    objective: str = "clm"  # one of lab.train.objectives.OBJECTIVES
    mask_prob: float = 0.15  # mlm: fraction of positions masked

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("max_steps", "batch_size", "eval_interval", "eval_batches"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "an int >= 1")
        for name in ("seed", "checkpoint_interval"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "an int >= 0")
        if not _is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.max_steps:
            fail("warmup_steps", f"an int in [0, max_steps={self.max_steps}]")
        if not _is_number(self.lr) or self.lr <= 0:
            fail("lr", "a finite number > 0")
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "a number in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "a finite number >= 0")
        for name in ("beta1", "beta2"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                fail(name, "a number in [0, 1)")
        if self.objective not in OBJECTIVES:
            fail("objective", f"one of {OBJECTIVES}")
        if not _is_number(self.mask_prob) or not 0 < self.mask_prob < 1:
            fail("mask_prob", "a number in (0, 1)")
        if not isinstance(self.device, str):
            fail("device", "a device string such as 'cpu' or 'cuda'")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            fail("device", "a device string such as 'cpu' or 'cuda'")
        if device.type == "cuda" and not torch.cuda.is_available():
            fail("device", "'cpu' here: CUDA is not available")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig.from_dict expects a dict, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}; expected a subset of {known}")
        try:
            return cls(**d)
        except TypeError as e:  # missing required keys
            raise ValueError(f"TrainConfig.from_dict: {e}") from e


# Changing any of these mid-run changes the trajectory, so resume refuses it;
# evaluation, checkpoint cadence and device may change.
_TRAJECTORY_FIELDS = (
    "max_steps",
    "batch_size",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "seed",
    "objective",
    "mask_prob",
)


class TrainingDivergedError(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; carries what was recorded so far."""

    def __init__(self, message: str, *, step: int, history: list[dict], evals: list[dict]):
        super().__init__(message)
        self.step = step
        self.history = history
        self.evals = evals


@dataclass
class TrainResult:
    model: GPT  # in eval mode
    model_config: GPTConfig
    train_config: TrainConfig
    history: list[dict]  # per step: step, lr, train_loss (minibatch), grad_norm (pre-clip)
    evals: list[dict]  # per eval point: step, train_loss, val_loss, elapsed_s, tokens_per_s
    final_val_loss: float
    best_val_loss: float
    final_train_loss: float
    steps: int
    wall_time_s: float
    tokens_per_s: float  # training tokens / training time, evaluation and checkpoints excluded
    peak_memory_bytes: int
    data_identity: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything but the model, JSON-serialisable."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        d["model_config"] = self.model_config.to_dict()
        d["train_config"] = self.train_config.to_dict()
        d["num_params"] = self.model.num_params()
        return d

    @classmethod
    def load(cls, checkpoint_dir: str | Path, *, map_location="cpu") -> TrainResult:
        """Rebuild a result from a checkpoint written by train() (`out_dir/last` or `out_dir/best`)."""
        ckpt = load_checkpoint(checkpoint_dir, map_location=map_location)
        state = ckpt.extra.get("train_state")
        if ckpt.train_config is None or state is None:
            raise CheckpointError(f"checkpoint {ckpt.path} was not written by lab.train.train()")
        evals = state["evals"]
        ckpt.model.eval()
        return cls(
            model=ckpt.model,
            model_config=ckpt.model_config,
            train_config=TrainConfig.from_dict(ckpt.train_config),
            history=state["history"],
            evals=evals,
            final_val_loss=evals[-1]["val_loss"] if evals else math.nan,
            best_val_loss=state["best_val_loss"],
            final_train_loss=evals[-1]["train_loss"] if evals else math.nan,
            steps=ckpt.step,
            wall_time_s=state["wall_time_s"],
            tokens_per_s=state["train_tokens"] / state["train_time_s"] if state["train_time_s"] else 0.0,
            peak_memory_bytes=state["peak_memory_bytes"],
            data_identity=state["data_identity"],
        )


# ---------------------------------------------------------------- batches and evaluation


def _check_token_array(array, name: str, block_size: int, vocab_size: int | None = None) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        got = f"{array.dtype} array of shape {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{name} must be a 1-D integer numpy array of token ids, got {got}")
    if len(array) <= block_size:
        raise ValueError(f"{name} has {len(array)} tokens; need more than block_size={block_size}")
    if vocab_size is not None and (array.min() < 0 or array.max() >= vocab_size):
        raise ValueError(
            f"{name} holds token ids in [{array.min()}, {array.max()}], outside [0, vocab_size={vocab_size})"
        )


@torch.no_grad()
def evaluate(
    model: GPT,
    array: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    n_batches: int,
    generator_seed: int = 1234,
    device: str = "cpu",
    objective: str = "clm",
    mask_prob: float = 0.15,
) -> float:
    """Mean loss over n_batches random batches; the same batches (and, for mlm and
    prefix_lm, the same masks and prefixes) for the same generator_seed."""
    return float(
        _batch_losses(
            model,
            array,
            block_size,
            batch_size,
            n_batches,
            generator_seed,
            device,
            objective=objective,
            mask_prob=mask_prob,
        ).mean()
    )


@torch.no_grad()
def per_position_loss(
    model: GPT,
    array: np.ndarray,
    *,
    block_size: int,
    batch_size: int,
    n_batches: int,
    generator_seed: int = 1234,
    device: str = "cpu",
) -> np.ndarray:
    """Mean loss at each position 0..block_size-1 over the same batches evaluate() uses:
    how much the prediction gains from each extra token of context."""
    return _batch_losses(model, array, block_size, batch_size, n_batches, generator_seed, device, per_position=True)


def _batch_losses(
    model,
    array,
    block_size,
    batch_size,
    n_batches,
    generator_seed,
    device,
    per_position=False,
    objective="clm",
    mask_prob=0.15,
):
    """Losses over fixed random batches (the same batches for the same generator_seed)."""
    if not isinstance(model, GPT):
        raise ValueError(f"model must be a lab.models.GPT, got {type(model).__name__}")
    for name, value in (("block_size", block_size), ("batch_size", batch_size), ("n_batches", n_batches)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not _is_int(generator_seed) or generator_seed < 0:
        raise ValueError(f"generator_seed must be a non-negative int, got {generator_seed!r}")
    _check_token_array(array, "array", block_size)
    generator = torch.Generator().manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    try:
        losses = []
        for _ in range(n_batches):
            x, y = get_batch(array, block_size, batch_size, generator, device)
            if objective != "clm":
                x, y, prefix = objective_batch(
                    objective, x, y, generator=generator, mask_prob=mask_prob, mask_id=model.config.vocab_size - 1
                )
                losses.append(model(x, y, prefix_len=prefix)[1].item())
            elif per_position:
                logits, _ = model(x)
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                losses.append(nll.view(y.shape).mean(0).cpu().numpy())
            else:
                losses.append(model(x, y)[1].item())
    finally:
        model.train(was_training)
    return np.mean(np.stack(losses), axis=0) if per_position else np.asarray(losses)


# ---------------------------------------------------------------- training


def _make_optimizer(model: GPT, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # decay matrices (weights, embeddings); leave biases and norm gains alone
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True if device.type == "cuda" else None
    )


def _load_resumable(path: Path, mc: GPTConfig, tc: TrainConfig, data_identity: str, device):
    """The checkpoint to resume from, refused unless it continues this exact run."""
    ckpt = load_checkpoint(path, expected_config=mc, map_location=device)
    state = ckpt.extra.get("train_state")
    if None in (state, ckpt.optimizer_state, ckpt.rng_state, ckpt.train_config):
        raise CheckpointError(f"{ckpt.path} is not a resumable checkpoint written by train()")
    saved = TrainConfig.from_dict(ckpt.train_config)
    diffs = [
        f"{k}: checkpoint {getattr(saved, k)!r} != now {getattr(tc, k)!r}"
        for k in _TRAJECTORY_FIELDS
        if getattr(saved, k) != getattr(tc, k)
    ]
    if diffs:
        raise CheckpointError(f"cannot resume {ckpt.path} with a different train config: " + "; ".join(diffs))
    if state["data_identity"] != data_identity:
        raise CheckpointError(
            f"cannot resume {ckpt.path}: it was trained on {state['data_identity']!r}, not {data_identity!r}"
        )
    return ckpt, state


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def train_step(
    model: GPT,
    optimizer,
    x,
    y,
    *,
    grad_clip: float,
    step: int = 0,
    history=None,
    evals=None,
    prefix_len=None,
    stats: dict | None = None,
):
    """One optimizer step on batch (x, y); returns (loss, pre-clip grad norm).

    The loss returned is the objective's cross-entropy; an MoE model's load-balancing
    loss is added to it for the gradient only. With a `stats` dict, also fills in
    "block_grad_norms" (pre-clip gradient norm of each block) and, for MoE models,
    "aux_loss" and "expert_load" (per layer, the fraction of tokens each expert got).

    Raises TrainingDivergedError before updating the weights when the loss or gradient
    norm is not finite, so the model stays usable. Shared by train() and the benchmarks.
    """
    _, loss = model(x, y, prefix_len=prefix_len)
    aux = model.aux_loss()
    optimizer.zero_grad(set_to_none=True)
    (loss if aux is None else loss + aux).backward()
    if stats is not None:
        stats["block_grad_norms"] = _block_grad_norms(model)
        if model.config.n_expert is not None:
            stats["expert_load"] = model.expert_load()
            if aux is not None:
                stats["aux_loss"] = aux.item()
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    loss_value = loss.item()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        raise TrainingDivergedError(
            f"training diverged at step {step}: loss {loss_value}, grad norm {grad_norm}",
            step=step,
            history=history or [],
            evals=evals or [],
        )
    optimizer.step()
    return loss_value, grad_norm


def _block_grad_norms(model: GPT) -> list[float]:
    norms = []
    for block in model.blocks:
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(()))
    return torch.stack(norms).tolist()


def make_optimizer(model: GPT, train_config: TrainConfig) -> torch.optim.AdamW:
    """AdamW as train() builds it (weight decay on matrices only)."""
    return _make_optimizer(model, train_config, torch.device(train_config.device))


def train(
    model_config: GPTConfig,
    train_config: TrainConfig,
    data,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    callback=None,
    stop_after: int | None = None,
    init_from: GPT | None = None,
) -> TrainResult:
    """Train a GPT from scratch (or resume from `out_dir/last`) and return a TrainResult.

    Evaluates (fixed train and val batches) at step 0, every eval_interval steps
    and at the end. With out_dir, writes `last/` at every eval point and every
    checkpoint_interval steps, and `best/` when the validation loss improves.

    callback(kind, record) is called with ("step", history record) after every
    step and ("eval", eval record) after every evaluation; returning True after a
    step ends training there, with a final evaluation and checkpoint.

    stop_after=n ends the loop after step n (and any evaluation or checkpoint
    scheduled for it) as if the process were killed there: nothing extra is
    evaluated or written. It exists to test resume.

    init_from=model starts from a copy of that model's weights instead of a fresh
    initialisation (continued training, e.g. uptraining a converted checkpoint); its
    config must equal model_config.

    Raises TrainingDivergedError (a FloatingPointError with .step, .history and
    .evals) when the loss or gradient norm is not finite.
    """
    if init_from is not None and (not isinstance(init_from, GPT) or init_from.config != model_config):
        got = init_from.config if isinstance(init_from, GPT) else type(init_from).__name__
        raise ValueError(f"init_from must be a GPT with config {model_config}, got {got}")
    if not isinstance(model_config, GPTConfig):
        raise ValueError(f"model_config must be a GPTConfig, got {type(model_config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    for attr in ("train", "val", "identity"):
        if not hasattr(data, attr):
            raise ValueError(f"data must have train, val and identity attributes; {type(data).__name__} lacks {attr!r}")
    if not isinstance(data.identity, str):
        raise ValueError(f"data.identity must be a str, got {type(data.identity).__name__}")
    _check_token_array(data.train, "data.train", model_config.block_size, model_config.vocab_size)
    _check_token_array(data.val, "data.val", model_config.block_size, model_config.vocab_size)
    if train_config.objective == "mlm":
        top = int(max(data.train.max(), data.val.max()))
        if top >= model_config.vocab_size - 1:
            raise ValueError(
                f"objective 'mlm' uses the last vocabulary id ({model_config.vocab_size - 1}) as [MASK], "
                f"but the data uses ids up to {top}: set the model's vocab_size to the tokenizer's + 1"
            )
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the run directory holding last/)")
    if stop_after is not None and (not _is_int(stop_after) or not 1 <= stop_after <= train_config.max_steps):
        raise ValueError(
            f"stop_after must be None or an int in [1, max_steps={train_config.max_steps}], got {stop_after!r}"
        )
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")

    tc, mc = train_config, model_config
    out_dir = Path(out_dir) if out_dir is not None else None
    device = torch.device(tc.device)
    block_size = mc.block_size
    tokens_per_step = tc.batch_size * block_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_rss_bytes()

    batch_gen = seed_everything(tc.seed)  # model init draws from the global RNG; batches from this one
    history: list[dict] = []
    evals: list[dict] = []
    best_val = math.inf
    start_step = 0
    train_time = wall_before = 0.0  # carried over from before a resume
    train_tokens = 0
    if resume:
        ckpt, state = _load_resumable(out_dir / "last", mc, tc, data.identity, device)
        model = ckpt.model
        optimizer = _make_optimizer(model, tc, device)
        optimizer.load_state_dict(ckpt.optimizer_state)
        restore_rng_state(ckpt.rng_state, batch_gen)
        history, evals = state["history"], state["evals"]
        best_val, start_step = state["best_val_loss"], ckpt.step
        train_time, wall_before = state["train_time_s"], state["wall_time_s"]
        train_tokens = state["train_tokens"]
    else:
        model = GPT(mc).to(device)
        if init_from is not None:
            model.load_state_dict(init_from.state_dict())
        optimizer = _make_optimizer(model, tc, device)

    t_start = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def run_eval(step: int) -> dict:
        kwargs = dict(
            block_size=block_size,
            batch_size=tc.batch_size,
            n_batches=tc.eval_batches,
            device=device,
            objective=tc.objective,
            mask_prob=tc.mask_prob,
        )
        record = {
            "step": step,
            "train_loss": evaluate(model, data.train, **kwargs),
            "val_loss": evaluate(model, data.val, **kwargs),
            "elapsed_s": wall(),
            "tokens_per_s": train_tokens / train_time if train_time > 0 else 0.0,
        }
        evals.append(record)
        if callback is not None:
            callback("eval", record)
        return record

    def train_state() -> dict:
        return {
            "history": history,
            "evals": evals,
            "best_val_loss": best_val,
            "train_time_s": train_time,
            "wall_time_s": wall(),
            "train_tokens": train_tokens,
            "peak_memory_bytes": peak_memory(),
            "data_identity": data.identity,
        }

    def peak_memory() -> int:
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        return max(0, _peak_rss_bytes() - rss_before)

    def checkpoint(name: str, step: int, *, with_optimizer: bool) -> None:
        save_checkpoint(
            out_dir / name,
            model=model,
            optimizer=optimizer if with_optimizer else None,
            step=step,
            model_config=mc,
            train_config=tc,
            rng_state=capture_rng_state(batch_gen) if with_optimizer else None,
            extra={"train_state": train_state()},
        )

    def note_val(step: int, val: float) -> None:
        nonlocal best_val
        if val < best_val:
            best_val = val
            if out_dir is not None:
                checkpoint("best", step, with_optimizer=False)

    if start_step == 0:
        note_val(0, run_eval(0)["val_loss"])

    model.train()
    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not progress, desc="train", dynamic_ncols=True)
    step = start_step
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(
                step,
                lr=tc.lr,
                warmup_steps=tc.warmup_steps,
                max_steps=tc.max_steps,
                min_lr_ratio=tc.min_lr_ratio,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(data.train, block_size, tc.batch_size, batch_gen, device)
            x, y, prefix = objective_batch(
                tc.objective, x, y, generator=batch_gen, mask_prob=tc.mask_prob, mask_id=mc.vocab_size - 1
            )
            step += 1
            stats = {}
            loss_value, grad_norm = train_step(
                model,
                optimizer,
                x,
                y,
                grad_clip=tc.grad_clip,
                step=step,
                history=history,
                evals=evals,
                prefix_len=prefix,
                stats=stats,
            )
            train_time += time.perf_counter() - t0  # loss.item() synchronised any device
            train_tokens += tokens_per_step

            record = {"step": step, "lr": lr, "train_loss": loss_value, "grad_norm": grad_norm, **stats}
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{train_tokens / train_time:,.0f}", refresh=False)
            stop = bool(callback("step", record)) if callback is not None else False

            is_eval = step % tc.eval_interval == 0 or step == tc.max_steps or stop
            if is_eval:
                note_val(step, run_eval(step)["val_loss"])
                model.train()
            is_checkpoint = is_eval or (tc.checkpoint_interval and step % tc.checkpoint_interval == 0)
            if out_dir is not None and is_checkpoint:
                checkpoint("last", step, with_optimizer=True)
            if stop or (stop_after is not None and step >= stop_after):
                break
    finally:
        bar.close()

    model.eval()
    last_eval = evals[-1]
    return TrainResult(
        model=model,
        model_config=mc,
        train_config=tc,
        history=history,
        evals=evals,
        final_val_loss=last_eval["val_loss"],
        best_val_loss=best_val,
        final_train_loss=last_eval["train_loss"],
        steps=step,
        wall_time_s=wall(),
        tokens_per_s=train_tokens / train_time if train_time > 0 else 0.0,
        peak_memory_bytes=peak_memory(),
        data_identity=data.identity,
    )
