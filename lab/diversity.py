"""Diversity and repetition of generated token sequences (curriculum 05 sampling, 16 synthetic data)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from lab.checks import check_int


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n: unique n-grams / total n-grams, pooled over all sequences (Li et al. 2016)."""
    check_int("n", n, 1)
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    if not grams:
        raise ValueError(f"no {n}-grams: every sequence is shorter than {n} tokens")
    return len(set(grams)) / len(grams)


def loop_start(tokens: Sequence[int], *, max_period: int = 100, min_repeats: int = 2) -> int | None:
    """Where `tokens` falls into a loop: the smallest start s such that tokens[s:] is
    periodic with some period p <= max_period, repeated at least `min_repeats` times
    (tokens[i] == tokens[i + p] for all i >= s). None when the tail never loops."""
    n = len(tokens)
    best = None
    for p in range(1, min(max_period, n // min_repeats) + 1):
        # walk back from the end while the period-p relation holds
        i = n - p - 1
        while i >= 0 and tokens[i] == tokens[i + p]:
            i -= 1
        s = i + 1
        if n - s >= min_repeats * p and (best is None or s < best):
            best = s
    return best


WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def words(text: str) -> list[str]:
    """The words of a text, lower-cased: runs of letters, with inner apostrophes (o'er)."""
    return [w.lower() for w in WORD.findall(text)]


def known_words(texts: Iterable[str], vocabulary: set[str]) -> tuple[int, int]:
    """(k, n): of the n words in `texts`, k are in `vocabulary` (lower-cased words)."""
    ws = [w for t in texts for w in words(t)]
    return sum(w in vocabulary for w in ws), len(ws)
