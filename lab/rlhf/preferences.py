"""Preference pairs: two samples per prompt, the higher-scoring one chosen (ties dropped),
kept in a JSONL file whose reader names the line of a malformed pair."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lab.checks import is_number
from lab.rlhf.sequences import encode_batch, sample_completions


@dataclass(frozen=True)
class PreferencePair:
    """A prompt, the completion preferred (chosen) and the other (rejected); optionally the
    scores that decided it. Invalid pairs are ValueErrors saying what is wrong."""

    prompt: str
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None

    def __post_init__(self):
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name!r} must be a string, got {type(value).__name__} {value!r:.60}")
            if not value:
                raise ValueError(f"{name!r} is an empty string")
        if self.chosen == self.rejected:
            raise ValueError(
                f"'chosen' equals 'rejected' ({self.chosen!r}): a pair must differ to express a preference"
            )
        for name in ("chosen_score", "rejected_score"):
            value = getattr(self, name)
            if value is not None and not is_number(value):
                raise ValueError(f"{name!r} must be a finite number or absent, got {value!r}")
        if (self.chosen_score is None) != (self.rejected_score is None):
            raise ValueError("give both 'chosen_score' and 'rejected_score' or neither")
        if self.chosen_score is not None and self.chosen_score < self.rejected_score:
            raise ValueError(
                f"'chosen_score' {self.chosen_score} is below 'rejected_score' {self.rejected_score}: "
                "the pair is labelled backwards"
            )


PAIR_KEYS = ("prompt", "chosen", "rejected")
OPTIONAL_PAIR_KEYS = ("chosen_score", "rejected_score")


def preference_pairs(
    model,
    tokenizer,
    prompts: Sequence[str],
    score: Callable[[str], float],
    *,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> tuple[list[PreferencePair], int]:
    """Two samples from `model` per prompt; the one `score` rates higher is chosen.
    Returns (pairs, ties): a tie (equal scores, identical samples included) is dropped."""
    a = sample_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, generator=generator, temperature=temperature
    )
    b = sample_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, generator=generator, temperature=temperature
    )
    pairs, ties = [], 0
    for p, x, y in zip(prompts, a, b):
        sx, sy = float(score(x)), float(score(y))
        if sx == sy:
            ties += 1
            continue
        (cw, sw), (cl, sl) = ((x, sx), (y, sy)) if sx > sy else ((y, sy), (x, sx))
        pairs.append(PreferencePair(p, cw, cl, sw, sl))
    return pairs, ties


def write_preferences(path, pairs: Sequence[PreferencePair]) -> Path:
    """One JSON object per line (prompt, chosen, rejected and the scores when known),
    written to a temporary file and renamed into place."""
    path = Path(path)
    lines = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PreferencePair):
            raise ValueError(f"pairs[{i}] must be a PreferencePair, got {type(pair).__name__}")
        lines.append(json.dumps({k: v for k, v in asdict(pair).items() if v is not None}, ensure_ascii=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_preference_line(line: str, line_no: int, *, alphabet: str | None = None) -> PreferencePair:
    """One JSONL line -> PreferencePair; a ValueError names the line and what is wrong."""
    where = f"line {line_no}"
    if not line.strip():
        raise ValueError(f"{where}: empty line; expected a JSON object with keys {list(PAIR_KEYS)}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}): {line.strip()[:80]!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {list(PAIR_KEYS)}, got {type(obj).__name__}")
    missing = [k for k in PAIR_KEYS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; a pair needs {list(PAIR_KEYS)}, got {sorted(obj)}")
    unknown = sorted(set(obj) - set(PAIR_KEYS) - set(OPTIONAL_PAIR_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(PAIR_KEYS + OPTIONAL_PAIR_KEYS)}")
    try:
        pair = PreferencePair(**obj)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if alphabet is not None:
        for name in PAIR_KEYS:
            bad = sorted({c for c in getattr(pair, name) if c not in alphabet})
            if bad:
                raise ValueError(f"{where}: {name!r} has character(s) {bad} outside the tokenizer's alphabet")
    return pair


def read_preferences(path, *, alphabet: str | None = None) -> list[PreferencePair]:
    """Read a JSONL preference file written by `write_preferences` (or by hand). Every line
    must be one pair; the first malformed one is a ValueError naming the file, the line
    number (from 1) and the problem. `alphabet` (e.g. the char tokenizer's characters)
    also rejects text the model cannot encode."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preference file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    pairs = []
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            pairs.append(parse_preference_line(line, n, alphabet=alphabet))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    if not pairs:
        raise ValueError(f"preference file {str(path)!r} holds no pairs")
    return pairs


def pair_tensors(tokenizer, pairs: Sequence[PreferencePair], block_size: int):
    if not pairs:
        raise ValueError("need at least one preference pair, got none")
    prompts = [p.prompt for p in pairs]
    chosen = encode_batch(tokenizer, prompts, [p.chosen for p in pairs], block_size=block_size)
    rejected = encode_batch(tokenizer, prompts, [p.rejected for p in pairs], block_size=block_size)
    return chosen, rejected


def stack_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a then rows of b, right-padded with zeros to the longer of the two."""
    T = max(a.size(1), b.size(1))
    return torch.cat([F.pad(a, (0, T - a.size(1))), F.pad(b, (0, T - b.size(1)))])
