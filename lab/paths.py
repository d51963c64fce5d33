"""Where the lab keeps caches (trained models, token arrays, downloaded corpora)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$LAB_CACHE` (default `~/.cache/llm-lab`), joined with `parts`, created on demand."""
    root = Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "llm-lab")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
