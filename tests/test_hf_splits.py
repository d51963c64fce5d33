"""The lab's splits as Hugging Face datasets: `token_splits` holds exactly the token arrays a
lab run trains and validates on (char and BPE), `text_splits` exactly split_text's halves,
and a row goes straight into the exported model's Hugging Face loss, which equals the lab
GPT's on the same tokens."""

import datasets
import numpy as np
import pytest
import torch

from lab.data import load_corpus, prepare, split_text
from lab.data.hf_datasets import tokenized_dataset
from lab.hf_splits import text_splits, token_splits
from lab.models import GPT, GPTConfig, export_hf
from lab.session import Lab
from lab.tokenizers.bpe import train_bpe

TEXT = load_corpus("tinyshakespeare")[:60_000]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("tok", ["char", "bpe"])
def test_token_splits_are_the_labs_token_arrays(tok, cache):
    tokenizer = "char" if tok == "char" else train_bpe(TEXT, 300)
    data = prepare(text=TEXT, tokenizer=tokenizer)
    ds = token_splits(data, 64)
    assert isinstance(ds, datasets.DatasetDict) and list(ds) == ["train", "validation"]
    for name, array in (("train", data.train), ("validation", data.val)):
        rows = np.asarray(ds[name].with_format("numpy")["input_ids"])
        n = len(array) // 64
        assert rows.shape == (n, 64) and rows.dtype == np.int64
        assert np.array_equal(rows.reshape(-1), array[: n * 64])  # in order, remainder dropped
    assert ds["train"].features["input_ids"].length == 64


def test_text_splits_join_back_to_split_text(cache):
    ds = text_splits("tinyshakespeare")
    train, val = split_text(load_corpus("tinyshakespeare"))
    assert "".join(ds["train"]["text"]) == train and "".join(ds["validation"]["text"]) == val
    char = prepare("tinyshakespeare", "char")
    ids = tokenized_dataset(ds["validation"], char.tokenizer)["input_ids"]
    assert [i for row in ids for i in row] == char.val.tolist()  # Dataset.map's tokens are prepare's


def test_a_row_is_a_hugging_face_training_example_with_the_labs_loss(cache, tmp_path):
    """input_ids = labels on the export (transformers shifts them) is the lab GPT's loss on
    (row[:-1], row[1:])."""
    data = prepare(text=TEXT, tokenizer="char")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    from lab.models.hf import load_hf_causal_lm

    hf = load_hf_causal_lm(export_hf(model, tmp_path / "e"))[0]
    batch = token_splits(data, 32)["validation"].with_format("torch")[:8]["input_ids"]
    with torch.no_grad():
        hf_loss = hf(input_ids=batch, labels=batch).loss
        _, lab_loss = model(batch[:, :-1], batch[:, 1:].contiguous())
    torch.testing.assert_close(hf_loss, lab_loss, atol=1e-5, rtol=0)


def test_lab_dataset_is_token_splits_of_lab_data(cache):
    lab = Lab("smoke")
    ds = lab.dataset("tinyshakespeare", "char")
    block = lab.profile.pretraining.baby.block_size
    expect = token_splits(lab.data("tinyshakespeare", "char"), block)
    assert ds["validation"]["input_ids"] == expect["validation"]["input_ids"] and ds["train"].num_rows > 0
    assert lab.dataset(block_size=16)["validation"].features["input_ids"].length == 16


def test_bad_arguments_name_the_value():
    data = prepare(text=TEXT, tokenizer="char")
    with pytest.raises(ValueError, match="needs a TokenData"):
        token_splits(TEXT, 64)
    with pytest.raises(ValueError, match="block_size"):
        token_splits(data, 0)
    with pytest.raises(ValueError, match="too few for one row"):
        token_splits(data, 10**6)
