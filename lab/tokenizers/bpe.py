"""Byte-level BPE trained by the lab, exported as a `tiktoken.Encoding` for fast encoding.

Training follows GPT-2: split the text into chunks with the GPT-2 regex (so merges never
cross a word/space/punctuation boundary), start from the 256 single bytes, and repeatedly
merge the most frequent adjacent pair. Pair counts are updated incrementally (only the
chunks that contain the merged pair are touched), which trains vocab 2048 on tiny
Shakespeare in a few seconds.

The result is a `mergeable_ranks` table {token bytes: rank} in tiktoken's own format:
ranks 0..255 are the single bytes, and every later token is the concatenation of two
tokens of lower rank. tiktoken then does the encoding (in Rust) and decoding.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import os
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import regex
import tiktoken

from lab.tokenizers.char import _as_int_list, _check_utf8

# GPT-2's split pattern, as tiktoken writes it (possessive quantifiers; same splits as
# the original r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""").
# The `regex` module (a tiktoken dependency) understands it too, so training and
# encoding split text identically.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class BPETokenizer:
    """A byte-level BPE vocabulary (tiktoken mergeable ranks) plus its split pattern."""

    name = "bpe"

    def __init__(self, mergeable_ranks: dict[bytes, int], *, pat_str: str = GPT2_PATTERN):
        _check_ranks(mergeable_ranks)
        if not isinstance(pat_str, str) or not pat_str:
            raise ValueError(f"pat_str must be a non-empty regex string, got {pat_str!r}")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pat_str = pat_str
        self.encoding = tiktoken.Encoding(
            name=f"lab_bpe_{self.vocab_size}_{self._digest()[:8]}",
            pat_str=pat_str,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens={},
        )

    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks)

    @property
    def identity(self) -> str:
        """Changes whenever the ranks or the split pattern change."""
        return f"bpe-{self.vocab_size}-{self._digest()[:16]}"

    def _digest(self) -> str:
        h = hashlib.sha256(self.pat_str.encode("utf-8"))
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(b"%d:" % rank + token + b"\x00")
        return h.hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. A lone surrogate (not encodable as UTF-8) raises ValueError
        with its position, where tiktoken alone would encode U+FFFD in its place."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        _check_utf8(text, "BPETokenizer.encode")
        # encode_ordinary: special-token-looking text is just text (there are none anyway).
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        ids = _as_int_list(ids, self.vocab_size)
        return self.encoding.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a single token stands for (handy for inspecting merges)."""
        return self.encoding.decode_single_token_bytes(token_id)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ranks as `base64(token) rank` lines (tiktoken's file format), atomically."""
        path = Path(path)
        lines = [
            f"{base64.b64encode(token).decode('ascii')} {rank}\n"
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        ]
        _atomic_write_text(path, "".join(lines))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, pat_str: str = GPT2_PATTERN) -> BPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no BPE ranks file at {str(path)!r}")
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'base64 rank', got {line[:60]!r}") from None
        return cls(ranks, pat_str=pat_str)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def train_bpe(text: str, vocab_size: int, *, pattern: str = GPT2_PATTERN) -> BPETokenizer:
    """Learn `vocab_size - 256` byte-pair merges from `text`.

    Ties between equally frequent pairs go to the pair with the smallest (left id, right id),
    so training is deterministic. If the text runs out of pairs first, the vocabulary is
    smaller than asked for (with a warning). A merge whose bytes already exist as a token
    (e.g. "a"+"bc" after "ab"+"c") reuses that token, keeping ranks consistent for tiktoken.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"train_bpe needs a non-empty str to train on, got {text!r:.60}")
    _check_utf8(text, "train_bpe")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"vocab_size must be an int >= 256 (the single bytes), got {vocab_size!r}")
    try:
        splitter = regex.compile(pattern)
    except (regex.error, TypeError) as e:
        raise ValueError(f"pattern is not a valid regex: {e}") from None

    # Each distinct chunk is trained once, weighted by how often it occurs.
    chunk_counts = Counter(splitter.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    ids_of: dict[bytes, int] = {b: i for i, b in enumerate(vocab)}

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks that (may) hold it
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += f
            where[pair].add(w)
    # Max-heap with lazy deletion: an entry is live only if its count is still current.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size:
        best = None
        while heap:
            neg_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) == -neg_count > 0:
                best = pair
                break
        if best is None:
            warnings.warn(
                f"train_bpe: text ran out of pairs at vocab_size={len(vocab)} (asked for {vocab_size})",
                stacklevel=2,
            )
            break
        a, b = best
        merged_bytes = vocab[a] + vocab[b]
        new_id = ids_of.get(merged_bytes)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged_bytes)
            ids_of[merged_bytes] = new_id

        changed: set[tuple[int, int]] = set()
        for w in where.pop(best, ()):
            word, f = words[w], freqs[w]
            out, i, n, hit = [], 0, len(word), False
            while i < n:
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    out.append(new_id)
                    i += 2
                    hit = True
                else:
                    out.append(word[i])
                    i += 1
            if not hit:
                continue  # stale entry: an earlier merge already consumed the pair here
            # Chunks are short, so re-counting the whole chunk is simpler than patching neighbours.
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= f
                changed.add(pair)
            for pair in zip(out, out[1:]):
                pair_counts[pair] += f
                where[pair].add(w)
                changed.add(pair)
            words[w] = out
        for pair in changed:
            c = pair_counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            else:
                del pair_counts[pair]

    return BPETokenizer({tok: rank for rank, tok in enumerate(vocab)}, pat_str=pattern)


def train_bpe_cached(text: str, vocab_size: int, *, pattern: str = GPT2_PATTERN) -> BPETokenizer:
    """`train_bpe`, memoised on disk in `cache_dir("tokenizers")` by (text, vocab_size, pattern)."""
    from lab.paths import cache_dir

    if not isinstance(text, str) or not text:
        raise ValueError(f"train_bpe needs a non-empty str to train on, got {text!r:.60}")
    _check_utf8(text, "train_bpe")
    text_fp = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    pat_fp = hashlib.sha256(pattern.encode("utf-8")).hexdigest()[:8]
    path = cache_dir("tokenizers") / f"bpe-{text_fp}-{vocab_size}-{pat_fp}.tiktoken"
    if path.is_file():
        try:
            return BPETokenizer.load(path, pat_str=pattern)
        except ValueError:
            pass  # corrupt cache entry: retrain and overwrite it
    tok = train_bpe(text, vocab_size, pattern=pattern)
    tok.save(path)
    return tok


def _check_ranks(ranks: dict[bytes, int]) -> None:
    """tiktoken's invariants: ranks 0..n-1, bytes at 0..255, merges built from lower ranks."""
    if not isinstance(ranks, dict) or not ranks:
        raise ValueError("mergeable_ranks must be a non-empty dict {bytes: rank}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"mergeable ranks must be exactly 0..{len(ranks) - 1}, each once")
    for i in range(256):
        if ranks.get(bytes([i])) != i:
            raise ValueError(f"byte {bytes([i])!r} must have rank {i} in a byte-level BPE")
    for token, rank in ranks.items():
        if rank < 256:
            continue
        if not any(
            ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank for k in range(1, len(token))
        ):
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")


def _atomic_write_text(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling name (not mkstemp) so the file gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="ascii") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
