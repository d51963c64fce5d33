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

from lab.checks import (
    BOOL,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    Rule,
    bounded_int,
    check_fields,
    check_int,
    check_relations,
    describe,
    from_dict,
    number,
    one_of,
)
from lab.data import get_batch
from lab.models import GPT, GPTConfig
from lab.models.compiled import CompiledFunction
from lab.runlog import EVENTS_DIR, DeferredInterrupt, RunLog, describe_run, sample_text, write_about
from lab.seeding import seed_everything
from lab.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from lab.train.objectives import MASK_STRATEGIES, OBJECTIVES, objective_batch
from lab.train.schedule import lr_at


def _is_device(value) -> bool:
    try:
        return isinstance(value, str) and torch.device(value) is not None
    except RuntimeError:
        return False


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
    # mlm: how chosen positions are corrupted in training, one of lab.train.objectives.MASK_STRATEGIES
    # ("bert": 80/10/10); evaluation always masks every chosen position, so losses compare across strategies
    mask_strategy: str = "mask"
    # torch.compile the loss (forward and backward) and use the fused AdamW: the same
    # computation, losses equal to the eager path's to float rounding (not bitwise); eager
    # with a warning where the compiler is unavailable
    compile: bool = False

    def __post_init__(self):
        check_fields(
            self,
            {
                "max_steps": POSITIVE_INT,
                "batch_size": POSITIVE_INT,
                "eval_interval": POSITIVE_INT,
                "eval_batches": POSITIVE_INT,
                "seed": NON_NEGATIVE_INT,
                "checkpoint_interval": NON_NEGATIVE_INT,
                "warmup_steps": bounded_int(0, self.max_steps, "max_steps"),
                "lr": POSITIVE,
                "min_lr_ratio": FRACTION,
                "weight_decay": NON_NEGATIVE,
                "grad_clip": NON_NEGATIVE,
                "beta1": number(0, 1, high_open=True),
                "beta2": number(0, 1, high_open=True),
                "objective": one_of(OBJECTIVES),
                "mask_prob": PROBABILITY,
                "mask_strategy": one_of(MASK_STRATEGIES),
                "compile": BOOL,
                "device": Rule("a device string such as 'cpu' or 'cuda'", _is_device),
            },
        )
        cuda = torch.device(self.device).type == "cuda"
        check_relations(
            self, [(not cuda or torch.cuda.is_available(), "device", "'cpu' here: CUDA is not available", self.device)]
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return from_dict(cls, d)


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
    "mask_strategy",
    "compile",
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
        raise ValueError(f"{name} must be a 1-D integer numpy array of token ids, got {describe(array)}")
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
        check_int(name, value, 1)
    check_int("generator_seed", generator_seed, 0)
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
    # fused: one kernel for all parameters (CUDA, and CPU when compiling). Otherwise the
    # multi-tensor (foreach) update, which on CPU gives bitwise the per-parameter loop's
    # numbers that torch would otherwise run there
    fused = device.type == "cuda" or tc.compile
    return torch.optim.AdamW(
        groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True if fused else None, foreach=None if fused else True
    )


def _batch_loss(model: GPT, x, y, prefix_len):
    """The training loss of a batch: the model's forward without its per-batch input checks
    (train() checks the token arrays once, before the first step)."""
    return model._logits_and_loss(x, y, None, prefix_len)[1]


def make_loss_fn(model: GPT, train_config: TrainConfig):
    """loss_fn(x, y, prefix_len) -> loss of `model` on a batch, as train() computes it:
    under torch.compile when train_config.compile (eager, with a RuntimeWarning, where the
    compiler is unavailable), else the eager forward, unchecked (check the data first)."""
    if not train_config.compile:
        return lambda x, y, prefix_len=None: _batch_loss(model, x, y, prefix_len)
    compiled = CompiledFunction(_batch_loss, what="TrainConfig.compile")
    return lambda x, y, prefix_len=None: compiled(model, x, y, prefix_len)


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
    loss_fn=None,
):
    """One optimizer step on batch (x, y); returns (loss, pre-clip grad norm).

    The loss returned is the objective's cross-entropy; an MoE model's load-balancing
    loss is added to it for the gradient only. With a `stats` dict, also fills in
    "block_grad_norms" (pre-clip gradient norm of each block) and, for MoE models,
    "aux_loss" and "expert_load" (per layer, the fraction of tokens each expert got).

    loss_fn(x, y, prefix_len) computes the loss (make_loss_fn: what train() uses); by
    default the model's checked forward. The loss, gradient norm and any block norms are
    read from the device once, together, before the update.

    Raises TrainingDivergedError before updating the weights when the loss or gradient
    norm is not finite, so the model stays usable. Shared by train() and the benchmarks.
    """
    loss = model(x, y, prefix_len=prefix_len)[1] if loss_fn is None else loss_fn(x, y, prefix_len)
    aux = model.aux_loss()
    optimizer.zero_grad(set_to_none=True)
    (loss if aux is None else loss + aux).backward()
    blocks = None
    if stats is not None:
        blocks = _block_grad_norms(model)
        if model.config.n_expert is not None:
            stats["expert_load"] = model.expert_load()
            if aux is not None:
                stats["aux_loss"] = aux.item()
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    values = torch.stack([loss.detach().float(), grad_norm.float(), *([] if blocks is None else blocks)]).tolist()
    loss_value, grad_norm = values[0], values[1]
    if blocks is not None:
        stats["block_grad_norms"] = values[2:]
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        raise TrainingDivergedError(
            f"training diverged at step {step}: loss {loss_value}, grad norm {grad_norm}",
            step=step,
            history=history or [],
            evals=evals or [],
        )
    optimizer.step()
    return loss_value, grad_norm


