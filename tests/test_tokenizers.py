"""Tokenizers: round trips (property tests), clear errors, BPE compression and caching."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lab.tokenizers.bpe as bpe_module
from lab.data import load_corpus
from lab.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    TokenizerUnavailableError,
    available_tokenizers,
    cl100k,
    get_tokenizer,
    gpt2,
    gpt2_available,
    train_bpe,
)

SHAKESPEARE = load_corpus("tinyshakespeare")
fast = settings(deadline=None, max_examples=100)


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.from_text(SHAKESPEARE)


@pytest.fixture(scope="module")
def bpe300() -> BPETokenizer:
    return train_bpe(SHAKESPEARE[:50_000], 300)


@pytest.fixture(scope="module")
def cl100k_tok():
    return cl100k()


# --- char ------------------------------------------------------------------------------


@fast
@given(data=st.data())
def test_char_round_trip(char_tok, data):
    text = data.draw(st.text(alphabet=st.sampled_from(char_tok.chars)))
    ids = char_tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < char_tok.vocab_size for i in ids)
    assert char_tok.decode(ids) == text


def test_char_vocab_is_sorted_set_of_characters(char_tok):
    assert char_tok.chars == sorted(set(SHAKESPEARE))
    assert char_tok.vocab_size == 65  # nanoGPT's shakespeare_char


def test_char_unknown_character_names_it_and_its_position(char_tok):
    with pytest.raises(ValueError, match=r"'é' at position 5"):
        char_tok.encode("Hello\u00e9 world")


def test_char_decode_rejects_out_of_range_ids(char_tok):
    with pytest.raises(ValueError, match="token id 65 at position 1"):
        char_tok.decode([0, 65])
    with pytest.raises(ValueError, match="token id -1"):
        char_tok.decode([-1])


def test_char_json_round_trip_and_identity():
    tok = CharTokenizer.from_text("hello world")
    again = CharTokenizer.from_json(tok.to_json())
    assert again.chars == tok.chars and again.identity == tok.identity
    assert json.loads(tok.to_json())["type"] == "char"
    assert CharTokenizer.from_text("hello worlds").identity != tok.identity
    with pytest.raises(ValueError, match="CharTokenizer JSON"):
        CharTokenizer.from_json("{not json")
    with pytest.raises(ValueError, match="expected JSON like"):
        CharTokenizer.from_json('{"type": "bpe"}')


def test_char_bad_alphabets():
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])


# --- lab BPE ---------------------------------------------------------------------------


@fast
@given(text=st.text())
def test_bpe_round_trips_arbitrary_unicode(bpe300, text):
    assert bpe300.decode(bpe300.encode(text)) == text


def test_bpe_round_trips_held_out_shakespeare(bpe300):
    held_out = SHAKESPEARE[-20_000:]
    assert bpe300.decode(bpe300.encode(held_out)) == held_out


def test_bpe_ranks_are_bytes_then_merges(bpe300):
    ranks = bpe300.mergeable_ranks
    assert bpe300.vocab_size == 300 == len(ranks)
    assert all(ranks[bytes([i])] == i for i in range(256))
    assert all(len(tok) >= 2 for tok, r in ranks.items() if r >= 256)
    bpe_module._check_ranks(ranks)  # every merge is made of lower-ranked parts


def test_bpe_compresses_more_with_bigger_vocab():
    train, held_out = SHAKESPEARE[:200_000], SHAKESPEARE[-100_000:]
    ratios = [len(held_out) / len(train_bpe(train, v).encode(held_out)) for v in (300, 600)]
    assert 1.0 < ratios[0] < ratios[1]


def test_bpe_training_is_deterministic():
    a = train_bpe(SHAKESPEARE[:20_000], 280)
    b = train_bpe(SHAKESPEARE[:20_000], 280)
    assert a.identity == b.identity
    assert a.identity != train_bpe(SHAKESPEARE[:20_000], 281).identity


def test_bpe_save_load(tmp_path, bpe300):
    path = bpe300.save(tmp_path / "ranks.tiktoken")
    loaded = BPETokenizer.load(path)
    assert loaded.identity == bpe300.identity
    sample = SHAKESPEARE[1000:3000]
    assert loaded.encode(sample) == bpe300.encode(sample)
    path.write_text("not base64 at all!\n")
    with pytest.raises(ValueError, match="expected 'base64 rank'"):
        BPETokenizer.load(path)


def test_bpe_rejects_inconsistent_ranks():
    ranks = {bytes([i]): i for i in range(256)}
    with pytest.raises(ValueError, match="not a merge of two lower-ranked"):
        BPETokenizer({**ranks, b"abc": 256})
    with pytest.raises(ValueError, match=r"0\.\.256"):
        BPETokenizer({**ranks, b"ab": 300})


@pytest.mark.parametrize("bad", [255, 0, -1, 300.0, True, None])
def test_bpe_bad_vocab_size(bad):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 256"):
        train_bpe("some text", bad)


def test_bpe_small_text_stops_early_with_warning():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = train_bpe("abab", 1000)
    assert 256 < tok.vocab_size < 1000
    assert tok.decode(tok.encode("abab")) == "abab"


def test_get_tokenizer_bpe_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    text = SHAKESPEARE[:30_000]
    first = get_tokenizer("bpe", text=text, vocab_size=290)
    assert len(list((tmp_path / "tokenizers").glob("*.tiktoken"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(bpe_module, "train_bpe", no_training)
    second = get_tokenizer("bpe", text=text, vocab_size=290)
    assert second.identity == first.identity


# --- tiktoken encodings ----------------------------------------------------------------


@fast
@given(text=st.text())
def test_cl100k_round_trips_arbitrary_unicode(cl100k_tok, text):
    assert cl100k_tok.decode(cl100k_tok.encode(text)) == text


def test_cl100k_treats_special_token_text_as_text(cl100k_tok):
    text = "a <|endoftext|> b"
    ids = cl100k_tok.encode(text)
    assert 100257 not in ids
    assert cl100k_tok.decode(ids) == text
    assert cl100k_tok.vocab_size == 100277


def test_gpt2_round_trip_when_cached():
    if not gpt2_available():
        pytest.skip("GPT-2 files are not in tiktoken's cache (the lab never downloads them)")
    tok = gpt2()
    text = SHAKESPEARE[:5000]
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 50257


def test_gpt2_unavailable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: nothing to find
    assert not gpt2_available()
    with pytest.raises(TokenizerUnavailableError, match="not in tiktoken's cache.*TIKTOKEN_CACHE_DIR"):
        get_tokenizer("gpt2")


# --- registry --------------------------------------------------------------------------


def test_every_tokenizer_follows_the_protocol(char_tok, bpe300, cl100k_tok):
    for tok in (char_tok, bpe300, cl100k_tok):
        assert isinstance(tok, Tokenizer)
        assert isinstance(tok.identity, str) and tok.identity
        assert tok.name in available_tokenizers()


def test_get_tokenizer_errors():
    with pytest.raises(ValueError, match=r"unknown tokenizer 'sentencepiece'.*char, bpe, cl100k, gpt2"):
        get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="pass a non-empty text"):
        get_tokenizer("char")
    with pytest.raises(ValueError, match="needs vocab_size"):
        get_tokenizer("bpe", text="hello")
    with pytest.raises(ValueError, match="does not match"):
        get_tokenizer("cl100k", vocab_size=1000)
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        get_tokenizer("bpe", text="hello", vocab_size="512")


def test_get_tokenizer_char_and_cl100k():
    assert get_tokenizer("char", text="abca").chars == ["a", "b", "c"]
    assert get_tokenizer("cl100k").name == "cl100k"
