"""An exported lab model scored by lm-evaluation-harness from its Hugging Face directory (a
local one-document task, no hub): the harness's bits per byte equals the lab's written-out
computation on the same windows, and agrees with the lab's validation loss on the same text
(random windows instead of the harness's tiling; one char token per byte on ASCII text)."""

import math

import numpy as np
import pytest
import torch

from lab.data import load_corpus, split_text
from lab.evalharness import bits_per_byte, rolling_nll, rolling_windows, text_task
from lab.models import GPT, GPTConfig, export_hf
from lab.session import Lab
from lab.tokenizers.bpe import train_bpe
from lab.train.trainer import evaluate

# The harness runs the export (Conv1D / HF attention), the lab its own GPT: float32 sums in
# another order over ~20k tokens
EXACT_RTOL = 1e-5
# the lab's validation loss (1280 random windows: standard error ~0.007 bits) vs the
# harness's one fixed tiling of the same text: measured 0.001 bits apart (4.4517 vs 4.4529)
VAL_TOL_BITS = 0.03
TEXT_CHARS = 20_000

needs_harness = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("lm_eval"),
    reason="lm-evaluation-harness is an optional extra: pip install -e '.[evalharness]' -c constraints.txt",
)


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    """The smoke profile's baby GPT on tinyshakespeare (char), trained a little longer so its
    loss is well below uniform, the first TEXT_CHARS of the validation split, and the
    harness's scores of that text from the model's export."""
    from lab.evalharness import harness_scores

    lab = Lab("smoke")
    data = lab.data("tinyshakespeare", "char")
    run = lab.pretrain(data, lab.model_config(data), seed=0, max_steps=150)
    _, val_text = split_text(load_corpus("tinyshakespeare"))
    text = val_text[:TEXT_CHARS]
    model = run.model.eval()
    path = export_hf(model, tmp_path_factory.mktemp("evalharness") / "baby", tokenizer=data.tokenizer)
    return model, data.tokenizer, text, harness_scores(path, text)


def _tiny(vocab_size, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, **kw)).eval()


def test_rolling_windows_score_every_token_once_with_full_context_where_possible():
    for n, ctx in [(1, 4), (3, 4), (4, 4), (5, 4), (9, 4), (100, 32)]:
        windows = rolling_windows(n, ctx)
        assert sum(k for _, k in windows) == n
        assert windows[0] == (0, min(n, ctx)) and all(s >= 0 for s, _ in windows)
        # each window ends where the tokens it scores end: at 4, 8, ... and n
        ends = [s + min(ctx, n) for s, _ in windows]
        assert ends == [min(n, ctx * (j + 1)) for j in range(len(windows))]
    assert rolling_windows(9, 4) == [(0, 4), (4, 4), (5, 1)]
    with pytest.raises(ValueError, match="n_tokens >= 1"):
        rolling_windows(0, 4)


@needs_harness
def test_the_written_out_rolling_nll_is_lm_evals_windowing():
    """rolling_nll on the lab GPT equals the sum over lm-eval's own window generator."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model = _tiny(40)
    ids = torch.randint(0, 40, (77,), generator=torch.Generator().manual_seed(3)).tolist()
    total = 0.0
    for inp, pred in map(make_disjoint_window, get_rolling_token_windows(ids, 7, 32, 1)):
        x = torch.tensor([(inp + pred)[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(x)[0][0, -len(pred) :], -1)
        total -= float(logp[torch.arange(len(pred)), torch.tensor(pred)].double().sum())
    assert rolling_nll(model, ids, 7) == pytest.approx(total, rel=1e-6)


@needs_harness
def test_lm_eval_scores_the_export_as_the_lab_computes_it(baby):
    model, tok, text, scores = baby
    ours = bits_per_byte(model, text, tok)
    assert scores["bits_per_byte"] == pytest.approx(ours, rel=EXACT_RTOL)
    assert scores["byte_perplexity"] == pytest.approx(2 ** scores["bits_per_byte"], rel=1e-9)
    nats = ours * len(text.encode()) * math.log(2)
    assert scores["word_perplexity"] == pytest.approx(math.exp(nats / len(text.split())), rel=1e-3)
    assert scores["bits_per_byte"] < math.log2(tok.vocab_size) - 1  # trained: well below uniform


@needs_harness
def test_lm_eval_bits_per_byte_agrees_with_the_labs_validation_loss(baby):
    model, tok, text, scores = baby
    array = np.asarray(tok.encode(text), dtype=np.int64)
    assert len(array) == len(text.encode())  # char on ASCII text: one token per byte
    val_loss = evaluate(model, array, block_size=model.config.block_size, batch_size=32, n_batches=40)
    assert abs(scores["bits_per_byte"] - val_loss / math.log(2)) <= VAL_TOL_BITS, (scores, val_loss / math.log(2))


@needs_harness
def test_lm_eval_scores_a_bpe_llama_export_as_the_lab(tmp_path):
    """The byte-level BPE export (several bytes per token) in the Llama layout: bits per byte,
    not per token, still equal."""
    from lab.evalharness import harness_scores

    bpe = train_bpe(load_corpus("tinyshakespeare")[:50_000], 320)
    model = _tiny(bpe.vocab_size, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1)
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 8
    scores = harness_scores(export_hf(model, tmp_path / "bpe", tokenizer=bpe), text)
    assert len(bpe.encode(text)) < len(text.encode())
    assert scores["bits_per_byte"] == pytest.approx(bits_per_byte(model, text, bpe), rel=EXACT_RTOL)


@needs_harness
def test_an_export_without_its_tokenizer_is_refused_by_name(tmp_path):
    from lab.evalharness import harness_scores

    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        harness_scores(export_hf(_tiny(40), tmp_path / "plain"), "some text")


def test_without_the_extra_the_error_names_the_install_command(monkeypatch, tmp_path):
    from lab.evalharness import harness_scores

    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[evalharness\]'"):
        harness_scores(tmp_path, "some text")


def test_the_local_task_is_one_document_of_the_text(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    task = text_task("line one\nline two\n")
    path = task["dataset_kwargs"]["data_files"]["test"]
    assert path.startswith(str(tmp_path)) and task["output_type"] == "loglikelihood_rolling"
    assert [json.loads(line) for line in open(path)] == [{"text": "line one\nline two\n"}]
    assert text_task("line one\nline two\n") == task  # same text, same file
    with pytest.raises(ValueError, match="non-empty str"):
        text_task("")
    with pytest.raises(ValueError, match="identifier"):
        text_task("x", name="my task")
