"""Labels of character-level properties, for linear probes of the residual stream.

Each function maps a window of text (what the model sees, one token per character)
to one label per position, or -1 where the property is undefined there.
"""

from __future__ import annotations

import torch

VOWELS = frozenset("aeiouAEIOU")
# chars since the last newline, binned: where the model is in a line of verse
LINE_BINS = (8, 16, 32)


def is_vowel(window: str) -> list[int]:
    """1 if the current character is a vowel (a property of the token itself)."""
    return [int(c in VOWELS) for c in window]


def previous_char(window: str, vocab: dict[str, int]) -> list[int]:
    """The previous character's id (needs attention to the previous position)."""
    return [-1] + [vocab[c] for c in window[:-1]]


def line_position(window: str) -> list[int]:
    """The column (0 = first character after a newline), binned by LINE_BINS; -1 where no
    newline is in view."""
    out, col = [], None
    for c in window:
        out.append(-1 if col is None else sum(col >= b for b in LINE_BINS))
        if c == "\n":
            col = 0
        elif col is not None:
            col += 1
    return out


def word_end(window: str) -> list[int]:
    """1 if the current character is the last letter of a word. The next character decides
    it, which a causal model has not seen: readable only as far as the model predicts it."""
    out = []
    for i, c in enumerate(window):
        if i + 1 >= len(window):
            out.append(-1)
        else:
            out.append(int(c.isalpha() and not window[i + 1].isalpha()))
    return out


def labels(window: str, vocab: dict[str, int]) -> dict[str, list[int]]:
    """Every property's labels for one window."""
    return {
        "is_vowel": is_vowel(window),
        "previous_char": previous_char(window, vocab),
        "line_position": line_position(window),
        "word_end": word_end(window),
    }


def stack_labels(windows: list[str], vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """{property: (n_windows, T) long tensor} for a batch of equal-length windows."""
    if not windows or len({len(w) for w in windows}) != 1:
        raise ValueError("windows must be a non-empty list of equal-length strings")
    per = [labels(w, vocab) for w in windows]
    return {k: torch.tensor([p[k] for p in per], dtype=torch.long) for k in per[0]}


CHAR_CLASSES = ("vowel", "consonant", "space", "newline", "other")


def char_class(window: str) -> list[int]:
    """The class of each character (an index into CHAR_CLASSES): a vowel, another letter,
    a space, a newline, or anything else (punctuation, digits)."""
    out = []
    for c in window:
        # a string, not VOWELS: a frozenset's repr changes with the hash seed, and
        # registry fingerprints hash the constants a followed function reads by repr
        if c in "aeiouAEIOU":
            out.append(0)
        elif c.isalpha():
            out.append(1)
        else:
            out.append({" ": 2, "\n": 3}.get(c, 4))
    return out
