"""Position tables and similarity matrices of curriculum 02's heatmaps."""

import pytest
import torch

from lab.inspect.positions import alibi_matrix, cosine_matrix, encoding_table, offset_means, toeplitz_deviation
from lab.models import GPT, GPTConfig


def _config(pos, **kw):
    return GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8, pos=pos, **kw)


def test_rope_similarity_is_the_mean_cosine_of_the_angle_differences():
    config = _config("rope")
    sim = cosine_matrix(encoding_table(config, 16))
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    offsets = torch.arange(16).float()[:, None] - torch.arange(16).float()[None, :]
    expected = torch.cos(offsets[..., None] * inv_freq).mean(-1)
    assert torch.allclose(sim, expected, atol=1e-5)


@pytest.mark.parametrize("pos", ["sinusoidal", "rope"])
def test_fixed_encodings_are_offset_only(pos):
    assert toeplitz_deviation(cosine_matrix(encoding_table(_config(pos), 16))) < 1e-5


def test_learned_table_needs_the_model_and_comes_from_wpe():
    config = _config("learned")
    with pytest.raises(ValueError, match="model="):
        encoding_table(config, 4)
    model = GPT(config)
    assert torch.equal(encoding_table(config, 4, model), model.wpe.weight[:4].detach())
    assert encoding_table(_config("alibi"), 4) is None


def test_offset_means_and_toeplitz_deviation():
    m = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert offset_means(m).tolist() == [3.0, 2.0]
    assert toeplitz_deviation(m) == 4.0
    bias = alibi_matrix(_config("alibi"), 5)
    assert toeplitz_deviation(bias) == 0 and float(bias[0, 0]) == 0 and float(bias[0, 4]) < float(bias[0, 1])
