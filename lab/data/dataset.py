"""From a corpus to token arrays and training batches (nanoGPT's prepare.py + get_batch).

data = prepare("tinyshakespeare", get_tokenizer("char", text=load_corpus("tinyshakespeare")))
x, y = get_batch(data.train, block_size=256, batch_size=64, generator=g)
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lab.checks import check_int, check_number
from lab.data.corpora import corpus_fingerprint, load_corpus
from lab.paths import cache_dir
from lab.tokenizers import Tokenizer, get_tokenizer


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """The first (1 - val_fraction) of `text` for training, the rest for validation.

    A contiguous tail (not a random sample) so validation text is never seen in training,
    not even as the overlap of a window.
    """
    if not isinstance(text, str):
        raise ValueError(f"split_text expects a str, got {type(text).__name__}")
    check_number("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
    n = int(len(text) * (1 - val_fraction))
    if n == 0 or n == len(text):
        raise ValueError(
            f"text too short to split: {len(text)} chars with val_fraction={val_fraction} "
            "leaves an empty train or val split"
        )
    return text[:n], text[n:]


def interleave_for_split(text: str, *, chunk: int = 5000, every: int = 10) -> tuple[str, float]:
    """Reorder `text` so that a tail split takes every `every`-th chunk of `chunk` characters
    as validation text: returns (reordered text, the val_fraction that selects exactly them).

    For corpora made of different works (Milton: epic verse, then minor poems, then prose),
    a plain tail split would validate on one genre only; this keeps train and val the same
    mixture while no validation chunk is ever seen in training."""
    if not isinstance(text, str):
        raise ValueError(f"interleave_for_split expects a str, got {type(text).__name__}")
    check_int("chunk", chunk, 1)
    check_int("every", every, 2)
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    val = [p for i, p in enumerate(pieces) if i % every == every - 1]
    if not val or len(val) == len(pieces):
        raise ValueError(
            f"text of {len(text)} chars has {len(pieces)} chunks of {chunk}: too few for a 1-in-{every} split"
        )
    train = [p for i, p in enumerate(pieces) if i % every != every - 1]
    train_text, val_text = "".join(train), "".join(val)
    return train_text + val_text, len(val_text) / (len(train_text) + len(val_text))


@dataclass(eq=False)
class TokenData:
    """Encoded train/val splits of one corpus under one tokenizer."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    corpus: str
    train_chars: int
    val_chars: int
    fingerprint: str = field(default="")  # of the full corpus text, before splitting

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def identity(self) -> str:
        """A cache key for anything derived from this data (e.g. a trained model)."""
        key = "|".join(
            str(part)
            for part in (
                self.fingerprint or self.corpus,
                self.tokenizer.identity,
                self.train_chars,
                self.val_chars,
                len(self.train),
                len(self.val),
            )
        )
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"TokenData(corpus={self.corpus!r}, tokenizer={self.tokenizer.identity!r}, "
            f"train={len(self.train):,} tokens / {self.train_chars:,} chars, "
            f"val={len(self.val):,} tokens / {self.val_chars:,} chars)"
        )


