"""lab.scaling: power-law fits recover planted parameters, bootstrap intervals cover the
truth, compute_optimal matches the closed form, and bad input is a clear ValueError."""

import functools
import math

import numpy as np
import pytest
import torch

from lab.models import GPT, GPTConfig
from lab.scaling import (
    ChinchillaFit,
    PowerLawFit,
    bootstrap_fit,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    non_embedding_params,
    training_tokens,
)
from lab.train import TrainConfig

TRUE_N = dict(E=1.3, A=40.0, alpha=0.35)
TRUE_ND = dict(E=1.1, A=30.0, alpha=0.34, B=400.0, beta=0.28)
SIZES = np.geomspace(5e3, 5e5, 6)
TOKENS = np.geomspace(1e5, 1e6, 4)


def _law_n(N, E, A, alpha):
    return E + A * np.asarray(N, float) ** -alpha


def _law_nd(N, D, E, A, alpha, B, beta):
    return E + A * np.asarray(N, float) ** -alpha + B * np.asarray(D, float) ** -beta


def _grid_nd(reps=1):
    NN, DD = np.meshgrid(SIZES, TOKENS, indexing="ij")
    return np.tile(NN.ravel(), reps), np.tile(DD.ravel(), reps)


# ---------------------------------------------------------------- recovery


def test_power_law_recovers_exact_parameters():
    fit = fit_power_law(SIZES, _law_n(SIZES, **TRUE_N))
    assert isinstance(fit, PowerLawFit) and fit.n_points == 6 and not fit.at_bound
    for k, v in TRUE_N.items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-4), k
    assert fit.rss < 1e-12
    assert fit.predict(1e7) == pytest.approx(_law_n(1e7, **TRUE_N), rel=1e-6)


def test_power_law_recovers_noisy_parameters():
    rng = np.random.default_rng(1)
    N = np.tile(SIZES, 3)
    L = _law_n(N, **TRUE_N) + rng.normal(0, 0.003, N.size)
    fit = fit_power_law(N, L)
    assert fit.alpha == pytest.approx(TRUE_N["alpha"], abs=0.08)
    assert fit.E == pytest.approx(TRUE_N["E"], abs=0.1)
    assert fit.rmse == pytest.approx(0.003, rel=0.6)


def test_power_law_without_floor_fits_zero_irreducible_loss():
    """A pure power law (E = 0) is found at the E >= 0 boundary, not below it."""
    L = 50.0 * SIZES**-0.2
    fit = fit_power_law(SIZES, L)
    assert fit.E == pytest.approx(0.0, abs=1e-6)
    assert fit.alpha == pytest.approx(0.2, rel=1e-4)


def test_chinchilla_recovers_exact_parameters():
    N, D = _grid_nd()
    fit = fit_chinchilla(N, D, _law_nd(N, D, **TRUE_ND))
    assert isinstance(fit, ChinchillaFit) and fit.n_points == N.size and not fit.at_bound
    for k, v in TRUE_ND.items():
        assert getattr(fit, k) == pytest.approx(v, rel=1e-3), k
    assert fit.predict(1e6, 1e7) == pytest.approx(_law_nd(1e6, 1e7, **TRUE_ND), rel=1e-6)


def test_chinchilla_recovers_noisy_parameters():
    rng = np.random.default_rng(2)
    N, D = _grid_nd(reps=3)
    fit = fit_chinchilla(N, D, _law_nd(N, D, **TRUE_ND) + rng.normal(0, 0.003, N.size))
    assert fit.alpha == pytest.approx(TRUE_ND["alpha"], abs=0.08)
    assert fit.beta == pytest.approx(TRUE_ND["beta"], abs=0.08)
    assert fit.E == pytest.approx(TRUE_ND["E"], abs=0.15)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_power_law_interval_contains_truth():
    rng = np.random.default_rng(3)
    N = np.tile(SIZES, 4)
    L = _law_n(N, **TRUE_N) + rng.normal(0, 0.004, N.size)
    boot = bootstrap_fit(fit_power_law, N, L, strata=N.tolist(), n_boot=200)
    for k, v in TRUE_N.items():
        iv = boot.intervals[k]
        assert iv.low <= v <= iv.high, (k, iv)
        assert iv.low <= iv.estimate <= iv.high
    assert boot.n_failed == 0 and boot.intervals["alpha"].n_boot == 200
    assert boot.fit.alpha == boot.intervals["alpha"].estimate


