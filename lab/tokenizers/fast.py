"""The lab's tokenizers as Hugging Face `tokenizers` objects, so an exported model directory
carries its tokenizer (`tokenizer.json`) and `AutoTokenizer`, `pipeline`, trl or
lm-evaluation-harness load it as it is.

- `CharTokenizer` -> a `WordLevel` model over the alphabet (id = index in the sorted
  alphabet, as in the lab), every character split off on its own by the pre-tokenizer and
  joined back without spaces by the `Fuse` decoder. No unknown token: a character outside the
  alphabet is an error, as in the lab.
- `BPETokenizer` (tiktoken mergeable ranks) -> a byte-level `BPE` model: the vocabulary is the
  ranks with each token's bytes written in GPT-2's byte-to-unicode alphabet, and the merges are
  every split of a token into two tokens of the vocabulary, ordered by the rank of the token
  they make (transformers' own tiktoken conversion). The same split pattern pre-tokenizes, so
  the ids equal tiktoken's.

No special tokens and no chat template: the lab's models have none (an exported model's
`generate` never stops early). A trainer that needs an end-of-sequence or padding token names
one of the vocabulary's own tokens (trl's `eos_token` / `pad_token` settings).
"""

from __future__ import annotations

from lab.tokenizers.bpe import BPETokenizer
from lab.tokenizers.char import CharTokenizer

__all__ = ["to_hf_tokenizer", "to_tokenizers"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _char_tokenizer(tok: CharTokenizer):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    out = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=None))
    # every character is its own pre-token; [\s\S] also matches the newline, which "." does not
    out.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    out.decoder = decoders.Fuse()
    return out


def _bpe_tokenizer(tok: BPETokenizer):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = tok.mergeable_ranks
    enc = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for t, r in ranks.items():
        if len(t) < 2:
            continue
        splits = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
        merges.extend((ranks[a], ranks[b], r, a, b) for a, b in splits)
    merges.sort(key=lambda m: (m[2], m[0], m[1]))
    out = Tokenizer(models.BPE(vocab, [(s(a), s(b)) for *_, a, b in merges], fuse_unk=False, ignore_merges=True))
    out.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tok.pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    out.decoder = decoders.ByteLevel()
    return out


def to_tokenizers(tok):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly as the lab tokenizer `tok`
    (a CharTokenizer or the lab's BPETokenizer). ValueError for any other tokenizer."""
    if isinstance(tok, CharTokenizer):
        return _char_tokenizer(tok)
    if isinstance(tok, BPETokenizer):
        return _bpe_tokenizer(tok)
    raise ValueError(
        f"to_tokenizers converts the lab's CharTokenizer and BPETokenizer, got {type(tok).__name__} "
        "(cl100k and gpt2 have Hugging Face tokenizers of their own)"
    )


def to_hf_tokenizer(tok):
    """`tok` as a transformers `PreTrainedTokenizerFast` (no special tokens, no chat template,
    no cleanup of spaces on decode, no padding side surprises: right)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=to_tokenizers(tok),
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
