"""Where a training step spends its time: torch.profiler's per-operator self time, grouped
into the kinds of work a reader can act on (matrix multiplies, the attention kernel, the
optimizer update, normalisation, elementwise and copies...).

    profile = profile_step(step, steps=20, warmup=5)
    profile.shares()        # {"matmul (GEMM)": 0.41, "optimizer update": 0.12, ...}
    profile.top(15)         # the operators with the most self time

Self time is time spent in an operator itself, not in the operators it calls, so the
kinds add up to the whole profiled window without double counting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from lab.checks import check_int

# (kind, exact operator names, name fragments): the first kind that names an operator
# exactly or by a fragment wins. Autograd's "evaluate_function: XBackward0" scopes match
# nothing: their self time is the framework's own overhead.
KINDS: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("attention kernel", frozenset(), ("scaled_dot_product", "flash_attention")),
    (
        "matmul (GEMM)",
        frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation"}),
        (),
    ),
    ("optimizer update", frozenset(), ("_foreach_", "_fused_adam", "Optimizer.")),
    ("normalisation", frozenset(), ("layer_norm", "rms_norm")),
    ("activation", frozenset(), ("gelu", "silu", "relu")),
    ("softmax and loss", frozenset(), ("softmax", "nll_loss", "cross_entropy")),
    ("embedding", frozenset(), ("embedding",)),
    (
        "elementwise and copies",
        frozenset(
            {
                *(
                    f"aten::{op}{inplace}"
                    for op in ("add", "mul", "div", "sub", "pow", "sqrt", "neg")
                    for inplace in ("", "_")
                ),
                *(f"aten::{op}" for op in ("copy_", "clone", "fill_", "zero_", "_to_copy", "where", "masked_fill_")),
            }
        ),
        (),
    ),
)
OTHER = "other (framework and small ops)"


def kind_of(op: str) -> str:
    """The kind of work an operator name stands for (KINDS), OTHER when none matches."""
    for kind, names, fragments in KINDS:
        if op in names or any(f in op for f in fragments):
            return kind
    return OTHER


@dataclass
class StepProfile:
    ops: dict[str, float]  # operator -> self CPU time per step, microseconds
    steps: int

    @property
    def total_us(self) -> float:
        return sum(self.ops.values())

    def by_kind(self) -> dict[str, float]:
        """{kind: self time per step, microseconds}, largest first."""
        out: dict[str, float] = {}
        for op, us in self.ops.items():
            out[kind_of(op)] = out.get(kind_of(op), 0.0) + us
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def shares(self) -> dict[str, float]:
        """{kind: fraction of the step's self time}; sums to 1."""
        total = self.total_us
        return {k: v / total for k, v in self.by_kind().items()}

    def top(self, n: int = 15) -> list[dict]:
        """Rows (operator, kind, ms per step, share) of the n operators with the most self time."""
        total = self.total_us
        rows = sorted(self.ops.items(), key=lambda kv: -kv[1])[:n]
        return [
            {"operator": op, "kind": kind_of(op), "ms per step": round(us / 1e3, 3), "share": round(us / total, 4)}
            for op, us in rows
        ]


def profile_step(step: Callable[[], object], *, steps: int, warmup: int = 5) -> StepProfile:
    """Run step() `warmup` times unprofiled, then `steps` times under torch.profiler and
    return each operator's self time per step: CPU time, or device time where CUDA is
    available."""
    check_int("steps", steps, 1)
    check_int("warmup", warmup, 0)
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    ops = {}
    for evt in prof.key_averages():
        # on a GPU the kernels' own time is what a step waits for; on a CPU the operators'
        us = evt.self_device_time_total if torch.cuda.is_available() else evt.self_cpu_time_total
        if us > 0:
            ops[evt.key] = ops.get(evt.key, 0.0) + us / steps
    return StepProfile(ops=ops, steps=steps)
