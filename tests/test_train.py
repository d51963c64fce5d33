"""Unit tests of lab.train: schedule, checkpoints, the training loop and exact resume."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lab.train.checkpoint as checkpoint_module
from lab.models import GPT, GPTConfig
from lab.train import (
    CheckpointError,
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    evaluate,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    train,
)

MODEL = GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=32)


def make_data(identity: str = "toy-pattern") -> SimpleNamespace:
    """Stand-in for lab.data: a learnable repeating pattern with a little noise."""
    rng = np.random.default_rng(0)
    tokens = np.tile(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 5, 7]), 400)
    noise = rng.random(len(tokens)) < 0.05
    tokens[noise] = rng.integers(0, 12, noise.sum())
    tokens = tokens.astype(np.uint16)
    return SimpleNamespace(train=tokens[:5000], val=tokens[5000:], identity=identity)


DATA = make_data()


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=20, batch_size=4, lr=3e-3, warmup_steps=3, eval_interval=10, eval_batches=2)
    return TrainConfig(**{**base, **overrides})


def losses(result_or_history) -> list[float]:
    history = getattr(result_or_history, "history", result_or_history)
    return [h["train_loss"] for h in history]


# ---------------------------------------------------------------- schedule


def test_lr_schedule_warmup_peak_decay_floor():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(100)]
    warm = lrs[:11]
    steps = np.diff(warm)
    assert np.allclose(steps, steps[0]) and steps[0] > 0  # linear climb
    assert lrs[0] > 0  # no update is wasted at lr 0
    assert max(lrs) == lrs[10] == 1.0  # peak at the end of warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.1)  # the last update runs at the floor
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_lr_schedule_without_warmup_starts_at_peak():
    assert lr_at(0, lr=2.0, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == 2.0
    assert lr_at(9, lr=2.0, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == pytest.approx(0.0)
    assert lr_at(0, lr=2.0, warmup_steps=0, max_steps=1, min_lr_ratio=0.5) == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=-1), "step"),
        (dict(lr=0.0), "lr"),
        (dict(warmup_steps=11), "warmup_steps"),
        (dict(max_steps=0), "max_steps"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_lr_schedule_validates(kwargs, match):
    args = {**dict(step=0, lr=1.0, warmup_steps=2, max_steps=10, min_lr_ratio=0.1), **kwargs}
    step = args.pop("step")
    with pytest.raises(ValueError, match=match):
        lr_at(step, **args)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_steps", 0),
        ("batch_size", 2.0),
        ("lr", -1.0),
        ("lr", float("nan")),
        ("warmup_steps", 50),
        ("beta2", 1.0),
        ("grad_clip", -1.0),
        ("eval_interval", 0),
        ("device", "tpu-ish"),
    ],
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        config(**{field: value})


def test_train_config_round_trips_and_rejects_unknown_keys():
    tc = config()
    assert TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict()))) == tc
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({**tc.to_dict(), "learning_rate": 1.0})


# ---------------------------------------------------------------- checkpoints


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(MODEL)


def test_checkpoint_round_trip_gives_identical_logits_and_keeps_tying(model, tmp_path):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ck", model=model, optimizer=optimizer, step=7, model_config=MODEL, extra={"a": 1})

    ckpt = load_checkpoint(tmp_path / "ck", expected_config=MODEL)
    assert ckpt.step == 7 and ckpt.extra == {"a": 1} and ckpt.model_config == MODEL
    assert ckpt.model.lm_head.weight is ckpt.model.wte.weight
    idx = torch.randint(0, MODEL.vocab_size, (2, 16))
    assert torch.equal(model.eval()(idx)[0], ckpt.model.eval()(idx)[0])
    assert ckpt.optimizer_state["state"].keys() == optimizer.state_dict()["state"].keys()
    files = json.loads((tmp_path / "ck" / "config.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "optimizer.pt"}


def test_untied_model_round_trips(tmp_path):
    mc = replace(MODEL, tie_weights=False)
    m = GPT(mc)
    save_checkpoint(tmp_path / "ck", model=m, step=0, model_config=mc)
    loaded = load_checkpoint(tmp_path / "ck").model
    assert loaded.lm_head.weight is not loaded.wte.weight
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)


def test_truncated_weights_raise_checkpoint_error(model, tmp_path):
    save_checkpoint(tmp_path / "ck", model=model, step=1, model_config=MODEL)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_corrupt_config_json_raises_checkpoint_error(model, tmp_path):
    save_checkpoint(tmp_path / "ck", model=model, step=1, model_config=MODEL)
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "ck")


def test_missing_checkpoint_raises_file_not_found(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    save_checkpoint(tmp_path / "ck", model=model, step=1, model_config=MODEL)
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_config_mismatch_names_the_field(model, tmp_path):
    save_checkpoint(tmp_path / "ck", model=model, step=1, model_config=MODEL)
    with pytest.raises(CheckpointError, match=r"n_layer: checkpoint 2 != expected 3"):
        load_checkpoint(tmp_path / "ck", expected_config=replace(MODEL, n_layer=3))


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_failed_save_leaves_no_partial_checkpoint(model, tmp_path, monkeypatch):
    optimizer = torch.optim.AdamW(model.parameters())

    def boom(*args, **kwargs):
        raise OSError("disk full")

    # fails after model.safetensors is already written into the temporary directory
    monkeypatch.setattr(checkpoint_module.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", model=model, optimizer=optimizer, step=1, model_config=MODEL)
    assert not (tmp_path / "ck").exists()
    assert _leftovers(tmp_path) == []

    monkeypatch.undo()
    save_checkpoint(tmp_path / "ck", model=model, step=1, model_config=MODEL)
    before = _snapshot(tmp_path / "ck")
    monkeypatch.setattr(checkpoint_module.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", model=model, optimizer=optimizer, step=2, model_config=MODEL)
    assert _snapshot(tmp_path / "ck") == before
    assert _leftovers(tmp_path) == []


def test_failed_rename_restores_the_old_checkpoint(model, tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ck", model=model, step=1, model_config=MODEL)
    before = _snapshot(tmp_path / "ck")
    real_replace = os.replace

    def replace_failing_on_new(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace_failing_on_new)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path / "ck", model=model, step=2, model_config=MODEL)
    monkeypatch.undo()
    assert _snapshot(tmp_path / "ck") == before
    assert _leftovers(tmp_path) == []


def test_load_recovers_a_save_killed_between_renames(model, tmp_path):
    save_checkpoint(tmp_path / "ck", model=model, step=5, model_config=MODEL)
    os.replace(tmp_path / "ck", tmp_path / ".ck.old-abc123")  # as if killed right after the first rename
    assert load_checkpoint(tmp_path / "ck").step == 5


def test_save_validates_inputs(model, tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "ck", model=model, step=-1, model_config=MODEL)
    with pytest.raises(ValueError, match="does not match"):
        save_checkpoint(tmp_path / "ck", model=model, step=0, model_config=replace(MODEL, n_layer=3))
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "ck", model=model, step=0, model_config=MODEL, extra={"x": object()})
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------- training


def test_loss_decreases_on_a_learnable_pattern(tmp_path):
    result = train(MODEL, config(max_steps=50, eval_interval=25), DATA, out_dir=tmp_path, progress=False)
    initial, final = result.evals[0]["val_loss"], result.final_val_loss
    assert initial == pytest.approx(math.log(MODEL.vocab_size), abs=0.3)
    assert final < 0.5 * initial
    assert [e["step"] for e in result.evals] == [0, 25, 50]
    assert len(result.history) == result.steps == 50
    assert set(result.history[0]) == {"step", "lr", "train_loss", "grad_norm", "block_grad_norms"}
    assert len(result.history[0]["block_grad_norms"]) == MODEL.n_layer
    assert result.best_val_loss == min(e["val_loss"] for e in result.evals)
    assert result.tokens_per_s > 0 and result.wall_time_s > 0
    assert not result.model.training
    assert result.model.lm_head.weight is result.model.wte.weight
    json.dumps(result.to_dict())

    assert {"best", "last"} <= {p.name for p in tmp_path.iterdir()}
    best = TrainResult.load(tmp_path / "best")
    assert best.steps == 50 and best.best_val_loss == result.best_val_loss
    idx = torch.randint(0, MODEL.vocab_size, (2, 16))
    assert torch.equal(best.model(idx)[0], result.model(idx)[0])


def test_evaluate_uses_the_same_batches_every_time(model):
    kw = dict(block_size=16, batch_size=4, n_batches=3)
    assert evaluate(model, DATA.val, **kw) == evaluate(model, DATA.val, **kw)
    assert evaluate(model, DATA.val, **kw) != evaluate(model, DATA.val, **kw, generator_seed=7)
    assert model.training  # mode restored


def test_same_seed_same_curve_different_seed_different():
    a = train(MODEL, config(max_steps=8), DATA, progress=False)
    b = train(MODEL, config(max_steps=8), DATA, progress=False)
    c = train(MODEL, config(max_steps=8, seed=1), DATA, progress=False)
    assert losses(a) == losses(b)
    assert a.evals[-1]["val_loss"] == b.evals[-1]["val_loss"]
    assert losses(a) != losses(c)


@pytest.mark.parametrize("killed_at", [10, 13])
def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, killed_at):
    # dropout > 0 so the restored RNG states matter, not just weights and optimizer
    mc = replace(MODEL, dropout=0.1)
    tc = config(max_steps=20, eval_interval=10)
    full = train(mc, tc, DATA, out_dir=tmp_path / "full", progress=False)

    run = tmp_path / "interrupted"
    partial = train(mc, tc, DATA, out_dir=run, progress=False, stop_after=killed_at)
    assert partial.steps == killed_at
    assert load_checkpoint(run / "last").step == 10  # the last checkpoint before the "kill"
    resumed = train(mc, tc, DATA, out_dir=run, resume=True, progress=False)

    assert resumed.steps == 20
    assert losses(resumed) == losses(full)
    assert [h["grad_norm"] for h in resumed.history] == [h["grad_norm"] for h in full.history]
    assert resumed.evals == [
        {**e, "elapsed_s": r["elapsed_s"], "tokens_per_s": r["tokens_per_s"]} for e, r in zip(full.evals, resumed.evals)
    ]
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_refuses_a_changed_config_or_dataset(tmp_path):
    kw = dict(out_dir=tmp_path, progress=False)
    train(MODEL, config(max_steps=10), DATA, **kw)
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.003 != now 0.001"):
        train(MODEL, config(max_steps=10, lr=1e-3), DATA, resume=True, **kw)
    with pytest.raises(CheckpointError, match="n_embd"):
        train(replace(MODEL, n_embd=64), config(max_steps=10), DATA, resume=True, **kw)
    with pytest.raises(CheckpointError, match="other-corpus"):
        train(MODEL, config(max_steps=10), make_data("other-corpus"), resume=True, **kw)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="last"):
        train(MODEL, config(), DATA, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="out_dir"):
        train(MODEL, config(), DATA, resume=True, progress=False)


def test_divergence_raises_with_step_and_history():
    with pytest.raises(TrainingDivergedError, match="step") as info:
        train(MODEL, config(lr=1e30, grad_clip=0.0, warmup_steps=0), DATA, progress=False)
    assert isinstance(info.value, FloatingPointError)
    assert info.value.step >= 1
    assert len(info.value.history) == info.value.step - 1
    assert len(info.value.evals) == 1  # the step-0 evaluation


def test_callback_sees_steps_and_evals_and_can_stop():
    seen = []

    def callback(kind, record):
        seen.append((kind, record["step"]))
        return kind == "step" and record["step"] == 4

    result = train(MODEL, config(max_steps=20), DATA, progress=False, callback=callback)
    assert result.steps == 4
    assert seen == [("eval", 0), ("step", 1), ("step", 2), ("step", 3), ("step", 4), ("eval", 4)]


@pytest.mark.parametrize(
    "data, match",
    [
        (SimpleNamespace(train=np.zeros((2, 50), dtype=np.int64), val=DATA.val, identity="x"), "data.train"),
        (SimpleNamespace(train=DATA.train, val=DATA.val[:10], identity="x"), "data.val"),
        (SimpleNamespace(train=DATA.train + 100, val=DATA.val, identity="x"), "vocab_size"),
        (SimpleNamespace(train=DATA.train, val=DATA.val), "identity"),
    ],
)
def test_train_validates_data(data, match):
    with pytest.raises(ValueError, match=match):
        train(MODEL, config(), data, progress=False)


def test_train_validates_arguments():
    with pytest.raises(ValueError, match="stop_after"):
        train(MODEL, config(), DATA, progress=False, stop_after=0)
    with pytest.raises(ValueError, match="GPTConfig"):
        train(MODEL.to_dict(), config(), DATA, progress=False)


# ---------------------------------------------------------------- speed paths: same numbers


def _plain_loop(mc: GPTConfig, tc: TrainConfig, data, steps: int) -> tuple[list[float], list[float]]:
    """What train() computes, written as the plainest loop: the checked forward,
    clip_grad_norm_, torch's default AdamW (a per-parameter loop on CPU)."""
    from lab.data import get_batch
    from lab.seeding import seed_everything

    gen = seed_everything(tc.seed)
    model = GPT(mc).train()
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), foreach=False)
    out, norms = [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(
                step, lr=tc.lr, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps, min_lr_ratio=tc.min_lr_ratio
            )
        x, y = get_batch(data.train, mc.block_size, tc.batch_size, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)))
        out.append(loss.item())
        opt.step()
    return out, norms


