"""Tokenizers: char-level, the lab's own byte-level BPE, and tiktoken's cl100k / GPT-2.

All of them satisfy the `Tokenizer` protocol, and `get_tokenizer(name, ...)` builds any
of them by name:

    tok = get_tokenizer("char", text=corpus)
    tok = get_tokenizer("bpe", text=corpus, vocab_size=2048)   # trained once, then cached
    tok = get_tokenizer("cl100k")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lab.tokenizers.bpe import GPT2_PATTERN, BPETokenizer, train_bpe, train_bpe_cached
from lab.tokenizers.char import CharTokenizer
from lab.tokenizers.tiktoken_encodings import (
    TiktokenTokenizer,
    TokenizerUnavailableError,
    cl100k,
    gpt2,
    gpt2_available,
    install_gpt2_files,
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the lab relies on.

    `identity` is a stable string that changes whenever the text <-> id mapping changes;
    caches of token arrays and trained models are keyed by it.
    """

    name: str
    vocab_size: int
    identity: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


TOKENIZERS = ("char", "bpe", "cl100k", "gpt2")


def available_tokenizers() -> list[str]:
    """Names `get_tokenizer` knows (gpt2 may still be unavailable: see `gpt2_available`)."""
    return list(TOKENIZERS)


def get_tokenizer(name: str, *, text: str | None = None, vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer by name.

    - "char": vocabulary = sorted characters of `text` (required).
    - "bpe": the lab's byte-level BPE trained on `text` with `vocab_size` (both required);
      cached on disk by (text, vocab_size).
    - "cl100k", "gpt2": fixed pretrained vocabularies; `text` is ignored, and `vocab_size`,
      if given, must match theirs.
    """
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; expected one of {', '.join(TOKENIZERS)}")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")

    if name in ("char", "bpe") and not text:
        raise ValueError(f"the {name!r} tokenizer is built from a corpus: pass a non-empty text=...")
    if name == "char":
        tok = CharTokenizer.from_text(text)
    elif name == "bpe":
        if vocab_size is None:
            raise ValueError("the 'bpe' tokenizer needs vocab_size=... (an int >= 256)")
        return train_bpe_cached(text, vocab_size)
    elif name == "cl100k":
        tok = cl100k()
    else:
        tok = gpt2()
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} does not match the {name!r} tokenizer's vocab_size={tok.vocab_size} "
            f"(only 'bpe' can be trained to a chosen size)"
        )
    return tok


__all__ = [
    "GPT2_PATTERN",
    "BPETokenizer",
    "CharTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerUnavailableError",
    "available_tokenizers",
    "cl100k",
    "get_tokenizer",
    "gpt2",
    "gpt2_available",
    "install_gpt2_files",
    "train_bpe",
    "train_bpe_cached",
]