def _block_grad_norms(model: GPT) -> list[torch.Tensor]:
    norms = []
    for block in model.blocks:
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        norms.append(
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()
            if grads
            else torch.zeros((), device=next(block.parameters()).device)
        )
    return norms


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
    _check_train_args(model_config, train_config, data, out_dir, resume, callback, stop_after, init_from)
    tc = train_config
    run = _Run(model_config, tc, data, Path(out_dir) if out_dir is not None else None, callback)
    run.start(resume, init_from)
    run.open_log(progress)
    ok = False
    try:
        with DeferredInterrupt() as interrupt:
            if run.step == 0:
                run.evaluate()
            run.model.train()
            while run.step < tc.max_steps:
                record = run.train_one_step()
                run.log_step(record)
                stop = bool(callback("step", record)) if callback is not None else False
                if run.step % tc.eval_interval == 0 or run.step == tc.max_steps or stop:
                    run.evaluate()
                    run.model.train()
                    run.checkpoint("last")
                elif tc.checkpoint_interval and run.step % tc.checkpoint_interval == 0:
                    run.checkpoint("last")
                if stop or (stop_after is not None and run.step >= stop_after):
                    break
                if interrupt.requested and run.step < tc.max_steps:  # Ctrl-C: a checkpoint to resume from
                    run.checkpoint("last")
                    raise KeyboardInterrupt(f"training interrupted after step {run.step}{run.resume_hint()}")
        ok = True
    finally:
        run.log.close(ok)
    return run.result()


def _check_train_args(model_config, train_config, data, out_dir, resume, callback, stop_after, init_from) -> None:
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
    if stop_after is not None:
        bounded_int(1, train_config.max_steps, "max_steps").check("stop_after", stop_after)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")


