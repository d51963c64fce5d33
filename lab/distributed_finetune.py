"""Track A fine-tuning (lab.finetune) across processes under Hugging Face accelerate:
data parallelism (DDP), or FSDP2 (torch's fully_shard) when the model does not fit one
device. lab.finetune stays the single-process path, unchanged: its cache key hashes that
file, and the registered Track A predictions call it.

    accelerate launch --multi_gpu --num_processes 2 -m lab.distributed_finetune \\
        --base runs/hf-base --new milton.txt --out runs/ft method=lora rank=8
    accelerate launch --multi_gpu --num_processes 8 -m lab.distributed_finetune --fsdp \\
        --base /models/Qwen2.5-7B --new milton.txt --profile gpu --out runs/ft-full method=full

The run is finetune()'s run, split: every process draws the same global batch (new-task
rows, then the replayed old-task rows) from the same seeded generator and trains on its own
batch_size / processes rows. Every row scores block_size tokens, so the mean of the
processes' mean losses is the global batch's mean loss, and averaging the gradients (DDP's
all-reduce, FSDP's reduce-scatter) gives the full batch's gradient to float rounding.
Every process evaluates the same fixed batches. The main process writes the adapter (or
the full weights, gathered from the shards under FSDP) and result.json into --out, in
finetune()'s run-folder layout: `load_finetuned(load_run(out))` reads them in one process.
Nothing goes into the fine-tuning cache: a parallel run's numbers are not finetune()'s bits.

FSDP here is torch's own fully_shard applied by this module (each decoder layer, then the
whole model), not accelerate's FSDP plugin: accelerate 1.15 turns its plugin on only for
GPU-like distributed types (accelerate/state.py) and silently falls back to DDP on the CPU,
while fully_shard runs on gloo as on NCCL, so the CPU test runs the code a GPU cluster runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lab.data import TokenData, get_batch, load_corpus, prepare
from lab.finetune import (
    FinetuneConfig,
    FinetuneResult,
    _initial_weights,
    _layer_stats,
    _run_key,
    _save,
    base_hash,
    hf_loss,
    prepare_model,
    retokenize,
    state_bytes,
    weight_bytes,
)
from lab.seeding import seed_everything
from lab.train.schedule import lr_at


@dataclass
class SavedFinetuneResult(FinetuneResult):
    """A FinetuneResult read back from a run folder outside the cache (load_run)."""

    out_dir: str = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir)


def load_run(out_dir) -> SavedFinetuneResult:
    """The result a parallel run wrote into out_dir; `load_finetuned` of it gives the model."""
    out = Path(out_dir)
    path = out / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"no result.json in {out}: not a finished fine-tuning run folder")
    return SavedFinetuneResult.from_dict({**json.loads(path.read_text()), "out_dir": str(out)})


def make_accelerator(device: str = "cpu"):
    """The Accelerator that starts the processes' group: gloo on the CPU, NCCL on GPUs."""
    from accelerate import Accelerator

    return Accelerator(cpu=torch.device(device).type == "cpu")