def prepare(
    corpus: str | None = None,
    tokenizer: Tokenizer | str | None = None,
    *,
    text: str | None = None,
    val_fraction: float = 0.1,
    train_fraction: float = 1.0,
) -> TokenData:
    """Load (or take) a text, split it, tokenize both splits, cache the arrays.

    Give either a corpus name or `text=`. `tokenizer` is a Tokenizer, a name for
    `get_tokenizer` built on the full text (e.g. "char", "cl100k"), or None for "char".
    `train_fraction` < 1 keeps only the first part of the training split (the
    validation split is unchanged), for data-size experiments.
    Token arrays are cached in `cache_dir("tokens")` by (text, tokenizer, fractions).
    """
    if (corpus is None) == (text is None):
        raise ValueError(
            f"prepare needs exactly one of a corpus name or text=..., got corpus={corpus!r} "
            f"and text={'None' if text is None else f'<{type(text).__name__}>'}"
        )
    check_number("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
    check_number("train_fraction", train_fraction, 0, 1, low_open=True)
    if corpus is not None:
        text = load_corpus(corpus)
        name = corpus
    else:
        if not isinstance(text, str) or not text:
            raise ValueError(f"text must be a non-empty str, got {text!r:.60}")
        name = f"text:{corpus_fingerprint(text)}"

    if tokenizer is None:
        tokenizer = "char"
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer, text=text)
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(
            f"tokenizer must follow the lab Tokenizer protocol (name, vocab_size, identity, "
            f"encode, decode), got {type(tokenizer).__name__}"
        )

    train_text, val_text = split_text(text, val_fraction)
    if train_fraction < 1.0:
        keep = int(len(train_text) * train_fraction)
        if keep == 0:
            raise ValueError(f"train_fraction={train_fraction} leaves no training text ({len(train_text)} chars)")
        train_text = train_text[:keep]

    fingerprint = corpus_fingerprint(text)
    key = hashlib.sha256(
        f"{fingerprint}|{tokenizer.identity}|{float(val_fraction)!r}|{float(train_fraction)!r}".encode()
    ).hexdigest()[:20]
    folder = cache_dir("tokens")
    paths = {split: folder / f"{key}.{split}.npy" for split in ("train", "val")}
    arrays = _load_cached(paths)
    if arrays is None:
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        arrays = {
            "train": _encode(tokenizer, train_text, dtype),
            "val": _encode(tokenizer, val_text, dtype),
        }
        for split, path in paths.items():
            _atomic_save(path, arrays[split])
    return TokenData(
        train=arrays["train"],
        val=arrays["val"],
        tokenizer=tokenizer,
        corpus=name,
        train_chars=len(train_text),
        val_chars=len(val_text),
        fingerprint=fingerprint,
    )


def get_batch(
    data: np.ndarray,
    block_size: int,
    batch_size: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size` tokens: inputs x and next-token targets y.

    Start positions come from `torch.randint(..., generator=generator)`, so the batches
    are a pure function of the generator's state. Both tensors are int64 on `device`.
    """
    data = _as_tokens(data)
    check_int("block_size", block_size, 1, numpy=True)
    check_int("batch_size", batch_size, 1, numpy=True)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _check_long_enough(data, block_size)
    starts = (
        torch.randint(len(data) - block_size, (batch_size,), generator=generator, device=generator.device).cpu().numpy()
    )
    windows = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    if torch.device(device).type == "cuda":
        # Pinned memory lets the copy overlap with compute, as in nanoGPT.
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class SlidingWindowDataset(torch.utils.data.Dataset):
    """Every window of `block_size` tokens, `stride` apart, for full-pass evaluation.

    With the default stride (= block_size) the windows tile the data without overlap; the
    last few tokens that do not fill a whole window (plus its one target) are left out.
    """

    def __init__(self, data: np.ndarray, block_size: int, stride: int | None = None):
        self.data = _as_tokens(data)
        check_int("block_size", block_size, 1, numpy=True)
        stride = block_size if stride is None else stride
        check_int("stride", stride, 1, numpy=True)
        _check_long_enough(self.data, block_size)
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        # A window needs block_size + 1 tokens (inputs plus the shifted targets).
        return (len(self.data) - (self.block_size + 1)) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        start = (i % n) * self.stride
        chunk = torch.from_numpy(self.data[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


# --- helpers --------------------------------------------------------------------------


def _check_long_enough(data: np.ndarray, block_size: int) -> None:
    if len(data) <= block_size:
        raise ValueError(
            f"corpus too short: {len(data)} tokens, need more than block_size={block_size} "
            "(use a smaller block_size or a bigger split)"
        )


def _as_tokens(data) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, np.ndarray) or data.ndim != 1 or not np.issubdtype(data.dtype, np.integer):
        desc = type(data).__name__
        if isinstance(data, np.ndarray):
            desc += f" {data.dtype} with shape {data.shape}"
        raise ValueError(f"token data must be a 1-D integer array, got {desc}")
    return data


def _encode(tokenizer: Tokenizer, text: str, dtype) -> np.ndarray:
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise ValueError(
            f"tokenizer {tokenizer.identity!r} produced id {int(ids.max())} outside vocab_size={tokenizer.vocab_size}"
        )
    return ids.astype(dtype)


def _load_cached(paths: dict[str, Path]) -> dict[str, np.ndarray] | None:
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        return {split: np.load(p, allow_pickle=False) for split, p in paths.items()}
    except (OSError, ValueError):
        return None  # unreadable entry: recompute and overwrite


def _atomic_save(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    # A unique sibling name (not mkstemp) so the file gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
