"""External yardsticks run side by side with the lab: nanoGPT's own train.py.

nanoGPT is not shipped with the lab (its code is not ours); point NANOGPT_DIR at a
checkout whose data/shakespeare_char has been prepared with its prepare.py. Its code is
run unmodified: other seeds come from a small wrapper that offsets the one
`torch.manual_seed(1337 + seed_offset)` call train.py makes, and its final weights are
read back from the checkpoint it writes, so the lab can evaluate them exactly as it
evaluates its own models."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from lab.checks import NON_NEGATIVE_INT

# Runs nanoGPT's train.py as its __main__ with every torch.manual_seed(s) call turned into
# torch.manual_seed(s + seed): train.py seeds once, with 1337 + seed_offset (0 outside DDP),
# so seed 0 is nanoGPT's own run and seed k its run with 1337 + k. argv: seed, train.py args.
_SEEDED_RUNNER = """
import runpy, sys, torch
offset = int(sys.argv[1])
sys.argv = ["train.py", *sys.argv[2:]]
_manual_seed = torch.manual_seed
torch.manual_seed = lambda s: _manual_seed(s + offset)
runpy.run_path("train.py", run_name="__main__")
"""


def nanogpt_dir() -> tuple[Path | None, str]:
    """(checkout, "") when NANOGPT_DIR is usable, else (None, why not)."""
    raw = os.environ.get("NANOGPT_DIR")
    if not raw:
        return None, "set NANOGPT_DIR to a nanoGPT checkout to compare against its own train.py"
    path = Path(raw)
    if not (path / "train.py").exists() or not (path / "data/shakespeare_char/train.bin").exists():
        return None, f"NANOGPT_DIR={raw} needs train.py and data/shakespeare_char/train.bin (run its prepare.py)"
    return path, ""


def nanogpt_baby_command(
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
    out_dir,
    seed: int = 0,
    compile: bool = False,
    save_checkpoints: bool = False,
) -> list[str]:
    """The command line run_nanogpt_baby runs (from the nanoGPT checkout)."""
    NON_NEGATIVE_INT.check("seed", seed)
    args = [
        "config/train_shakespeare_char.py",
        f"--device={device}",
        f"--compile={bool(compile)}",
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
        f"--always_save_checkpoint={bool(save_checkpoints)}",
        f"--out_dir={out_dir}",
    ]
    if seed == 0:
        return [sys.executable, "train.py", *args]
    return [sys.executable, "-c", _SEEDED_RUNNER, str(seed), *args]


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
    seed: int = 0,
    compile: bool = False,
    save_checkpoints: bool = False,
) -> str:
    """nanoGPT's README CPU command for the baby shakespeare-char model; returns its stdout.

    lr_decay_iters defaults to max_iters (the README's choice); it must exceed nanoGPT's
    100 warmup iterations. seed k > 0 runs the same unmodified train.py seeded with
    1337 + k instead of its 1337. compile passes --compile=True (torch.compile of the
    model). save_checkpoints writes out_dir/ckpt.pt at every evaluation (nanoGPT's
    always_save_checkpoint; it changes nothing in training), so the last one holds the
    final weights: read them with load_nanogpt_checkpoint."""
    cmd = nanogpt_baby_command(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=block_size,
        batch_size=batch_size,
        max_iters=max_iters,
        device=device,
        eval_iters=eval_iters,
        eval_interval=eval_interval,
        lr_decay_iters=lr_decay_iters,
        out_dir=out_dir or path / "out-lab-yardstick",
        seed=seed,
        compile=compile,
        save_checkpoints=save_checkpoints,
    )
    proc = subprocess.run(cmd, cwd=path, capture_output=True, text=True)
    if proc.returncode != 0:
        shown = " ".join(a for a in cmd[1:] if a != _SEEDED_RUNNER)
        raise RuntimeError(f"nanoGPT's train.py failed ({shown}):\n{proc.stderr[-2000:]}")
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


def load_nanogpt_checkpoint(ckpt_path: str | Path):
    """(lab GPT in eval mode, iter_num) from a nanoGPT ckpt.pt: the same weights under the
    lab's names (nanoGPT's layout is the lab's GPT-2 layout, biases per its `bias`).
    Loaded with weights_only=True: nothing in the file is unpickled as code."""
    from lab.models import GPT, GPTConfig

    ckpt = torch.load(Path(ckpt_path), map_location="cpu", weights_only=True)
    args = ckpt["model_args"]
    config = GPTConfig(
        vocab_size=args["vocab_size"],
        block_size=args["block_size"],
        n_layer=args["n_layer"],
        n_head=args["n_head"],
        n_embd=args["n_embd"],
        bias=args["bias"],
        dropout=0.0,
    )
    renames = (
        (r"^_orig_mod\.", ""),  # saved from a compiled model
        (r"^transformer\.h\.", "blocks."),
        (r"^transformer\.", ""),
    )
    state = {}
    for name, tensor in ckpt["model"].items():
        for pattern, new in renames:
            name = re.sub(pattern, new, name)
        if not name.endswith(".attn.bias"):  # old nanoGPT's causal-mask buffer
            state[name] = tensor
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval(), int(ckpt["iter_num"])


@torch.no_grad()
def split_loss(model, array, *, block_size: int, batch_size: int = 64) -> float:
    """Mean next-token loss (nats) over a whole split: every non-overlapping window of
    block_size tokens (the last partial one left out), each token predicted once from the
    tokens before it in its window, so context lengths 1..block_size are equally weighted,
    as in randomly placed windows. Deterministic, and free of the sampling noise of a few
    random batches (nanoGPT's estimate) and of the fixed draw of a few fixed batches (the
    lab's evaluate): the one evaluation the lab applies to its own and nanoGPT's weights."""
    import numpy as np

    from lab.checks import POSITIVE_INT

    POSITIVE_INT.check("block_size", block_size)
    POSITIVE_INT.check("batch_size", batch_size)
    tokens = np.asarray(array, dtype=np.int64)
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"the split has {len(tokens)} tokens; need more than block_size={block_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for first in range(0, n_windows, batch_size):
            starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
            windows = tokens[starts[:, None] + np.arange(block_size + 1)]
            x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1])).to(device)
            y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:])).to(device)
            _, loss = model(x, y)
            total += float(loss) * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count
