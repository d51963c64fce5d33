"""Post-training a small GPT: supervised fine-tuning, preferences, a reward model and DPO.

The pieces of the RLHF recipe at a scale a CPU runs in minutes, written out in plain
torch loops (the trainer in `lab.train` pretrains; these loops post-train a copy):

- an instruction-like task the char-level Shakespeare tokenizer can spell
  (`WordTask`: "name th: " -> "thee\\n", name a word that starts with the prompt's
  two letters) and supervised fine-tuning (`sft`) of a pretrained model on
  prompt + completion with the loss on completion tokens only;
- an exactly scorable property (`vowel_fraction` of the completion) and preference pairs
  (`preference_pairs`: two samples per prompt from the SFT model, the higher-scoring one
  chosen, ties dropped), kept in a JSONL file (`write_preferences` / `read_preferences`,
  which names the line of a malformed pair);
- a reward model (`RewardModel`: the GPT trunk plus a scalar head on the last token)
  trained with the Bradley-Terry loss, and its held-out `pairwise_accuracy`;
- DPO (`dpo`, `dpo_loss`: Rafailov et al. 2023) against a frozen reference, and a
  Monte-Carlo estimate of the sequence-level KL(pi || ref) from samples of pi
  (`kl_estimate`).

Everything is deterministic for a seed: batches and samples come from seeded
torch.Generators, new heads start at zero. No library implements DPO in the pinned
environment (trl is not installed), hence `dpo_loss` here, tested on hand-computed values.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VOWELS = "aeiou"
STOP = "\n"  # every completion ends with a newline
PROMPT_TEMPLATE = "name {}: "


# ---------------------------------------------------------------- checks


def _pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _pos_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"seed must be a non-negative int, got {value!r}")
    return value


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed(seed))
    return g


# ---------------------------------------------------------------- the task and its score


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
        _pos_int("prefix_len", prefix_len)
        _pos_int("min_words", min_words)
        if not (_pos_int("min_len", min_len) > prefix_len and _pos_int("max_len", max_len) >= min_len):
            raise ValueError(
                f"need prefix_len < min_len <= max_len (each word must go past its prefix), got "
                f"prefix_len={prefix_len}, min_len={min_len}, max_len={max_len}"
            )
        if (
            isinstance(held_out_fraction, bool)
            or not isinstance(held_out_fraction, (int, float))
            or not 0 < held_out_fraction < 1
        ):
            raise ValueError(f"held_out_fraction must be a number in (0, 1), got {held_out_fraction!r}")
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
        picks = torch.randint(len(pool), (_pos_int("n", n),), generator=generator).tolist()
        return [self.prompt(pool[i][: self.prefix_len]) for i in picks], [pool[i] + STOP for i in picks]

    def prompts(self, split: str, n: int, generator: torch.Generator) -> list[str]:
        """n prompts with prefixes drawn uniformly (with replacement) from a split."""
        prefixes = self._split(split)
        picks = torch.randint(len(prefixes), (_pos_int("n", n),), generator=generator).tolist()
        return [self.prompt(prefixes[i]) for i in picks]

    def _split(self, split: str) -> tuple[str, ...]:
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        return self.train_prefixes if split == "train" else self.held_out_prefixes


# ---------------------------------------------------------------- encoding and log-probs


def encode_batch(tokenizer, prompts: Sequence[str], completions: Sequence[str], *, block_size: int | None = None):
    """Right-padded token ids (B, T) int64, a bool mask (B, T) of the completion tokens,
    and the lengths (B,) of prompt + completion. Padding repeats id 0 and is never read:
    attention is causal and every statistic stops at a row's length."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: they must pair up")
    if not prompts:
        raise ValueError("encode_batch needs at least one (prompt, completion) pair, got none")
    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not isinstance(p, str) or not p or not isinstance(c, str) or not c:
            raise ValueError(f"pair {i}: prompt and completion must be non-empty strings, got {p!r}, {c!r}")
        rows.append((tokenizer.encode(p), tokenizer.encode(c)))
    lengths = [len(a) + len(b) for a, b in rows]
    T = max(lengths)
    if block_size is not None and T > block_size:
        i = lengths.index(T)
        raise ValueError(
            f"pair {i} is {T} tokens long, more than the model's block_size={block_size}: "
            f"{prompts[i]!r} + {completions[i]!r}"
        )
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (a, b) in enumerate(rows):
        idx[i, : len(a) + len(b)] = torch.tensor(a + b)
        mask[i, len(a) : len(a) + len(b)] = True
    return idx, mask, torch.tensor(lengths)


