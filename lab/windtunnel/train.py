"""Training in a wind tunnel: fresh sequences every step (nothing to memorise), AdamW with
warm-up and cosine decay, gradient clipping, weights kept at chosen steps (for the
training-dynamics hypotheses), cached on disk by task, model, budget and code."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import lab as lab_package
from lab.paths import cache_dir
from lab.seeding import seed_everything
from lab.windtunnel.models import PositionMLP, PrefixMLP, TunnelTransformer, n_params


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

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        bad = [s for s in self.keep_steps if not isinstance(s, int) or not 0 <= s <= self.steps]
        if bad:
            raise ValueError(f"keep_steps must lie in [0, steps={self.steps}], got {bad}")


@dataclass
class TunnelRun:
    model: torch.nn.Module  # final weights, eval mode
    config: TunnelTrainConfig
    history: list[dict]  # every 10 steps: step, loss
    kept: dict[int, dict] = field(default_factory=dict)  # step -> state_dict
    wall_time_s: float = 0.0

    def at_step(self, step: int) -> torch.nn.Module:
        """A copy of the model with the weights kept after `step`."""
        import copy

        if step not in self.kept:
            raise KeyError(f"no weights kept at step {step}; kept: {sorted(self.kept)}")
        m = copy.deepcopy(self.model)
        m.load_state_dict(self.kept[step])
        return m.eval()


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
    if isinstance(model, PositionMLP):
        return {"kind": kind, "width": model.wte.embedding_dim, "depth": len(model.body.blocks)}
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


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr_at(step: int, cfg: TunnelTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_tunnel(task, build, cfg: TunnelTrainConfig, *, progress: bool = False, cache: bool = True) -> TunnelRun:
    """Build a model with build() under cfg.seed (so its initialisation is the seed's), train
    it on fresh batches of `task`, or load the cached run. The model comes back in eval mode."""
    seed_everything(cfg.seed)
    model = build()
    run_dir = cache_dir("windtunnel", run_key(task, model, cfg)) if cache else None
    if run_dir is not None and (run_dir / "done.json").exists():
        state = torch.load(run_dir / "run.pt", weights_only=False)
        model.load_state_dict(state["model"])
        return TunnelRun(model.eval(), cfg, state["history"], state["kept"], state["wall_time_s"])

    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    kept = {0: {k: v.clone() for k, v in model.state_dict().items()}} if 0 in cfg.keep_steps else {}
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"{type(model).__name__} on {task.name}", leave=False)
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = task.sample(cfg.batch_size, gen)
        loss = model.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{type(model).__name__} on {task.name}: loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            history.append({"step": step + 1, "loss": loss.item()})
        if step + 1 in cfg.keep_steps:
            kept[step + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    model.eval()
    if run_dir is not None:
        _save_atomic(
            {"model": model.state_dict(), "history": history, "kept": kept, "wall_time_s": wall}, run_dir / "run.pt"
        )
        (run_dir / "done.json").write_text(json.dumps({"steps": cfg.steps, "wall_time_s": wall}))
    return TunnelRun(model, cfg, history, kept, wall)
