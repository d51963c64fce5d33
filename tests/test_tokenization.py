"""lab.tokenization: compression, word splits and embedding geometry on known inputs,
and clear errors for bad input. Fast: no training beyond a tiny BPE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lab.tokenization import (
    bpe_tokenizers,
    by_frequency,
    chance_nearest_in_group,
    check_vocab_sizes,
    cohesion,
    compression,
    cosine_matrix,
    embedding_neighbours,
    gains_per_doubling,
    ids_of,
    max_digits_per_token,
    mean_cosine,
    nearest_in_group_fraction,
    neighbour_rows,
    pair_gap,
    split_report,
    token_counts,
    token_pieces,
    tokens_per_word,
)
from lab.tokenizers import CharTokenizer, cl100k, train_bpe

TEXT = "the cat sat on the mat. the cat ate the rat. " * 40


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer.from_text(TEXT)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXT, 270)


# ------------------------------------------------------------------ compression


def test_compression_of_char_and_bytes_is_one(char_tok):
    assert compression(char_tok, "the cat") == 1.0
    assert compression(train_bpe(TEXT, 256), "the cat sat") == 1.0


def test_compression_counts_characters_not_bytes():
    tok = train_bpe("ab" * 50, 256)  # bytes only: 'é' is two tokens
    assert compression(tok, "é") == 0.5


def test_bpe_compresses_its_training_text(bpe):
    c = compression(bpe, TEXT)
    assert c > 2.0
    assert c == len(TEXT) / len(bpe.encode(TEXT))


def test_compression_errors(char_tok):
    with pytest.raises(ValueError, match="text is empty"):
        compression(char_tok, "")
    with pytest.raises(ValueError, match="text must be a str, got int"):
        compression(char_tok, 42)
    with pytest.raises(ValueError, match="expected a lab Tokenizer"):
        compression("not a tokenizer", "abc")


def test_gains_per_doubling():
    assert gains_per_doubling([256, 512, 1024], [1.0, 2.0, 2.5]) == [1.0, 0.5]
    g = gains_per_doubling([256, 1024], [1.0, 3.0])  # two doublings
    assert g == [1.0]
    with pytest.raises(ValueError, match="got 2 values for 3 vocab sizes"):
        gains_per_doubling([256, 512, 1024], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite numbers"):
        gains_per_doubling([256, 512], [1.0, math.nan])


@pytest.mark.parametrize(
    "sizes, match",
    [
        ([128, 512], "vocab size 128 is below 256"),
        ([256, 255], "vocab size 255 is below 256"),
        ([512, 256], "strictly increasing"),
        ([256, 256], "strictly increasing"),
        ([256], "at least two vocab sizes"),
        ([256, 512.0], "must be ints, got 512.0"),
        ([256, True], "must be ints, got True"),
        ("256", "sequence of ints"),
        (256, "sequence of ints"),
    ],
)
def test_vocab_size_errors_name_the_value(sizes, match):
    with pytest.raises(ValueError, match=match):
        check_vocab_sizes(sizes)


def test_bpe_tokenizers_trains_each_size(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    toks = bpe_tokenizers(TEXT, [256, 260])
    assert [t.vocab_size for t in toks.values()] == [256, 260]
    with pytest.raises(ValueError, match="vocab size 100 is below 256"):
        bpe_tokenizers(TEXT, [100, 300])
    with pytest.raises(ValueError, match="train_text is empty"):
        bpe_tokenizers("", [256, 300])


# ------------------------------------------------------------------ splits


def test_split_report_pieces_rebuild_the_word(char_tok, bpe):
    rep = split_report(char_tok, ["cat", "rat"])
    assert rep == [("cat", ["c", "a", "t"]), ("rat", ["r", "a", "t"])]
    rep = split_report(bpe, ["cat", "mat"], prefix=" ")
    for word, pieces in rep:
        assert "".join(pieces) == " " + word
    assert len(rep[0][1]) == 1  # " cat" is frequent enough to be one token
    assert tokens_per_word([("a", ["a"]), ("bc", ["b", "c"])]) == 1.5


def test_byte_fallback_is_shown_as_hex():
    tok = train_bpe("ab" * 50, 256)
    assert token_pieces(tok, "é") == ["<0xC3>", "<0xA9>"]
    assert token_pieces(tok, "aé") == ["a", "<0xC3>", "<0xA9>"]


def test_cl100k_groups_digits_by_three():
    tok = cl100k()
    assert token_pieces(tok, "123456789") == ["123", "456", "789"]
    assert max_digits_per_token(tok, ["1234567", " 42"]) == 3
    assert max_digits_per_token(train_bpe(TEXT, 270), ["123456"]) == 1


def test_split_report_errors(char_tok):
    with pytest.raises(ValueError, match="words is empty"):
        split_report(char_tok, [])
    with pytest.raises(ValueError, match="words must be a list of strings"):
        split_report(char_tok, "cat")
    with pytest.raises(ValueError, match="word '' is empty"):
        split_report(char_tok, ["cat", ""])
    with pytest.raises(ValueError, match="each word must be a str, got int"):
        split_report(char_tok, ["cat", 3])
    with pytest.raises(ValueError, match="prefix must be a str"):
        split_report(char_tok, ["cat"], prefix=None)
    with pytest.raises(ValueError, match="empty split report"):
        tokens_per_word([])


# ------------------------------------------------------------------ embeddings


def _planted() -> torch.Tensor:
    """Rows 0-2 point near e0, rows 3-4 near e1, row 5 near -e0; small noise."""
    g = torch.Generator().manual_seed(0)
    e0, e1 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    rows = [e0, e0, e0, e1, e1, -e0]
    return torch.stack(rows) + 0.05 * torch.randn(6, 4, generator=g)


def test_cosine_matrix():
    e = torch.tensor([[1.0, 0], [0, 2.0], [-3.0, 0]])
    cos = cosine_matrix(e)
    assert torch.allclose(cos, torch.tensor([[1.0, 0, -1], [0, 1, 0], [-1, 0, 1]], dtype=torch.float64))
    assert torch.allclose(cosine_matrix(e.numpy()), cos)


def test_neighbours_on_planted_matrix():
    nn = embedding_neighbours(_planted(), [0, 3, 5], k=2)
    assert {j for j, _ in nn[0]} == {1, 2}
    assert nn[3][0][0] == 4
    assert nn[5][0][0] in (3, 4) and nn[5][0][1] < 0.5  # -e0 is far from all; the orthogonal rows come first
    assert all(c1 >= c2 for v in nn.values() for (_, c1), (_, c2) in zip(v, v[1:]))
    assert all(i not in [j for j, _ in v] for i, v in nn.items())
    # restricted candidates
    assert embedding_neighbours(_planted(), [0], k=1, among=[3, 4, 5])[0][0][0] in (3, 4)


def test_neighbour_ties_go_to_the_smaller_id():
    e = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 0], [0, 1.0]])
    assert [j for j, _ in embedding_neighbours(e, [3], k=4)[3]] == [0, 2, 1, 4]
    assert [j for j, _ in embedding_neighbours(e, [3], k=2, among=[4, 2, 0])[3]] == [0, 2]


@pytest.mark.parametrize(
    "k, match",
    [
        (0, "k must be an int >= 1, got 0"),
        (-1, "k must be an int >= 1, got -1"),
        (6, "k=6 is more neighbours than the 5 candidates"),
        (2.0, "k must be an int >= 1, got 2.0"),
    ],
)
def test_neighbour_k_errors(k, match):
    with pytest.raises(ValueError, match=match):
        embedding_neighbours(_planted(), [0], k=k)


def test_neighbour_input_errors():
    e = _planted()
    with pytest.raises(ValueError, match="token id 6 in ids is out of range for a vocabulary of 6"):
        embedding_neighbours(e, [6], k=1)
    with pytest.raises(ValueError, match="ids is empty"):
        embedding_neighbours(e, [], k=1)
    with pytest.raises(ValueError, match="repeated ids"):
        embedding_neighbours(e, [1, 1], k=1)
    with pytest.raises(ValueError, match="2-D"):
        embedding_neighbours(torch.ones(6), [0], k=1)
    with pytest.raises(ValueError, match=r"rows \[2\] are all zero"):
        cosine_matrix(torch.tensor([[1.0, 0], [0, 1], [0, 0]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        cosine_matrix(torch.tensor([[1.0, math.nan], [0, 1]]))
    with pytest.raises(ValueError, match=r"the 1 candidates token 0 has \(vocabulary 6, restricted to 2 ids\)"):
        embedding_neighbours(e, [0], k=2, among=[0, 1])
    with pytest.raises(ValueError, match="tensor or array"):
        cosine_matrix([[1.0, 0.0], [0.0, 1.0]])


def test_group_statistics_on_planted_matrix():
    e = _planted()
    assert mean_cosine(e, [0, 1, 2]) > 0.95
    assert mean_cosine(e, [0, 1, 2], [5]) < -0.95
    assert cohesion(e, [0, 1, 2], [3, 4]) > 0.9
    assert nearest_in_group_fraction(e, [0, 1, 2], range(6)) == 1.0
    assert nearest_in_group_fraction(e, [0, 3], range(6)) == 0.0
    assert chance_nearest_in_group(5, 26) == pytest.approx(4 / 25)
    # pairs: (0,3) and (1,4) are mismatched directions; (0,1) and (3,4) matched
    assert pair_gap(e, [(0, 1), (3, 4)]) > 0.9
    assert pair_gap(e, [(0, 3), (4, 1)]) < -0.9


def test_isotropic_random_embedding_has_near_zero_mean_cosine():
    e = torch.randn(200, 512, generator=torch.Generator().manual_seed(1))
    assert abs(mean_cosine(e)) < 0.01
    assert abs(mean_cosine(e + 3.0)) > 0.5  # a shared offset: anisotropic


def test_group_errors():
    e = _planted()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        mean_cosine(e, [0])
    with pytest.raises(ValueError, match=r"overlap in ids \[1\]"):
        mean_cosine(e, [0, 1], [1, 2])
    with pytest.raises(ValueError, match=r"group ids \[5\] are not among the candidates"):
        nearest_in_group_fraction(e, [0, 5], [0, 1, 2])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        pair_gap(e, [(0, 1)])
    with pytest.raises(ValueError, match="pairs must be"):
        pair_gap(e, [(0, 1), (2,)])
    with pytest.raises(ValueError, match="among_size must be an int >= 5, got 3"):
        chance_nearest_in_group(5, 3)


def test_frequencies():
    counts = token_counts(np.array([2, 2, 0, 2, 1, 0]), 4)
    assert counts.tolist() == [2, 1, 3, 0]
    assert by_frequency(counts) == [2, 0, 1, 3]
    assert token_counts(torch.tensor([0, 1, 1]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"ids range over \[0, 4\], outside a vocabulary of 4"):
        token_counts([0, 4], 4)
    with pytest.raises(ValueError, match="non-empty"):
        token_counts([], 4)
    with pytest.raises(ValueError, match="integers"):
        token_counts([0.5, 1.0], 4)


def test_ids_of_and_rows(char_tok, bpe):
    ids = ids_of(char_tok, "cat")
    assert char_tok.decode(ids) == "cat"
    with pytest.raises(ValueError, match="'é' is 2 tokens"):
        ids_of(train_bpe("ab" * 50, 256), ["é"])
    rows = neighbour_rows(char_tok, {ids[0]: [(ids[1], 0.5), (ids[2], 0.25)]})
    assert rows == [{"token": "'c'", "#1": "'a' (0.50)", "#2": "'t' (0.25)"}]
