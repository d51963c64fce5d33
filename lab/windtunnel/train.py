"""Training in a wind tunnel: fresh sequences every step (nothing to memorise), AdamW with
warm-up and cosine decay, gradient clipping, weights kept at chosen steps (for the
training-dynamics hypotheses), cached on disk by task, model, budget and code.

A run in progress writes a checkpoint (weights, optimizer, data-generator state, history,
kept weights) every `checkpoint_every` steps, atomically; a run that was interrupted
resumes from its last checkpoint and ends exactly where an uninterrupted run would.
Everything on disk is plain tensors, numbers and lists, read back with
`torch.load(weights_only=True)`: a file holding anything else (a pickled object) is
refused with an error that names it, never executed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import lab as lab_package
from lab.paths import cache_dir, cache_lock
from lab.runlog import EVENTS_DIR, RunLog
from lab.seeding import seed_everything
from lab.windtunnel.models import PaperMLP, PrefixMLP, TunnelTransformer, n_params


@dataclass(frozen=True)
class TunnelTrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    keep_steps: tuple[int, ...] = ()  # also save the weights after these steps (0 = at init)
    # the cosine decay (to 10% of lr) runs over this last fraction of the steps after warm-up;
    # before it the rate stays at lr (1.0: cosine over the whole run)
    decay_fraction: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.decay_fraction, (int, float)) and 0 < self.decay_fraction <= 1):
            raise ValueError(f"decay_fraction must be a number in (0, 1], got {self.decay_fraction!r}")
        bad = [s for s in self.keep_steps if not isinstance(s, int) or not 0 <= s <= self.steps]
        if bad:
            raise ValueError(f"keep_steps must lie in [0, steps={self.steps}], got {bad}")


@dataclass
class TunnelRun:
    model: torch.nn.Module  # final weights, eval mode, on the CPU
    config: TunnelTrainConfig
    history: list[dict]  # every 10 steps: step, loss
    kept: dict[int, dict] = field(default_factory=dict)  # step -> state_dict
    wall_time_s: float = 0.0
    device: str = "cpu"  # where it was trained

    def at_step(self, step: int) -> torch.nn.Module:
        """A copy of the model with the weights kept after `step`."""
        import copy

        if step not in self.kept:
            raise KeyError(f"no weights kept at step {step}; kept: {sorted(self.kept)}")
        m = copy.deepcopy(self.model)
        m.load_state_dict(self.kept[step])
        return m.eval()

    def final_loss(self, last: int = 10) -> float:
        """Mean training loss of the last `last` logged steps (logged every 10 steps)."""
        return sum(h["loss"] for h in self.history[-last:]) / len(self.history[-last:])


def _spec(model: torch.nn.Module) -> dict:
    kind = type(model).__name__
    if isinstance(model, TunnelTransformer):
        c = model.gpt.config
        return {"kind": kind, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd}
    if isinstance(model, PrefixMLP):
        return {
            "kind": kind,
            "embd": model.wte.embedding_dim,
            "width": model.inp.out_features,
            "depth": len(model.body.blocks),
        }
    if isinstance(model, PaperMLP):
        return {"kind": kind, "width": model.wte.embedding_dim, "depth": len(model.blocks)}
    raise ValueError(f"unknown wind-tunnel model {kind}")


# the source a trained run depends on; analyses and metrics can change without retraining
TRAINING_SOURCES = ("windtunnel/tasks.py", "windtunnel/models.py", "windtunnel/train.py")


def _code_version() -> str:
    root = Path(lab_package.__file__).parent
    h = hashlib.sha256()
    files = [root / f for f in TRAINING_SOURCES] + sorted((root / "models").rglob("*.py"))
    for f in files:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_key(task, model, cfg: TunnelTrainConfig) -> str:
    spec = {
        "task": repr(task),
        "model": _spec(model),
        "train": asdict(cfg),
        "code": _code_version(),
        "params": n_params(model),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


class UnsafeCacheFile(ValueError):
    """A cached wind-tunnel file that is not plain weights (or is damaged): refused, not loaded."""


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`: a reader
    sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_safe(path: Path, required: tuple[str, ...] = ()) -> dict:
    """torch.load(path, weights_only=True): tensors, numbers, strings and containers of them
    only. Anything else (a pickled object, a damaged file, missing entries) raises
    UnsafeCacheFile naming the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCacheFile(
            f"refusing to load {path}: it is not a plain weights file ({first}). "
            f"Delete {path.parent} to train this run again."
        ) from None
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UnsafeCacheFile(
            f"refusing to load {path}: entries {missing} are missing. Delete {path.parent} to retrain."
        )
    return obj


