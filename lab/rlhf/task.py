"""The post-training task and its score: name a word that starts with two given letters
("name th: " -> "thee\\n"), and the exactly scorable property preferences are about (the
answer's share of vowels)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

from lab.checks import POSITIVE_INT, PROBABILITY

VOWELS = "aeiou"
STOP = "\n"  # every completion ends with a newline
PROMPT_TEMPLATE = "name {}: "


def vowel_fraction(completion: str) -> float:
    """The preference property: the share of a, e, i, o, u among the completion's
    characters before its first newline (0.0 for an empty answer). Exact, in [0, 1]."""
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")
    answer = completion.split(STOP, 1)[0]
    return sum(c in VOWELS for c in answer) / len(answer) if answer else 0.0


def _split_key(prefix: str) -> float:
    """A fixed number in [0, 1) per prefix: the held-out split does not depend on a seed."""
    return int(hashlib.sha256(prefix.encode()).hexdigest()[:8], 16) / 2**32


@dataclass(frozen=True)
class WordTask:
    """Name a word that starts with the prompt's letters: "name th: " -> "thee\\n".

    Built from a text (`from_text`): its lowercase words of min_len..max_len letters,
    grouped by their first prefix_len letters; prefixes with fewer than min_words words
    are dropped. A fixed hash of each prefix puts about held_out_fraction of them in the
    held-out split: SFT, preference pairs, the reward model and DPO see only training
    prefixes, and the hypotheses evaluate on prefixes none of them saw.
    """

    words: dict[str, tuple[str, ...]]  # prefix -> its words, sorted
    train_prefixes: tuple[str, ...]
    held_out_prefixes: tuple[str, ...]
    prefix_len: int

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        prefix_len: int = 2,
        min_len: int = 3,
        max_len: int = 10,
        min_words: int = 3,
        held_out_fraction: float = 0.25,
    ) -> WordTask:
        if not isinstance(text, str) or not text:
            raise ValueError(f"WordTask.from_text needs a non-empty str, got {text!r:.60}")
        POSITIVE_INT.check("prefix_len", prefix_len)
        POSITIVE_INT.check("min_words", min_words)
        if not (
            POSITIVE_INT.check("min_len", min_len) > prefix_len and POSITIVE_INT.check("max_len", max_len) >= min_len
        ):
            raise ValueError(
                f"need prefix_len < min_len <= max_len (each word must go past its prefix), got "
                f"prefix_len={prefix_len}, min_len={min_len}, max_len={max_len}"
            )
        PROBABILITY.check("held_out_fraction", held_out_fraction)
        unique = sorted({w for w in re.findall(r"[a-z]+", text.lower()) if min_len <= len(w) <= max_len})
        groups: dict[str, list[str]] = {}
        for w in unique:
            groups.setdefault(w[:prefix_len], []).append(w)
        words = {p: tuple(ws) for p, ws in sorted(groups.items()) if len(ws) >= min_words}
        held = tuple(p for p in words if _split_key(p) < held_out_fraction)
        train = tuple(p for p in words if _split_key(p) >= held_out_fraction)
        if not held or not train:
            raise ValueError(
                f"the text gives {len(words)} prefixes with >= {min_words} words of {min_len}..{max_len} letters: "
                f"too few for a train / held-out split ({len(train)} / {len(held)})"
            )
        return cls(words, train, held, prefix_len)

    @property
    def max_completion_len(self) -> int:
        """Characters of the longest well-formed completion (the word and its newline)."""
        return max(len(w) for ws in self.words.values() for w in ws) + len(STOP)

    @staticmethod
    def prompt(prefix: str) -> str:
        return PROMPT_TEMPLATE.format(prefix)

    def prefix_of(self, prompt: str) -> str:
        head, tail = PROMPT_TEMPLATE.split("{}")
        if not (
            isinstance(prompt, str)
            and prompt.startswith(head)
            and prompt.endswith(tail)
            and len(prompt) == len(head) + self.prefix_len + len(tail)
        ):
            example = self.prompt("x" * self.prefix_len)
            raise ValueError(f"{prompt!r} is not a prompt of this task (expected one like {example!r})")
        return prompt[len(head) : len(head) + self.prefix_len]

    def well_formed(self, prompt: str, completion: str) -> bool:
        """The answer format: the prompt's prefix, at least one more lowercase letter, a newline."""
        return re.fullmatch(re.escape(self.prefix_of(prompt)) + r"[a-z]+\n", completion) is not None

    def known_word(self, prompt: str, completion: str) -> bool:
        """Well formed and a word of the text with the prompt's prefix."""
        return self.well_formed(prompt, completion) and completion[:-1] in self.words[self.prefix_of(prompt)]

    def sft_examples(self, n: int, generator: torch.Generator) -> tuple[list[str], list[str]]:
        """n (prompt, completion) pairs: words drawn uniformly from the training prefixes' words."""
        pool = [w for p in self.train_prefixes for w in self.words[p]]
        picks = torch.randint(len(pool), (POSITIVE_INT.check("n", n),), generator=generator).tolist()
        return [self.prompt(pool[i][: self.prefix_len]) for i in picks], [pool[i] + STOP for i in picks]

    def prompts(self, split: str, n: int, generator: torch.Generator) -> list[str]:
        """n prompts with prefixes drawn uniformly (with replacement) from a split."""
        prefixes = self._split(split)
        picks = torch.randint(len(prefixes), (POSITIVE_INT.check("n", n),), generator=generator).tolist()
        return [self.prompt(prefixes[i]) for i in picks]

    def _split(self, split: str) -> tuple[str, ...]:
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        return self.train_prefixes if split == "train" else self.held_out_prefixes