def test_bootstrap_chinchilla_interval_contains_truth_and_derived():
    rng = np.random.default_rng(4)
    N, D = _grid_nd(reps=3)
    L = _law_nd(N, D, **TRUE_ND) + rng.normal(0, 0.003, N.size)
    truth_ratio = compute_optimal(ChinchillaFit(**TRUE_ND, rss=0.0, n_points=1), 1e12).tokens_per_param
    boot = bootstrap_fit(
        functools.partial(fit_chinchilla, grid=16),
        N,
        D,
        L,
        strata=list(zip(N, D)),
        n_boot=40,
        derived=lambda f: {"ratio": compute_optimal(f, 1e12).tokens_per_param},
    )
    for k in ("alpha", "beta"):
        iv = boot.intervals[k]
        assert iv.low <= TRUE_ND[k] <= iv.high, (k, iv)
    iv = boot.intervals["ratio"]
    assert iv.low <= truth_ratio <= iv.high
    assert boot.samples["ratio"].size == 40 - boot.n_failed


def test_bootstrap_is_deterministic_and_counts_failures():
    rng = np.random.default_rng(5)
    N = SIZES[:3]  # free resampling of 3 points often draws < 3 distinct sizes: refused
    L = _law_n(N, **TRUE_N) + rng.normal(0, 0.002, N.size)
    a = bootstrap_fit(fit_power_law, N, L, n_boot=30, seed=7)
    b = bootstrap_fit(fit_power_law, N, L, n_boot=30, seed=7)
    assert a.intervals == b.intervals
    assert a.n_failed > 0 and "distinct N" in a.failures[0]
    assert a.intervals["alpha"].n_boot == 30 - a.n_failed


# ---------------------------------------------------------------- compute-optimal


def test_compute_optimal_matches_closed_form_and_brute_force():
    fit = ChinchillaFit(**TRUE_ND, rss=0.0, n_points=1)
    a, b, A, B = fit.alpha, fit.beta, fit.A, fit.B
    for C in (1e12, 1e18, 1e24):
        opt = compute_optimal(fit, C)
        G = (a * A / (b * B)) ** (1 / (a + b))
        assert opt.N_opt == pytest.approx(G * (C / 6) ** (b / (a + b)), rel=1e-9)
        assert opt.D_opt == pytest.approx((C / 6) ** (a / (a + b)) / G, rel=1e-9)
        assert 6 * opt.N_opt * opt.D_opt == pytest.approx(C, rel=1e-9)
        assert opt.tokens_per_param == pytest.approx(opt.D_opt / opt.N_opt, rel=1e-12)
        # brute force along the iso-compute line
        Ns = np.geomspace(opt.N_opt / 100, opt.N_opt * 100, 20001)
        losses = fit.predict(Ns, C / (6 * Ns))
        assert Ns[np.argmin(losses)] == pytest.approx(opt.N_opt, rel=2e-3)
        assert opt.loss == pytest.approx(losses.min(), abs=1e-9)


def test_compute_optimal_equal_exponents_gives_constant_ratio():
    fit = ChinchillaFit(E=1.0, A=50.0, alpha=0.3, B=200.0, beta=0.3, rss=0.0, n_points=1)
    opt = compute_optimal(fit, np.array([1e10, 1e15, 1e20]))
    assert isinstance(opt.tokens_per_param, np.ndarray) and opt.tokens_per_param.shape == (3,)
    np.testing.assert_allclose(opt.tokens_per_param, (200.0 / 50.0) ** (1 / 0.3), rtol=1e-9)


# ---------------------------------------------------------------- bad input


def test_fewer_points_than_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match=r"3 parameters.*only 2 point"):
        fit_power_law([1e4, 1e5], [2.0, 1.8])
    with pytest.raises(ValueError, match=r"5 parameters.*only 4 point"):
        fit_chinchilla([1e4, 1e5, 1e6, 1e7], [1e5, 1e6, 1e7, 1e8], [2.0, 1.9, 1.8, 1.7])


def test_too_few_distinct_values_is_a_clear_error():
    with pytest.raises(ValueError, match=r"3 distinct N values.*got 2 distinct among 4"):
        fit_power_law([1e4, 1e4, 1e5, 1e5], [2.0, 2.1, 1.8, 1.9])
    N, D = _grid_nd()
    keep = D <= TOKENS[1]  # two budgets only
    with pytest.raises(ValueError, match=r"3 distinct D values.*got 2"):
        fit_chinchilla(N[keep], D[keep], _law_nd(N[keep], D[keep], **TRUE_ND))


