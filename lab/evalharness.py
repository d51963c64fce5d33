"""An exported lab model scored by EleutherAI's lm-evaluation-harness, and the same number
written out, so the harness's bits per byte can be read against the lab's validation loss.

    path = export_hf(model, "exports/baby", tokenizer=data.tokenizer)   # model + tokenizer.json
    harness_scores(path, text)       # lm-eval: {"bits_per_byte": ..., "byte_perplexity": ..., ...}
    bits_per_byte(model, text, data.tokenizer)   # the lab's own, on the harness's windows

The harness loads the export directory as it is (`model="hf"`, its `AutoTokenizer`) and
scores `text` as one document of a local task (`text_task`: a JSON-lines copy of the text,
no hub) with `loglikelihood_rolling`: the tokens are cut into disjoint windows of the
model's context, the first conditioned on a prefix token (the lab's models have no
end-of-text token, so a newline stands in), each later window on the token before it, so the
first token of a window sees one token of context and the last sees a full context. That is
the spread of contexts the lab's validation loss averages over (random windows of
`block_size`, the first target seeing one token). bits per byte = total nats / (UTF-8 bytes
x ln 2); the validation loss is nats per token, so the two compare after scaling by tokens
per byte (1 for the char tokenizer on ASCII text, fewer for BPE).

Needs the optional extra: `pip install -e '.[evalharness]' -c constraints.txt`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from lab.data.corpora import corpus_fingerprint
from lab.paths import cache_dir

__all__ = ["HARNESS_METRICS", "bits_per_byte", "harness_scores", "rolling_nll", "rolling_windows", "text_task"]

HARNESS_METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")


def _check_text(text) -> str:
    if not isinstance(text, str) or not text:
        raise ValueError(f"need a non-empty str to score, got {text!r:.60}")
    return text


def text_task(text: str, *, name: str = "lab_text") -> dict:
    """An lm-eval task config that scores `text` as one document (loglikelihood_rolling,
    bits per byte, byte and word perplexity), read by `datasets`' packaged "json" builder
    from a copy of the text under $LAB_CACHE/evalharness: nothing is fetched."""
    _check_text(text)
    if not name.isidentifier():
        raise ValueError(f"task name must be an identifier (letters, digits, _), got {name!r}")
    folder = cache_dir("evalharness")
    path = folder / f"{name}-{corpus_fingerprint(text)[:16]}.jsonl"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        tmp.replace(path)
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(folder / "datasets")},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in HARNESS_METRICS],
    }


def _context_length(config) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"the {type(config).__name__} names no context length (n_positions / max_position_embeddings)")


def _prefix_id(tokenizer, prefix: str) -> int:
    ids = tokenizer.encode(prefix)
    if len(ids) != 1:
        raise ValueError(f"the prefix {prefix!r} must be one token of the tokenizer, it encodes to {ids}")
    return ids[0]


def harness_scores(
    path, text: str, *, prefix: str = "\n", batch_size: int = 16, device: str = "cpu"
) -> dict[str, float]:
    """{metric: value} for HARNESS_METRICS: lm-eval's `simple_evaluate` with its Hugging Face
    model loading the export directory `path` as it is (weights, config, tokenizer.json), on
    `text_task(text)`, windows of the model's context length, `prefix` as the token the first
    window is conditioned on (`prefix_token_id`: the export has no BOS / EOS token)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install -e '.[evalharness]' -c constraints.txt"
        ) from exc
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: export the model with export_hf(..., tokenizer=tok)")
    prefix_id = _prefix_id(AutoTokenizer.from_pretrained(str(path), local_files_only=True), prefix)
    max_length = _context_length(AutoConfig.from_pretrained(str(path), local_files_only=True))
    task = text_task(text)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(path),
            "prefix_token_id": prefix_id,
            "max_length": max_length,
            "device": device,
            "dtype": "float32",
        },
        tasks=[task],
        batch_size=batch_size,
        bootstrap_iters=0,  # one document: no standard error to bootstrap
        log_samples=False,
    )["results"][task["task"]]
    return {m: float(results[f"{m},none"]) for m in HARNESS_METRICS}


def rolling_windows(n_tokens: int, context: int) -> list[tuple[int, int]]:
    """lm-eval's disjoint rolling windows over a sequence of `n_tokens` tokens with the prefix
    token in front (position 0 of the padded sequence), as (start, n_scored): the model reads
    padded[start : start + context] and the last n_scored of its predictions are scored. Every
    token is scored exactly once; the last window reads a full context and scores the rest."""
    if n_tokens < 1 or context < 1:
        raise ValueError(f"need n_tokens >= 1 and context >= 1, got {n_tokens} and {context}")
    windows, done = [], 0
    while done < n_tokens:
        n = min(context, n_tokens - done)
        # the window ending at token done + n (padded index done + n) reads the `context` before it
        windows.append((max(0, done + n - context), n))
        done += n
    return windows


@torch.no_grad()
def rolling_nll(model, ids: list[int], prefix_id: int, *, batch_size: int = 64) -> float:
    """Total negative log-likelihood (nats) of `ids` under the lab GPT `model`, every token
    predicted once on lm-eval's rolling windows (`rolling_windows`), the first from `prefix_id`."""
    padded = torch.tensor([prefix_id, *ids])
    width = min(model.config.block_size, len(ids))  # every window reads this many tokens
    windows = rolling_windows(len(ids), model.config.block_size)
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(windows), batch_size):
            chunk = windows[b : b + batch_size]
            x = torch.stack([padded[s : s + width] for s, _ in chunk])
            y = torch.stack([padded[s + 1 : s + width + 1] for s, _ in chunk])
            logits, _ = model(x)
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            total += sum(float(row[-n:].double().sum()) for row, (_, n) in zip(nll, chunk))
    finally:
        model.train(was_training)
    return total


def bits_per_byte(model, text: str, tokenizer, *, prefix: str = "\n") -> float:
    """The lab's own bits per byte of `text`: `rolling_nll` over the text's tokens / (UTF-8
    bytes x ln 2), what lm-eval computes for the model's export."""
    ids = tokenizer.encode(_check_text(text))
    prefix_id = _prefix_id(tokenizer, prefix)
    return rolling_nll(model, ids, prefix_id) / (len(text.encode("utf-8")) * math.log(2))
