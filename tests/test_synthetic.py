"""lab.synthetic: sampling a corpus, diversity metrics, mixing, the collapse chain."""

import math

import pytest
import torch

from lab.models import GPT, GPTConfig
from lab.seeding import seed_everything
from lab.synthetic import (
    Generation,
    check_vocabulary,
    collapse_chain,
    distinct_n,
    diversity,
    in_vocab_fraction,
    mix_counts,
    mix_texts,
    sample_corpus,
    unigram_entropy_bits,
    units,
    vocab_coverage,
)
from lab.tokenizers.char import CharTokenizer
from lab.train import TrainConfig, train

TEXT = "the cat sat on the mat.\nthe dog sat on the log!\n" * 20


@pytest.fixture
def lab_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_text(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    seed_everything(0)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


# ---------------------------------------------------------------- diversity metrics


def test_units_chars_and_words():
    assert units("ab c", "char") == ["a", "b", " ", "c"]
    assert units("The cat's HAT, 'tis o'er-done 42", "word") == ["the", "cat's", "hat", "tis", "o'er", "done"]


def test_distinct_n_on_known_strings():
    assert distinct_n("abab", 1) == 2 / 4
    assert distinct_n("abab", 2) == 2 / 3  # ab, ba, ab
    assert distinct_n("abcd", 4) == 1.0
    assert distinct_n("aaaa", 3) == 1 / 2
    assert distinct_n("the cat the cat", 1, "word") == 2 / 4
    assert distinct_n("the cat the cat", 2, "word") == 2 / 3


def test_unigram_entropy_bits_on_known_strings():
    assert unigram_entropy_bits("aaaa") == 0.0
    assert unigram_entropy_bits("aabb") == pytest.approx(1.0)
    assert unigram_entropy_bits("abcd") == pytest.approx(2.0)
    assert unigram_entropy_bits("aaab") == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert unigram_entropy_bits("to be or not to be", "word") == pytest.approx(
        -(2 * (2 / 6) * math.log2(2 / 6) + 2 * (1 / 6) * math.log2(1 / 6))
    )


def test_coverage_and_in_vocab_fraction():
    ref = "the cat sat on the mat"  # types: the cat sat on mat
    assert vocab_coverage("the cat", ref) == 2 / 5
    assert vocab_coverage("a dog", ref) == 0.0
    assert vocab_coverage("the cat sat on mat", ref) == 1.0
    assert vocab_coverage("abc", "abcd", "char") == 3 / 4
    assert vocab_coverage("the cat", {"cat", "dog"}) == 1 / 2
    assert in_vocab_fraction("the dog the cat", ref) == 3 / 4
    assert in_vocab_fraction("the dog", {"dog"}) == 1 / 2


def test_diversity_collects_every_metric():
    m = diversity(TEXT[:200], reference=TEXT, vocabulary={"the", "cat"})
    assert set(m) == {
        "distinct1",
        "distinct2",
        "distinct3",
        "distinct4",
        "word_distinct1",
        "word_distinct2",
        "char_entropy_bits",
        "word_entropy_bits",
        "word_coverage",
        "char_coverage",
        "real_word_fraction",
    }
    assert m["distinct1"] <= m["distinct2"] <= m["distinct3"] <= m["distinct4"] <= 1
    assert set(diversity("abc def ghi")) == {
        "distinct1",
        "distinct2",
        "distinct3",
        "distinct4",
        "word_distinct1",
        "word_distinct2",
        "char_entropy_bits",
        "word_entropy_bits",
    }


def test_metric_errors_name_the_value():
    with pytest.raises(ValueError, match=r"n must be an int >= 1, got 0"):
        distinct_n("abc", 0)
    with pytest.raises(ValueError, match=r"at least n=4 chars, the text has 3"):
        distinct_n("abc", 4)
    with pytest.raises(ValueError, match=r"unit must be one of \('char', 'word'\), got 'byte'"):
        distinct_n("abc", 1, "byte")
    with pytest.raises(ValueError, match="at least one word"):
        unigram_entropy_bits("123 !!", "word")
    with pytest.raises(ValueError, match="reference with at least one word"):
        vocab_coverage("the cat", "42")
    with pytest.raises(ValueError, match="text must be a str, got int"):
        units(3)


# ---------------------------------------------------------------- sampling


def test_sample_corpus_is_deterministic_and_in_vocabulary(model, tok):
    a = sample_corpus(model, tok, 500, temperature=1.0, seed=3, n_streams=4)
    b = sample_corpus(model, tok, 500, temperature=1.0, seed=3, n_streams=4)
    c = sample_corpus(model, tok, 500, temperature=1.0, seed=4, n_streams=4)
    assert a == b and a != c
    assert len(a) == 500
    assert set(a) <= set(tok.chars)
    check_vocabulary(a, tok)


@pytest.mark.parametrize("n_chars,n_streams,context", [(1, 1, None), (37, 5, 3), (100, 3, 15), (64, 64, 8)])
def test_sample_corpus_lengths(model, tok, n_chars, n_streams, context):
    text = sample_corpus(model, tok, n_chars, seed=0, n_streams=n_streams, context=context, prompt="the ")
    assert len(text) == n_chars and set(text) <= set(tok.chars)


def test_sample_corpus_follows_a_sharp_model(tok):
    """A model trained on a repetitive text reproduces it: sampling conditions on the stream."""
    data = type("D", (), {})()
    tok4 = CharTokenizer(list("abcd"))
    ids = torch.tensor(tok4.encode("abcd" * 300)).numpy()
    data.train, data.val, data.identity = ids[:1000], ids[1000:], "abcd"
    cfg = GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=2, n_embd=16)
    tc = TrainConfig(max_steps=100, batch_size=8, lr=1e-2, eval_interval=100, eval_batches=1)
    m = train(cfg, tc, data, progress=False).model
    text = sample_corpus(m, tok4, 200, temperature=0.5, seed=0, prompt="a", n_streams=2)
    assert text.startswith("bcdabcda") and distinct_n(text, 4) < 0.05