def token_logprobs(model, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(token | everything before it) over the tokens where mask is True
    (the completion): log pi(y | x) for a causal LM. Keeps the graph for training."""
    logits, _ = model(idx)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(-1)


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts, completions, *, batch_size: int = 256) -> torch.Tensor:
    """(N,) log pi(completion | prompt) per pair, in eval mode, without gradients."""
    was = model.training
    model.eval()
    try:
        out = []
        for s in range(0, len(prompts), batch_size):
            idx, mask, _ = encode_batch(
                tokenizer,
                prompts[s : s + batch_size],
                completions[s : s + batch_size],
                block_size=model.config.block_size,
            )
            out.append(token_logprobs(model, idx.to(_device(model)), mask.to(_device(model))).cpu())
        return torch.cat(out)
    finally:
        model.train(was)


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    batch_size: int = 512,
) -> list[str]:
    """One sampled completion per prompt, cut after its first newline (or max_new_tokens
    characters without one). Prompts of equal length are batched; order is kept."""
    _pos_int("max_new_tokens", max_new_tokens)
    encoded = [tokenizer.encode(p) for p in prompts]
    longest = max((len(e) for e in encoded), default=0)
    if longest + max_new_tokens > model.config.block_size:
        raise ValueError(
            f"a {longest}-token prompt + max_new_tokens={max_new_tokens} exceeds the model's "
            f"block_size={model.config.block_size}"
        )
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    out: list[str] = [""] * len(prompts)
    was = model.training
    model.eval()
    try:
        for n, rows in sorted(by_len.items()):
            for s in range(0, len(rows), batch_size):
                chunk = rows[s : s + batch_size]
                idx = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=_device(model))
                gen = model.generate(idx, max_new_tokens, temperature=temperature, generator=generator)
                for i, ids in zip(chunk, gen[:, n:].cpu().tolist()):
                    text = tokenizer.decode(ids)
                    cut = text.find(STOP)
                    out[i] = text if cut < 0 else text[: cut + len(STOP)]
    finally:
        model.train(was)
    return out


# ---------------------------------------------------------------- supervised fine-tuning


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=_pos_float("lr", lr), betas=(0.9, 0.95), weight_decay=0.0)


def sft(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    history: list | None = None,
):
    """A fine-tuned copy of `model` (the original is untouched): AdamW at a constant lr on
    random batches of (prompt, completion) pairs, cross-entropy on completion tokens only
    (the prompt is context, never a target). `history` gets {step, loss} per step."""
    _pos_int("steps", steps)
    _pos_int("batch_size", batch_size)
    g = _generator(seed)
    model = copy.deepcopy(model).train()
    dev = _device(model)
    idx, mask, _ = encode_batch(tokenizer, prompts, completions, block_size=model.config.block_size)
    opt = _adamw(model.parameters(), lr)
    for step in range(steps):
        rows = torch.randint(len(idx), (batch_size,), generator=g)
        b_idx, b_mask = idx[rows].to(dev), mask[rows].to(dev)
        logp = token_logprobs(model, b_idx, b_mask)
        loss = -logp.sum() / b_mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if history is not None:
            history.append({"step": step + 1, "loss": float(loss.detach())})
    return model.eval()


# ---------------------------------------------------------------- preferences


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
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
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


def _pair_tensors(tokenizer, pairs: Sequence[PreferencePair], block_size: int):
    if not pairs:
        raise ValueError("need at least one preference pair, got none")
    prompts = [p.prompt for p in pairs]
    chosen = encode_batch(tokenizer, prompts, [p.chosen for p in pairs], block_size=block_size)
    rejected = encode_batch(tokenizer, prompts, [p.rejected for p in pairs], block_size=block_size)
    return chosen, rejected


def _stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a then rows of b, right-padded with zeros to the longer of the two."""
    T = max(a.size(1), b.size(1))
    return torch.cat([F.pad(a, (0, T - a.size(1))), F.pad(b, (0, T - b.size(1)))])


# ---------------------------------------------------------------- reward model


def final_hidden_states(model, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, n_embd) final normed hidden states of a lab GPT, with gradients (read
    from the final norm's output during an ordinary forward)."""
    got = {}
    handle = model.ln_f.register_forward_hook(lambda module, args, output: got.__setitem__("h", output))
    try:
        model(idx)
    finally:
        handle.remove()
    return got["h"]


class RewardModel(nn.Module):
    """r(x, y): a copy of a GPT trunk and a scalar head on the hidden state of the last
    token of prompt + completion. The head starts at zero (every reward 0)."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = copy.deepcopy(trunk)
        w = trunk.wte.weight
        self.head = nn.Linear(trunk.config.n_embd, 1).to(device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = final_hidden_states(self.trunk, idx)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths.to(idx.device) - 1]
        return self.head(last).squeeze(-1)

    @torch.no_grad()
    def rewards(self, tokenizer, prompts, completions, *, batch_size: int = 256) -> torch.Tensor:
        """(N,) rewards in eval mode."""
        was = self.training
        self.eval()
        try:
            out = []
            dev = _device(self)
            for s in range(0, len(prompts), batch_size):
                idx, _, lengths = encode_batch(
                    tokenizer,
                    prompts[s : s + batch_size],
                    completions[s : s + batch_size],
                    block_size=self.trunk.config.block_size,
                )
                out.append(self(idx.to(dev), lengths).cpu())
            return torch.cat(out)
        finally:
            self.train(was)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(r_chosen - r_rejected): the negative log-likelihood of the
    preferences under the Bradley-Terry model P(chosen > rejected) = sigmoid(r_c - r_r)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def train_reward_model(
    trunk,
    tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    history: list | None = None,
) -> RewardModel:
    """A RewardModel on a copy of `trunk`, trained with the Bradley-Terry loss by AdamW at a
    constant lr on random batches of `pairs` (chosen and rejected in one forward)."""
    _pos_int("steps", steps)
    _pos_int("batch_size", batch_size)
    g = _generator(seed)
    rm = RewardModel(trunk).train()
    dev = _device(rm)
    (ci, _, cl), (ri, _, rl) = _pair_tensors(tokenizer, pairs, trunk.config.block_size)
    opt = _adamw(rm.parameters(), lr)
    for step in range(steps):
        rows = torch.randint(len(ci), (batch_size,), generator=g)
        idx = _stack(ci[rows], ri[rows]).to(dev)
        r = rm(idx, torch.cat([cl[rows], rl[rows]]))
        loss = bradley_terry_loss(r[:batch_size], r[batch_size:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if history is not None:
            history.append({"step": step + 1, "loss": float(loss.detach())})
    return rm.eval()


def pairwise_accuracy(rm: RewardModel, tokenizer, pairs: Sequence[PreferencePair]) -> float:
    """Share of pairs whose chosen completion gets the higher reward (a tie counts half)."""
    if not pairs:
        raise ValueError("pairwise_accuracy needs at least one pair, got none")
    prompts = [p.prompt for p in pairs]
    rc = rm.rewards(tokenizer, prompts, [p.chosen for p in pairs])
    rr = rm.rewards(tokenizer, prompts, [p.rejected for p in pairs])
    return float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean())


# ---------------------------------------------------------------- DPO


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean DPO loss (Rafailov et al. 2023, eq. 7) from sequence log-probabilities:
    -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))).
    log 2 when pi equals ref; falls as pi moves mass from y_l to y_w relative to ref."""
    beta = _pos_float("beta", beta)
    shapes = {tuple(t.shape) for t in (pi_chosen, pi_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must share one shape, got {sorted(shapes)}")
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def dpo(
    policy,
    reference,
    tokenizer,
    pairs: Sequence[PreferencePair],
    *,
    beta: float,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    history: list | None = None,
):
    """A copy of `policy` trained by DPO on `pairs` against the frozen `reference` (whose
    log-probabilities are computed once, up front). AdamW at a constant lr on random
    batches. `history` gets per step the loss, the mean implicit reward margin
    beta * ((pi - ref)(y_w) - (pi - ref)(y_l)) and the share of pairs it ranks right."""
    beta = _pos_float("beta", beta)
    _pos_int("steps", steps)
    _pos_int("batch_size", batch_size)
    g = _generator(seed)
    pol = copy.deepcopy(policy).train()
    dev = _device(pol)
    block = pol.config.block_size
    (ci, cm, _), (ri, rm_, _) = _pair_tensors(tokenizer, pairs, block)
    prompts = [p.prompt for p in pairs]
    ref_c = sequence_logprobs(reference, tokenizer, prompts, [p.chosen for p in pairs]).to(dev)
    ref_r = sequence_logprobs(reference, tokenizer, prompts, [p.rejected for p in pairs]).to(dev)
    opt = _adamw(pol.parameters(), lr)
    for step in range(steps):
        rows = torch.randint(len(ci), (batch_size,), generator=g)
        idx = _stack(ci[rows], ri[rows]).to(dev)
        mask = _stack(cm[rows], rm_[rows]).to(dev)
        logp = token_logprobs(pol, idx, mask)
        pc, pr = logp[:batch_size], logp[batch_size:]
        loss = dpo_loss(pc, pr, ref_c[rows.to(dev)], ref_r[rows.to(dev)], beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if history is not None:
            with torch.no_grad():
                margin = beta * ((pc - ref_c[rows.to(dev)]) - (pr - ref_r[rows.to(dev)]))
            history.append(
                {
                    "step": step + 1,
                    "loss": float(loss.detach()),
                    "margin": float(margin.mean()),
                    "accuracy": float((margin > 0).float().mean()),
                }
            )
    return pol.eval()


# ---------------------------------------------------------------- KL to the reference


@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)], nats per sequence."""

    mean: float
    sem: float  # standard error of the mean over samples
    n: int
    samples: tuple[float, ...] = field(repr=False, default=())


def kl_estimate(policy, reference, tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> KLEstimate:
    """KL(pi || ref) from completions sampled from `policy` for `prompts` (one each):
    the mean of log pi(y|x) - log ref(y|x). Unbiased; single samples can be negative,
    and it is exactly 0 when the two models are the same."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need equally many (>= 1) prompts and completions, got {len(prompts)} and {len(completions)}")
    d = (
        sequence_logprobs(policy, tokenizer, prompts, completions)
        - sequence_logprobs(reference, tokenizer, prompts, completions)
    ).double()
    n = len(d)
    sem = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return KLEstimate(float(d.mean()), sem, n, tuple(d.tolist()))
