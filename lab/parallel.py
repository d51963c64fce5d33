"""How many pytest-xdist workers `lab run` starts: every core, as far as memory allows.

    workers = max(1, min(cores, available memory // memory per worker of the profile))

`cores` are the cores this process may run on (its CPU affinity, which containers and
`taskset` narrow), `available memory` is psutil's estimate of what can be used without
swapping. A worker's memory is the profile's WORKER_MEMORY_BYTES: the largest peak RSS of
one hypothesis on that profile in the reference store (results/lab.sqlite: 1.44 GB on
cpu, for the m11 objectives), rounded up with room for the interpreter and torch. The gpu
profile is sized for one GPU, so it runs one worker (several GPUs: `lab run --ray`, one
GPU per task). An explicit `-n N` / `--workers N` overrides the rule; 1 runs serially.

Two workers never train the same cached configuration at once: every training cache
(runs, finetune, windtunnel) is filled under lab.paths.cache_lock, so the second waits
and reuses the first's result (tests/test_reliability.py::
test_two_processes_training_the_same_run_train_it_once). Tests are sent to workers a
file at a time (`--dist loadfile`) so a module's shared models train once, in one worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1 << 30
WORKER_MEMORY_BYTES = {"smoke": 1 * GIB, "cpu": 2 * GIB, "gpu": 8 * GIB}
GPU_WORKERS = 1


@dataclass(frozen=True)
class WorkerPlan:
    """The worker count and the reason for it, as one line for the user."""

    workers: int
    why: str


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        return os.cpu_count() or 1


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def plan_workers(profile: str, *, cores: int | None = None, memory: int | None = None) -> WorkerPlan:
    """The worker count for `profile` on this machine (or on `cores` cores with `memory`
    bytes available); ValueError for an unknown profile."""
    if profile not in WORKER_MEMORY_BYTES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(WORKER_MEMORY_BYTES)}")
    if profile == "gpu":
        return WorkerPlan(GPU_WORKERS, "the gpu profile is sized for one GPU")
    cores = usable_cores() if cores is None else cores
    memory = available_memory() if memory is None else memory
    per = WORKER_MEMORY_BYTES[profile]
    fit = memory // per
    workers = max(1, min(cores, fit))
    return WorkerPlan(
        workers,
        f"{cores} core(s); {memory / GIB:.1f} GiB available / {per / GIB:.0f} GiB per {profile}-profile worker = {fit}",
    )


def wants_own_workers(extra: list[str]) -> bool:
    """Whether the pytest arguments already choose parallelism (-n, --numprocesses, -p no:xdist)."""
    for i, arg in enumerate(extra):
        if arg == "-n" or arg.startswith("-n") and arg[2:].strip("=").isalnum():
            return True
        if arg.startswith("--numprocesses") or arg in ("-pno:xdist",):
            return True
        if arg == "-p" and i + 1 < len(extra) and extra[i + 1] == "no:xdist":
            return True
    return False


def xdist_args(workers: int) -> list[str]:
    """pytest arguments for `workers` workers: none for one (no xdist overhead)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    return [] if workers == 1 else ["-n", str(workers), "--dist", "loadfile"]


def workers_of(argv: list[str]) -> int:
    """The xdist worker count pytest arguments ask for (1 without -n)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("-n", "--numprocesses") and i + 1 < len(argv) else None
        if value is None and arg.startswith("--numprocesses="):
            value = arg.split("=", 1)[1]
        if value is None and arg.startswith("-n") and arg[2:].isdigit():
            value = arg[2:]
        if value is not None:
            return int(value) if value.isdigit() else usable_cores()
    return 1


def thread_env(workers: int, environ: dict[str, str] | None = None, *, cores: int | None = None) -> dict[str, str]:
    """The environment for `workers` processes sharing the cores: each torch gets
    cores // workers threads (OMP_NUM_THREADS) unless the user chose. Left alone, every
    worker's torch starts a thread per core and they stall each other at every parallel
    region: on the 2-core reference machine a training run took 3-4x longer while other
    torch processes ran. The thread count changes the order of float sums (about 1e-8 in a
    loss), so a run's numbers are the same for the same worker count."""
    env = dict(os.environ if environ is None else environ)
    if workers > 1 and "OMP_NUM_THREADS" not in env:
        cores = usable_cores() if cores is None else cores
        env["OMP_NUM_THREADS"] = str(max(1, cores // workers))
    return env
