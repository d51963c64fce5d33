"""Curriculum 01: tokenization and embeddings — how much text a BPE token covers as the
vocabulary grows, how a web-scale tokenizer (cl100k) and the lab's Shakespeare BPE cut
rare words and numbers, and what a trained char-level GPT's embedding matrix learned."""

import re
from collections import Counter

import pytest
import torch

from lab.data import split_text
from lab.models import GPT
from lab.report import at_least, at_most, check, greater_than, less_than, prediction
from lab.seeding import seed_everything
from lab.tokenization import (
    bpe_tokenizers,
    by_frequency,
    chance_nearest_in_group,
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
    tokens_per_word,
)
from lab.tokenizers import get_tokenizer

pytestmark = [pytest.mark.curriculum, pytest.mark.m01_tokenization]


@pytest.fixture(scope="module")
def shakespeare_splits(lab):
    """(train, val) text of tiny Shakespeare, nanoGPT's 90/10 split."""
    return split_text(lab.corpus("tinyshakespeare"))


@pytest.fixture(scope="module")
def cl100k_tok():
    return get_tokenizer("cl100k")


# ------------------------------------------------------------------ (a) compression vs vocab


def _compression_figure(sizes, val_c, train_c, cl100k_c):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(sizes, val_c, "o-", label="validation split")
    ax.plot(sizes, train_c, "s--", label="training split", alpha=0.7)
    ax.axhline(cl100k_c, color="grey", ls=":", label="cl100k (validation)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(v) for v in sizes])
    ax.minorticks_off()
    ax.set_xlabel("BPE vocabulary size (log scale)")
    ax.set_ylabel("characters per token")
    ax.set_title("Lab BPE on tiny Shakespeare: compression vs vocabulary")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


@prediction(
    "BPE compression (validation chars per token) rises with every increase of the vocabulary size",
    metric="min_gain_per_doubling",
    expect=greater_than(0.0),
)
@prediction(
    "Diminishing returns: the last doubling of the vocabulary gains at most half as many chars/token as the first",
    metric="last_over_first_gain",
    expect=at_most(0.5),
)
@prediction(
    "At the top of the range (8192 -> 16384 on cpu) doubling the vocabulary adds less than 0.5 chars/token",
    metric="last_gain_per_doubling",
    expect=less_than(0.5),
)
def test_compression_grows_with_diminishing_returns(lab, shakespeare_splits, cl100k_tok, outcome):
    """How does BPE compression (characters per token) grow with the vocabulary size?

    Train the lab's byte-level BPE (GPT-2 split pattern, most frequent pair merged
    first, starting from the 256 single bytes) on tiny Shakespeare's training split at
    each of the profile's vocabulary sizes (256 to 16384 on the cpu profile; 256 is
    bytes only, 1 char/token on this ASCII text) and measure compression, characters
    per token, on the held-out validation split (and on the training split, for the
    gap). Between consecutive sizes, the gain is the change in chars/token per doubling
    of the vocabulary, (c2 - c1) / log2(V2 / V1). Tokenization is deterministic, so
    every number is exact (no seeds). cl100k (GPT-4's 100k vocabulary, trained on web
    text) on the same validation text is drawn for reference.
    """
    s = lab.profile.tokenization
    train_text, val_text = shakespeare_splits
    toks = bpe_tokenizers(train_text, s.vocab_sizes)
    val_c = [compression(toks[v], val_text) for v in s.vocab_sizes]
    train_c = [compression(toks[v], train_text) for v in s.vocab_sizes]
    for v, cv, ct in zip(s.vocab_sizes, val_c, train_c):
        outcome.record(f"val_chars_per_token_v{v}", cv, unit="chars/token", deterministic=True)
        outcome.record(f"train_chars_per_token_v{v}", ct, unit="chars/token", deterministic=True)
    gains = gains_per_doubling(s.vocab_sizes, val_c)
    exact = dict(unit="chars/token per doubling", deterministic=True)  # tokenization has no randomness
    outcome.record("min_gain_per_doubling", min(gains), **exact)
    outcome.record("first_gain_per_doubling", gains[0], **exact)
    outcome.record("last_gain_per_doubling", gains[-1], **exact)
    outcome.record("last_over_first_gain", gains[-1] / gains[0], deterministic=True)
    cl = outcome.record(
        "val_chars_per_token_cl100k", compression(cl100k_tok, val_text), unit="chars/token", deterministic=True
    )

    outcome.plot("compression", _compression_figure(s.vocab_sizes, val_c, train_c, cl))
    outcome.table(
        "gains",
        [
            {"vocab": f"{v0} -> {v1}", "val chars/token": f"{c0:.3f} -> {c1:.3f}", "gain per doubling": round(g, 3)}
            for (v0, v1), (c0, c1), g in zip(zip(s.vocab_sizes, s.vocab_sizes[1:]), zip(val_c, val_c[1:]), gains)
        ],
        caption="Validation compression between consecutive vocabulary sizes",
    )
    outcome.note(f"the validation split has {len(val_text):,} characters; the BPEs never saw it")
    outcome.note(
        "Disclosure: the diminishing-returns predictions were written after seeing validation compression "
        "at 256 / 300 / 400 / 1024 tokens (1.00 / 1.38 / 1.71 / 2.26 chars/token) while timing BPE training; "
        "nothing at 2048 or above had been seen."
    )


# ------------------------------------------------------------------ (b) rare words and numbers

RARE_WORDS = (
    "photosynthesis",
    "mitochondria",
    "cryptocurrency",
    "smartphone",
    "algorithm",
    "thermodynamics",
    "electroencephalography",
    "antidisestablishmentarianism",
    "bioluminescence",
    "hyperparameter",
    "Kubernetes",
    "Schwarzenegger",
    "Tchaikovsky",
    "Nebuchadnezzar",
)
NUMBERS = (
    "7",
    "42",
    "365",
    "1984",
    "2024",
    "65536",
    "1000000",
    "3.14159",
    "1,000,000",
    "123456789",
    "8675309",
    "0.001",
)
FREQUENT_WORDS = ("the", "and", "to", "of", "my", "you", "that", "is", "not", "with")
NON_ASCII = ("café", "naïve", "Zürich", "façade", "東京")


def _speaker_names(train_text: str, n: int) -> list[str]:
    """The `n` most frequent speaker tags of the training split (lines 'NAME:')."""
    counts = Counter(re.findall(r"^([A-Z][A-Z' ]*[A-Z]):$", train_text, flags=re.MULTILINE))
    return [name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _show(pieces: list[str]) -> str:
    return " | ".join(p.replace(" ", "␣").replace("\n", "\\n") for p in pieces)


@check(
    "cl100k never puts more than three digits in one token (its pre-tokenizer cuts digit runs into groups of <= 3)",
    metric="cl100k_max_digits_per_token",
    expect=at_most(3),
)
@prediction(
    "The lab BPE, which saw almost no digits in Shakespeare, spends at least 1.5x as many tokens on numbers as cl100k",
    metric="numbers_ratio_bpe_over_cl100k",
    expect=at_least(1.5),
)
@prediction(
    "Rare modern words and foreign names take at least 1.5x as many tokens under the lab BPE as under cl100k",
    metric="rare_words_ratio_bpe_over_cl100k",
    expect=at_least(1.5),
)
@prediction(
    "Ten common English function words (the, and, to, of, my, you, that, is, not, with) are one token each under "
    "the lab BPE",
    metric="frequent_words_tokens_per_word_bpe",
    expect=at_most(1.0),
)
@prediction(
    "In-domain names (the corpus' most frequent speaker tags) take no more tokens under the lab BPE than under cl100k",
    metric="speaker_names_ratio_bpe_over_cl100k",
    expect=at_most(1.0),
)
def test_rare_words_and_numbers(lab, shakespeare_splits, cl100k_tok, outcome):
    """How do cl100k and the lab BPE cut rare words, numbers and in-domain names?

    Tokenize fixed word lists with cl100k (100,277 tokens, web text) and with the lab's
    BPE trained on tiny Shakespeare's training split at the profile's split vocabulary
    (1024 on cpu): rare modern words and non-Shakespearean names, numbers (integers,
    decimals, thousands separators), ten frequent function words, and the twelve most
    frequent speaker tags of the training split (upper-case names heading speeches).
    Words and numbers are tokenized as they appear in running text, after a space
    (" photosynthesis"); speaker tags as they appear, at the start of a line, with no
    space. The statistic per category is total tokens under the lab BPE over total
    tokens under cl100k (exact: tokenization is deterministic). A few accented and
    non-Latin words are tabled too: a byte-level BPE that never saw them falls back to
    single bytes (shown as <0xAB>).
    """
    s = lab.profile.tokenization
    train_text, _ = shakespeare_splits
    bpe = get_tokenizer("bpe", text=train_text, vocab_size=s.split_vocab)
    names = _speaker_names(train_text, 12)
    groups = {
        "rare_words": (RARE_WORDS, " "),
        "numbers": (NUMBERS, " "),
        "frequent_words": (FREQUENT_WORDS, " "),
        "speaker_names": (names, ""),
        "non_ascii": (NON_ASCII, " "),
    }
    rows = []
    for group, (words, prefix) in groups.items():
        rep_bpe = split_report(bpe, words, prefix=prefix)
        rep_cl = split_report(cl100k_tok, words, prefix=prefix)
        exact = dict(unit="tokens/word", deterministic=True)  # fixed word lists, deterministic tokenizers
        outcome.record(f"{group}_tokens_per_word_bpe", tokens_per_word(rep_bpe), **exact)
        outcome.record(f"{group}_tokens_per_word_cl100k", tokens_per_word(rep_cl), **exact)
        outcome.record(
            f"{group}_ratio_bpe_over_cl100k", tokens_per_word(rep_bpe) / tokens_per_word(rep_cl), deterministic=True
        )
        for (word, p_bpe), (_, p_cl) in zip(rep_bpe, rep_cl):
            rows.append(
                {
                    "group": group,
                    "word": prefix.replace(" ", "␣") + word,
                    f"lab BPE {s.split_vocab}": _show(p_bpe),
                    "n (BPE)": len(p_bpe),
                    "cl100k": _show(p_cl),
                    "n (cl100k)": len(p_cl),
                }
            )
    for name, tok in (("cl100k", cl100k_tok), ("bpe", bpe)):
        n_max = max_digits_per_token(tok, [" " + n for n in NUMBERS])
        outcome.record(f"{name}_max_digits_per_token", n_max, deterministic=True)
    outcome.table("splits", rows, caption="Token pieces (␣ = space) under the lab BPE and cl100k")
    digits = sorted({c for c in train_text if c.isdigit()})
    outcome.note(f"digits in the training split: {''.join(digits) or 'none'}; speaker tags used: {', '.join(names)}")


# ------------------------------------------------------------------ (c) embedding geometry

LOWER = "abcdefghijklmnopqrstuvwxyz"
VOWELS = "aeiou"


def _init_embedding(run, seed: int) -> torch.Tensor:
    """The token embedding this run started from: the trainer seeds, then builds the model."""
    seed_everything(seed)
    return GPT(run.model.config).wte.weight.detach()


def _heatmap(tok, trained, init, title):
    import matplotlib.pyplot as plt

    order = [c for c in VOWELS] + [c for c in LOWER if c not in VOWELS] + [c for c in LOWER.upper()]
    order += [c for c in tok.chars if c not in order]
    ids = ids_of(tok, order)
    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5), layout="constrained")
    for ax, (name, e) in zip(axes, (("trained", trained), ("random init", init))):
        cos = cosine_matrix(e)[ids][:, ids].numpy()
        im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
        labels = [repr(c)[1:-1] for c in order]
        ax.set_xticks(range(len(ids)), labels, fontsize=6, rotation=90)
        ax.set_yticks(range(len(ids)), labels, fontsize=6)
        for edge in (len(VOWELS), len(LOWER), 2 * len(LOWER)):  # vowels | consonants | capitals | other
            ax.axhline(edge - 0.5, color="k", lw=0.6)
            ax.axvline(edge - 0.5, color="k", lw=0.6)
        ax.set_title(name)
    fig.colorbar(im, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle(title)
    return fig


@prediction(
    "Vowels cluster: vowel-vowel minus vowel-consonant cosine in the trained embedding exceeds that at random init",
    metric="vowel_cohesion",
    expect=greater_than("vowel_cohesion_init"),
)
@prediction(
    "At least 40% of the lower-case vowels (2.5x chance) have another vowel as nearest lower-case neighbour",
    metric="vowel_nn_vowel_fraction",
    expect=at_least(0.4),
)
def test_vowels_cluster_in_embedding(lab, char_data, baby_runs, outcome, require_trained):
    """Do vowels cluster in a char-level GPT's token embedding?

    For each seed's baby GPT (char-level tiny Shakespeare; the token embedding is tied
    to the output layer, so each row serves both reading and predicting a character),
    take the embedding matrix and compare rows by cosine similarity. Vowel cohesion is
    the mean cosine between distinct lower-case vowels (a e i o u) minus the mean
    cosine between a vowel and a lower-case consonant. The nearest-neighbour statistic
    is the fraction of the five vowels whose most similar other lower-case letter is a
    vowel (chance 4/25 = 0.16), judged as a count of vowels out of five per seed, with an
    exact binomial interval over all seeds' vowels. The control is the same model's embedding at
    initialisation (same seed, before any step), paired by seed. The table lists the
    nearest neighbours of the most frequent characters of the training split (first
    seed); the figure shows the cosine matrix of the alphabet, trained and at init.
    """
    s = lab.profile.tokenization
    tok = char_data.tokenizer
    vowels, consonants = ids_of(tok, VOWELS), ids_of(tok, [c for c in LOWER if c not in VOWELS])
    lower = ids_of(tok, LOWER)
    counts = token_counts(char_data.train, tok.vocab_size)
    frequent = by_frequency(counts)[: s.n_table]
    for seed, run in baby_runs.items():
        trained, init = run.model.wte.weight.detach(), _init_embedding(run, seed)
        outcome.record("vowel_cohesion", cohesion(trained, vowels, consonants), seed=seed)
        outcome.record("vowel_cohesion_init", cohesion(init, vowels, consonants), seed=seed)
        for name, emb in (("vowel_nn_vowel_fraction", trained), ("vowel_nn_vowel_fraction_init", init)):
            hits = round(nearest_in_group_fraction(emb, vowels, lower) * len(vowels))
            outcome.record_fraction(name, hits, len(vowels), seed=seed)
        if seed == min(baby_runs):
            nn = embedding_neighbours(trained, frequent, s.k_neighbours)
            outcome.table(
                "neighbours",
                neighbour_rows(tok, nn),
                caption=f"Nearest neighbours (cosine) of the most frequent characters, trained, seed {seed}",
            )
            nn_v = embedding_neighbours(trained, vowels, s.k_neighbours, among=lower)
            outcome.table(
                "vowel_neighbours",
                neighbour_rows(tok, nn_v),
                caption=f"Nearest lower-case neighbours of the vowels, trained, seed {seed}",
            )
            outcome.plot(
                "cosine_matrix", _heatmap(tok, trained, init, f"Token-embedding cosine similarity (seed {seed})")
            )
    outcome.note(f"chance level of the nearest-neighbour fraction: {chance_nearest_in_group(5, 26):.2f}")
    require_trained(baby_runs, "each seed's baby GPT")


@prediction(
    "Each capital letter is closer to its own lower-case letter than to other lower-case letters, more so than at init",
    metric="case_pair_gap",
    expect=greater_than("case_pair_gap_init"),
)
def test_case_pairs_are_close(lab, char_data, baby_runs, outcome, require_trained):
    """Is each capital letter closest to its own lower case in a char-level GPT's embedding?

    For each seed's baby GPT, the case-pair gap is the mean cosine between each capital
    and its own lower-case letter ('A'-'a', ..., 'Z'-'z') minus the mean cosine between
    a capital and the other 25 lower-case letters. The model is never told that 'T'
    and 't' are one letter; only the contexts they appear in could teach it. Control:
    the same model's embedding at initialisation, paired by seed (~0 by symmetry).
    Frequency is a confound: rare capitals and rare lower-case letters ('Z', 'z') may
    be close only because rare characters share a direction (see the frequency
    hypothesis below); the table gives each pair's cosine and rank to tell them apart.
    """
    tok = char_data.tokenizer
    pairs = list(zip(ids_of(tok, LOWER.upper()), ids_of(tok, LOWER)))
    rows = []
    for seed, run in baby_runs.items():
        trained, init = run.model.wte.weight.detach(), _init_embedding(run, seed)
        outcome.record("case_pair_gap", pair_gap(trained, pairs), seed=seed)
        outcome.record("case_pair_gap_init", pair_gap(init, pairs), seed=seed)
        if seed == min(baby_runs):
            cos = cosine_matrix(trained)
            for (u, lo), ch in zip(pairs, LOWER):
                lower_ids = [j for _, j in pairs]
                rank = 1 + sum(cos[u, j].item() > cos[u, lo].item() for j in lower_ids if j != lo)
                rows.append(
                    {
                        "pair": f"{ch.upper()} / {ch}",
                        "cosine": round(cos[u, lo].item(), 3),
                        "rank of own lower case among 26": rank,
                    }
                )
    outcome.table("case_pairs", rows, caption="Cosine of each case pair and the lower-case letter's rank (first seed)")
    require_trained(baby_runs, "each seed's baby GPT")


@prediction(
    "Rare characters share a direction: their mean pairwise cosine exceeds that of the most frequent characters",
    metric="rare_mean_cosine",
    expect=greater_than("frequent_mean_cosine"),
)
@prediction(
    "Training makes the embedding anisotropic: mean cosine over all token pairs rises above its value at init",
    metric="mean_cosine",
    expect=greater_than("mean_cosine_init"),
)
def test_rare_tokens_share_a_direction(lab, char_data, baby_runs, outcome, require_trained):
    """Do rare characters share a direction in the embedding, and does training make it anisotropic?

    Count characters in the training split and take the profile's group size (10 on
    cpu) of the rarest and of the most frequent. For each seed's baby GPT, record the
    mean cosine between distinct rare characters and between distinct frequent ones;
    with tied embeddings a rare character is mostly trained by the softmax pushing its
    logit down, the same push for every rare character. Anisotropy is the mean cosine
    over all pairs of the vocabulary, compared with the same model at initialisation
    (paired by seed).
    """
    s = lab.profile.tokenization
    tok = char_data.tokenizer
    counts = token_counts(char_data.train, tok.vocab_size)
    order = by_frequency(counts)
    frequent, rare = order[: s.n_group], order[-s.n_group :]
    for seed, run in baby_runs.items():
        trained, init = run.model.wte.weight.detach(), _init_embedding(run, seed)
        outcome.record("rare_mean_cosine", mean_cosine(trained, rare), seed=seed)
        outcome.record("frequent_mean_cosine", mean_cosine(trained, frequent), seed=seed)
        outcome.record("rare_mean_cosine_init", mean_cosine(init, rare), seed=seed)
        outcome.record("frequent_mean_cosine_init", mean_cosine(init, frequent), seed=seed)
        outcome.record("mean_cosine", mean_cosine(trained), seed=seed)
        outcome.record("mean_cosine_init", mean_cosine(init), seed=seed)
    require_trained(baby_runs, "each seed's baby GPT")
    outcome.table(
        "groups",
        [
            {
                "group": name,
                "characters (count in training split)": ", ".join(f"{tok.decode([i])!r} ({counts[i]})" for i in ids),
            }
            for name, ids in (("most frequent", frequent), ("rarest", rare))
        ],
        caption="The frequency groups",
    )
