"""Models for the inference comparisons. Speed does not depend on what the weights
learned, so the decode benchmarks use freshly initialised Llama-style models (seed 0)
long enough for the longest decode, exported once to Hugging Face format."""

import pytest
import torch

from lab.models import GPT
from lab.paths import cache_dir
from lab.seeding import seed_everything


@pytest.fixture(scope="session")
def decode_model(lab, char_data):
    """decode_model(n_kv_head, sliding_window=None) -> a lab GPT in eval mode."""
    inf = lab.profile.inference
    models = {}

    def get(n_kv_head: int, sliding_window: int | None = None) -> GPT:
        key = (n_kv_head, sliding_window)
        if key not in models:
            block = inf.prompt_len + max(inf.decode_lengths)
            config = lab.llama_config(
                char_data,
                n_kv_head=n_kv_head,
                sliding_window=sliding_window,
                block_size=block,
            )
            seed_everything(0)
            models[key] = GPT(config).eval()
        return models[key]

    return get


@pytest.fixture(scope="session")
def hf_decode_model(decode_model):
    """hf_decode_model(n_kv_head) -> the same weights through transformers' LlamaForCausalLM."""
    pytest.importorskip("transformers")
    from lab.models.hf import export_hf, load_hf_causal_lm
    from lab.session import weights_hash

    models = {}

    def get(n_kv_head: int):
        if n_kv_head not in models:
            model = decode_model(n_kv_head)
            path = cache_dir("hf-exports") / weights_hash(model)
            if not (path / "config.json").exists():
                export_hf(model, path)
            models[n_kv_head] = load_hf_causal_lm(path)[0].eval()
        return models[n_kv_head]

    return get


@pytest.fixture(scope="session")
def decode_prompt(lab):
    inf = lab.profile.inference
    return torch.randint(0, 65, (1, inf.prompt_len), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def decode_length(lab):
    """decode_length(i) -> the profile's i-th decode length, skipping when it has fewer.
    decode_length("long") -> the third (1,000 tokens on the cpu profile), or the last."""
    lengths = lab.profile.inference.decode_lengths

    def get(index):
        if index == "long":
            return lengths[min(2, len(lengths) - 1)]
        if index >= len(lengths):
            pytest.skip(f"the {lab.profile.name} profile has only {len(lengths)} decode lengths")
        return lengths[index]

    return get


@pytest.fixture(scope="session")
def ablation_runs(lab, char_data):
    """ablation_runs(train=None, **overrides) -> {seed: TrainResult}: the architecture
    ablations' shared small GPT (profile.architecture) with `overrides` changing one
    component, trained on char-level tiny Shakespeare with the shared budget for every
    seed. `train` overrides the training setup (objective, lr, steps...) the same way.
    A run that diverges is returned as its TrainingDivergedError."""
    from lab.train import TrainingDivergedError

    runs = {}

    def get(train: dict | None = None, **overrides):
        train = train or {}
        key = (tuple(sorted(overrides.items())), tuple(sorted(train.items())))
        if key not in runs:
            config = lab.arch_config(char_data, **overrides)
            by_seed = {}
            for seed in lab.seeds:
                try:
                    by_seed[seed] = lab.arch_pretrain(char_data, config, seed=seed, **train)
                except TrainingDivergedError as exc:
                    by_seed[seed] = exc
            runs[key] = by_seed
        return runs[key]

    return get
