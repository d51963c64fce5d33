"""Data-parallel pretraining under Hugging Face accelerate, beside lab.train.train (which
stays the single-process path, unchanged). It lives outside lab/train on purpose: the
training cache's key hashes lab/train, and this module must not invalidate cached runs.

    accelerate launch --multi_gpu --num_processes 2 -m lab.distributed --profile smoke --out runs/dp
    accelerate launch --multi_gpu --num_processes 8 -m lab.distributed --profile gpu --out runs/dp n_layer=12

(`--multi_gpu` picks accelerate's torchrun launcher; on a machine without CUDA, or with
device=cpu, the processes talk over gloo on the CPU.)

The run is the single-process run, split: every process draws the same global batch of
`batch_size` rows from the same seeded generator and trains on its own slice of
batch_size / processes rows; DistributedDataParallel averages the gradients, each slice's
loss weighted by its share of the scored tokens, so the update is the full batch's (to
float rounding). Clipping, the schedule and AdamW then act on identical gradients in every
process, so the weights stay identical; every process evaluates the same fixed batches.
Only the main process writes checkpoints, in train()'s format: `TrainResult.load(out /
"last")` reads them in a single process. Differences from train(): no resume, no
callback, no Ctrl-C checkpoint; with dropout the masks differ from the single process's;
an MoE model's load-balancing loss is computed on each slice.

With fsdp=True (`--fsdp`) the model is sharded with torch's FSDP2 (fully_shard: each block,
then the whole model) instead of replicated: every process holds a shard of the weights,
gradients and AdamW moments. Checkpoints are then gathered from the shards and hold no
optimizer state, and no TensorBoard events are written (a text sample would need every
process generating). accelerate's own FSDP plugin is not used: accelerate 1.15 ignores it
on the CPU (see lab/distributed_finetune.py), while fully_shard runs on gloo and NCCL alike.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from lab.data import get_batch
from lab.models import GPT, GPTConfig
from lab.runlog import RunLog, describe_run
from lab.train.checkpoint import save_checkpoint
from lab.train.objectives import objective_batch
from lab.train.schedule import lr_at
from lab.train.trainer import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    _block_grad_norms,
    _check_train_args,
    _make_optimizer,
    _Run,
)


class _DataParallelRun(_Run):
    """train()'s run state, with the model wrapped for data parallelism by `accelerator`."""

    def __init__(self, accelerator, mc: GPTConfig, tc: TrainConfig, data, out_dir: Path | None, fsdp: bool = False):
        super().__init__(mc, tc, data, out_dir, None)
        self.acc, self.fsdp = accelerator, fsdp
        self.device = accelerator.device  # cuda:<local rank> on GPUs; the config names only the kind
        world = accelerator.num_processes
        if tc.batch_size % world:
            raise ValueError(
                f"batch_size={tc.batch_size} must be divisible by the number of processes ({world}): each "
                "process trains an equal slice of the global batch"
            )
        self.rows = slice(
            accelerator.process_index * (tc.batch_size // world),
            (accelerator.process_index + 1) * (tc.batch_size // world),
        )
        if fsdp and (world < 2 or mc.n_expert is not None):
            raise ValueError(
                f"fsdp=True needs at least 2 processes and a dense model, got {world} process(es) and "
                f"n_expert={mc.n_expert}"
            )

    def start(self) -> None:
        super().start(False, None)
        if not self.fsdp:
            self.ddp, self.wrapped_optimizer = self.acc.prepare(self.model, self.optimizer)
            return
        from torch.distributed.fsdp import fully_shard

        for block in self.model.blocks:
            fully_shard(block)
        fully_shard(self.model)
        # fully_shard swapped the parameters for sharded ones: the optimizer must hold those
        self.optimizer = _make_optimizer(self.model, self.tc, self.device)
        self.ddp, self.wrapped_optimizer = self.model, self.optimizer

    def open_log(self, progress: bool) -> None:
        if self.acc.is_main_process and not self.fsdp:
            super().open_log(progress)
        else:
            desc = describe_run(self.mc, self.tc, self.data)
            progress = progress and self.acc.is_main_process
            self.log = RunLog(None, desc=desc, total=self.tc.max_steps, initial=self.step, progress=progress)

    def checkpoint(self, name: str) -> None:
        # no barrier: the other processes never read checkpoints while training
        if not self.fsdp:
            if self.acc.is_main_process:
                super().checkpoint(name)
            return
        if self.out_dir is None:
            return
        full = self.full_state_dict(cpu_offload=True)  # every process sends its shards
        if self.acc.is_main_process:
            save_checkpoint(
                self.out_dir / name,
                model=self.unsharded(full),
                step=self.step,
                model_config=self.mc,
                train_config=self.tc,
                extra={"train_state": self.state()},
            )

    def full_state_dict(self, cpu_offload: bool) -> dict:
        """The whole model's weights gathered from the shards: in every process, or with
        cpu_offload only in the main one (on its CPU)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
        return get_model_state_dict(self.model, options=options)

    def unsharded(self, state: dict) -> GPT:
        with torch.random.fork_rng(devices=[]):  # building a GPT draws initial weights: not from the run's RNG
            model = GPT(self.mc)
        model.load_state_dict(state)
        return model.to(self.device)

    def block_grad_norms(self) -> list[torch.Tensor]:
        if not self.fsdp:
            return _block_grad_norms(self.model)
        # every process holds a shard of each gradient: add the squares, then across processes
        squares = torch.stack(
            [
                sum(
                    ((p.grad.to_local().float() ** 2).sum() for p in b.parameters() if p.grad is not None),
                    start=torch.zeros((), device=self.device),
                )
                for b in self.model.blocks
            ]
        )
        torch.distributed.all_reduce(squares)
        return list(squares.sqrt())

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        if not self.fsdp:
            return self.acc.clip_grad_norm_(self.model.parameters(), max_norm)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def train_one_step(self) -> dict:
        tc, t0 = self.tc, time.perf_counter()
        lr = lr_at(
            self.step, lr=tc.lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps, min_lr_ratio=tc.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(self.data.train, self.mc.block_size, tc.batch_size, self.batch_gen, self.device)
        x, y, prefix = objective_batch(
            tc.objective,
            x,
            y,
            generator=self.batch_gen,
            mask_prob=tc.mask_prob,
            mask_id=self.mc.vocab_size - 1,
            mask_strategy=tc.mask_strategy,
        )
        scored = (y != -1).sum()
        x, y = x[self.rows], y[self.rows]
        self.rows_trained = x.shape[0]
        prefix = prefix[self.rows] if prefix is not None else None
        self.step += 1
        # the model's loss is a mean over this slice's scored tokens: weighted by the slice's
        # share, DDP's mean over processes is the mean over the global batch
        share = (y != -1).sum() * self.acc.num_processes / scored
        loss = self.ddp(x, y, prefix_len=prefix)[1]
        aux = self.model.aux_loss()
        self.wrapped_optimizer.zero_grad(set_to_none=True)
        self.acc.backward(loss * share if aux is None else loss * share + aux)
        stats = {"block_grad_norms": self.block_grad_norms()}
        grad_norm = self.clip_grad_norm(tc.grad_clip if tc.grad_clip > 0 else math.inf)
        total = self.acc.reduce((loss * share).detach().float(), reduction="mean")
        values = torch.stack([total, grad_norm.float(), *stats["block_grad_norms"]]).tolist()
        loss_value, grad_norm = values[0], values[1]
        stats["block_grad_norms"] = values[2:]
        if self.mc.n_expert is not None:
            load = torch.tensor(self.model.expert_load(), device=self.device)
            stats["expert_load"] = self.acc.reduce(load, reduction="mean").tolist()
            if aux is not None:
                stats["aux_loss"] = self.acc.reduce(aux.detach(), reduction="mean").item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingDivergedError(
                f"training diverged at step {self.step}: loss {loss_value}, grad norm {grad_norm}",
                step=self.step,
                history=self.history,
                evals=self.evals,
            )
        self.wrapped_optimizer.step()
        self.train_time += time.perf_counter() - t0
        self.train_tokens += tc.batch_size * self.mc.block_size
        record = {"step": self.step, "lr": lr, "train_loss": loss_value, "grad_norm": grad_norm, **stats}
        self.history.append(record)
        return record


def make_accelerator(train_config: TrainConfig, *, moe: bool = False):
    """The Accelerator train_distributed uses: on the CPU (gloo) for device='cpu'; for an
    MoE model (moe=True), DDP is told that experts no token reached have no gradient."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        cpu=torch.device(train_config.device).type == "cpu",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=moe)],
    )


def train_distributed(
    model_config: GPTConfig,
    train_config: TrainConfig,
    data,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    accelerator=None,
    fsdp: bool = False,
) -> TrainResult:
    """train() with data parallelism across the processes `accelerate launch` started (in
    a plain process: one process, the same run as train()). Every process returns the
    same TrainResult (under FSDP, with the model gathered from the shards); the main
    process writes `out_dir/last` and `out_dir/best`."""
    _check_train_args(model_config, train_config, data, out_dir, False, None, None, None)
    tc = train_config
    acc = accelerator or make_accelerator(tc, moe=model_config.n_expert is not None)
    run = _DataParallelRun(acc, model_config, tc, data, Path(out_dir) if out_dir is not None else None, fsdp)
    run.start()
    run.open_log(progress)
    ok = False
    try:
        run.evaluate()
        run.model.train()
        while run.step < tc.max_steps:
            record = run.train_one_step()
            run.log_step(record)
            if run.step % tc.eval_interval == 0 or run.step == tc.max_steps:
                run.evaluate()
                run.model.train()
                run.checkpoint("last")
            elif tc.checkpoint_interval and run.step % tc.checkpoint_interval == 0:
                run.checkpoint("last")
        ok = True
    finally:
        run.log.close(ok)
    acc.wait_for_everyone()  # the checkpoints are on disk for every process
    if fsdp:
        run.local_params = sum(p.to_local().numel() for p in run.model.parameters())
        run.model = run.unsharded(run.full_state_dict(cpu_offload=False))
    result = run.result()
    result.extra["data_parallel"] = {"processes": acc.num_processes, "rows_per_process": run.rows_trained}
    if fsdp:  # what this process held while training: a shard
        result.extra["data_parallel"].update(fsdp=True, process_params=run.local_params)
    return result


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch ... -m lab.distributed --out DIR [key=value ...]`: the
    profile's baby GPT (as `lab train` builds it) trained data-parallel into DIR."""
    from lab.commands import split_overrides
    from lab.profiles import PROFILES
    from lab.session import Lab

    p = argparse.ArgumentParser(prog="python -m lab.distributed", description=main.__doc__)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model or training settings, e.g. n_layer=6")
    p.add_argument("--profile", choices=sorted(PROFILES), help="scale (default: $LAB_PROFILE, else gpu/cpu)")
    p.add_argument("--corpus", default="tinyshakespeare")
    p.add_argument("--tokenizer", default="char")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW state (FSDP2)")
    p.add_argument(
        "--out", required=True, help="folder for the checkpoints (last/, best/), written by the main process"
    )
    args = p.parse_args(argv)
    try:
        model_over, train_over = split_overrides(args.overrides)
        lab = Lab(args.profile, progress=False)
        tc = lab.train_config(seed=args.seed, **train_over)
        acc = make_accelerator(tc, moe=model_over.get("n_expert") is not None)
        with acc.main_process_first():  # one process fills the token cache, the others read it
            data = lab.data(args.corpus, args.tokenizer)
        mc = lab.model_config(data, **model_over)
    except ValueError as exc:
        print(f"lab.distributed: {exc}", file=sys.stderr)
        return 2
    try:
        result = train_distributed(
            mc, tc, data, out_dir=args.out, progress=acc.is_main_process, accelerator=acc, fsdp=args.fsdp
        )
    except ValueError as exc:
        print(f"lab.distributed: {exc}", file=sys.stderr)
        return 2
    if acc.is_main_process:
        dp = result.extra["data_parallel"]
        sharded = (
            f", holding {dp['process_params']} of {sum(p.numel() for p in result.model.parameters())} weights"
            if args.fsdp
            else ""
        )
        print(
            f"lab.distributed: {acc.num_processes} process(es){' FSDP' if args.fsdp else ''}, {result.steps} steps, "
            f"each process {dp['rows_per_process']} of {tc.batch_size} rows a step{sharded}, validation loss "
            f"{result.final_val_loss:.4f}; checkpoints in {args.out} (last/, best/)"
        )
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