def test_sample_corpus_errors(model, tok):
    with pytest.raises(ValueError, match=r"n_chars must be an int >= 1, got 0"):
        sample_corpus(model, tok, 0)
    with pytest.raises(ValueError, match=r"n_chars must be an int >= 1, got -5"):
        sample_corpus(model, tok, -5)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0.*got 0"):
        sample_corpus(model, tok, 10, temperature=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0.*got -1.0"):
        sample_corpus(model, tok, 10, temperature=-1.0)
    with pytest.raises(ValueError, match=r"outside the tokenizer's vocabulary.*'Z'"):
        sample_corpus(model, tok, 10, prompt="Z")
    with pytest.raises(ValueError, match=r"context must be an int in \[1, block_size=16\), got 16"):
        sample_corpus(model, tok, 10, context=16)
    with pytest.raises(ValueError, match=r"n_streams must be an int >= 1, got 0"):
        sample_corpus(model, tok, 10, n_streams=0)


# ---------------------------------------------------------------- mixing


@pytest.mark.parametrize(
    "n,f,expected",
    [(200, 0.5, (100, 100)), (200, 0.0, (0, 200)), (200, 1.0, (200, 0)), (10, 0.25, (2, 8)), (1000, 0.1, (100, 900))],
)
def test_mix_counts(n, f, expected):
    assert mix_counts(n, f) == expected


@pytest.mark.parametrize("f", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_mix_texts_arithmetic_and_interleaving(f):
    real, syn = "r" * 5000, "s" * 5000
    text = mix_texts(real, syn, f, 4000, chunk=100)
    n_real, n_syn = mix_counts(4000, f)
    assert len(text) == 4000 and text.count("r") == n_real and text.count("s") == n_syn
    if 0 < f < 1:  # both sources in the tail (a validation split) and in the head
        assert "r" in text[-800:] and "s" in text[-800:] and "r" in text[:800] and "s" in text[:800]


def test_mix_texts_keeps_each_source_in_order():
    real = "".join(chr(ord("a") + i % 26) for i in range(300))
    syn = "".join(chr(ord("A") + i % 26) for i in range(300))
    text = mix_texts(real, syn, 0.5, 400, chunk=7)
    assert "".join(c for c in text if c.islower()) == real[:200]
    assert "".join(c for c in text if c.isupper()) == syn[:200]


def test_mix_errors():
    with pytest.raises(ValueError, match=r"real_fraction must be a number in \[0, 1\], got 1.5"):
        mix_texts("a" * 10, "b" * 10, 1.5, 10)
    with pytest.raises(ValueError, match=r"real_fraction must be a number in \[0, 1\], got -0.1"):
        mix_counts(10, -0.1)
    with pytest.raises(ValueError, match=r"n_chars must be an int >= 1, got 0"):
        mix_counts(0, 0.5)
    with pytest.raises(ValueError, match=r"synthetic text has 10 characters; the mix needs 50"):
        mix_texts("a" * 100, "b" * 10, 0.5, 100)
    with pytest.raises(ValueError, match=r"real text has 3 characters; the mix needs 50"):
        mix_texts("a" * 3, "b" * 100, 0.5, 100)


# ---------------------------------------------------------------- the chain


def _tiny_train(data, generation):
    cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    return train(
        cfg, TrainConfig(max_steps=3, batch_size=4, lr=1e-3, eval_interval=3, eval_batches=1), data, progress=False
    ).model


def test_collapse_chain_feeds_each_generation_the_previous_sample(lab_cache, tok):
    real = TEXT * 3
    losses = iter(range(100))
    kw = dict(
        real_text=real,
        tokenizer=tok,
        train=_tiny_train,
        evaluate=lambda m: float(next(losses)),
        n_chars=600,
        temperature=1.0,
        seed=1,
        sample_chars=200,
        n_streams=4,
        chunk=50,
    )
    syn = collapse_chain(generations=3, real_fraction=0.0, **kw)
    assert [g.generation for g in syn] == [0, 1, 2]
    assert syn[0].train_text == real[:600] and syn[0].real_fraction == 1.0
    assert syn[1].train_text == syn[0].sample[:600] and syn[1].real_chars == 0 and syn[1].synthetic_chars == 600
    assert syn[2].train_text == syn[1].sample[:600]
    assert len(syn[0].sample) == 600 and len(syn[2].sample) == 200  # the last one only for diversity
    assert syn[1].source == "sampled from gen 0 (600 chars)"
    assert [g.real_val_loss for g in syn] == [0.0, 1.0, 2.0]

    mixed = collapse_chain(generations=2, real_fraction=0.5, first=syn[0], **kw)
    assert mixed[0] is syn[0]
    assert mixed[1].train_text == mix_texts(real, syn[0].sample, 0.5, 600, chunk=50)
    assert (mixed[1].real_chars, mixed[1].synthetic_chars, mixed[1].real_fraction) == (300, 300, 0.5)
    assert mixed[1].source == "sampled from gen 0 (300 chars) + real text (300 chars)"
    again = collapse_chain(generations=2, real_fraction=0.0, **{**kw, "evaluate": lambda m: 0.0})
    assert again[1].train_text == syn[1].train_text  # sampling and training are deterministic


def test_collapse_chain_errors(tok):
    kw = dict(real_text=TEXT, tokenizer=tok, train=_tiny_train, evaluate=lambda m: 0.0, generations=2)
    with pytest.raises(ValueError, match=r"n_chars must be an int >= 1, got 0"):
        collapse_chain(n_chars=0, **kw)
    with pytest.raises(ValueError, match=r"real_fraction must be a number in \[0, 1\], got 2"):
        collapse_chain(n_chars=100, real_fraction=2, **kw)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        collapse_chain(n_chars=100, temperature=0.0, **kw)
    with pytest.raises(ValueError, match=r"real_text has 960 characters; each generation trains on n_chars=2,000"):
        collapse_chain(n_chars=2000, **kw)
    with pytest.raises(ValueError, match=r"outside the tokenizer's vocabulary"):
        collapse_chain(n_chars=100, **{**kw, "real_text": "XYZ" * 100})
    first = Generation(0, 1.0, 100, 0, "real", 0.0, "abc", "x")
    with pytest.raises(ValueError, match=r"first.sample has 3 characters; generation 1 needs 100"):
        collapse_chain(n_chars=100, first=first, **kw)
    with pytest.raises(ValueError, match=r"generations must be an int >= 1, got 0"):
        collapse_chain(n_chars=100, **{**kw, "generations": 0})
