"""External yardsticks run side by side with the lab: nanoGPT's own train.py.

nanoGPT is not shipped with the lab (its code is not ours); point NANOGPT_DIR at a
checkout whose data/shakespeare_char has been prepared with its prepare.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def nanogpt_dir() -> tuple[Path | None, str]:
    """(checkout, "") when NANOGPT_DIR is usable, else (None, why not)."""
    raw = os.environ.get("NANOGPT_DIR")
    if not raw:
        return None, "set NANOGPT_DIR to a nanoGPT checkout to compare against its own train.py"
    path = Path(raw)
    if not (path / "train.py").exists() or not (path / "data/shakespeare_char/train.bin").exists():
        return None, f"NANOGPT_DIR={raw} needs train.py and data/shakespeare_char/train.bin (run its prepare.py)"
    return path, ""


def run_nanogpt_baby(
    path: Path,
    *,
    n_layer,
    n_head,
    n_embd,
    block_size,
    batch_size,
    max_iters,
    device="cpu",
    eval_iters=20,
    eval_interval=None,
    lr_decay_iters=None,
    out_dir=None,
) -> str:
    """nanoGPT's README CPU command for the baby shakespeare-char model; returns its stdout.
    lr_decay_iters defaults to max_iters (the README's choice); it must exceed nanoGPT's
    100 warmup iterations."""
    cmd = [
        sys.executable,
        "train.py",
        "config/train_shakespeare_char.py",
        f"--device={device}",
        "--compile=False",
        f"--eval_iters={eval_iters}",
        f"--eval_interval={eval_interval or max_iters}",
        "--log_interval=1",
        f"--block_size={block_size}",
        f"--batch_size={batch_size}",
        f"--n_layer={n_layer}",
        f"--n_head={n_head}",
        f"--n_embd={n_embd}",
        f"--max_iters={max_iters}",
        f"--lr_decay_iters={lr_decay_iters or max_iters}",
        "--dropout=0.0",
        "--always_save_checkpoint=False",
        f"--out_dir={out_dir or path / 'out-lab-yardstick'}",
    ]
    proc = subprocess.run(cmd, cwd=path, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py failed ({' '.join(cmd[1:])}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def nanogpt_step_times(stdout: str) -> list[float]:
    """Per-iteration seconds from nanoGPT's 'iter N: loss L, time Tms' log lines."""
    return [float(t) / 1e3 for t in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", stdout, flags=re.M)]


def nanogpt_val_losses(stdout: str) -> dict[int, float]:
    """{step: val loss} from nanoGPT's 'step N: train loss A, val loss B' lines."""
    return {
        int(s): float(v)
        for s, v in re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", stdout, flags=re.M)
    }