def shard_fsdp(model) -> None:
    """FSDP2: every decoder layer (the classes transformers will not split across devices)
    its own shard group, then the rest (embeddings, final norm, head) in the root's."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"{type(base).__name__} names no decoder-layer classes (_no_split_modules={sorted(layer_classes)}): "
            "FSDP needs the layers to shard"
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


class _Run:
    """finetune()'s training state, on this process's slice of every batch."""

    def __init__(self, acc, base_dir, new: TokenData, old: TokenData, cfg: FinetuneConfig, device, fsdp: bool):
        self.acc, self.new, self.old, self.cfg, self.fsdp = acc, new, old, cfg, fsdp
        world = acc.num_processes
        if cfg.batch_size % world:
            raise ValueError(
                f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world}): each "
                "process trains an equal slice of the global batch"
            )
        if fsdp and world < 2:
            raise ValueError("fsdp=True needs at least 2 processes (start them with accelerate launch)")
        self.rows = slice(
            acc.process_index * (cfg.batch_size // world), (acc.process_index + 1) * (cfg.batch_size // world)
        )
        self.device = acc.device if torch.device(device).type != "cpu" else torch.device("cpu")
        seed_everything(cfg.seed)  # the same LoRA initialisation in every process
        self.model = prepare_model(base_dir, cfg, str(self.device))
        self.model.train()
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.base_weight_bytes, self.state_bytes = weight_bytes(self.model), state_bytes(self.model)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if fsdp:
            shard_fsdp(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # what this process holds: under FSDP a shard (DTensor.to_local), else every weight
        self.local_params = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.model.parameters()
        )
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.initial = {} if fsdp else _initial_weights(self.model, cfg)
        if fsdp:
            self.forward, self.wrapped_optimizer = self.model, self.optimizer
        else:
            self.forward, self.wrapped_optimizer = acc.prepare(self.model, self.optimizer)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.n_old = round(cfg.batch_size * cfg.replay_fraction)
        self.evals, self.history, self.layer_stats = [], [], []
        self.t0 = time.perf_counter()

    def evaluate(self, step: int) -> None:
        cfg = self.cfg
        kw = dict(block_size=cfg.block_size, batch_size=cfg.batch_size, n_batches=cfg.eval_batches)
        self.evals.append(
            {
                "step": step,
                "train_loss": hf_loss(self.model, self.new.train, **kw),
                "new_val": hf_loss(self.model, self.new.val, **kw),
                "old_val": hf_loss(self.model, self.old.val, **kw),
                "elapsed_s": time.perf_counter() - self.t0,
            }
        )
        # under FSDP the weights and Adam moments are shards: no per-layer statistics
        layers = {} if self.fsdp else _layer_stats(self.model, self.optimizer, self.initial, self.cfg)
        self.layer_stats.append({"step": step, "layers": layers})

    def train_one_step(self, step: int) -> bool:
        """One optimizer step on the global batch; False when the loss or gradient is not finite."""
        cfg = self.cfg
        lr = lr_at(
            step - 1, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(self.new.train, cfg.block_size, cfg.batch_size - self.n_old, self.gen, self.device)
        if self.n_old:
            xo, yo = get_batch(self.old.train, cfg.block_size, self.n_old, self.gen, self.device)
            x, y = torch.cat((x, xo)), torch.cat((y, yo))
        x, y = x[self.rows], y[self.rows]
        logits = self.forward(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.wrapped_optimizer.zero_grad(set_to_none=True)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if self.fsdp:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        else:
            self.acc.backward(loss)
            grad_norm = self.acc.clip_grad_norm_(self.params, max_norm)
        loss_value = self.acc.reduce(loss.detach(), reduction="mean").item()
        grad_norm = float(grad_norm)
        self.history.append({"step": step, "lr": lr, "loss": loss_value, "grad_norm": grad_norm})
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            return False
        self.wrapped_optimizer.step()
        return True


def finetune_distributed(
    base_dir,
    new: TokenData,
    old: TokenData,
    cfg: FinetuneConfig,
    *,
    out_dir=None,
    device: str = "cpu",
    fsdp: bool = False,
    progress: bool = True,
    accelerator=None,
) -> FinetuneResult:
    """finetune() across the processes `accelerate launch` started (in a plain process: one
    process, finetune()'s run). Every process returns the same result; the main process
    writes it, with the adapter or full weights, into out_dir (not into the cache)."""
    if not isinstance(cfg, FinetuneConfig):
        raise ValueError(f"cfg must be a FinetuneConfig, got {type(cfg).__name__}")
    for name, d in (("new", new), ("old", old)):
        if not isinstance(d, TokenData):
            raise ValueError(f"{name} must be a lab TokenData, got {type(d).__name__}")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and any(out.iterdir()) and not (out / "result.json").exists():
        raise ValueError(f"--out {out} is a non-empty folder that holds no fine-tuning run: refusing to replace it")
    acc = accelerator or make_accelerator(device)
    bh = base_hash(base_dir)
    run = _Run(acc, base_dir, new, old, cfg, device, fsdp)
    run.evaluate(0)
    diverged = False
    bar = tqdm(total=cfg.steps, disable=not progress, desc=f"finetune {cfg.label}", dynamic_ncols=True)
    for step in range(1, cfg.steps + 1):
        if not run.train_one_step(step):
            diverged = True
            break
        bar.update(1)
        bar.set_postfix(loss=f"{run.history[-1]['loss']:.3f}", refresh=False)
        if step % cfg.eval_interval == 0 or step == cfg.steps:
            run.evaluate(step)
    bar.close()
    spec = {"finetune": _run_key(bh, cfg, new, old), "processes": acc.num_processes, "fsdp": fsdp}
    result = FinetuneResult(
        config=cfg,
        key=hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20],
        base_dir=str(base_dir),
        base_hash=bh,
        evals=run.evals,
        history=run.history,
        layer_stats=run.layer_stats,
        trainable_params=run.trainable,
        total_params=run.total_params,
        base_weight_bytes=run.base_weight_bytes,
        state_bytes=run.state_bytes,
        diverged=diverged,
        wall_time_s=time.perf_counter() - run.t0,
        extra={
            "data_parallel": {**spec, "rows_per_process": run.rows.stop - run.rows.start},
            "main_process_params": run.local_params,
        },
    )
    if out is not None:
        _write(run, result, out, base_dir)
    acc.wait_for_everyone()  # the run folder is on disk for every process
    return result


def _write(run: _Run, result: FinetuneResult, out: Path, base_dir) -> None:
    """The main process saves the run; under FSDP every process first sends it its shards."""
    model = run.model
    if run.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if run.acc.is_main_process:  # the gathered weights, in a fresh unsharded copy to save
            model = prepare_model(base_dir, run.cfg, "cpu")
            model.load_state_dict(full)
    if run.acc.is_main_process:
        _save(model, result, out)


def load_text_data(spec: str, tokenizer) -> TokenData:
    """TokenData of a lab corpus name or a UTF-8 text file, in the base model's vocabulary
    (for a character tokenizer, characters it cannot encode are dropped, as Track A does)."""
    path = Path(spec)
    text = path.read_text(encoding="utf-8") if path.is_file() else load_corpus(spec)
    if tokenizer.name == "char":
        text, _ = retokenize(text, tokenizer)
    return prepare(text=text, tokenizer=tokenizer)


def base_tokenizer(base_dir):
    """(checkpoint directory, tokenizer): the checkpoint's own, or, for a lab export (which
    carries none), the character tokenizer of tiny Shakespeare it was trained with."""
    from lab.models.hf import resolve_hf_checkpoint
    from lab.tokenizers import get_tokenizer
    from lab.tokenizers.hf import HFTokenizer

    path, tokenizer = resolve_hf_checkpoint(base_dir)
    if tokenizer is not None:
        return path, HFTokenizer(tokenizer, str(base_dir))
    return path, get_tokenizer("char", text=load_corpus("tinyshakespeare"))


def config_from_args(profile: str | None, overrides: list[str]) -> FinetuneConfig:
    """The profile's Track A settings (lr, steps, batch, block, evals) with key=value changes."""
    from lab.commands import _value
    from lab.profiles import get_profile

    f = get_profile(profile).finetune
    settings = dict(
        lr=f.lr,
        steps=f.steps,
        batch_size=f.batch_size,
        block_size=f.base.block_size,
        eval_interval=f.eval_interval,
        eval_batches=f.eval_batches,
    )
    known = set(FinetuneConfig.__dataclass_fields__)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"expected key=value with a key among {sorted(known)}, got {item!r}")
        value = _value(raw)
        settings[key] = tuple(value) if isinstance(value, list) else value
    return FinetuneConfig(**settings)


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch ... -m lab.distributed_finetune --base DIR --new TEXT --out DIR
    [key=value ...]`: Track A's fine-tuning of the base on the new text, across processes."""
    p = argparse.ArgumentParser(prog="python -m lab.distributed_finetune", description=main.__doc__)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="FinetuneConfig fields, e.g. method=full rank=16")
    p.add_argument("--base", default=os.environ.get("LAB_HF_MODEL"), help="HF checkpoint (default: $LAB_HF_MODEL)")
    p.add_argument("--new", required=True, help="the new task: a lab corpus name or a text file")
    p.add_argument("--old", default="tinyshakespeare", help="the old task, measured (and replayed)")
    p.add_argument("--profile", help="Track A's settings of this profile (default: $LAB_PROFILE, else gpu/cpu)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (each process takes its own GPU)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW state (FSDP2)")
    p.add_argument("--out", required=True, help="run folder (adapter/ or weights/, result.json), main process")
    args = p.parse_args(argv)
    try:
        if not args.base:
            raise ValueError("no base model: give --base or set LAB_HF_MODEL")
        cfg = config_from_args(args.profile, args.overrides)
        acc = make_accelerator(args.device)
        with acc.main_process_first():  # one process fills the token cache, the others read it
            base_dir, tokenizer = base_tokenizer(args.base)
            new, old = load_text_data(args.new, tokenizer), load_text_data(args.old, tokenizer)
        result = finetune_distributed(
            base_dir, new, old, cfg, out_dir=args.out, device=args.device, fsdp=args.fsdp,
            progress=acc.is_main_process, accelerator=acc,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        print(f"lab.distributed_finetune: {exc}", file=sys.stderr)
        return 2
    if acc.is_main_process:
        dp = result.extra["data_parallel"]
        print(
            f"lab.distributed_finetune: {cfg.label}, {dp['processes']} process(es){' FSDP' if args.fsdp else ''}, "
            f"{len(result.history)} steps, each process {dp['rows_per_process']} of {cfg.batch_size} rows a step, "
            f"new-task validation loss {result.final['new_val']:.4f}; run folder {args.out}"
        )
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
