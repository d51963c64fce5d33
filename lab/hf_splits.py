"""The lab's train / validation splits as Hugging Face datasets, so a researcher takes the
exact data a lab run trains and validates on into any trainer or tool that reads a
`datasets.DatasetDict`.

    data = lab.data("tinyshakespeare", "char")   # TokenData: the lab's token arrays
    ds = token_splits(data, block_size=64)        # {"train", "validation"}: rows of 64 token ids
    ds["train"].with_format("torch")              # batches for a DataLoader / transformers' Trainer
    text_splits("tinyshakespeare")                # the same split as text, one row per line

`token_splits` cuts `prepare`'s own token arrays (the ones `lab.pretrain` trains on and
validates with) into consecutive rows, so its tokens are the lab's for every tokenizer,
char, BPE and cl100k alike. `text_splits` holds the text `split_text` gives each side, for
tools that tokenize themselves (`lab.data.hf_datasets.tokenized_dataset` encodes it with
`Dataset.map` and its Arrow cache).

Rows are consecutive, not the lab's random windows: a trainer that reads rows sees each
token once per epoch, where the lab samples windows anywhere in the array. Kept out of
lab/data/ on purpose: the source under lab/data keys the training-run cache
(lab.session.code_version), and this view of the data must not invalidate cached runs.
"""

from __future__ import annotations

import numpy as np

from lab.checks import POSITIVE_INT
from lab.data import TokenData, load_corpus, split_text
from lab.data.hf_datasets import _datasets, text_dataset

__all__ = ["SPLITS", "text_splits", "token_splits"]

SPLITS = {"train": "train", "validation": "val"}  # Hugging Face split name -> TokenData field


def _rows(array: np.ndarray, block_size: int, split: str):
    datasets = _datasets()
    n = len(array) // block_size
    if n == 0:
        raise ValueError(f"the {split} split has {len(array)} tokens: too few for one row of block_size {block_size}")
    rows = np.asarray(array[: n * block_size], dtype=np.int64).reshape(n, block_size)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64"), length=block_size)})
    return datasets.Dataset.from_dict({"input_ids": rows}, features=features)


def token_splits(data: TokenData, block_size: int):
    """A DatasetDict {"train", "validation"} of `data`'s token arrays cut into consecutive rows
    of `block_size` ids ("input_ids"), in order, the remainder dropped.

    A Hugging Face causal LM takes a row as input_ids and labels (it shifts the labels
    itself), so each row trains block_size - 1 predictions; for the lab GPT's (x, y) pairs
    take rows of block_size + 1 and split them as row[:-1], row[1:]."""
    if not isinstance(data, TokenData):
        raise ValueError(
            f"token_splits needs a TokenData (lab.data.prepare / lab.data(...)), got {type(data).__name__}"
        )
    POSITIVE_INT.check("block_size", block_size)
    return _datasets().DatasetDict(
        {name: _rows(getattr(data, field), block_size, name) for name, field in SPLITS.items()}
    )


def text_splits(corpus: str, *, val_fraction: float = 0.1):
    """A DatasetDict {"train", "validation"} of the lab corpus `corpus` as `split_text` splits
    it (the split `prepare` tokenizes), one row per line ("text", line breaks kept), loaded
    by `datasets.load_dataset("text")` from copies in $LAB_CACHE/datasets: joining a split's
    rows gives its text back exactly."""
    train, val = split_text(load_corpus(corpus), val_fraction)
    return _datasets().DatasetDict(
        {"train": text_dataset(train, name=f"{corpus}-train"), "validation": text_dataset(val, name=f"{corpus}-val")}
    )
