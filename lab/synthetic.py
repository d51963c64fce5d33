"""Synthetic data and model collapse (curriculum 16): sample a corpus from a lab GPT,
measure how diverse a text is, mix it with real text, and run a chain of generations in
which each model is trained on text sampled from the previous one.

    text = sample_corpus(model, tokenizer, 200_000, temperature=1.0, seed=0)
    diversity(text, reference=real_val_text, vocabulary=real_words)
    mixed = mix_texts(real_text, text, real_fraction=0.5, n_chars=200_000)
    chain = collapse_chain(real_text=..., tokenizer=..., train=..., evaluate=..., generations=4,
                           n_chars=200_000, real_fraction=0.0)

The chain: generation 0 is trained on the first `n_chars` characters of the real text;
generation k (k >= 1) is trained on `n_chars` characters of which a share `real_fraction`
is that same real text and the rest is sampled from generation k-1's model. Every
generation is trained from scratch by the caller's `train(data, generation)`, and scored
by the caller's `evaluate(model)` (the hypotheses use the real validation split).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from lab.checks import (
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Rule,
    check_choice,
    check_int,
    is_int,
)
from lab.diversity import distinct_n as _distinct_n

UNITS = ("char", "word")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


# ---------------------------------------------------------------- argument checks


# 0 would be greedy decoding: every stream the same text
TEMPERATURE = Rule("a finite number > 0 (0 would be greedy decoding: every stream the same text)", POSITIVE.ok)


def _check_text(text, what: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")


def check_vocabulary(text: str, tokenizer) -> None:
    """Raise ValueError unless every character of `text` is in the char tokenizer's
    vocabulary (other tokenizers: unless `tokenizer.encode(text)` succeeds)."""
    _check_text(text, "text")
    stoi = getattr(tokenizer, "stoi", None)
    if stoi is not None:
        unknown = sorted(set(text) - set(stoi))
        if unknown:
            raise ValueError(
                f"text holds {len(unknown)} character(s) outside the tokenizer's vocabulary of "
                f"{len(stoi)}: {''.join(unknown)[:40]!r}"
            )
    else:
        tokenizer.encode(text)


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def sample_corpus(
    model,
    tokenizer,
    n_chars: int,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    prompt: str = "\n",
    n_streams: int = 128,
    context: int | None = None,
    top_k: int | None = None,
) -> str:
    """Exactly `n_chars` characters sampled from a char-level lab GPT.

    `n_streams` independent streams are sampled in one batch, each starting from `prompt`
    (not included in the output), and joined end to end. A stream is extended window by
    window through GPT.generate with its KV cache: each window conditions on the stream's
    last `context` tokens (default block_size // 2) and samples block_size - context more,
    so every token is predicted at position p with exactly p tokens of context, as in
    training. The same model, seed and arguments give the same text (on the same device).
    The text only holds characters of the tokenizer's vocabulary.
    """
    POSITIVE_INT.check("n_chars", n_chars)
    TEMPERATURE.check("temperature", temperature)
    NON_NEGATIVE_INT.check("seed", seed)
    POSITIVE_INT.check("n_streams", n_streams)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
    check_vocabulary(prompt, tokenizer)
    block = model.config.block_size
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocab_size {model.config.vocab_size} is below the tokenizer's {tokenizer.vocab_size}"
        )
    context = block // 2 if context is None else context
    Rule(f"an int in [1, block_size={block})", lambda c: is_int(c) and 1 <= c < block).check("context", context)
    ids = tokenizer.encode(prompt)[-context:]
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        per_stream = -(-n_chars // n_streams)  # ceil
        out = torch.tensor([ids] * n_streams, dtype=torch.long, device=device)
        start = out.shape[1]
        while out.shape[1] - start < per_stream:
            ctx = out[:, -context:]
            new = min(block - ctx.shape[1], per_stream - (out.shape[1] - start))
            window = model.generate(ctx, new, temperature=temperature, top_k=top_k, generator=generator)
            out = torch.cat([out, window[:, ctx.shape[1] :]], dim=1)
    finally:
        model.train(was_training)
    rows = out[:, start:].cpu().tolist()
    text = "".join(tokenizer.decode(r) for r in rows)[:n_chars]
    check_vocabulary(text, tokenizer)
    return text


# ---------------------------------------------------------------- diversity


def units(text: str, unit: str = "char") -> list[str]:
    """The text as characters, or as lower-cased words (runs of letters, inner apostrophes kept)."""
    _check_text(text, "text")
    check_choice("unit", unit, UNITS)
    return list(text) if unit == "char" else _WORD.findall(text.lower())


def distinct_n(text: str, n: int, unit: str = "char") -> float:
    """Distinct-n: unique n-grams / all n-grams of the text's characters or words. It falls
    as a text grows, so compare texts of equal length only."""
    check_int("n", n, 1)
    seq = units(text, unit)
    if len(seq) < n:
        raise ValueError(f"distinct_n needs at least n={n} {unit}s, the text has {len(seq)}")
    return _distinct_n([seq], n)


def unigram_entropy_bits(text: str, unit: str = "char") -> float:
    """Shannon entropy (bits) of the text's character or word frequency distribution."""
    seq = units(text, unit)
    if not seq:
        raise ValueError(f"unigram_entropy_bits needs at least one {unit}, the text has none")
    counts = Counter(seq).values()
    total = sum(counts)
    return max(0.0, -sum(c / total * math.log2(c / total) for c in counts))


def vocab_coverage(text: str, reference: str | Iterable[str], unit: str = "word") -> float:
    """Share of the reference's distinct characters or words that occur in `text`.
    `reference` is a text, or an iterable of types (e.g. a set of words)."""
    types = set(units(reference, unit)) if isinstance(reference, str) else set(reference)
    if not types:
        raise ValueError(f"vocab_coverage needs a reference with at least one {unit}, it has none")
    return len(types & set(units(text, unit))) / len(types)


def in_vocab_fraction(text: str, vocabulary: str | Iterable[str], unit: str = "word") -> float:
    """Share of the text's words (or characters) that belong to `vocabulary` (a text or a
    set of types): with real words as the vocabulary, how much of a sample is real words."""
    vocab = set(units(vocabulary, unit)) if isinstance(vocabulary, str) else set(vocabulary)
    seq = units(text, unit)
    if not seq:
        raise ValueError(f"in_vocab_fraction needs a text with at least one {unit}, it has none")
    return sum(u in vocab for u in seq) / len(seq)


def diversity(text: str, *, reference: str | None = None, vocabulary: Iterable[str] | str | None = None) -> dict:
    """Diversity metrics of one text: character distinct-1..4, word distinct-1 and -2,
    unigram entropy of characters and of words (bits), and, given them, word-type coverage
    of a `reference` text and the share of words that are in `vocabulary`."""
    m = {f"distinct{n}": distinct_n(text, n, "char") for n in range(1, 5)}
    m["word_distinct1"] = distinct_n(text, 1, "word")
    m["word_distinct2"] = distinct_n(text, 2, "word")
    m["char_entropy_bits"] = unigram_entropy_bits(text, "char")
    m["word_entropy_bits"] = unigram_entropy_bits(text, "word")
    if reference is not None:
        m["word_coverage"] = vocab_coverage(text, reference, "word")
        m["char_coverage"] = vocab_coverage(text, reference, "char")
    if vocabulary is not None:
        m["real_word_fraction"] = in_vocab_fraction(text, vocabulary, "word")
    return m


# ---------------------------------------------------------------- mixing


def mix_counts(n_chars: int, real_fraction: float) -> tuple[int, int]:
    """(real, synthetic) characters of an n_chars mix: round(real_fraction * n_chars) real."""
    POSITIVE_INT.check("n_chars", n_chars)
    FRACTION.check("real_fraction", real_fraction)
    n_real = round(real_fraction * n_chars)
    return n_real, n_chars - n_real


def mix_texts(real: str, synthetic: str, real_fraction: float, n_chars: int, *, chunk: int = 2000) -> str:
    """`n_chars` characters: the first mix_counts(...)[0] of `real` and the first
    mix_counts(...)[1] of `synthetic`, cut into chunks of `chunk` characters and interleaved
    evenly (in order within each source), so a tail validation split holds both."""
    _check_text(real, "real")
    _check_text(synthetic, "synthetic")
    n_real, n_syn = mix_counts(n_chars, real_fraction)
    check_int("chunk", chunk, 1)
    for name, text, need in (("real", real, n_real), ("synthetic", synthetic, n_syn)):
        if len(text) < need:
            raise ValueError(f"{name} text has {len(text):,} characters; the mix needs {need:,}")
    pieces = []
    for src, text, need in ((0, real, n_real), (1, synthetic, n_syn)):
        k = -(-need // chunk)
        # place chunk i of a source at relative position (i + 0.5) / k: evenly spread
        pieces += [((i + 0.5) / k, src, text[i * chunk : min(need, (i + 1) * chunk)]) for i in range(k)]
    pieces.sort(key=lambda p: (p[0], p[1]))
    return "".join(p[2] for p in pieces)


# ---------------------------------------------------------------- the chain of generations


@dataclass
class Generation:
    """One generation of a collapse chain."""

    generation: int
    real_fraction: float  # share of the training text that is real (1.0 for generation 0)
    real_chars: int
    synthetic_chars: int
    source: str  # what the training text was, in words
    real_val_loss: float  # evaluate(model): the caller's score on real text
    sample: str  # text sampled from this generation's model
    train_text: str = field(repr=False)
    model: object = field(default=None, repr=False)


def collapse_chain(
    *,
    real_text: str,
    tokenizer,
    train: Callable,
    evaluate: Callable,
    generations: int,
    n_chars: int,
    real_fraction: float = 0.0,
    temperature: float = 1.0,
    seed: int = 0,
    sample_chars: int | None = None,
    val_fraction: float = 0.05,
    first: Generation | None = None,
    n_streams: int = 128,
    chunk: int = 2000,
) -> list[Generation]:
    """Train `generations` models in a chain and return one Generation per model.

    Generation 0 trains on real_text[:n_chars] (or is `first`, shared with another chain).
    Generation k >= 1 trains on mix_texts(real_text, sample of generation k-1,
    real_fraction, n_chars): real_fraction 0 is synthetic data only. Each training text
    becomes TokenData through lab.data.prepare(text=..., tokenizer=tokenizer,
    val_fraction=val_fraction); `train(data, generation)` returns the trained model (from
    scratch) and `evaluate(model)` its loss on real text. Every model is sampled (seed
    `seed * 1009 + generation`) for max(sample_chars, the synthetic characters the next
    generation needs) characters; the last for sample_chars.
    """
    from lab.data import prepare

    _check_text(real_text, "real_text")
    POSITIVE_INT.check("n_chars", n_chars)
    FRACTION.check("real_fraction", real_fraction)
    TEMPERATURE.check("temperature", temperature)
    check_int("generations", generations, 1)
    sample_chars = n_chars if sample_chars is None else sample_chars
    POSITIVE_INT.check("sample_chars", sample_chars)
    if len(real_text) < n_chars:
        raise ValueError(f"real_text has {len(real_text):,} characters; each generation trains on n_chars={n_chars:,}")
    check_vocabulary(real_text[:n_chars], tokenizer)
    n_real, n_syn = mix_counts(n_chars, real_fraction)

    def sample(model, generation: int) -> str:
        need = sample_chars if generation == generations - 1 else max(sample_chars, n_syn)
        return sample_corpus(
            model, tokenizer, need, temperature=temperature, seed=seed * 1009 + generation, n_streams=n_streams
        )

    def step(generation: int, text: str, real: int, syn: int, source: str) -> Generation:
        check_vocabulary(text, tokenizer)
        data = prepare(text=text, tokenizer=tokenizer, val_fraction=val_fraction)
        model = train(data, generation)
        return Generation(
            generation,
            real / n_chars,
            real,
            syn,
            source,
            float(evaluate(model)),
            sample(model, generation),
            text,
            model,
        )

    if first is not None:
        if not isinstance(first, Generation) or first.generation != 0:
            raise ValueError(f"first must be a generation-0 Generation, got {first!r:.80}")
        if generations > 1 and len(first.sample) < n_syn:
            raise ValueError(
                f"first.sample has {len(first.sample):,} characters; generation 1 needs {n_syn:,} synthetic ones"
            )
        chain = [first]
    else:
        chain = [step(0, real_text[:n_chars], n_chars, 0, f"real text ({n_chars:,} chars)")]
    for g in range(1, generations):
        text = mix_texts(real_text, chain[-1].sample, real_fraction, n_chars, chunk=chunk)
        parts = [f"sampled from gen {g - 1} ({n_syn:,} chars)"] if n_syn else []
        parts += [f"real text ({n_real:,} chars)"] if n_real else []
        chain.append(step(g, text, n_real, n_syn, " + ".join(parts)))
    return chain


# ---------------------------------------------------------------- noise and duplicates


def inject_noise(ids: torch.Tensor, rate: float, vocab_size: int, *, generator: torch.Generator) -> torch.Tensor:
    """A copy of the token ids `ids` with each position, independently with probability
    `rate`, replaced by a token drawn uniformly from the vocabulary (it may draw the same
    token). Draws come from `generator` on the CPU, so the noise is reproducible."""
    FRACTION.check("rate", rate)
    POSITIVE_INT.check("vocab_size", vocab_size)
    hit = torch.rand(ids.shape, generator=generator) < rate
    noise = torch.randint(0, vocab_size, ids.shape, generator=generator)
    return torch.where(hit.to(ids.device), noise.to(ids.device, ids.dtype), ids)


def noisy_text(text: str, tokenizer, rate: float, *, seed: int) -> str:
    """`text` with a share `rate` of its tokens replaced by uniformly random ones (inject_noise
    through the tokenizer): character noise for a character tokenizer."""
    _check_text(text, "text")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    noisy = inject_noise(ids, rate, tokenizer.vocab_size, generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(noisy.tolist())


def dedup_pieces(pieces: Iterable[str]) -> list[str]:
    """The pieces with every exact repeat of an earlier piece dropped, order kept."""
    seen, out = set(), []
    for p in pieces:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


@dataclass(frozen=True)
class RepeatedCorpus:
    """A training text in which one passage is repeated, and the same text deduplicated."""

    with_repeats: str  # n_chars: unique text interleaved with `repeats` copies of the passage
    deduplicated: str  # the same pieces with the repeated copies dropped (the passage once)
    passage: str  # the repeated passage


def repeated_corpus(text: str, *, n_chars: int, repeated_fraction: float, repeats: int) -> RepeatedCorpus:
    """From the start of `text`: a corpus of `n_chars` characters in which a share
    `repeated_fraction` is one passage (the text right after the unique part) repeated
    `repeats` times, the copies spread evenly between equal slices of the unique text,
    and its exact deduplication (dedup_pieces), which keeps the passage once."""
    _check_text(text, "text")
    POSITIVE_INT.check("n_chars", n_chars)
    FRACTION.check("repeated_fraction", repeated_fraction)
    check_int("repeats", repeats, 2)
    passage_len = round(n_chars * repeated_fraction) // repeats
    if passage_len < 1:
        raise ValueError(f"{repeated_fraction} of {n_chars:,} characters cannot hold {repeats} copies of a passage")
    n_unique = n_chars - passage_len * repeats
    if len(text) < n_unique + passage_len:
        raise ValueError(f"text has {len(text):,} characters; the corpus needs {n_unique + passage_len:,}")
    passage = text[n_unique : n_unique + passage_len]
    bounds = [round(i * n_unique / repeats) for i in range(repeats + 1)]
    pieces = [p for i in range(repeats) for p in (text[bounds[i] : bounds[i + 1]], passage)]
    return RepeatedCorpus("".join(pieces), "".join(dedup_pieces(pieces)), passage)
