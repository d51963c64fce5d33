"""Progress of long work (training runs): what is running, step / total, tokens/s, ETA.

Every trainer reports through `task(...)`. Outside pytest that is a tqdm bar on stderr.
Under pytest (which captures stderr) the lab's plugin installs a sink that prints the
same information as lines through pytest's terminal reporter (lab.report.progress), also
from pytest-xdist workers. A sink is any object with `start(task)`, `update(task)` and
`finish(task)`; it reads the task's fields (`desc`, `step`, `total`, `stats`, `eta_s`...).

    bar = task("GPT 4L/4H/128d on tinyshakespeare/char, seed 0", total=2000, initial=0)
    for step in range(1, 2001):
        ...
        bar.update(step, loss=2.31, tokens_per_s=41_000)
    bar.close()
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

_SINKS: list = []  # innermost last; empty: tqdm


class Task:
    """One unit of long work with a known number of steps."""

    def __init__(self, desc: str, total: int, *, initial: int = 0, unit: str = "step", sink=None):
        self.desc, self.total, self.initial, self.unit = desc, int(total), int(initial), unit
        self.step = self.initial
        self.stats: dict[str, float] = {}
        self.started = time.monotonic()
        self.ok: bool | None = None  # set by close(): True finished, False interrupted or failed
        self._sink = sink
        if sink is not None:
            sink.start(self)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0

    @property
    def steps_per_s(self) -> float:
        done = self.step - self.initial
        return done / self.elapsed_s if done > 0 and self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate since this task started (None before the first step)."""
        rate = self.steps_per_s
        return (self.total - self.step) / rate if rate > 0 else None

    def update(self, step: int, **stats: float) -> None:
        """The task is at `step` (absolute, not an increment); stats such as loss=...,
        tokens_per_s=... are shown beside it."""
        self.step = int(step)
        self.stats.update(stats)
        if self._sink is not None:
            self._sink.update(self)

    def close(self, ok: bool = True) -> None:
        if self.ok is not None:
            return
        self.ok = ok
        if self._sink is not None:
            self._sink.finish(self)

    def line(self) -> str:
        """One line for a log: desc, step / total (percent), stats, rate, elapsed, ETA."""
        parts = [f"{self.step:,}/{self.total:,} {self.unit}s ({100 * self.fraction:.0f}%)"]
        if "loss" in self.stats:
            parts.append(f"loss {self.stats['loss']:.4f}")
        if self.stats.get("tokens_per_s"):
            parts.append(f"{self.stats['tokens_per_s']:,.0f} tok/s")
        parts.append(f"{format_duration(self.elapsed_s)} elapsed")
        if self.ok is None:
            eta = self.eta_s
            parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA ?")
        return f"{self.desc}: " + ", ".join(parts)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class TqdmSink:
    """The default outside pytest: a tqdm bar per task on stderr."""

    def __init__(self):
        self._bars = {}

    def start(self, task: Task) -> None:
        from tqdm.auto import tqdm

        self._bars[id(task)] = tqdm(
            total=task.total, initial=task.initial, desc=task.desc, unit=task.unit, dynamic_ncols=True
        )

    def update(self, task: Task) -> None:
        bar = self._bars.get(id(task))
        if bar is None:
            return
        bar.update(task.step - bar.n)
        post = {}
        if "loss" in task.stats:
            post["loss"] = f"{task.stats['loss']:.4f}"
        if task.stats.get("tokens_per_s"):
            post["tok_s"] = f"{task.stats['tokens_per_s']:,.0f}"
        if post:
            bar.set_postfix(post, refresh=False)

    def finish(self, task: Task) -> None:
        bar = self._bars.pop(id(task), None)
        if bar is not None:
            bar.close()


_TQDM = TqdmSink()


def task(desc: str, total: int, *, initial: int = 0, unit: str = "step", enabled: bool = True) -> Task:
    """Start reporting a task: through the innermost installed sink, else a tqdm bar.
    enabled=False gives a task that reports nowhere (same interface)."""
    sink = None if not enabled else (_SINKS[-1] if _SINKS else _TQDM)
    return Task(desc, total, initial=initial, unit=unit, sink=sink)


def install(sink) -> None:
    """Route every task started from now on to `sink` (until `uninstall(sink)`)."""
    _SINKS.append(sink)


def uninstall(sink) -> None:
    if sink in _SINKS:
        _SINKS.remove(sink)


@contextmanager
def routed_to(sink) -> Iterator[None]:
    """Tasks started inside the block report to `sink`."""
    install(sink)
    try:
        yield
    finally:
        uninstall(sink)
