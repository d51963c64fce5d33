"""Corpora, token arrays, batches and reference statistics.

text = load_corpus("tinyshakespeare")
data = prepare("tinyshakespeare", "char")          # TokenData, cached on disk
x, y = get_batch(data.train, 256, 64, generator)   # int64 (64, 256) each
"""

from lab.data.corpora import (
    CORPORA,
    MILTON_FETCH_HINT,
    MILTON_FILES,
    CorpusUnavailableError,
    UnknownCorpusError,
    available_corpora,
    corpus_fingerprint,
    corpus_installed,
    fetch_corpus,
    fetch_milton,
    load_corpus,
    milton_dir,
    normalize_text,
    strip_gutenberg,
)
from lab.data.dataset import (
    SlidingWindowDataset,
    TokenData,
    get_batch,
    interleave_for_split,
    prepare,
    split_text,
)
from lab.data.entropy import bigram_conditional_entropy, unigram_entropy

__all__ = [
    "CORPORA",
    "MILTON_FETCH_HINT",
    "MILTON_FILES",
    "CorpusUnavailableError",
    "SlidingWindowDataset",
    "TokenData",
    "UnknownCorpusError",
    "available_corpora",
    "bigram_conditional_entropy",
    "corpus_fingerprint",
    "corpus_installed",
    "fetch_corpus",
    "fetch_milton",
    "get_batch",
    "load_corpus",
    "milton_dir",
    "normalize_text",
    "prepare",
    "split_text",
    "interleave_for_split",
    "strip_gutenberg",
    "unigram_entropy",
]
