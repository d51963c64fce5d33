"""Track A: what each fine-tuning method costs per step, in time and memory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lab.data import get_batch
from lab.finetune import FinetuneConfig, prepare_model
from lab.report import less_than, prediction

pytestmark = pytest.mark.track_a

METHODS = ("full", "lora", "qlora")


def _step_fn(lab, base, data, method):
    f = lab.profile.finetune
    cfg = FinetuneConfig(method=method, rank=8, lr=f.lr, batch_size=f.batch_size, block_size=f.base.block_size)
    torch.manual_seed(0)
    model = prepare_model(base, cfg, lab.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)

    def step():
        x, y = get_batch(data.train, cfg.block_size, cfg.batch_size, gen, lab.device)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("method", METHODS)
def test_step_time_benchmark(lab, ft_base, milton_data, benchmark, outcome, method):
    """How long does a fine-tuning step take: full vs LoRA r=8 vs QLoRA r=8 on the same base?

    Timed with pytest-benchmark: one AdamW step (batch sampling, forward, backward,
    update) per round after 3 warm-up steps; the three methods run in the same process,
    one after another.
    """
    benchmark.group = "track A: fine-tuning step (full vs LoRA vs QLoRA)"
    benchmark.extra_info["method"] = method
    benchmark.pedantic(
        _step_fn(lab, ft_base, milton_data, method), rounds=lab.profile.finetune.bench_rounds, warmup_rounds=3
    )
    outcome.cite_benchmark(benchmark.group)


_PEAK = r"""
import json, resource, sys, torch
from lab.data import get_batch
from lab.finetune import FinetuneConfig, prepare_model
import numpy as np
base, method, batch, block, steps, device, tokens = sys.argv[1:8]
batch, block, steps = int(batch), int(block), int(steps)
array = np.load(tokens)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
cfg = FinetuneConfig(method=method, rank=8, batch_size=batch, block_size=block)
torch.manual_seed(0)
model = prepare_model(base, cfg, device).train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3)
gen = torch.Generator().manual_seed(0)
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
for _ in range(steps):
    x, y = get_batch(array, block, batch, gen, device)
    loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
print(json.dumps({"peak": int(peak)}))
"""


def _peak_memory(lab, base, data, method, tmp_path) -> int:
    """Peak memory of a few fine-tuning steps in a fresh process: CUDA's peak allocation,
    or on CPU the peak resident set above what the process held before loading the model."""
    import numpy as np

    tokens = tmp_path / "tokens.npy"
    if not tokens.exists():
        np.save(tokens, data.train[:200_000])
    f = lab.profile.finetune
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK,
            str(base),
            method,
            str(f.batch_size),
            str(f.base.block_size),
            "5",
            lab.device,
            str(tokens),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess for {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


@prediction(
    "LoRA's training peak memory is below full fine-tuning's", metric="lora_peak", expect=less_than("full_peak")
)
@prediction("QLoRA's training peak memory is below LoRA's", metric="qlora_peak", expect=less_than("lora_peak"))
def test_peak_memory(lab, ft_base, milton_data, outcome, tmp_path):
    """Does LoRA need less training memory than full fine-tuning, and QLoRA less than LoRA?

    Peak memory of five fine-tuning steps per method, each in a fresh process: each
    method (full, LoRA r=8, QLoRA r=8) runs in its own Python process so one method's
    allocations cannot hide another's; on CPU the figure is the peak resident
    set above the process's footprint before the model was loaded (allocator slack
    included), on CUDA the peak allocated bytes. Repeated once per profile seed.
    """
    rows = []
    for rep in lab.seeds:
        for method in METHODS:
            peak = _peak_memory(lab, ft_base, milton_data, method, tmp_path)
            outcome.record(f"{method}_peak", peak, seed=rep, unit="bytes")
            rows.append({"method": method, "repeat": rep, "peak MiB": round(peak / 2**20, 1)})
    outcome.table("peak_memory", rows, caption="Peak memory of 5 fine-tuning steps, fresh process per method")
