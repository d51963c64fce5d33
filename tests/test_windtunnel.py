"""Wind tunnels: the exact oracles (property tests against brute-force enumeration),
sequence formats, bad input, models, training cache and calibration metrics."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.windtunnel.metrics import (
    bayes_loss_nats,
    calibration,
    context_blind_floor,
    context_blind_kl_floor,
    kl_bits,
    predict,
)
from lab.windtunnel.models import (
    PaperMLP,
    PrefixMLP,
    TunnelTransformer,
    matched_paper_mlp,
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
@given(S=st.integers(2, 3), n_obs=st.integers(2, 3), K=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_forward_posterior_matches_enumeration(S, n_obs, K, seed):
    rng = np.random.default_rng(seed)
    T, E = _random_stochastic(rng, S, S), _random_stochastic(rng, S, n_obs)
    obs = rng.integers(0, n_obs, size=K)
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
        PaperMLP(task, width=16, depth=3),
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
    with pytest.raises(ValueError, match="within 10%"):
        matched_prefix_mlp(task, 50, embd=8, depth=3)


def test_paper_mlp_within_one_percent_and_context_blind():
    task = BijectionTask(20, 19)
    target = n_params(TunnelTransformer(task, n_layer=4, n_head=4, n_embd=64))
    mlp = matched_paper_mlp(task, target)
    assert abs(n_params(mlp) - target) <= 0.01 * target
    assert len(mlp.blocks) in (18, 19, 20)
    # each scored position sees its own token and position only: changing any other token changes nothing
    b = task.sample(3, torch.Generator().manual_seed(0))
    changed = b.tokens.clone()
    changed[:, 1::2] = (changed[:, 1::2] - 20 + 1) % 20 + 20  # every value token
    torch.testing.assert_close(predict(mlp, b.tokens), predict(mlp, changed))
    with pytest.raises(ValueError, match="within 1%"):
        matched_paper_mlp(task, 10, depths=(18,))
    with pytest.raises(ValueError, match="depths must be positive ints"):
        matched_paper_mlp(task, target, depths=())


def test_paper_mlp_trains_on_the_transformers_objective():
    """Bijection: next-token cross-entropy over the whole vocabulary at key positions, as the
    transformer; HMM: soft cross-entropy against the posterior."""
    task = BijectionTask(5, 4)
    torch.manual_seed(0)
    mlp = PaperMLP(task, width=8, depth=2)
    b = task.sample(4, torch.Generator().manual_seed(1))
    logits = mlp._logits(b.tokens)
    assert logits.shape == (4, 4, task.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.targets[:, task.positions].flatten())
    torch.testing.assert_close(mlp.loss(b), expected)
    hmm = HMMTask(3, 3, 4)
    hb = hmm.sample(4, torch.Generator().manual_seed(1))
    m = PaperMLP(hmm, width=8, depth=2)
    torch.testing.assert_close(m.loss(hb), -(hb.posterior.float() * m(hb.tokens)).sum(-1).mean())


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


# ---------------------------------------------------------------- paper scale, resume, safe loading


def test_paper_scale_shapes():
    """The gpu profile is the paper's scale: V=20 with 19 keys, 6 x 6 x d192 (2.67M
    parameters) for the bijection, 9 x 8 x d256 for the HMM at K=20, and MLPs matched to them."""
    from lab.profiles import get_profile
    from lab.windtunnel.scale import make_tasks, transformer_shape

    b = get_profile("gpu").bayes
    tasks = make_tasks(b)
    bij = tasks["bijection"]
    assert (bij.n_values, bij.n_keys, bij.seq_len) == (20, 19, 37)
    assert transformer_shape(b, "bijection") == (6, 6, 192)
    t = TunnelTransformer(bij, n_layer=6, n_head=6, n_embd=192)
    assert 2_600_000 < n_params(t) < 2_750_000  # the paper: 2.7M
    paper = matched_paper_mlp(bij, n_params(t), depths=b.paper_mlp_depths)
    assert abs(n_params(paper) - n_params(t)) <= 0.01 * n_params(t) and len(paper.blocks) in (18, 19, 20)
    assert abs(n_params(matched_prefix_mlp(bij, n_params(t), embd=b.mlp_embd, depth=b.mlp_depth)) - n_params(t)) <= (
        0.1 * n_params(t)
    )
    hmm = tasks["hmm"]
    assert (hmm.n_states, hmm.n_symbols, hmm.length) == (5, 5, 20)
    assert transformer_shape(b, "hmm") == (9, 8, 256)
    assert b.kept_steps[0] == 0 and b.kept_steps[-1] == b.bijection_steps  # curves over the whole run


class _Interrupted(Exception):
    pass


class _StopAfter:
    """A task whose sample() raises after n calls: a run killed mid-way."""

    def __init__(self, task, n):
        self.task, self.n, self.calls = task, n, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def __repr__(self):
        return repr(self.task)

    def sample(self, n, generator):
        self.calls += 1
        if self.calls > self.n:
            raise _Interrupted
        return self.task.sample(n, generator)


@pytest.mark.parametrize("kind", ["transformer", "paper-mlp"])
def test_paper_scale_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, kind):
    """At the paper's shapes on a few tiny steps: a run killed after step 5 resumes from its
    checkpoint at step 4 and ends with the weights, history and kept weights of a run that
    was never interrupted."""
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    task = BijectionTask(20, 19)
    target = 2_671_488

    def build():
        t = TunnelTransformer(task, n_layer=6, n_head=6, n_embd=192)
        return t if kind == "transformer" else matched_paper_mlp(task, target)

    cfg = TunnelTrainConfig(steps=7, batch_size=2, lr=3e-4, warmup_steps=2, seed=5, keep_steps=(0, 3, 7))
    straight = train_tunnel(task, build, cfg, cache=False)
    with pytest.raises(_Interrupted):
        train_tunnel(_StopAfter(task, 5), build, cfg, checkpoint_every=2)
    (ckpt,) = tmp_path.rglob("checkpoint.pt")
    assert not list(tmp_path.rglob("done.json"))
    resumed = train_tunnel(task, build, cfg, checkpoint_every=2)
    assert resumed.history == straight.history
    assert sorted(resumed.kept) == [0, 3, 7]
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(resumed.kept[3], straight.kept[3], rtol=0, atol=0)
    assert not ckpt.exists()  # the finished run keeps its weights, not the checkpoint
    assert not list(tmp_path.rglob("*.tmp"))


class _Planted:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("which", ["run.pt", "checkpoint.pt"])
def test_cache_refuses_a_planted_pickle(tmp_path, monkeypatch, capsys, which):
    """A pickle planted in the wind-tunnel cache (finished run or checkpoint) is refused with
    an error naming the file; its code never runs."""
    import pickle

    from lab.windtunnel.train import UnsafeCacheFile

    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    task = BijectionTask(4, 4)
    cfg = TunnelTrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
    build = lambda: TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8)  # noqa: E731
    train_tunnel(task, build, cfg)
    (run_dir,) = {p.parent for p in tmp_path.rglob("done.json")}
    if which == "checkpoint.pt":
        (run_dir / "done.json").unlink()
    with open(run_dir / which, "wb") as f:
        pickle.dump({"model": _Planted()}, f, protocol=2)
    with pytest.raises(UnsafeCacheFile, match=rf"refusing to load .*{which}.*not a plain weights file"):
        train_tunnel(task, build, cfg)
    assert "this must never run" not in capsys.readouterr().out


def test_cache_refuses_a_file_with_missing_entries(tmp_path, monkeypatch):
    from lab.windtunnel.train import UnsafeCacheFile

    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    task = BijectionTask(4, 4)
    cfg = TunnelTrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
    build = lambda: TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8)  # noqa: E731
    train_tunnel(task, build, cfg)
    (run_file,) = tmp_path.rglob("run.pt")
    torch.save({"model": {}}, run_file)
    with pytest.raises(UnsafeCacheFile, match=r"entries \['history', 'kept', 'wall_time_s'\] are missing"):
        train_tunnel(task, build, cfg)


def test_checkpoint_every_must_be_positive():
    task = BijectionTask(4, 4)
    cfg = TunnelTrainConfig(steps=2, batch_size=4, lr=1e-3)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        train_tunnel(task, lambda: TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8), cfg, checkpoint_every=0)


# ---------------------------------------------------------------- floors and measurements, by hand


def test_context_blind_floor_and_bayes_loss():
    task = BijectionTask(10, 9)
    b = task.sample(4000, torch.Generator().manual_seed(0))
    # the marginal posterior at every position is (close to) uniform: the uniform floor
    assert context_blind_floor(b) == pytest.approx(uniform_floor_bits(10, 9), abs=2e-3)
    assert bayes_loss_nats(b) == pytest.approx(sum(math.log(10 - t) for t in range(9)) / 9, abs=1e-6)
    # every sequence with the same posterior: ignoring the context loses nothing
    same = type(b)(
        b.tokens[:3], b.positions, b.targets[:3], b.posterior[:1].expand(3, -1, -1), b.entropy[:1].expand(3, -1)
    )
    assert context_blind_floor(same) == pytest.approx(0.0, abs=1e-12)
    assert context_blind_kl_floor(same) == pytest.approx(0.0, abs=1e-12)
    # KL to the average posterior: the uniform floor on the bijection; no context-blind
    # predictor does better (here: uniform, and a peaked guess of the right entropy)
    kl_floor = context_blind_kl_floor(b)
    assert kl_floor == pytest.approx(uniform_floor_bits(10, 9), abs=2e-3)
    uniform = torch.full(b.posterior.shape, -math.log(10), dtype=torch.float64)
    assert calibration(uniform, b).kl >= kl_floor - 1e-9
    hmm = HMMTask(3, 3, 5).sample(2000, torch.Generator().manual_seed(0))
    marginal = hmm.posterior.mean(0, keepdim=True).expand_as(hmm.posterior)
    assert calibration(marginal.log(), hmm).kl == pytest.approx(context_blind_kl_floor(hmm), abs=1e-9)
    other = (0.9 * marginal + 0.1 / 3).log()
    assert calibration(other, hmm).kl > context_blind_kl_floor(hmm)


def test_mean_abs_cosine_and_random_baseline_by_hand():
    from lab.windtunnel.analysis import mean_abs_cosine, random_cosine_baseline

    assert mean_abs_cosine(torch.eye(4)).item() == pytest.approx(0.0)
    assert mean_abs_cosine(torch.tensor([[1.0, 0.0], [2.0, 0.0], [-3.0, 0.0]])).item() == pytest.approx(1.0)
    assert mean_abs_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(math.sqrt(0.5))
    # three rows: pairs (0,1)=0, (0,2)=1, (1,2)=0 -> mean 1/3
    assert mean_abs_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])).item() == pytest.approx(1 / 3)
    # E|cos| between random directions: 2/pi in 2 dimensions, 1/2 in 3
    assert random_cosine_baseline(2) == pytest.approx(2 / math.pi)
    assert random_cosine_baseline(3) == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, generator=g)
    assert mean_abs_cosine(x).item() == pytest.approx(random_cosine_baseline(32), rel=0.03)


def _one_layer(task, seed=0):
    torch.manual_seed(seed)
    return TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8).eval()


def test_context_keys_are_the_keys_at_each_tokens_positions_averaged():
    from lab.windtunnel.analysis import context_keys, key_geometry, mean_abs_cosine

    task = BijectionTask(4, 4)
    model = _one_layer(task)
    b = task.sample(30, torch.Generator().manual_seed(0))
    values = torch.arange(4, 8)
    keys = context_keys(model, b.tokens, values)
    assert keys.shape == (1, 2, 4, 4)  # layers, heads, tokens, d_head
    gpt = model.gpt
    with torch.no_grad():
        x = gpt.wte(b.tokens) + gpt.wpe(torch.arange(b.tokens.size(1)))
        k = gpt.blocks[0].attn.c_attn(gpt.blocks[0].ln_1(x))[..., 8:16].reshape(30, -1, 2, 4)
    for j, v in enumerate(values.tolist()):
        torch.testing.assert_close(keys[0, :, j], k[b.tokens == v].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(key_geometry(model, b.tokens, values), mean_abs_cosine(keys).float())
    with pytest.raises(ValueError, match="token 99 never occurs"):
        context_keys(model, b.tokens, torch.tensor([99]))


def test_attention_values_through_the_output_projection_are_the_attention_output():
    """Each head's attention-weighted values, concatenated, are what c_proj turns into the
    attention sub-layer's write: c_proj(values) == hook_attn_out at the scored positions."""
    from lab.inspect import capture
    from lab.windtunnel.analysis import attention_values

    task = HMMTask(3, 3, 4)
    model = _one_layer(task)
    b = task.sample(5, torch.Generator().manual_seed(0))
    z = attention_values(model, b.tokens)
    assert z.shape == (5 * 4, 8)
    with torch.no_grad(), capture(model.gpt, ["blocks.0.hook_attn_out"]) as cache:
        model(b.tokens)
        out = model.gpt.blocks[0].attn.c_proj(z)
    torch.testing.assert_close(
        out, cache["blocks.0.hook_attn_out"][:, model.positions].reshape(-1, 8), atol=1e-5, rtol=1e-4
    )
    with pytest.raises(ValueError, match=r"layer must lie in \[0, 1\)"):
        attention_values(model, b.tokens, layer=1)


def test_standardised_and_pc1_against_entropy_by_hand():
    from lab.windtunnel.analysis import _pc1_against_entropy, standardised

    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    z = standardised(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(z[:, [0, 2]].std(0, unbiased=False), torch.ones(2))
    assert (z[:, 1] == 0).all()  # a constant feature stays 0
    # points on a line ordered by entropy: PC1 carries all the variance and ranks them as H does
    task = BijectionTask(6, 5, with_replacement=True)
    b = task.sample(40, torch.Generator().manual_seed(0))
    h = b.entropy.reshape(-1, 1)
    points = h * torch.tensor([[2.0, -1.0, 0.5]]) + torch.tensor([[1.0, 2.0, 3.0]])
    m = _pc1_against_entropy(standardised(points), b, 5)
    assert m["pc1_share"] == pytest.approx(1.0, abs=1e-5) and m["rho"] == pytest.approx(1.0, abs=1e-9)
    assert m["rho_within_position"] == pytest.approx(1.0, abs=1e-9)  # positions 1.. vary with repeated keys