@pytest.mark.parametrize(
    "bad, name",
    [
        (dict(N=[1e4, 0.0, 1e6]), "N"),
        (dict(N=[1e4, -1e5, 1e6]), "N"),
        (dict(L=[2.0, float("nan"), 1.5]), "L"),
        (dict(L=[2.0, 0.0, 1.5]), "L"),
    ],
)
def test_non_positive_or_non_finite_values_are_errors(bad, name):
    args = {"N": [1e4, 1e5, 1e6], "L": [2.0, 1.8, 1.5], **bad}
    with pytest.raises(ValueError, match=rf"{name} must be finite and > 0.*{name}\[1\]"):
        fit_power_law(args["N"], args["L"])


def test_non_positive_tokens_and_mismatched_lengths_are_errors():
    N, D = _grid_nd()
    L = _law_nd(N, D, **TRUE_ND)
    D_bad = D.copy()
    D_bad[3] = -1
    with pytest.raises(ValueError, match=r"D must be finite and > 0.*D\[3\] = -1"):
        fit_chinchilla(N, D_bad, L)
    with pytest.raises(ValueError, match=r"mismatched lengths \{'N': 24, 'D': 23, 'L': 24\}"):
        fit_chinchilla(N, D[:-1], L)
    with pytest.raises(ValueError, match=r"mismatched lengths"):
        fit_power_law([1e4, 1e5, 1e6], [2.0, 1.8])
    with pytest.raises(ValueError, match=r"non-empty 1-D"):
        fit_power_law([[1e4, 1e5, 1e6]], [[2.0, 1.8, 1.5]])


def test_compute_optimal_and_bootstrap_errors():
    pl = fit_power_law(SIZES, _law_n(SIZES, **TRUE_N))
    with pytest.raises(ValueError, match=r"needs a ChinchillaFit.*got PowerLawFit"):
        compute_optimal(pl, 1e12)
    fit = ChinchillaFit(**TRUE_ND, rss=0.0, n_points=1)
    with pytest.raises(ValueError, match=r"C must be finite and > 0"):
        compute_optimal(fit, 0.0)
    flat = ChinchillaFit(E=1.0, A=0.0, alpha=0.3, B=10.0, beta=0.3, rss=0.0, n_points=1)
    with pytest.raises(ValueError, match=r"A=0.*no optimal split"):
        compute_optimal(flat, 1e12)
    with pytest.raises(ValueError, match=r"strata has 2 labels for 6 points"):
        bootstrap_fit(fit_power_law, SIZES, _law_n(SIZES, **TRUE_N), strata=[0, 1])
    with pytest.raises(ValueError, match=r"n_boot must be an int >= 10"):
        bootstrap_fit(fit_power_law, SIZES, _law_n(SIZES, **TRUE_N), n_boot=3)
    calls = []

    def only_first(fit):  # succeeds on the full data, refuses every resample
        calls.append(fit)
        if len(calls) > 1:
            raise ValueError("refused")
        return {}

    with pytest.raises(ValueError, match=r"every one of 10 bootstrap resamples failed; first: refused"):
        bootstrap_fit(fit_power_law, SIZES, _law_n(SIZES, **TRUE_N), n_boot=10, derived=only_first)


# ---------------------------------------------------------------- counting


@pytest.mark.parametrize("n_layer, d", [(2, 16), (3, 48), (4, 96)])
def test_non_embedding_params_gpt2_formula(n_layer, d):
    """GPT-2 layout with biases: 12 d^2 + 13 d per block, plus the final LayerNorm."""
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=n_layer, n_head=4 if d % 4 == 0 else 3, n_embd=d)
    assert non_embedding_params(config) == n_layer * (12 * d * d + 13 * d) + 2 * d
    model = GPT(config)
    assert non_embedding_params(model) == model.num_params() - model.wte.weight.numel()


def test_non_embedding_params_untied_alibi_and_rng():
    config = GPTConfig(
        vocab_size=65,
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=16,
        pos="alibi",
        tie_weights=False,
        bias=False,
        norm="rmsnorm",
    )
    model = GPT(config)
    vocab = model.wte.weight.numel() + model.lm_head.weight.numel()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    n = non_embedding_params(config)
    assert torch.equal(torch.rand(3), expected), "counting must not consume the global RNG"
    assert n == sum(p.numel() for p in model.parameters()) - vocab
    with pytest.raises(ValueError, match=r"expects a GPTConfig.*got dict"):
        non_embedding_params({"n_layer": 2})


def test_training_tokens():
    mc = GPTConfig(vocab_size=65, block_size=64, n_layer=1, n_head=1, n_embd=8)
    assert training_tokens(TrainConfig(max_steps=300, batch_size=12, lr=1e-3), mc) == 300 * 12 * 64
    assert math.isclose(training_tokens(TrainConfig(max_steps=1, batch_size=1, lr=1e-3), mc), 64)
