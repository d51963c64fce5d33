"""Wind tunnels: the exact oracles (property tests against brute-force enumeration),
sequence formats, bad input, models, training cache and calibration metrics."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.windtunnel.metrics import calibration, kl_bits, predict
from lab.windtunnel.models import (
    PositionMLP,
    PrefixMLP,
    TunnelTransformer,
    matched_position_mlp,
    matched_prefix_mlp,
    n_params,
)
from lab.windtunnel.tasks import (
    BijectionTask,
    HMMTask,
    bijection_posterior_brute_force,
    check_stochastic,
    discretized_rows,
    entropy_bits,
    forward_posterior,
    hmm_posterior_brute_force,
    uniform_floor_bits,
)
from lab.windtunnel.train import TunnelTrainConfig, train_tunnel

# ---------------------------------------------------------------- bijection oracle


@settings(max_examples=40)
@given(V=st.integers(2, 5), data=st.data(), repl=st.booleans())
def test_bijection_posterior_matches_enumeration(V, data, repl):
    L = data.draw(st.integers(1, 6 if repl else V))
    seed = data.draw(st.integers(0, 10_000))
    batch = BijectionTask(V, L, with_replacement=repl).sample(1, torch.Generator().manual_seed(seed))
    keys = batch.tokens[0, 0::2].tolist()
    values = (batch.targets[0, 0::2] - V).tolist()
    for t in range(L):
        expected = bijection_posterior_brute_force(list(zip(keys[:t], values[:t])), keys[t], V)
        np.testing.assert_allclose(batch.posterior[0, t].numpy(), expected, atol=1e-12)
        assert batch.posterior[0, t].sum().item() == pytest.approx(1.0)
        assert batch.entropy[0, t].item() == pytest.approx(-sum(p * math.log2(p) for p in expected if p > 0), abs=1e-6)


def test_bijection_without_replacement_entropy_is_log2_of_unrevealed():
    task = BijectionTask(10, 9)
    b = task.sample(64, torch.Generator().manual_seed(0))
    expected = torch.tensor([math.log2(10 - t) for t in range(9)])
    torch.testing.assert_close(b.entropy, expected.expand(64, 9))


def test_bijection_format():
    task = BijectionTask(6, 4)
    b = task.sample(3, torch.Generator().manual_seed(1))
    assert b.tokens.shape == (3, 7) and task.seq_len == 7 and task.vocab_size == 12
    assert (b.tokens[:, 0::2] < 6).all() and (b.tokens[:, 1::2] >= 6).all()
    assert (b.targets[:, 1::2] == -1).all()
    torch.testing.assert_close(b.targets[:, 0:-1:2], b.tokens[:, 1::2])  # each key's target is the next value
    for row in b.tokens:  # keys distinct without replacement; one value per key
        assert len(set(row[0::2].tolist())) == 4
    assert torch.equal(task.positions, torch.tensor([0, 2, 4, 6]))


def test_fresh_bijection_every_sequence():
    b = BijectionTask(8, 8).sample(200, torch.Generator().manual_seed(0))
    maps = {tuple(sorted(zip(r[0::2].tolist(), r[1::2].tolist()))) for r in b.tokens}
    assert len(maps) > 190


def test_bijection_runs_out_of_keys():
    with pytest.raises(ValueError, match=r"runs out of keys after 5: n_keys=6 needs n_values >= 6"):
        BijectionTask(5, 6)
    BijectionTask(5, 6, with_replacement=True)
    with pytest.raises(ValueError, match="n_values must be an int >= 2"):
        BijectionTask(1, 1)


def test_uniform_floor():
    assert uniform_floor_bits(20, 19) == pytest.approx(1.1073, abs=1e-4)
    assert uniform_floor_bits(10, 9) == pytest.approx(0.901, abs=1e-3)


# ---------------------------------------------------------------- HMM oracle


def _random_stochastic(rng, rows, cols):
    return rng.dirichlet(np.ones(cols), size=rows)


@settings(max_examples=40)
@given(S=st.integers(2, 3), O=st.integers(2, 3), K=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_forward_posterior_matches_enumeration(S, O, K, seed):
    rng = np.random.default_rng(seed)
    T, E = _random_stochastic(rng, S, S), _random_stochastic(rng, S, O)
    obs = rng.integers(0, O, size=K)
    post = forward_posterior(T, E, obs)
    assert post.shape == (K, S)
    np.testing.assert_allclose(post.sum(-1), 1.0)
    for t in range(K):
        np.testing.assert_allclose(post[t], hmm_posterior_brute_force(T, E, obs[: t + 1]), atol=1e-10)


@settings(max_examples=30)
@given(n=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_discretized_rows_are_exact_hundredths(n, seed):
    rng = np.random.default_rng(seed)
    h = discretized_rows(rng.dirichlet(np.ones(n), size=n))
    assert (h.sum(-1) == 100).all() and (h >= 5).all()


def test_hmm_format_and_posteriors():
    task = HMMTask(5, 5, 6)
    b = task.sample(4, torch.Generator().manual_seed(0))
    assert b.tokens.shape == (4, task.seq_len) and task.seq_len == 53 + 12
    assert (
        (b.tokens[:, 0] == task.TRANS).all()
        and (b.tokens[:, 26] == task.EMIT).all()
        and (b.tokens[:, 52] == task.SEP).all()
    )
    assert (b.tokens[:, task.positions - 1] == task.OBS).all()
    assert (b.tokens[:, task.positions] >= task.n_prob_tokens + 4).all()
    assert b.tokens.max() < task.vocab_size
    # the posterior is the forward algorithm on the matrices written in the context
    row = b.tokens[0].numpy()
    T = (row[1:26] + 5).reshape(5, 5) / 100
    E = (row[27:52] + 5).reshape(5, 5) / 100
    obs = row[task.positions.numpy()] - (task.n_prob_tokens + 4)
    np.testing.assert_allclose(b.posterior[0].numpy(), forward_posterior(T, E, obs), atol=1e-12)
    torch.testing.assert_close(b.entropy, entropy_bits(b.posterior).float())


def test_non_stochastic_matrices_refused():
    E = np.full((2, 2), 0.5)
    with pytest.raises(ValueError, match=r"transition matrix is not row-stochastic: row 1 sums to 0.9"):
        forward_posterior(np.array([[0.5, 0.5], [0.6, 0.3]]), E, [0, 1])
    with pytest.raises(ValueError, match="emission matrix row 0 has negative"):
        forward_posterior(np.full((2, 2), 0.5), np.array([[1.5, -0.5], [0.5, 0.5]]), [0])
    with pytest.raises(ValueError, match="observations must be"):
        forward_posterior(np.full((2, 2), 0.5), E, [0, 2])
    with pytest.raises(ValueError, match="2-D"):
        check_stochastic(np.ones(3), "m")


def test_hmm_task_validation():
    with pytest.raises(ValueError, match="n_states must be an int >= 2"):
        HMMTask(1, 5, 10)
    with pytest.raises(ValueError, match="cannot all be >= 0.05"):
        HMMTask(25, 5, 10)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("task", [BijectionTask(6, 5), HMMTask(3, 3, 4)], ids=["bijection", "hmm"])
def test_models_give_distributions_over_answers(task):
    b = task.sample(5, torch.Generator().manual_seed(0))
    for model in (
        TunnelTransformer(task, n_layer=2, n_head=2, n_embd=16),
        PrefixMLP(task, embd=4, width=16, depth=2),
        PositionMLP(task, width=16, depth=1),
    ):
        logq = predict(model, b.tokens)
        assert logq.shape == b.posterior.shape
        torch.testing.assert_close(logq.exp().sum(-1), torch.ones(b.posterior.shape[:2]))
        assert torch.isfinite(model.loss(b))


def test_prefix_mlp_cannot_see_the_future():
    task = BijectionTask(6, 5)
    model = PrefixMLP(task, embd=4, width=16, depth=2).eval()
    b = task.sample(2, torch.Generator().manual_seed(0))
    changed = b.tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % task.vocab_size  # tokens after scored position 4
    a, c = predict(model, b.tokens), predict(model, changed)
    torch.testing.assert_close(a[:, :3], c[:, :3])  # positions 0, 2, 4 unaffected
    assert not torch.allclose(a[:, 3:], c[:, 3:])


def test_capacity_matched_mlp_within_ten_percent():
    task = BijectionTask(10, 9)
    target = n_params(TunnelTransformer(task, n_layer=2, n_head=2, n_embd=32))
    mlp = matched_prefix_mlp(task, target, embd=8, depth=3)
    assert abs(n_params(mlp) - target) <= 0.1 * target
    pos = matched_position_mlp(task, target, depth=2)
    assert abs(n_params(pos) - target) <= 0.1 * target
    with pytest.raises(ValueError, match="within 10%"):
        matched_prefix_mlp(task, 50, embd=8, depth=3)


# ---------------------------------------------------------------- training and metrics


def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    task = BijectionTask(4, 4)
    cfg = TunnelTrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, seed=3, keep_steps=(0, 3))
    build = lambda: TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8)  # noqa: E731
    a = train_tunnel(task, build, cfg, cache=False)
    b = train_tunnel(task, build, cfg)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k])
    assert sorted(b.kept) == [0, 3]
    c = train_tunnel(task, build, cfg)  # from the cache
    assert c.history == b.history
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(v, c.model.state_dict()[k])
    assert not list(tmp_path.rglob("*.tmp"))
    assert not torch.equal(c.at_step(0).gpt.wte.weight, c.model.gpt.wte.weight)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TunnelTrainConfig(steps=0, batch_size=2, lr=1e-3)
    with pytest.raises(ValueError, match=r"keep_steps must lie in \[0, steps=5\]"):
        TunnelTrainConfig(steps=5, batch_size=2, lr=1e-3, keep_steps=(9,))


def test_calibration_of_the_oracle_itself_is_perfect():
    task = BijectionTask(8, 7, with_replacement=True)
    b = task.sample(50, torch.Generator().manual_seed(0))
    logq = b.posterior.clamp_min(1e-30).log()
    cal = calibration(logq, b)
    assert cal.entropy_mae == pytest.approx(0.0, abs=1e-9)
    assert cal.kl == pytest.approx(0.0, abs=1e-9) and cal.tv == pytest.approx(0.0, abs=1e-9)


def test_uniform_predictor_scores_the_floor():
    task = BijectionTask(10, 9)
    b = task.sample(20, torch.Generator().manual_seed(0))
    logq = torch.full(b.posterior.shape, -math.log(10), dtype=torch.float64)
    cal = calibration(logq, b)
    assert cal.entropy_mae == pytest.approx(uniform_floor_bits(10, 9), abs=1e-9)
    # KL(Bayes || uniform) = log2 V - H_Bayes
    assert cal.kl == pytest.approx(uniform_floor_bits(10, 9), abs=1e-9)


def test_kl_bits_and_shape_check():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert kl_bits(p, q).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        calibration(torch.zeros(2, 3, 4), BijectionTask(4, 4).sample(2, torch.Generator()))


def test_analyses_see_every_sequence_beyond_one_predict_chunk():
    """Captures keep only the last forward pass: the analyses must run one pass over all
    sequences (a 512-sequence chunked predict once left the probe with the last chunk)."""
    from lab.windtunnel.analysis import ablation_mae, entropy_probe, streams_at_positions

    task = BijectionTask(4, 4, with_replacement=True)
    torch.manual_seed(0)
    model = TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8).eval()
    b = task.sample(600, torch.Generator().manual_seed(0))
    feats = streams_at_positions(model, b.tokens, ["blocks.0.hook_resid_post"])
    assert feats["blocks.0.hook_resid_post"].shape == (600 * 4, 8)
    assert set(entropy_probe(model, b)) == {
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
        "blocks.0.hook_resid_post",
    }
    res = ablation_mae(model, b, mode="mean")
    assert len(res["attn"]) == len(res["mlp"]) == 1


def test_key_cosines_pairs_and_mean():
    from lab.windtunnel.analysis import key_cosines, key_orthogonality

    task = BijectionTask(5, 4)
    torch.manual_seed(0)
    model = TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8)
    cos = key_cosines(model, torch.arange(5))
    assert cos.shape == (2, 10)  # 2 heads, 5 choose 2 pairs
    assert ((cos >= 0) & (cos <= 1 + 1e-6)).all()
    assert key_orthogonality(model, torch.arange(5)) == pytest.approx(cos.mean().item())