def test_the_eager_trainer_computes_bitwise_what_the_plain_loop_computes():
    # the foreach AdamW, the unchecked forward and the single read of loss and norms per
    # step are speed changes only: the numbers are the plain loop's, bit for bit
    tc = config(max_steps=12, eval_interval=12)
    result = train(MODEL, tc, DATA, progress=False)
    want_losses, want_norms = _plain_loop(MODEL, tc, DATA, 12)
    assert losses(result) == want_losses
    assert [h["grad_norm"] for h in result.history] == want_norms


def test_compiled_training_matches_the_eager_losses():
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    tc = config(max_steps=10, eval_interval=10)
    eager = train(MODEL, tc, DATA, progress=False)
    compiled = train(MODEL, replace(tc, compile=True), DATA, progress=False)
    # a fused AdamW and fused kernels round differently: close, not bitwise
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=2e-4, atol=2e-4)
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, abs=2e-3)


def test_compiled_training_falls_back_to_eager_when_torch_compile_is_unavailable(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("torch.compile is not available on this platform")

    monkeypatch.setattr(torch, "compile", broken)
    tc = config(max_steps=6, eval_interval=6)
    with pytest.warns(RuntimeWarning, match="TrainConfig.compile.*not available"):
        result = train(MODEL, replace(tc, compile=True), DATA, progress=False)
    eager = train(MODEL, tc, DATA, progress=False)
    # the fallback runs the eager loss with the fused AdamW the compiled path uses
    np.testing.assert_allclose(losses(result), losses(eager), rtol=1e-5, atol=1e-5)


def test_compile_is_part_of_the_trajectory(tmp_path):
    tc = config(max_steps=6, eval_interval=3)
    train(MODEL, tc, DATA, out_dir=tmp_path, progress=False, stop_after=3)
    with pytest.raises(CheckpointError, match="compile"):
        train(MODEL, replace(tc, compile=True), DATA, out_dir=tmp_path, resume=True, progress=False)
