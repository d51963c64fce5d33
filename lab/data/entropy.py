"""Exact character statistics of a text: reference points for a language model's loss.

A model that only learned character frequencies reaches the unigram entropy; one that
learned "which character follows which" reaches the bigram conditional entropy. Both are
plug-in (maximum-likelihood) estimates over the given text, in nats per character, so they
are directly comparable with a char model's cross-entropy loss.
"""

from __future__ import annotations

import numpy as np


def _codepoints(text: str, min_len: int, what: str) -> np.ndarray:
    if not isinstance(text, str):
        raise ValueError(f"{what} expects a str, got {type(text).__name__}")
    if len(text) < min_len:
        raise ValueError(f"{what} needs at least {min_len} character(s), got {len(text)}")
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def unigram_entropy(text: str) -> float:
    """H(X) of the character distribution of `text`, in nats per character."""
    codes = _codepoints(text, 1, "unigram_entropy")
    _, counts = np.unique(codes, return_counts=True)
    return _entropy(counts)


def bigram_conditional_entropy(text: str) -> float:
    """H(next char | current char) over the len(text)-1 adjacent pairs, in nats per character.

    Computed as H(pair) - H(first char of pair), both over the same pairs, so a text where
    each character fully determines the next (e.g. "abcabc...") gives exactly 0.
    """
    codes = _codepoints(text, 2, "bigram_conditional_entropy")
    pairs = codes[:-1] * 0x110000 + codes[1:]  # code points are < 0x110000: a unique pair id
    _, pair_counts = np.unique(pairs, return_counts=True)
    _, first_counts = np.unique(codes[:-1], return_counts=True)
    return max(0.0, _entropy(pair_counts) - _entropy(first_counts))
