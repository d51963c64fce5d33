"""A Hugging Face tokenizer behind the lab's Tokenizer protocol, so any local HF causal
LM can be fine-tuned and evaluated on lab corpora in its own vocabulary."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from lab.tokenizers.char import _check_utf8


class HFTokenizer:
    """Wraps a transformers tokenizer: encode adds no special tokens (corpora are one
    long stream), decode skips none. `identity` hashes the full vocabulary."""

    def __init__(self, tokenizer, name: str):
        if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "get_vocab"):
            raise ValueError(f"expected a transformers tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self.name = f"hf:{name}"
        self.vocab_size = len(tokenizer)
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        self.identity = f"{self.name}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        _check_utf8(text, f"{self.name} encode")  # the Rust tokenizers raise a bare TypeError
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))
