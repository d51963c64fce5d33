"""TensorBoard events from Track A's fine-tuning and Track D's wind tunnels (as the GPT
trainer writes them, tests/test_pretraining_lab_live.py): beside each cached run, loaded by
TensorBoard's own reader, found by `lab board`'s TensorBoard, and never changing a number."""

import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer  # noqa: E402

from lab.runlog import slug  # noqa: E402
from lab.windtunnel.models import TunnelTransformer  # noqa: E402
from lab.windtunnel.tasks import BijectionTask  # noqa: E402
from lab.windtunnel.train import TunnelTrainConfig, train_tunnel  # noqa: E402


def _events(run_dir) -> EventAccumulator:
    (folder,) = (run_dir / "tb").iterdir()  # one run, named for what it trains
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _board_runs(cache) -> list[str]:
    """The runs TensorBoard lists for `lab board` (its --logdir is the whole cache)."""
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(cache))
    return sorted(mux.Runs())


def _steps(acc, tag) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


# ---------------------------------------------------------------- wind tunnels

TASK = BijectionTask(4, 4)


def _build():
    return TunnelTransformer(TASK, n_layer=1, n_head=2, n_embd=8)


CFG = TunnelTrainConfig(steps=25, batch_size=8, lr=1e-3, warmup_steps=2, seed=3, keep_steps=(0, 12))


def _weights_equal(a, b) -> None:
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_a_wind_tunnel_run_writes_events_its_reader_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    run = train_tunnel(TASK, _build, CFG)
    (run_dir,) = (tmp_path / "windtunnel").glob("*/")
    acc = _events(run_dir)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert _steps(acc, tag) == [h["step"] for h in run.history] == [1, 11, 21, 25], tag
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([h["loss"] for h in run.history], rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm") + acc.Scalars("train/tokens_per_s"))
    (name,) = (run_dir / "tb").iterdir()
    assert name.name == "TunnelTransformer-on-bijection-V4-L4-seed-3"
    assert _board_runs(tmp_path) == [f"windtunnel/{run_dir.name}/tb/{name.name}"]


def test_wind_tunnel_logging_changes_no_number(tmp_path, monkeypatch):
    """cache=False writes no events; the cached run writes them (and checkpoints): the same
    weights, history and kept weights to the bit, and the same global random state after."""
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    plain = train_tunnel(TASK, _build, CFG, cache=False)
    rng_plain = torch.get_rng_state()
    logged = train_tunnel(TASK, _build, CFG, progress=True, checkpoint_every=10)
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert logged.history == plain.history
    _weights_equal(plain.model, logged.model)
    for k, v in plain.kept[12].items():
        assert torch.equal(v, logged.kept[12][k])
    assert list(tmp_path.rglob("events.out.tfevents.*"))


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


def test_a_resumed_wind_tunnel_run_has_one_curve(tmp_path, monkeypatch):
    """Killed after step 15 (checkpoint at 10, events written up to 11), then resumed:
    TensorBoard drops the killed attempt's events after the checkpoint, so every step
    appears once, with the uninterrupted run's values."""
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    with pytest.raises(_Interrupted):
        train_tunnel(_StopAfter(TASK, 15), _build, CFG, checkpoint_every=10)
    (run_dir,) = (tmp_path / "windtunnel").glob("*/")
    assert 11 in _steps(_events(run_dir), "train/loss")  # the killed attempt got past its checkpoint
    resumed = train_tunnel(TASK, _build, CFG, checkpoint_every=10)
    acc = _events(run_dir)
    assert _steps(acc, "train/loss") == [h["step"] for h in resumed.history] == [1, 11, 21, 25]
    assert _steps(acc, "train/grad_norm") == [1, 11, 21, 25]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([h["loss"] for h in resumed.history])


def test_events_that_cannot_be_written_do_not_stop_training(tmp_path, monkeypatch, capsys):
    import torch.utils.tensorboard as tb

    class Broken(tb.SummaryWriter):
        def add_scalar(self, *args, **kwargs):
            raise OSError("disk full")

    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(tb, "SummaryWriter", Broken)
    logged = train_tunnel(TASK, _build, CFG)
    plain = train_tunnel(TASK, _build, CFG, cache=False)
    _weights_equal(plain.model, logged.model)
    err = capsys.readouterr().err
    assert err.count("TensorBoard events for 'TunnelTransformer on bijection-V4-L4, seed 3' are off: disk full") == 1


# ---------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    """A tiny exported GPT base, old and new data (as tests/test_finetune.py)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from lab.data import load_corpus, prepare
    from lab.models import GPT, GPTConfig, export_hf
    from lab.tokenizers import get_tokenizer

    text = load_corpus("tinyshakespeare")
    tok = get_tokenizer("char", text=text)
    old = prepare(text=text[:30_000], tokenizer=tok)
    new = prepare(text=text[-30_000:].upper(), tokenizer=tok)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_embd=32,
        n_kv_head=2,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
    )  # exports as a Llama (q_proj, k_proj...: LoRA's default targets)
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("base") / "hf"
    export_hf(GPT(config), base)
    return base, new, old


