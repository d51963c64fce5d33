"""Noise injection and deduplication behind curriculum 16's data-quality hypotheses."""

import pytest
import torch

from lab.synthetic import dedup_pieces, inject_noise, noisy_text, repeated_corpus
from lab.tokenizers import CharTokenizer

TEXT = "".join(chr(97 + (i * 7) % 26) for i in range(5000))


def test_inject_noise_replaces_about_rate_of_the_tokens_reproducibly():
    ids = torch.zeros(20_000, dtype=torch.long)
    a = inject_noise(ids, 0.1, 50, generator=torch.Generator().manual_seed(0))
    b = inject_noise(ids, 0.1, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # a replaced token is non-zero with probability 49/50
    assert 0.09 < (a != 0).float().mean().item() < 0.107
    assert int(a.max()) < 50 and torch.equal(inject_noise(ids, 0.0, 50, generator=torch.Generator()), ids)
    with pytest.raises(ValueError, match="rate"):
        inject_noise(ids, 1.5, 50, generator=torch.Generator())


def test_noisy_text_keeps_length_and_alphabet():
    tok = CharTokenizer.from_text(TEXT)
    out = noisy_text(TEXT, tok, 0.2, seed=1)
    assert len(out) == len(TEXT) and set(out) <= set(TEXT) and out != TEXT


def test_dedup_pieces_keeps_first_occurrences_in_order():
    assert dedup_pieces(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]


def test_repeated_corpus_sizes_and_deduplication():
    c = repeated_corpus(TEXT, n_chars=1000, repeated_fraction=0.5, repeats=10)
    assert len(c.with_repeats) == 1000 and len(c.passage) == 50
    assert c.with_repeats.count(c.passage) >= 10
    assert len(c.deduplicated) == 500 + 50
    assert c.deduplicated == TEXT[: 1000 // 2 // 10] + c.passage + TEXT[50:500]
    with pytest.raises(ValueError, match="needs"):
        repeated_corpus(TEXT[:100], n_chars=1000, repeated_fraction=0.5, repeats=10)
