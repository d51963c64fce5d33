"""Character-level tokenizer: one token per Unicode character (nanoGPT's shakespeare_char)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence


class CharTokenizer:
    """Maps each character of a fixed alphabet to its index in the sorted alphabet.

    The vocabulary is closed: encoding a character outside it is an error rather than
    a silent <unk>, because a char model can never predict a character it has no row for.
    """

    name = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet, got no characters")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer alphabet entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            dupes = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"CharTokenizer alphabet has duplicate characters: {dupes!r}")
        self.chars: list[str] = chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from the sorted set of characters in `text`."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"CharTokenizer.from_text needs a non-empty str, got {text!r:.60}")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def identity(self) -> str:
        """Changes whenever the alphabet (and so the id mapping) changes."""
        digest = hashlib.sha256("".join(self.chars).encode("utf-8", "surrogatepass")).hexdigest()
        return f"char-{self.vocab_size}-{digest[:16]}"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            # Slow path only on failure: find where, so the message is actionable.
            pos, bad = next((i, c) for i, c in enumerate(text) if c not in stoi)
            raise ValueError(
                f"character {bad!r} at position {pos} is not in this char tokenizer's "
                f"vocabulary of {self.vocab_size} characters (built from a different text?)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        ids = _as_int_list(ids, self.vocab_size)
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=True)

    @classmethod
    def from_json(cls, data: str) -> CharTokenizer:
        try:
            obj = json.loads(data)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a CharTokenizer JSON document: {e}") from None
        if not isinstance(obj, dict) or obj.get("type") != "char" or not isinstance(obj.get("chars"), list):
            raise ValueError(f"expected JSON like {{'type': 'char', 'chars': [...]}}, got {str(obj)[:80]!r}")
        return cls(obj["chars"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _as_int_list(ids, vocab_size: int) -> list[int]:
    """Token ids from a list, tuple, numpy array or tensor, each checked against the vocabulary."""
    if isinstance(ids, str):
        raise ValueError("decode expects a sequence of token ids, got a str")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    try:
        out = list(ids)
    except TypeError:
        raise ValueError(f"decode expects a sequence of token ids, got {ids!r:.60}") from None
    for pos, i in enumerate(out):
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"token ids must be ints, got {i!r} at position {pos}")
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} at position {pos} is out of range for vocab_size={vocab_size}")
    return out


def _check_utf8(text: str, what: str) -> None:
    """ValueError naming the first lone surrogate (U+D800..U+DFFF, which UTF-8 cannot
    encode) and its position: a byte-level tokenizer would otherwise see U+FFFD instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what}: character {text[e.start]!r} (U+{ord(text[e.start]):04X}) at position {e.start} is a lone "
            "surrogate, which has no UTF-8 encoding; byte-level tokenizers do not silently replace it with "
            "U+FFFD (clean the text, e.g. text.encode('utf-8', 'replace').decode('utf-8'))"
        ) from None