def lr_at(step: int, cfg: TunnelTrainConfig) -> float:
    """Linear warm-up, then (optionally) constant, then cosine decay to 10% of cfg.lr over
    the last decay_fraction of the remaining steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, round(cfg.decay_fraction * (cfg.steps - cfg.warmup_steps)))
    progress = (step - (cfg.steps - decay_steps)) / decay_steps
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress)))))


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


RUN_FILE, CHECKPOINT_FILE, DONE_FILE = "run.pt", "checkpoint.pt", "done.json"


def train_tunnel(
    task,
    build,
    cfg: TunnelTrainConfig,
    *,
    progress: bool = False,
    cache: bool = True,
    device: str = "cpu",
    checkpoint_every: int = 1000,
) -> TunnelRun:
    """Build a model with build() under cfg.seed (so its initialisation is the seed's), train
    it on fresh batches of `task` on `device`, or load the cached run. An interrupted run
    resumes from its last checkpoint (written every `checkpoint_every` steps). The model
    comes back on the CPU in eval mode. The device is not part of the cache key."""
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    seed_everything(cfg.seed)
    model = build()
    run_dir = cache_dir("windtunnel", run_key(task, model, cfg)) if cache else None
    # one process trains an entry; another (an xdist worker) waits, then reuses it
    lock = cache_lock(run_dir, what="wind-tunnel run") if run_dir is not None else contextlib.nullcontext()
    with lock:
        return _load_or_train(task, model, cfg, run_dir, progress, device, checkpoint_every)


def _load_or_train(task, model, cfg, run_dir, progress, device, checkpoint_every) -> TunnelRun:
    if run_dir is not None and (run_dir / DONE_FILE).exists():
        state = load_safe(run_dir / RUN_FILE, ("model", "history", "kept", "wall_time_s"))
        model.load_state_dict(state["model"])
        done = json.loads((run_dir / DONE_FILE).read_text())
        return TunnelRun(
            model.eval(), cfg, state["history"], state["kept"], state["wall_time_s"], done.get("device", "cpu")
        )

    model.to(device)
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        foreach=True,  # one kernel per step for all tensors (the CPU default loops over them)
    )
    kept = {0: _cpu_state(model)} if 0 in cfg.keep_steps else {}
    history: list[dict] = []
    start, wall_before = 0, 0.0
    ckpt_path = run_dir / CHECKPOINT_FILE if run_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        ck = load_safe(ckpt_path, ("model", "optimizer", "step", "generator", "history", "kept", "wall_time_s"))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        start, history, kept, wall_before = ck["step"], ck["history"], ck["kept"], ck["wall_time_s"]

    # TensorBoard events beside the run; a resumed run drops those written after its checkpoint
    events = run_dir / EVENTS_DIR if run_dir is not None else None
    desc = f"{type(model).__name__} on {task.name}, seed {cfg.seed}"
    t0 = time.perf_counter()
    model.train()
    with RunLog(events, desc=desc, total=cfg.steps, initial=start, progress=progress) as log:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            batch = task.sample(cfg.batch_size, gen).to(device)
            loss = model.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{type(model).__name__} on {task.name}: loss {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            opt.step()
            if step % 10 == 0 or step == cfg.steps - 1:
                history.append({"step": step + 1, "loss": loss.item()})
                tokens_per_s = (step + 1 - start) * batch.tokens.numel() / (time.perf_counter() - t0)
                # grad_norm stays a tensor: RunLog reads it at the next flush, not inside the step
                log.step(
                    step + 1,
                    loss=history[-1]["loss"],
                    lr=lr_at(step, cfg),
                    grad_norm=grad_norm,
                    tokens_per_s=tokens_per_s,
                )
            if step + 1 in cfg.keep_steps:
                kept[step + 1] = _cpu_state(model)
            if ckpt_path is not None and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
                save_atomic(
                    {
                        "model": _cpu_state(model),
                        "optimizer": opt.state_dict(),
                        "step": step + 1,
                        "generator": gen.get_state(),
                        "history": history,
                        "kept": kept,
                        "wall_time_s": wall_before + time.perf_counter() - t0,
                    },
                    ckpt_path,
                )
                log.flush()  # the grad norms held back as tensors (the checkpoint synchronised)
    wall = wall_before + time.perf_counter() - t0
    model.to("cpu").eval()
    if run_dir is not None:
        save_atomic(
            {"model": model.state_dict(), "history": history, "kept": kept, "wall_time_s": wall}, run_dir / RUN_FILE
        )
        done = {"steps": cfg.steps, "wall_time_s": wall, "device": str(device), "resumed_from": start}
        tmp = run_dir / f".{DONE_FILE}.tmp"
        tmp.write_text(json.dumps(done))
        os.replace(tmp, run_dir / DONE_FILE)
        if ckpt_path is not None:
            ckpt_path.unlink(missing_ok=True)
    return TunnelRun(model, cfg, history, kept, wall, str(device))
