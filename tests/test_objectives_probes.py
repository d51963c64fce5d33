"""Tests of the pretraining objectives (clm, prefix LM, masked LM) and what the trainer
records for them, of linear probes with control tasks, and of the ablation helpers that
compare training runs."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.ablations import (
    block_grad_norms,
    compare_runs,
    expert_load,
    mean_curve,
    normalized_entropy,
    summary_rows,
)
from lab.inspect.probes import ProbeResult, control_labels, fit_probe
from lab.models import GPT, GPTConfig
from lab.train import CheckpointError, TrainConfig, evaluate, make_optimizer, train, train_step
from lab.train.objectives import OBJECTIVES, next_token_nll, objective_batch

VOCAB = 12  # the toy data's ids are 0..11
MODEL = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16)
MLM_MODEL = replace(MODEL, vocab_size=VOCAB + 1)


def make_data(identity: str = "toy-pattern") -> SimpleNamespace:
    """A learnable repeating pattern over ids 0..11 with a little noise (as in test_train)."""
    rng = np.random.default_rng(0)
    tokens = np.tile(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 5, 7]), 300)
    noise = rng.random(len(tokens)) < 0.05
    tokens[noise] = rng.integers(0, VOCAB, noise.sum())
    tokens = tokens.astype(np.uint16)
    return SimpleNamespace(train=tokens[:3500], val=tokens[3500:], identity=identity)


DATA = make_data()


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=5, batch_size=4, lr=3e-3, warmup_steps=1, eval_interval=5, eval_batches=2)
    return TrainConfig(**{**base, **overrides})


def batch(B=3, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- objective_batch


def test_clm_batch_is_the_causal_batch():
    x, y = batch()
    inputs, targets, prefix = objective_batch("clm", x, y, generator=gen())
    assert inputs is x and targets is y and prefix is None


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(2, 20), seed=st.integers(0, 2**16))
def test_prefix_lm_scores_exactly_the_tokens_after_the_prefix(B, T, seed):
    x, y = batch(B, T, seed)
    inputs, targets, k = objective_batch("prefix_lm", x, y, generator=gen(seed))
    assert torch.equal(inputs, x)
    assert k.shape == (B,) and k.dtype == torch.long
    assert ((k >= 1) & (k <= T - 1)).all()
    for row in range(B):
        kk = int(k[row])
        # position i predicts x[i+1]: inside the prefix that token is visible, so not scored
        assert (targets[row, : kk - 1] == -1).all()
        assert torch.equal(targets[row, kk - 1 :], y[row, kk - 1 :])


def test_prefix_lm_draws_every_prefix_length_and_reproducibly():
    x, y = batch(B=400, T=6)
    _, t1, k = objective_batch("prefix_lm", x, y, generator=gen(1))
    assert set(k.tolist()) == {1, 2, 3, 4, 5}
    _, t2, k2 = objective_batch("prefix_lm", x, y, generator=gen(1))
    assert torch.equal(k, k2) and torch.equal(t1, t2)
    _, _, k3 = objective_batch("prefix_lm", x, y, generator=gen(2))
    assert not torch.equal(k, k3)


def test_prefix_lm_needs_two_tokens():
    x, y = batch(T=1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        objective_batch("prefix_lm", x, y, generator=gen())


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 20), p=st.floats(0.01, 0.9), seed=st.integers(0, 2**16))
def test_mlm_masks_exactly_the_scored_positions(B, T, p, seed):
    x, y = batch(B, T, seed)
    mask_id = VOCAB
    inputs, targets, prefix = objective_batch("mlm", x, y, generator=gen(seed), mask_prob=p, mask_id=mask_id)
    scored = targets != -1
    assert scored.any(dim=1).all()  # at least one prediction per row
    assert torch.equal(inputs == mask_id, scored)
    assert torch.equal(targets[scored], x[scored])  # the original token, not the next one
    assert torch.equal(inputs[~scored], x[~scored])
    assert torch.equal(prefix, torch.full((B,), T))  # fully bidirectional


def test_mlm_masks_about_mask_prob_of_the_positions():
    x, y = batch(B=64, T=64)
    for p in (0.15, 0.5):
        _, targets, _ = objective_batch("mlm", x, y, generator=gen(), mask_prob=p, mask_id=VOCAB)
        fraction = (targets != -1).float().mean().item()
        assert fraction == pytest.approx(p, abs=0.03)


def test_objective_batch_validates():
    x, y = batch()
    with pytest.raises(ValueError, match=r"objective must be one of \('clm', 'prefix_lm', 'mlm'\), got 'bert'"):
        objective_batch("bert", x, y, generator=gen())
    with pytest.raises(ValueError, match="mask_id"):
        objective_batch("mlm", x, y, generator=gen())
    assert OBJECTIVES == ("clm", "prefix_lm", "mlm")


def within_binomial(k: int, n: int, p: float, z: float = 5.0) -> bool:
    """k successes of n plausible at rate p: within z standard deviations of n * p."""
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("seed", [0, 7])
def test_mask_strategy_mask_is_the_all_mask_batch_draw_for_draw(seed):
    x, y = batch(B=8, T=32, seed=seed)
    # the all-[MASK] recipe, written out: positions at rate p, one forced per row
    expected_gen = gen(seed)
    masked = torch.rand(8, 32, generator=expected_gen) < 0.2
    masked[torch.arange(8), torch.randint(0, 32, (8,), generator=expected_gen)] = True
    g = gen(seed)
    inputs, targets, _ = objective_batch("mlm", x, y, generator=g, mask_prob=0.2, mask_id=VOCAB, mask_strategy="mask")
    assert torch.equal(inputs, torch.where(masked, VOCAB, x))
    assert torch.equal(targets, torch.where(masked, x, -1))
    assert torch.equal(g.get_state(), expected_gen.get_state())  # no extra draws
    default = objective_batch("mlm", x, y, generator=gen(seed), mask_prob=0.2, mask_id=VOCAB)
    assert torch.equal(default[0], inputs) and torch.equal(default[1], targets)


def test_mask_strategy_bert_is_80_10_10_on_the_same_positions():
    x, y = batch(B=200, T=100)
    mask_inputs, mask_targets, _ = objective_batch("mlm", x, y, generator=gen(3), mask_id=VOCAB)
    inputs, targets, _ = objective_batch("mlm", x, y, generator=gen(3), mask_id=VOCAB, mask_strategy="bert")
    assert torch.equal(targets, mask_targets)  # the same positions, all still predicted
    chosen = targets != -1
    assert torch.equal(inputs[~chosen], x[~chosen])
    got, original = inputs[chosen], x[chosen]
    n = int(chosen.sum())
    # a random replacement is uniform over the VOCAB non-[MASK] ids, so 1 in VOCAB of them is the original
    assert within_binomial(int((got == VOCAB).sum()), n, 0.8)
    assert within_binomial(int((got == original).sum()), n, 0.1 + 0.1 / VOCAB)
    replaced = got[(got != VOCAB) & (got != original)]
    assert within_binomial(len(replaced), n, 0.1 * (VOCAB - 1) / VOCAB)
    assert set(replaced.tolist()) == set(range(VOCAB))  # every non-[MASK] id, nothing else
    again = objective_batch("mlm", x, y, generator=gen(3), mask_id=VOCAB, mask_strategy="bert")[0]
    assert torch.equal(again, inputs)


def test_mask_strategy_bert_never_draws_the_mask_id():
    # with mask_id=1 the only legal random token is 0 (the data's own id): [MASK] stays at 80%,
    # where drawing from [0, mask_id] would give 85%
    x = torch.zeros(400, 100, dtype=torch.long)
    inputs, targets, _ = objective_batch("mlm", x, x, generator=gen(), mask_id=1, mask_strategy="bert")
    got = inputs[targets != -1]
    assert set(got.tolist()) == {0, 1}
    assert within_binomial(int((got == 1).sum()), len(got), 0.8)
    with pytest.raises(ValueError, match="mask_id=0"):
        objective_batch("mlm", x, x, generator=gen(), mask_id=0, mask_strategy="bert")


@pytest.mark.parametrize("bad", ["span", "BERT", None])
def test_mask_strategy_is_validated(bad):
    x, y = batch()
    with pytest.raises(ValueError, match=rf"mask_strategy must be one of \('mask', 'bert'\), got {bad!r}"):
        objective_batch("mlm", x, y, generator=gen(), mask_id=VOCAB, mask_strategy=bad)
    with pytest.raises(ValueError, match=rf"TrainConfig.mask_strategy must be one of .*got {bad!r}"):
        config(mask_strategy=bad)


# ---------------------------------------------------------------- next_token_nll


@pytest.fixture(scope="module")
def mlm_model() -> GPT:
    torch.manual_seed(0)
    return GPT(replace(MLM_MODEL, init_std=0.1))


def windows(B=3, L=12, seed=5):
    return torch.randint(0, VOCAB, (B, L), generator=gen(seed))


def test_next_token_nll_clm_is_the_cross_entropy_of_the_causal_logits(mlm_model):
    w, positions = windows(), [1, 4, 7, 11]
    nll = next_token_nll(mlm_model, "clm", w, positions)
    assert nll.shape == (3, 4)
    with torch.no_grad():
        full = mlm_model.eval()(w)[0]
    for col, t in enumerate(positions):
        expected = F.cross_entropy(full[:, t - 1], w[:, t], reduction="none")
        torch.testing.assert_close(nll[:, col], expected, atol=1e-5, rtol=1e-5)


def test_next_token_nll_prefix_lm_and_mlm_use_their_own_contexts(mlm_model):
    w, positions = windows(), [2, 6, 9]
    prefix = next_token_nll(mlm_model, "prefix_lm", w, positions)
    mlm = next_token_nll(mlm_model, "mlm", w, positions)
    with torch.no_grad():
        for col, t in enumerate(positions):
            logits = mlm_model(w[:, :t], prefix_len=t)[0][:, -1]
            torch.testing.assert_close(prefix[:, col], F.cross_entropy(logits, w[:, t], reduction="none"))
            masked = torch.cat((w[:, :t], torch.full((3, 1), VOCAB)), dim=1)  # [MASK] = last id
            logits = mlm_model(masked, prefix_len=t + 1)[0][:, -1]
            torch.testing.assert_close(mlm[:, col], F.cross_entropy(logits, w[:, t], reduction="none"))
    # bidirectional contexts are not causal ones: the numbers differ from clm's
    assert not torch.allclose(prefix, next_token_nll(mlm_model, "clm", w, positions), atol=1e-5)


def test_next_token_nll_never_looks_at_the_target_or_beyond(mlm_model):
    w = windows()
    changed = w.clone()
    changed[:, 4:] = (w[:, 4:] + 1) % VOCAB
    for objective in OBJECTIVES:
        a = next_token_nll(mlm_model, objective, w, [2, 3, 4, 9])
        b = next_token_nll(mlm_model, objective, changed, [2, 3, 4, 9])
        # predicting tokens 2 and 3 uses only tokens before them
        torch.testing.assert_close(a[:, :2], b[:, :2], atol=0, rtol=0)
        assert not torch.allclose(a[:, 2:], b[:, 2:])  # the target itself changed


def test_next_token_nll_restores_the_mode_and_validates_positions(mlm_model):
    mlm_model.train()
    next_token_nll(mlm_model, "prefix_lm", windows(), [3])
    assert mlm_model.training
    mlm_model.eval()
    for positions in ([0, 3], [12], []):
        with pytest.raises(ValueError, match="positions"):
            next_token_nll(mlm_model, "clm", windows(), positions)
    with pytest.raises(ValueError, match="objective"):
        next_token_nll(mlm_model, "causal", windows(), [3])


# ---------------------------------------------------------------- training with objectives


@pytest.mark.parametrize("objective, model_config", [("prefix_lm", MODEL), ("mlm", MLM_MODEL)])
def test_train_runs_each_objective(objective, model_config):
    result = train(model_config, config(objective=objective), DATA, progress=False)
    assert result.steps == 5 and result.train_config.objective == objective
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert math.isfinite(result.final_val_loss)


@pytest.mark.parametrize("objective, model_config", [("clm", MODEL), ("prefix_lm", MODEL), ("mlm", MLM_MODEL)])
def test_train_feeds_the_objectives_batches_to_each_step(objective, model_config, monkeypatch):
    import lab.train.trainer as trainer_module

    seen = []
    real_step = trainer_module.train_step

    def spy(model, optimizer, x, y, **kw):
        seen.append((x.clone(), y.clone(), kw.get("prefix_len")))
        return real_step(model, optimizer, x, y, **kw)

    monkeypatch.setattr(trainer_module, "train_step", spy)
    tc = config(objective=objective)
    result = train(model_config, tc, DATA, progress=False)
    assert len(seen) == 5
    T = model_config.block_size
    for x, y, prefix in seen:
        if objective == "clm":
            assert prefix is None and (y != -1).all()
        elif objective == "prefix_lm":
            assert prefix.shape == (4,) and ((prefix >= 1) & (prefix < T)).all()
            assert ((y == -1).sum(1) == prefix - 1).all()
        else:
            assert torch.equal(prefix, torch.full((4,), T))
            assert torch.equal(x == VOCAB, y != -1)  # [MASK] = vocab_size - 1 = 12
    # evaluations score the same objective, on evaluate()'s fixed batches and masks
    kw = dict(block_size=T, batch_size=tc.batch_size, n_batches=tc.eval_batches, objective=objective)
    assert result.final_val_loss == evaluate(result.model, DATA.val, **kw)


def test_train_mlm_with_bert_masking(tmp_path, monkeypatch):
    import lab.train.trainer as trainer_module

    seen = []
    real_step = trainer_module.train_step

    def spy(model, optimizer, x, y, **kw):
        seen.append((x.clone(), y.clone()))
        return real_step(model, optimizer, x, y, **kw)

    monkeypatch.setattr(trainer_module, "train_step", spy)
    tc = config(objective="mlm", mask_strategy="bert")
    result = train(MLM_MODEL, tc, DATA, out_dir=tmp_path, progress=False)
    assert result.steps == 5 and result.train_config.to_dict()["mask_strategy"] == "bert"
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    inputs = torch.cat([x[y != -1] for x, y in seen])
    assert (inputs == VOCAB).any() and (inputs != VOCAB).any()  # some predicted tokens are not [MASK]
    kw = dict(block_size=16, batch_size=4, n_batches=2, objective="mlm")
    assert result.final_val_loss == evaluate(result.model, DATA.val, **kw)  # evaluation masks every chosen position
    with pytest.raises(CheckpointError, match="mask_strategy: checkpoint 'bert' != now 'mask'"):
        train(MLM_MODEL, config(objective="mlm"), DATA, out_dir=tmp_path, resume=True, progress=False)


def test_mlm_refuses_a_vocab_without_a_free_mask_id():
    with pytest.raises(ValueError, match=r"objective 'mlm' uses the last vocabulary id \(11\) as \[MASK\].*up to 11"):
        train(MODEL, config(objective="mlm"), DATA, progress=False)


def test_evaluate_scores_the_objective_with_fixed_masks(mlm_model):
    kw = dict(block_size=16, batch_size=4, n_batches=3)
    mlm = evaluate(mlm_model, DATA.val, **kw, objective="mlm")
    assert mlm == evaluate(mlm_model, DATA.val, **kw, objective="mlm")  # the same masks every time
    assert mlm != evaluate(mlm_model, DATA.val, **kw)
    assert mlm != evaluate(mlm_model, DATA.val, **kw, objective="prefix_lm")


@pytest.mark.parametrize(
    "field, value", [("objective", "bert"), ("mask_prob", 0.0), ("mask_prob", 1.0), ("mask_prob", "0.2")]
)
def test_train_config_validates_the_objective(field, value):
    with pytest.raises(ValueError, match=field):
        config(**{field: value})


def test_history_records_per_block_gradient_norms():
    result = train(MODEL, config(), DATA, progress=False)
    assert len(result.history) == 5
    for h in result.history:
        assert set(h) == {"step", "lr", "train_loss", "grad_norm", "block_grad_norms"}
        norms = h["block_grad_norms"]
        assert len(norms) == MODEL.n_layer and all(n > 0 and math.isfinite(n) for n in norms)
        # the blocks hold a subset of the parameters: their norms fit inside the total
        assert sum(n * n for n in norms) <= h["grad_norm"] ** 2 * (1 + 1e-5)


def test_train_step_block_norms_are_the_pre_clip_gradient_norms():
    torch.manual_seed(0)
    model = GPT(MODEL)
    optimizer = make_optimizer(model, config())
    x, y = batch(4, 16)
    stats = {}
    # grad_clip=0: the gradients are left unscaled, so they can be checked after the step
    loss, total = train_step(model, optimizer, x, y, grad_clip=0.0, stats=stats)
    expected = [torch.sqrt(sum(p.grad.pow(2).sum() for p in block.parameters())).item() for block in model.blocks]
    assert stats["block_grad_norms"] == pytest.approx(expected, rel=1e-5)
    assert "expert_load" not in stats and "aux_loss" not in stats
    # with clipping, the recorded norms are still the pre-clip ones
    torch.manual_seed(0)
    model2 = GPT(MODEL)
    stats2 = {}
    train_step(model2, make_optimizer(model2, config()), x, y, grad_clip=1e-3, stats=stats2)
    assert stats2["block_grad_norms"] == pytest.approx(expected, rel=1e-5)


def test_train_step_prefix_len_changes_the_loss():
    torch.manual_seed(0)
    model = GPT(replace(MODEL, init_std=0.1))
    x, y = batch(4, 16)
    causal, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, grad_clip=1.0)
    prefix, _ = train_step(
        model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, grad_clip=1.0, prefix_len=torch.full((4,), 8)
    )
    assert causal != prefix


def test_resume_refuses_a_different_objective(tmp_path):
    kw = dict(out_dir=tmp_path, progress=False)
    train(MLM_MODEL, config(), DATA, **kw)
    with pytest.raises(CheckpointError, match="objective: checkpoint 'clm' != now 'mlm'"):
        train(MLM_MODEL, config(objective="mlm"), DATA, resume=True, **kw)
    with pytest.raises(CheckpointError, match="mask_prob: checkpoint 0.15 != now 0.3"):
        train(MLM_MODEL, config(mask_prob=0.3), DATA, resume=True, **kw)


def test_mlm_resume_reproduces_an_uninterrupted_run(tmp_path):
    tc = config(max_steps=6, eval_interval=3, objective="mlm")
    full = train(MLM_MODEL, tc, DATA, progress=False)
    train(MLM_MODEL, tc, DATA, out_dir=tmp_path, progress=False, stop_after=4)
    resumed = train(MLM_MODEL, tc, DATA, out_dir=tmp_path, resume=True, progress=False)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]


# ---------------------------------------------------------------- probes


def blobs(n, d=8, n_classes=3, seed=0, spread=0.3):
    g = gen(seed)
    centres = torch.randn(n_classes, d, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, d, generator=g), labels


def test_probe_reads_linearly_separable_labels():
    train_x, train_y = blobs(300, seed=0)
    test_x, test_y = blobs(200, seed=1)
    result = fit_probe(train_x, train_y, test_x, test_y)
    assert isinstance(result, ProbeResult)
    assert result.accuracy > 0.95 and result.train_accuracy > 0.95
    assert (result.n_train, result.n_test) == (300, 200)
    majority = torch.bincount(train_y).argmax()
    assert result.majority == pytest.approx((test_y == majority).float().mean().item())
    assert result.majority < 0.6


def test_probe_on_random_labels_is_at_chance():
    g = gen(3)
    train_x, test_x = torch.randn(200, 16, generator=g), torch.randn(1000, 16, generator=g)
    train_y, test_y = torch.randint(0, 2, (200,), generator=g), torch.randint(0, 2, (1000,), generator=g)
    result = fit_probe(train_x, train_y, test_x, test_y)
    assert 0.42 < result.accuracy < 0.58
    assert result.train_accuracy > result.accuracy  # what it fits is memorised noise


def test_probe_is_deterministic_for_a_seed():
    train_x, train_y = blobs(100, spread=3.0)
    test_x, test_y = blobs(100, seed=1, spread=3.0)
    a = fit_probe(train_x, train_y, test_x, test_y, steps=50)
    assert a == fit_probe(train_x, train_y, test_x, test_y, steps=50)


def test_probe_accepts_float64_features():
    train_x, train_y = blobs(100)
    test_x, test_y = blobs(50, seed=1)
    result = fit_probe(train_x.double(), train_y, test_x.double(), test_y, steps=50)
    assert result.accuracy > 0.9


def test_probe_handles_test_labels_unseen_in_training():
    train_x, train_y = blobs(60, n_classes=2)
    test_x = torch.randn(10, 8)
    test_y = torch.full((10,), 4)  # a class the probe never saw: it can't be right
    result = fit_probe(train_x, train_y, test_x, test_y, steps=20)
    assert result.accuracy == 0.0 and result.majority == 0.0


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(10), torch.zeros(10, dtype=torch.long)), "train features"),
        ((torch.randint(0, 3, (10, 4)), torch.zeros(10, dtype=torch.long)), "train features"),
        ((torch.randn(10, 4), torch.zeros(10)), "train labels"),
        ((torch.randn(10, 4), torch.zeros(10, 1, dtype=torch.long)), "train labels"),
        ((torch.randn(10, 4), torch.zeros(9, dtype=torch.long)), "10 feature rows but 9 labels"),
        ((torch.randn(0, 4), torch.zeros(0, dtype=torch.long)), "need equal, > 0"),
    ],
)
def test_probe_validates_shapes(args, match):
    test_x, test_y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        fit_probe(*args, test_x, test_y)


def test_probe_validates_test_split_and_matching_dims():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="test"):
        fit_probe(x, y, torch.randn(5, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="4 dims, test features 3"):
        fit_probe(x, y, torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


def test_control_labels_give_each_type_one_label():
    g = gen(0)
    types = torch.randint(0, 30, (500,), generator=g)
    labels = torch.randint(0, 5, (500,), generator=g) * 2  # only even labels exist
    control = control_labels(types, labels, seed=0)
    assert control.shape == labels.shape and control.dtype == labels.dtype
    for t in types.unique():
        assert control[types == t].unique().numel() == 1
    assert set(control.tolist()) <= set(labels.tolist())
    assert len(set(control.tolist())) > 1  # random over types, not constant
    assert torch.equal(control, control_labels(types, labels, seed=0))
    assert not torch.equal(control, control_labels(types, labels, seed=1))


def test_a_probe_fits_control_labels_only_by_memorising_types():
    # one-hot token types: a linear probe can memorise seen types, not generalise to new ones
    types = torch.arange(40).repeat(5)
    labels = torch.randint(0, 2, (200,), generator=gen(1))
    control = control_labels(types, labels, seed=0)
    feats = F.one_hot(types, 80).float() + 0.01 * torch.randn(200, 80, generator=gen(2))
    fitted = fit_probe(feats, control, feats, control)
    assert fitted.accuracy > 0.95


def test_control_labels_validate_shapes():
    with pytest.raises(ValueError, match=r"token_types \(3,\) and labels \(4,\)"):
        control_labels(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------- ablation helpers


def test_normalized_entropy():
    assert normalized_entropy([0.25] * 4) == pytest.approx(1.0)
    assert normalized_entropy([0.0, 1.0, 0.0, 0.0]) == pytest.approx(0.0)
    assert normalized_entropy([3, 3, 3]) == pytest.approx(1.0)  # counts are normalised
    assert 0 < normalized_entropy([0.7, 0.1, 0.1, 0.1]) < 1
    loads = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.9, 0.1], [0.0, 1.0]]])
    out = normalized_entropy(loads)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[1.0, 0.0], [-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2), 0.0]])


@pytest.fixture(scope="module")
def runs():
    """Two variants: 'base' over seeds 0 and 1, 'wide' over seed 0 only. 5 steps each."""
    tc = config(eval_interval=2)
    return {
        "base": {s: train(MODEL, replace(tc, seed=s), DATA, progress=False) for s in (0, 1)},
        "wide": {0: train(replace(MODEL, n_embd=32), tc, DATA, progress=False)},
    }


def test_summary_rows_one_per_variant_with_intervals(runs):
    rows = summary_rows(runs, baseline="base")
    assert [r["variant"] for r in rows] == ["base", "wide"]
    base, wide = rows
    assert {"architecture", "parameters", "seeds", "final val loss", "95% interval", "train tok/s"} <= set(base)
    assert base["seeds"] == 2 and wide["seeds"] == 1
    finals = [r.final_val_loss for r in runs["base"].values()]
    assert base["final val loss"] == pytest.approx(np.mean(finals), abs=1e-4)
    low, high = (float(v) for v in base["95% interval"].strip("[]").split(", "))
    assert low < np.mean(finals) < high
    assert wide["95% interval"] == "n/a (1 seed)"
    assert wide["parameters"] == runs["wide"][0].model.num_params() > base["parameters"]
    assert base["architecture"] == MODEL.describe()
    assert "minus base" not in base
    diff = runs["wide"][0].final_val_loss - runs["base"][0].final_val_loss
    assert wide["minus base"] == pytest.approx(diff, abs=1e-4)


def test_mean_curve_averages_the_seeds(runs):
    steps, values = mean_curve(runs["base"])
    assert steps == [0, 2, 4, 5]
    expected = np.mean([[e["val_loss"] for e in r.evals] for r in runs["base"].values()], axis=0)
    np.testing.assert_allclose(values, expected)
    steps, train_values = mean_curve(runs["wide"], key="train_loss")
    assert train_values == [e["train_loss"] for e in runs["wide"][0].evals]


class FakeOutcome:
    def __init__(self):
        self.records, self.plots, self.tables = [], [], []

    def record(self, metric, value, *, seed=None, unit=""):
        self.records.append((metric, value, seed, unit))

    def plot_lines(self, name, lines, **kw):
        self.plots.append((name, lines, kw))

    def table(self, name, rows, caption=""):
        self.tables.append((name, rows, caption))


def test_compare_runs_records_plots_and_tabulates(runs):
    outcome = FakeOutcome()
    compare_runs(outcome, runs, title="width", baseline="base")
    assert sorted(outcome.records) == sorted(
        [("base_val_loss", runs["base"][s].final_val_loss, s, "nats/token") for s in (0, 1)]
        + [("wide_val_loss", runs["wide"][0].final_val_loss, 0, "nats/token")]
    )
    ((name, lines, kw),) = outcome.plots
    assert name == "val_curves" and set(lines) == {"base", "wide"} and kw["title"] == "width"
    assert lines["base"] == mean_curve(runs["base"])
    ((name, rows, _),) = outcome.tables
    assert name == "final_losses" and rows == summary_rows(runs, baseline="base")


def test_summary_rows_rejects_an_unknown_baseline(runs):
    with pytest.raises(ValueError, match="baseline"):
        summary_rows(runs, baseline="nonexistent")


@pytest.mark.parametrize("bad", [{}, {"a": {}}, {"a": {0: "not a run"}}])
def test_run_helpers_validate_runs(bad):
    with pytest.raises(ValueError, match="runs"):
        summary_rows(bad)
    with pytest.raises(ValueError, match="runs"):
        compare_runs(FakeOutcome(), bad, title="x")


def test_block_grad_norms_from_history(runs):
    run = runs["base"][0]
    norms = block_grad_norms(run)
    assert norms.shape == (5, MODEL.n_layer)
    np.testing.assert_allclose(norms, [h["block_grad_norms"] for h in run.history])
    assert block_grad_norms(run, steps=3).shape == (3, MODEL.n_layer)
    old = replace(run, history=[{k: v for k, v in h.items() if k != "block_grad_norms"} for h in run.history])
    with pytest.raises(ValueError, match="no per-block gradient norms"):
        block_grad_norms(old)


def test_expert_load_from_history(runs):
    with pytest.raises(ValueError, match="not a mixture-of-experts"):
        expert_load(runs["base"][0])
    moe = train(replace(MODEL, n_expert=3, moe_top_k=1), config(max_steps=3), DATA, progress=False)
    load = expert_load(moe)
    assert load.shape == (3, MODEL.n_layer, 3)
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-6)
    entropy = normalized_entropy(load)
    assert entropy.shape == (3, MODEL.n_layer) and ((entropy >= 0) & (entropy <= 1 + 1e-9)).all()
