"""Linear CKA behind Track C's representation-drift hypothesis."""

import pytest
import torch

from lab.inspect.similarity import linear_cka


def _hsic_cka(x, y):
    """CKA written with Gram matrices and the centering matrix H (Kornblith et al., eq. 1-3)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kx, ky = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    return float((kx * ky).sum() / (kx.norm() * ky.norm()))


def test_linear_cka_equals_the_gram_matrix_form():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=gen), torch.randn(50, 5, generator=gen)
    y = y + x[:, :5]
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x, y), abs=1e-10)


def test_linear_cka_is_one_up_to_rotation_and_scale():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    assert linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-10)
    assert 0 <= linear_cka(x, torch.randn(40, 6, generator=gen)) < 0.5


def test_linear_cka_refuses_bad_shapes():
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(3, 2), torch.randn(3, 2))


def test_class_variance_share_is_one_for_class_means_and_small_for_noise():
    from lab.inspect.similarity import class_variance_share

    labels = torch.tensor([0, 0, 1, 1, 2, 2] * 50)
    means = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert class_variance_share(means[labels], labels) == pytest.approx(1.0)
    noise = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    assert class_variance_share(noise, labels) < 0.05
    with pytest.raises(ValueError, match="labels"):
        class_variance_share(noise, labels[:10])