class _Run:
    """The state of one training run: the model, optimizer and batch generator, what was
    recorded so far, and the clocks; a checkpoint saves all of it and resume restores it."""

    def __init__(self, mc: GPTConfig, tc: TrainConfig, data, out_dir: Path | None, callback):
        self.mc, self.tc, self.data, self.out_dir, self.callback = mc, tc, data, out_dir, callback
        self.device = torch.device(tc.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_before = _peak_rss_bytes()
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.best_val = math.inf
        self.step = 0
        self.train_time = self.wall_before = 0.0  # carried over from before a resume
        self.train_tokens = 0
        self.log: RunLog | None = None

    def start(self, resume: bool, init_from: GPT | None) -> None:
        """Seed, then build the model and optimizer, fresh or from `out_dir/last`."""
        self.batch_gen = seed_everything(self.tc.seed)  # model init draws from the global RNG; batches from this
        if resume:
            ckpt, state = _load_resumable(self.out_dir / "last", self.mc, self.tc, self.data.identity, self.device)
            self.model = ckpt.model
            self.optimizer = _make_optimizer(self.model, self.tc, self.device)
            self.optimizer.load_state_dict(ckpt.optimizer_state)
            self.loss_fn = make_loss_fn(self.model, self.tc)
            restore_rng_state(ckpt.rng_state, self.batch_gen)
            self.history, self.evals = state["history"], state["evals"]
            self.best_val, self.step = state["best_val_loss"], ckpt.step
            self.train_time, self.wall_before = state["train_time_s"], state["wall_time_s"]
            self.train_tokens = state["train_tokens"]
        else:
            self.model = GPT(self.mc).to(self.device)
            if init_from is not None:
                self.model.load_state_dict(init_from.state_dict())
            self.optimizer = _make_optimizer(self.model, self.tc, self.device)
            self.loss_fn = make_loss_fn(self.model, self.tc)
        self.t_start = time.perf_counter()

    def open_log(self, progress: bool) -> None:
        """The progress display and, with out_dir, TensorBoard events in out_dir/tb and
        out_dir/about.json (lab.runlog): nothing that training reads back."""
        desc = describe_run(self.mc, self.tc, self.data)
        events = None
        if self.out_dir is not None:
            events = self.out_dir / EVENTS_DIR
            if self.step == 0 or not (self.out_dir / "about.json").exists():
                write_about(self.out_dir, desc=desc, model_config=self.mc, train_config=self.tc, data=self.data)
        self.log = RunLog(events, desc=desc, total=self.tc.max_steps, initial=self.step, progress=progress)

    def log_step(self, record: dict) -> None:
        self.log.step(
            record["step"],
            loss=record["train_loss"],
            lr=record["lr"],
            grad_norm=record["grad_norm"],
            tokens_per_s=self.tokens_per_s,
        )

    def resume_hint(self) -> str:
        return f"; {self.out_dir / 'last'} holds it: train again with resume=True to continue" if self.out_dir else ""

    def train_one_step(self) -> dict:
        """One optimizer step on the next batch; returns (and keeps) its history record."""
        tc, t0 = self.tc, time.perf_counter()
        lr = lr_at(
            self.step, lr=tc.lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps, min_lr_ratio=tc.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(self.data.train, self.mc.block_size, tc.batch_size, self.batch_gen, self.device)
        mask_id = self.mc.vocab_size - 1
        x, y, prefix = objective_batch(
            tc.objective,
            x,
            y,
            generator=self.batch_gen,
            mask_prob=tc.mask_prob,
            mask_id=mask_id,
            mask_strategy=tc.mask_strategy,
        )
        self.step += 1
        stats = {}
        loss, grad_norm = train_step(
            self.model,
            self.optimizer,
            x,
            y,
            grad_clip=tc.grad_clip,
            step=self.step,
            history=self.history,
            evals=self.evals,
            prefix_len=prefix,
            stats=stats,
            loss_fn=self.loss_fn,
        )
        self.train_time += time.perf_counter() - t0  # loss.item() synchronised any device
        self.train_tokens += tc.batch_size * self.mc.block_size
        record = {"step": self.step, "lr": lr, "train_loss": loss, "grad_norm": grad_norm, **stats}
        self.history.append(record)
        return record

    def evaluate(self) -> None:
        """Train and val loss on fixed batches; a better val loss is checkpointed as `best`."""
        tc = self.tc
        kwargs = dict(
            block_size=self.mc.block_size,
            batch_size=tc.batch_size,
            n_batches=tc.eval_batches,
            device=self.device,
            objective=tc.objective,
            mask_prob=tc.mask_prob,
        )
        record = {
            "step": self.step,
            "train_loss": evaluate(self.model, self.data.train, **kwargs),
            "val_loss": evaluate(self.model, self.data.val, **kwargs),
            "elapsed_s": self.wall(),
            "tokens_per_s": self.tokens_per_s,
        }
        self.evals.append(record)
        if self.callback is not None:
            self.callback("eval", record)
        if self.log is not None:
            self.log.eval(self.step, val_loss=record["val_loss"], train_loss=record["train_loss"])
            if self.log.writes_events and tc.objective == "clm":
                self.log.text("sample", sample_text(self.model, self.data), self.step)
        if record["val_loss"] < self.best_val:
            self.best_val = record["val_loss"]
            self.checkpoint("best")

    def checkpoint(self, name: str) -> None:
        """Write `out_dir/name` (nothing without out_dir); `last` also keeps the optimizer and RNGs."""
        if self.out_dir is None:
            return
        resumable = name == "last"
        save_checkpoint(
            self.out_dir / name,
            model=self.model,
            optimizer=self.optimizer if resumable else None,
            step=self.step,
            model_config=self.mc,
            train_config=self.tc,
            rng_state=capture_rng_state(self.batch_gen) if resumable else None,
            extra={"train_state": self.state()},
        )

    def state(self) -> dict:
        return {
            "history": self.history,
            "evals": self.evals,
            "best_val_loss": self.best_val,
            "train_time_s": self.train_time,
            "wall_time_s": self.wall(),
            "train_tokens": self.train_tokens,
            "peak_memory_bytes": self.peak_memory(),
            "data_identity": self.data.identity,
        }

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.train_time if self.train_time > 0 else 0.0

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _peak_rss_bytes() - self.rss_before)

    def result(self) -> TrainResult:
        self.model.eval()
        last_eval = self.evals[-1]
        return TrainResult(
            model=self.model,
            model_config=self.mc,
            train_config=self.tc,
            history=self.history,
            evals=self.evals,
            final_val_loss=last_eval["val_loss"],
            best_val_loss=self.best_val,
            final_train_loss=last_eval["train_loss"],
            steps=self.step,
            wall_time_s=self.wall(),
            tokens_per_s=self.tokens_per_s,
            peak_memory_bytes=self.peak_memory(),
            data_identity=self.data.identity,
        )
