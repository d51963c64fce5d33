"""Shared experimental material: trained models every track can use. Training runs are
cached on disk by the lab (keyed by config, data and code), so each is trained once."""

import pytest


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
