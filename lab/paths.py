"""Where the lab keeps caches (trained models, token arrays, downloaded corpora), and the
lock that lets concurrent processes (pytest-xdist workers) share a cache entry."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$LAB_CACHE` (default `~/.cache/llm-lab`), joined with `parts`, created on demand."""
    root = Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "llm-lab")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def cache_lock(entry: str | os.PathLike, *, what: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry `entry` (a directory or file) while the
    block checks it, fills it or reads it back: the lock file `<entry>.lock` sits beside
    the entry, so replacing the entry never removes the lock. A second process (e.g.
    another pytest-xdist worker training the same config) waits, then finds the entry
    complete and reuses it instead of training into the same directory. The lock is the
    operating system's (filelock: flock on Unix), so a process that dies releases it.

        run_dir = cache_dir("runs", key)
        with cache_lock(run_dir):
            if not (run_dir / "done").exists():
                train_into(run_dir)
            return load(run_dir)
    """
    from filelock import FileLock, Timeout

    entry = Path(entry)
    lock = FileLock(str(entry.parent / f"{entry.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(
            f"lab: waiting for another process to finish {what or 'cache entry'} {entry}",
            file=sys.stderr,
            flush=True,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
