import pytest


@pytest.fixture(scope="module")
def char_data(lab):
    """Tiny Shakespeare, char-level, nanoGPT's 90/10 split."""
    return lab.data("tinyshakespeare", "char")


@pytest.fixture(scope="module")
def baby_runs(lab, char_data):
    """nanoGPT's baby config trained once per seed (cached on disk, shared by hypotheses)."""
    config = lab.model_config(char_data)
    return {seed: lab.pretrain(char_data, config, seed=seed) for seed in lab.seeds}