def _tiny():
    from lab.finetune import FinetuneConfig

    return FinetuneConfig(steps=6, batch_size=4, block_size=16, eval_interval=3, eval_batches=2, lr=1e-2)


def test_a_finetuning_run_writes_events_its_reader_loads(ft, tmp_path, monkeypatch):
    from lab.finetune import finetune

    base, new, old = ft
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    run = finetune(base, new, old, _tiny(), progress=False)
    acc = _events(run.run_dir)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert _steps(acc, tag) == list(range(1, 7)), tag
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([h["loss"] for h in run.history], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([h["lr"] for h in run.history], rel=1e-6)
    for tag, key in (("eval/val_loss", "new_val"), ("eval/old_val", "old_val"), ("eval/train_loss", "train_loss")):
        assert _steps(acc, tag) == [0, 3, 6]
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([e[key] for e in run.evals], rel=1e-6)
    samples = acc.Tensors("sample/text_summary")
    assert [s.step for s in samples] == [0, 3, 6]
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert "⟶" in text and len(text) > 12  # the prompt, then the model's continuation
    (name,) = (run.run_dir / "tb").iterdir()
    assert name.name == slug(f"LoRA r=8 of hf on {new.corpus}, seed 0")
    assert _board_runs(tmp_path) == [f"finetune/{run.key}/tb/{name.name}"]
    assert (run.run_dir / "result.json").exists() and (run.run_dir / "adapter").is_dir()


def test_finetune_logging_changes_no_number(ft, tmp_path, monkeypatch):
    """The same run with events and samples (and progress) and without: the same losses,
    evaluations, layer statistics and adapter weights to the bit, and the same global
    random state after."""
    import lab.finetune as lab_finetune
    from lab.runlog import RunLog

    base, new, old = ft
    cfg = _tiny()
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "plain"))
    with monkeypatch.context() as m:
        m.setattr(lab_finetune, "RunLog", lambda log_dir, **kw: RunLog(None, **kw))
        plain = lab_finetune.finetune(base, new, old, cfg, progress=False)
    rng_plain = torch.get_rng_state()
    assert not (plain.run_dir / "tb").exists()
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "logged"))
    logged = lab_finetune.finetune(base, new, old, cfg, progress=True)
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert (logged.run_dir / "tb").is_dir()
    assert logged.history == plain.history
    assert [{k: v for k, v in e.items() if k != "elapsed_s"} for e in logged.evals] == [
        {k: v for k, v in e.items() if k != "elapsed_s"} for e in plain.evals
    ]
    assert logged.layer_stats == plain.layer_stats
    from safetensors.torch import load_file

    (a,) = (plain.run_dir / "adapter").glob("*.safetensors")
    (b,) = (logged.run_dir / "adapter").glob("*.safetensors")
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
