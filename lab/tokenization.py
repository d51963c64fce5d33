"""Measuring tokenizers and token embeddings (curriculum module 01).

Compression of a tokenizer on a text, how it splits given words into pieces, and the
cosine geometry of an embedding matrix (nearest neighbours, group cohesion,
anisotropy). Plain functions of tokenizers, strings and tensors; no pytest, no training.

    tok = get_tokenizer("bpe", text=train_text, vocab_size=1024)
    compression(tok, val_text)                      # characters per token
    split_report(tok, ["photosynthesis", "1984"], prefix=" ")
    embedding_neighbours(model.wte.weight, [ids["e"]], k=3)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from lab.checks import check_int, is_int, is_number

# Bytes-only byte-level BPE: the smallest vocabulary the lab's BPE can have.
MIN_BPE_VOCAB = 256


# ------------------------------------------------------------------------ input checks


def _check_text(text, what: str = "text") -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{what} is empty: there is nothing to tokenize")
    return text


def _check_tokenizer(tokenizer) -> None:
    if not callable(getattr(tokenizer, "encode", None)) or not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"expected a lab Tokenizer (with encode and decode), got {type(tokenizer).__name__}")


def check_vocab_sizes(vocab_sizes: Iterable[int]) -> tuple[int, ...]:
    """Validate BPE vocabulary sizes for a compression curve: ints >= 256 (the single
    bytes), strictly increasing, at least two. Returns them as a tuple."""
    if isinstance(vocab_sizes, (str, bytes)) or not isinstance(vocab_sizes, Iterable):
        raise ValueError(f"vocab_sizes must be a sequence of ints, got {vocab_sizes!r}")
    sizes = tuple(vocab_sizes)
    for v in sizes:
        if not is_int(v, numpy=True):
            raise ValueError(f"vocab sizes must be ints, got {v!r}")
        if v < MIN_BPE_VOCAB:
            raise ValueError(
                f"vocab size {v} is below {MIN_BPE_VOCAB}: a byte-level BPE starts from the "
                f"{MIN_BPE_VOCAB} single bytes"
            )
    if len(sizes) < 2:
        raise ValueError(f"a compression curve needs at least two vocab sizes, got {sizes!r}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"vocab sizes must be strictly increasing, got {sizes!r}")
    return tuple(int(v) for v in sizes)


# ------------------------------------------------------------------------ compression


def compression(tokenizer, text: str) -> float:
    """Characters (Unicode code points) per token of `text` under `tokenizer`: 1.0 for
    a char tokenizer, higher the more text each token covers."""
    _check_tokenizer(tokenizer)
    _check_text(text)
    n_tokens = len(tokenizer.encode(text))
    if n_tokens == 0:
        raise ValueError(f"{getattr(tokenizer, 'name', 'tokenizer')} encoded {len(text)} characters into no tokens")
    return len(text) / n_tokens


def bpe_tokenizers(train_text: str, vocab_sizes: Iterable[int]) -> dict[int, object]:
    """{vocab size: the lab's byte-level BPE trained on `train_text` at that size}, each
    trained once and then cached on disk by `get_tokenizer`."""
    from lab.tokenizers import get_tokenizer

    _check_text(train_text, "train_text")
    return {v: get_tokenizer("bpe", text=train_text, vocab_size=v) for v in check_vocab_sizes(vocab_sizes)}


def gains_per_doubling(vocab_sizes: Sequence[int], values: Sequence[float]) -> list[float]:
    """Between consecutive vocab sizes, the change in `values` (e.g. chars per token)
    per doubling of the vocabulary: (c[i+1] - c[i]) / log2(v[i+1] / v[i])."""
    sizes = check_vocab_sizes(vocab_sizes)
    values = list(values)
    if len(values) != len(sizes):
        raise ValueError(f"got {len(values)} values for {len(sizes)} vocab sizes")
    for x in values:
        if not is_number(x, numpy=True):
            raise ValueError(f"values must be finite numbers, got {x!r}")
    return [
        (c1 - c0) / math.log2(v1 / v0) for (v0, c0), (v1, c1) in zip(zip(sizes, values), zip(sizes[1:], values[1:]))
    ]


# ------------------------------------------------------------------------ splits


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    enc = getattr(tokenizer, "encoding", None)
    if enc is not None and hasattr(enc, "decode_single_token_bytes"):
        return enc.decode_single_token_bytes(token_id)
    return None


def _show_bytes(b: bytes) -> str:
    """A token's bytes as text; bytes that are not whole UTF-8 characters as <0xAB>."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(x) if x < 0x80 else f"<0x{x:02X}>" for x in b)


def token_pieces(tokenizer, text: str) -> list[str]:
    """The pieces `tokenizer` cuts `text` into, one string per token. A byte-level token
    that is only part of a UTF-8 character shows as <0xAB>."""
    _check_tokenizer(tokenizer)
    _check_text(text)
    pieces = []
    for i in tokenizer.encode(text):
        b = _token_bytes(tokenizer, i)
        pieces.append(_show_bytes(b) if b is not None else tokenizer.decode([i]))
    return pieces


def split_report(tokenizer, words: Iterable[str], *, prefix: str = "") -> list[tuple[str, list[str]]]:
    """[(word, pieces)] for each word, tokenized as `prefix + word` (prefix " " for a word
    in running text, where byte-level BPEs attach the space to the word)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a str, got {type(prefix).__name__}")
    if isinstance(words, str) or not isinstance(words, Iterable):
        raise ValueError(f"words must be a list of strings, got {words!r:.60}")
    words = list(words)
    if not words:
        raise ValueError("words is empty: give at least one word to split")
    out = []
    for w in words:
        _check_text(w, f"word {w!r}" if isinstance(w, str) else "each word")
        out.append((w, token_pieces(tokenizer, prefix + w)))
    return out


def tokens_per_word(report: Sequence[tuple[str, list[str]]]) -> float:
    """Mean number of tokens per word of a `split_report`."""
    if not report:
        raise ValueError("empty split report")
    return sum(len(p) for _, p in report) / len(report)


def max_digits_per_token(tokenizer, texts: Iterable[str]) -> int:
    """The most decimal digits any single token holds when `tokenizer` encodes `texts`."""
    best = 0
    for t in texts:
        for piece in token_pieces(tokenizer, t):
            best = max(best, sum(ch.isdigit() for ch in piece))
    return best


# ------------------------------------------------------------------------ embeddings


def _matrix(embeddings) -> torch.Tensor:
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(embeddings)
    if not isinstance(embeddings, torch.Tensor):
        raise ValueError(f"embeddings must be a 2-D tensor or array, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (vocab x dim), got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] < 2 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings need at least 2 rows and 1 column, got shape {tuple(embeddings.shape)}")
    e = embeddings.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(e).all():
        raise ValueError("embeddings contain NaN or inf")
    if (e.norm(dim=1) == 0).any():
        bad = torch.nonzero(e.norm(dim=1) == 0).flatten().tolist()
        raise ValueError(f"embedding rows {bad[:10]} are all zero: cosine similarity is undefined")
    return e


def cosine_matrix(embeddings) -> torch.Tensor:
    """(V, V) cosine similarities between the rows of an embedding matrix (float64)."""
    e = _matrix(embeddings)
    e = e / e.norm(dim=1, keepdim=True)
    return e @ e.T


def _ids(ids, vocab: int, what: str) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"{what} must be a list of token ids, got {ids!r:.60}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{what} must be ints, got {i!r}")
        if not 0 <= i < vocab:
            raise ValueError(f"token id {i} in {what} is out of range for a vocabulary of {vocab}")
        out.append(int(i))
    if len(set(out)) != len(out):
        raise ValueError(f"{what} has repeated ids: {sorted({i for i in out if out.count(i) > 1})}")
    return out


def embedding_neighbours(
    embeddings, ids: Iterable[int], k: int, *, among: Iterable[int] | None = None
) -> dict[int, list[tuple[int, float]]]:
    """{id: [(neighbour id, cosine), ...]}: the k rows most cosine-similar to each row in
    `ids`, best first, the row itself excluded. `among` restricts the candidates
    (default: the whole vocabulary). Ties go to the smaller id."""
    cos = cosine_matrix(embeddings)
    vocab = cos.shape[0]
    query = _ids(ids, vocab, "ids")
    if not query:
        raise ValueError("ids is empty: name at least one token to find neighbours of")
    cands = list(range(vocab)) if among is None else _ids(among, vocab, "among")
    k = int(check_int("k", k, 1, numpy=True))
    cands = sorted(cands)
    cand_t = torch.tensor(cands, dtype=torch.long)
    out = {}
    for i in query:
        keep = cand_t[cand_t != i]
        if k > len(keep):
            raise ValueError(
                f"k={k} is more neighbours than the {len(keep)} candidates token {i} has "
                f"(vocabulary {vocab}{'' if among is None else f', restricted to {len(cands)} ids'})"
            )
        sims = cos[i, keep]
        order = torch.sort(-sims, stable=True).indices[:k]  # stable: ties keep the smaller id first
        out[i] = [(int(keep[o]), float(sims[o])) for o in order]
    return out


def mean_cosine(embeddings, group_a: Iterable[int] | None = None, group_b: Iterable[int] | None = None) -> float:
    """Mean cosine similarity between distinct rows.

    - no groups: over all pairs of the vocabulary (anisotropy: ~0 for random vectors in
      many dimensions, > 0 when the rows share a common direction);
    - one group: over pairs within it;
    - two groups (disjoint): over pairs with one row in each.
    """
    cos = cosine_matrix(embeddings)
    vocab = cos.shape[0]
    a = list(range(vocab)) if group_a is None else _ids(group_a, vocab, "group_a")
    if group_b is None:
        if len(a) < 2:
            raise ValueError(f"a group needs at least 2 tokens for a within-group mean, got {len(a)}")
        sub = cos[a][:, a]
        n = len(a)
        return ((sub.sum() - sub.diagonal().sum()) / (n * (n - 1))).item()
    if group_a is None:
        raise ValueError("group_b given without group_a")
    b = _ids(group_b, vocab, "group_b")
    if not a or not b:
        raise ValueError("both groups need at least one token")
    if set(a) & set(b):
        raise ValueError(f"group_a and group_b overlap in ids {sorted(set(a) & set(b))}")
    return cos[a][:, b].mean().item()


def cohesion(embeddings, group: Iterable[int], others: Iterable[int]) -> float:
    """How much closer a group's members are to each other than to `others`: mean cosine
    within `group` minus mean cosine between `group` and `others`. ~0 at random init."""
    group, others = list(group), list(others)
    return mean_cosine(embeddings, group) - mean_cosine(embeddings, group, others)


def nearest_in_group_fraction(embeddings, group: Iterable[int], among: Iterable[int]) -> float:
    """Fraction of `group`'s members whose single nearest neighbour among `among` (the
    member itself excluded) is another member of `group`. Chance level, for neighbours
    drawn uniformly, is (|group| - 1) / (|among| - 1): see `chance_nearest_in_group`."""
    group, among = list(group), list(among)
    cos_vocab = _matrix(embeddings).shape[0]
    g = _ids(group, cos_vocab, "group")
    m = _ids(among, cos_vocab, "among")
    if len(g) < 2:
        raise ValueError(f"a group needs at least 2 tokens, got {len(g)}")
    missing = sorted(set(g) - set(m))
    if missing:
        raise ValueError(f"group ids {missing} are not among the candidates")
    nn = embedding_neighbours(embeddings, g, 1, among=m)
    gs = set(g)
    return sum(nn[i][0][0] in gs for i in g) / len(g)


def chance_nearest_in_group(group_size: int, among_size: int) -> float:
    """(group - 1) / (among - 1): `nearest_in_group_fraction` for random neighbours."""
    g = int(check_int("group_size", group_size, 2, numpy=True))
    m = int(check_int("among_size", among_size, g, numpy=True))
    return (g - 1) / (m - 1)


def pair_gap(embeddings, pairs: Sequence[tuple[int, int]]) -> float:
    """Mean cosine of the given (a, b) pairs minus the mean cosine of mismatched pairs
    (a_i, b_j), i != j. E.g. ('A', 'a'), ('B', 'b') ...: > 0 when each capital is closer
    to its own lower-case letter than to the others. ~0 at random init."""
    pairs = list(pairs)
    if len(pairs) < 2:
        raise ValueError(f"pair_gap needs at least 2 pairs, got {len(pairs)}")
    for p in pairs:
        if not isinstance(p, (tuple, list)) or len(p) != 2:
            raise ValueError(f"pairs must be (id, id) tuples, got {p!r}")
    cos = cosine_matrix(embeddings)
    a = _ids([p[0] for p in pairs], cos.shape[0], "first ids of pairs")
    b = _ids([p[1] for p in pairs], cos.shape[0], "second ids of pairs")
    sub = cos[a][:, b]
    n = len(pairs)
    matched = sub.diagonal().mean()
    mismatched = (sub.sum() - sub.diagonal().sum()) / (n * (n - 1))
    return (matched - mismatched).item()


def token_counts(ids, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in `ids` (length vocab_size)."""
    vocab_size = int(check_int("vocab_size", vocab_size, 1, numpy=True))
    arr = np.asarray(ids.tolist() if hasattr(ids, "tolist") and not isinstance(ids, np.ndarray) else ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D sequence of token ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"ids range over [{arr.min()}, {arr.max()}], outside a vocabulary of {vocab_size}")
    return np.bincount(arr, minlength=vocab_size)


def by_frequency(counts: np.ndarray | Sequence[int]) -> list[int]:
    """Token ids from most to least frequent (ties: smaller id first)."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
    return sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))


def ids_of(tokenizer, chars: Iterable[str]) -> list[int]:
    """Token ids of single characters that each encode to exactly one token."""
    _check_tokenizer(tokenizer)
    out = []
    for c in chars:
        ids = tokenizer.encode(_check_text(c, "each character"))
        if len(ids) != 1:
            raise ValueError(
                f"{c!r} is {len(ids)} tokens under {getattr(tokenizer, 'name', 'this tokenizer')}, not one"
            )
        out.append(ids[0])
    return out


def neighbour_rows(tokenizer, neighbours: Mapping[int, list[tuple[int, float]]]) -> list[dict]:
    """Table rows for `embedding_neighbours`: each token and its neighbours as text."""

    def show(i: int) -> str:
        return repr(tokenizer.decode([i]))

    return [
        {"token": show(i), **{f"#{r + 1}": f"{show(j)} ({c:.2f})" for r, (j, c) in enumerate(nbrs)}}
        for i, nbrs in neighbours.items()
    ]
