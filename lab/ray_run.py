"""`lab run --ray [ADDRESS]`: the selected hypotheses as Ray tasks, their stores merged.

The driver collects the selection (pytest --collect-only with the same arguments) and
makes one Ray task per test file, asking for the resources of the profile: one CPU on
smoke and cpu, one GPU on gpu (Ray then sets CUDA_VISIBLE_DEVICES, so each task sees one
device). A task runs pytest on its node ids in the project root into a store of its own,
in a temporary folder of the machine it runs on, and returns the store file's bytes (the
write-ahead log checkpointed into it) with pytest's exit status and last lines. The driver
writes the stores it gets back beside the main store and merges them into it with
lab.report.merge (lossless, idempotent, all or nothing): each task's run keeps its run id.

Without ADDRESS a local Ray instance with `workers` CPUs is started and stopped again;
with one (`auto`, `ray://head:10001`, `head:6379`) the tasks go to that cluster, and the
project folder travels with them as Ray's working_dir (without .venv, caches, stores and
the built site): every node needs the same Python environment (`bash install.sh`).

Trained-model caches do not travel: each task trains (or finds in its node's $LAB_CACHE)
what its hypotheses need. Cache entries are keyed by the code, the configuration and the
data, so a rebuilt entry is the same model; moving them would put gigabytes through the
object store for runs that take a smoke task seconds and a cpu task minutes, and one file
per task means a module's shared models are trained once, in its task. Tasks on one node
share its cache, under lab.paths.cache_lock.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# what stays behind when the project folder travels to a remote cluster
EXCLUDES = [".venv", ".lab", ".git", "site", "*-site", "results", "*.sqlite", "*.sqlite-*", "__pycache__"]


@dataclass
class TaskResult:
    """What one task sends back: its file, pytest's exit status and output tail, its store."""

    name: str
    exitstatus: int
    tail: str
    store: bytes | None


def collect(root: Path, argv: list[str]) -> list[str]:
    """The node ids pytest selects with `argv` (run in `root`); SystemExit with pytest's
    output when collection fails."""
    # another -q or -v would change the listing from node ids to counts or a tree
    argv = [a for a in argv if a not in ("-q", "-qq", "--quiet", "-v", "-vv", "--verbose")]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pytest", *argv, "--collect-only", "-q", f"--lab-store={Path(tmp) / 'c.sqlite'}"]
        res = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if res.returncode not in (0, 5):
        raise SystemExit(f"lab run --ray: collecting the selection failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return [line.strip() for line in res.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def group_by_file(nodeids: list[str]) -> dict[str, list[str]]:
    """{test file: its node ids}, in collection order: one Ray task each."""
    groups: dict[str, list[str]] = {}
    for nodeid in nodeids:
        groups.setdefault(nodeid.split("::", 1)[0], []).append(nodeid)
    return groups


def task_options(extra: list[str], root: Path) -> list[str]:
    """The pytest options a task passes on: `extra` without test paths (a task runs only
    its own node ids)."""

    def is_path(arg: str) -> bool:
        return not arg.startswith("-") and ("::" in arg or (root / arg.split("::", 1)[0]).exists())

    return [arg for arg in extra if not is_path(arg)]


def run_task(name: str, nodeids: list[str], options: list[str], root: str | None) -> TaskResult:
    """Run `nodeids` with pytest in `root` (None: the task's working directory, where Ray
    unpacked the project) into a fresh store; return it as bytes."""
    cwd = Path(root) if root is not None else Path.cwd()
    with tempfile.TemporaryDirectory(prefix="lab-ray-") as tmp:
        store = Path(tmp) / "task.sqlite"
        cmd = [sys.executable, "-m", "pytest", *nodeids, *options, f"--lab-store={store}"]
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        data = None
        if store.exists():
            conn = sqlite3.connect(store)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            data = store.read_bytes()
    tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
    return TaskResult(name, res.returncode, tail, data)


def passed_env(environ, *, local: bool) -> dict[str, str]:
    """The driver's settings a task gets: LAB_* (LAB_HF_MODEL, LAB_HF_ALLOW_DOWNLOAD, ...) and
    NANOGPT_DIR, but never LAB_STORE (each task has its own store) nor, on a remote cluster,
    LAB_CACHE (a path on the driver's machine: each node keeps its own cache)."""
    drop = {"LAB_STORE"} | (set() if local else {"LAB_CACHE"})
    return {k: v for k, v in environ.items() if (k.startswith("LAB_") or k == "NANOGPT_DIR") and k not in drop}


def _resources(profile: str) -> dict:
    return {"num_cpus": 1, "num_gpus": 1} if profile == "gpu" else {"num_cpus": 1}


def run_on_ray(
    root: Path, argv: list[str], extra: list[str], *, profile: str, store: Path, address: str | None, workers: int
) -> int:
    """Run the selection `argv + extra` as Ray tasks and merge their stores into `store`.
    Returns pytest's worst exit status over the tasks (1 when a task was lost)."""
    import ray

    from lab.report.merge import merge_stores

    nodeids = collect(root, argv + extra)
    if not nodeids:
        print("lab run --ray: the selection holds no tests", file=sys.stderr)
        return 5
    groups = group_by_file(nodeids)
    options = task_options(extra, root) + ["--lab-profile", profile]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a lab run
    package_parent = str(Path(__file__).resolve().parents[1])
    env = passed_env(os.environ, local=address is None)
    if address is None:
        # the workers import this lab (not another checkout's) and run pytest in root
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=workers, include_dashboard=False, runtime_env={"env_vars": env})
        task_root: str | None = str(root)
        where = f"a local Ray instance ({workers} CPUs)"
    else:
        ray.init(address=address, runtime_env={"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env})
        task_root = None
        where = f"the Ray cluster at {address}"
    try:
        remote = ray.remote(**_resources(profile))(run_task)
        print(f"lab run --ray: {len(nodeids)} tests in {len(groups)} tasks on {where}", file=sys.stderr)
        pending = {remote.remote(name, ids, options, task_root): name for name, ids in groups.items()}
        results, lost = [], []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            try:
                results.append(ray.get(done[0]))
                r = results[-1]
                print(f"lab run --ray: {name}: exit {r.exitstatus}: {r.tail.splitlines()[-1] if r.tail else ''}")
            except ray.exceptions.RayError as exc:
                lost.append(name)
                print(f"lab run --ray: {name}: the task was lost ({type(exc).__name__}: {exc})", file=sys.stderr)
    finally:
        ray.shutdown()
    return _merge_back(results, lost, store, merge_stores)


def _merge_back(results: list[TaskResult], lost: list[str], store: Path, merge_stores) -> int:
    folder = store.parent / f".{store.name}-ray"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, r in enumerate(results):
        if r.store is None:
            continue
        path = folder / f"{i:03d}-{Path(r.name).stem}.sqlite"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(r.store)
        tmp.replace(path)
        paths.append(path)
    if paths:
        for count in merge_stores(store, paths):
            print(f"lab: merged {count.line()}")
    for path in paths:  # merged: the copies are no longer needed
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            f.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
    codes = [r.exitstatus for r in results] + [1] * len(lost)
    if all(c in (0, 5) for c in codes):
        return 0 if 0 in codes else 5
    return max(c for c in codes if c not in (0, 5))
