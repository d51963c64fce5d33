"""Checkpoints: a directory of model.safetensors, optimizer.pt and config.json.

A checkpoint is written into a temporary sibling directory and renamed into
place, so a killed process leaves either the old checkpoint or the new one,
never half of one. config.json records a sha256 per file; loading checks them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lab.models import GPT, GPTConfig

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be trusted: corrupt, truncated or mismatched."""


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    model_config: GPTConfig
    step: int
    train_config: dict | None = None  # TrainConfig.to_dict(); checkpoints know nothing of the trainer
    optimizer_state: dict | None = None
    rng_state: dict | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- RNG state


def capture_rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG a training step can touch: torch (CPU, CUDA), numpy, python, and `generator`."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # plain python values, so optimizer.pt loads with torch.load(weights_only=True)
        "numpy": (np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Inverse of capture_rng_state."""
    if not isinstance(state, dict) or not {"torch", "numpy", "python"} <= set(state):
        raise ValueError("rng state must be a dict from capture_rng_state with torch, numpy and python keys")
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        if "generator" not in state:
            raise ValueError("rng state holds no generator state to restore")
        generator.set_state(state["generator"])


# ---------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    # durability, not correctness: directories cannot be fsynced on every platform
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share memory with an earlier one; safetensors refuses shared tensors."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def _write_model(path: Path, model: GPT) -> None:
    tensors, aliases = _split_tied(model.state_dict())
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def _read_model(path: Path, config: GPTConfig, map_location) -> GPT:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{path}: tied tensor {alias!r} points at missing {target!r}")
        state[alias] = state[target]
    # building a model draws its random init; keep that from moving the caller's RNG
    with torch.random.fork_rng(devices=[]):
        model = GPT(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model config ({e})") from e
    return model.to(map_location)


# ---------------------------------------------------------------- atomic directory writes


def _write_dir_atomically(target: Path, write_into) -> None:
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise ValueError(f"checkpoint path {target} exists and is not a directory")
    for stale in parent.glob(f".{target.name}.tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    old = parent / f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
    try:
        write_into(tmp)
        _fsync(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync(parent)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted(target: Path) -> None:
    """A process killed between the two renames leaves the old checkpoint under a hidden name."""
    if target.exists():
        return
    leftovers = sorted(target.parent.glob(f".{target.name}.old-*")) if target.parent.is_dir() else []
    if len(leftovers) == 1:
        os.replace(leftovers[0], target)


# ---------------------------------------------------------------- public API


def save_checkpoint(
    dir: str | os.PathLike,
    *,
    model: GPT,
    optimizer: torch.optim.Optimizer | None = None,
    step: int,
    model_config: GPTConfig,
    train_config=None,
    rng_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing any existing one); returns its path.

    train_config may be anything with to_dict() (e.g. TrainConfig) or a dict.
    extra must be JSON-serialisable; it lands in config.json.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"model must be a lab.models.GPT, got {type(model).__name__}")
    if not isinstance(model_config, GPTConfig):
        raise ValueError(f"model_config must be a GPTConfig, got {type(model_config).__name__}")
    if model.config != model_config:
        raise ValueError(f"model_config {model_config} does not match the model's own config {model.config}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if rng_state is not None and not isinstance(rng_state, dict):
        raise ValueError(f"rng_state must be a dict from capture_rng_state or None, got {type(rng_state).__name__}")
    if train_config is not None and not isinstance(train_config, dict):
        if not hasattr(train_config, "to_dict"):
            raise ValueError(f"train_config must be a dict or have to_dict(), got {type(train_config).__name__}")
        train_config = train_config.to_dict()
    extra = {} if extra is None else extra
    try:
        json.dumps(extra, allow_nan=False)
        json.dumps(train_config, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra and train_config must be JSON-serialisable: {e}") from e

    def write_into(tmp: Path) -> None:
        _write_model(tmp / MODEL_FILE, model)
        if optimizer is not None or rng_state is not None:
            torch.save(
                {"optimizer": None if optimizer is None else optimizer.state_dict(), "rng_state": rng_state},
                tmp / OPTIMIZER_FILE,
            )
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "model_config": model_config.to_dict(),
            "train_config": train_config,
            "extra": extra,
            "files": files,
            "torch_version": torch.__version__,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))
        for name in files | {CONFIG_FILE: ""}:
            _fsync(tmp / name)

    target = Path(dir)
    _write_dir_atomically(target, write_into)
    return target


def load_checkpoint(
    dir: str | os.PathLike,
    *,
    expected_config: GPTConfig | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read and verify a checkpoint written by save_checkpoint.

    FileNotFoundError: the directory or one of its files is missing.
    CheckpointError: a file is corrupt or truncated, or the config differs from expected_config.
    """
    if expected_config is not None and not isinstance(expected_config, GPTConfig):
        raise ValueError(f"expected_config must be a GPTConfig or None, got {type(expected_config).__name__}")
    path = Path(dir)
    _recover_interrupted(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint config not found: {config_path}")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{config_path}: format_version {version!r}, expected {FORMAT_VERSION}")

    files = meta.get("files") or {}
    if MODEL_FILE not in files:
        raise CheckpointError(f"{config_path}: lists no {MODEL_FILE}")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {file}")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: sha256 mismatch, the file is truncated or corrupt")

    try:
        model_config = GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: bad model_config ({e})") from e
    if expected_config is not None and model_config != expected_config:
        diffs = [
            f"{k}: checkpoint {v!r} != expected {getattr(expected_config, k)!r}"
            for k, v in model_config.to_dict().items()
            if getattr(expected_config, k) != v
        ]
        raise CheckpointError(f"checkpoint {path} has a different model config: " + "; ".join(diffs))

    model = _read_model(path / MODEL_FILE, model_config, map_location)

    optimizer_state = rng_state = None
    if OPTIMIZER_FILE in files:
        try:
            # weights_only: tensors, numbers, strings and containers of them; a planted
            # pickle (a file the lab did not write) is refused without running anything
            blob = torch.load(path / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights only load failed" in str(e).lower():
                detail = "it holds objects other than tensors and plain values, refused unread"
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: cannot be loaded ({detail})") from e
        if not isinstance(blob, dict):
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: expected a dict of optimizer and RNG state")
        optimizer_state, rng_state = blob.get("optimizer"), blob.get("rng_state")
        if rng_state is not None:
            # RNG states must be CPU byte tensors whatever map_location says
            rng_state = {
                k: (v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v] if k == "cuda" else v)
                for k, v in rng_state.items()
            }

    return Checkpoint(
        path=path,
        model=model,
        model_config=model_config,
        step=int(meta.get("step", 0)),
        train_config=meta.get("train_config"),
        optimizer_state=optimizer_state,
        rng_state=rng_state,
        extra=meta.get("extra") or {},
    )
