"""The Pretraining Lab's live side: progress lines under pytest (also under xdist, quiet
under -q), TensorBoard events that TensorBoard's own reader loads, logging that leaves the
numbers alone, `lab train` resuming after Ctrl-C, `lab board`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAB = [sys.executable, "-m", "lab"]

HYPOTHESIS = """
import pytest
from lab.report import prediction, at_least

@pytest.mark.pretraining
@prediction("the loss falls", metric="drop", expect=at_least(0.0))
@pytest.mark.parametrize("seed", [0, 1])
def test_small(lab, outcome, seed):
    data = lab.data("tinyshakespeare", "char")
    run = lab.pretrain(data, lab.model_config(data), seed=seed, max_steps=12, eval_interval=6)
    outcome.record("drop", run.evals[0]["val_loss"] - run.evals[-1]["val_loss"], seed=seed)
"""

LINE = re.compile(
    r"\[lab\] test_h\.py::test_small\[\d\]: GPT 1L/2H/32d ctx 32 on tinyshakespeare/char, seed \d: "
    r"\d+/12 steps \(\d+%\), loss [\d.]+, [\d,]+ tok/s, \d+s elapsed"
)


@pytest.fixture
def small_project(pytester, tmp_path, monkeypatch):
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makeini("[pytest]\nmarkers =\n    pretraining: p\n")
    pytester.makepyfile(test_h=HYPOTHESIS)
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    return pytester


def _run(project, *args):
    store = project.path / "s.sqlite"
    return project.runpytest_subprocess(
        "--lab-profile", "smoke", f"--lab-store={store}", "-p", "no:cacheprovider", *args
    )


def test_a_hypothesis_under_pytest_shows_progress_lines(small_project):
    """Each training run prints what trains, step / total, loss, tokens/s and an ETA, and a
    last line when it is done, through pytest's capture."""
    res = _run(small_project, "--lab-progress=0")
    res.assert_outcomes(passed=2)
    lines = [line for line in res.outlines if line.startswith("[lab] ")]
    assert lines and all(LINE.match(line) for line in lines), lines[:5]
    assert any("ETA" in line for line in lines)
    assert sum(line.endswith("-- done") for line in lines) == 2  # one per run
    for seed in (0, 1):
        assert any(f"seed {seed}: 12/12 steps (100%)" in line for line in lines)


def test_progress_under_xdist_comes_from_the_workers_one_line_at_a_time(small_project):
    res = _run(small_project, "--lab-progress=0", "-n", "2")
    res.assert_outcomes(passed=2)
    # the controller prints from a thread, so a line may start right after pytest's own
    # progress dots on the same terminal line: find the lines wherever they start
    lines = [line[m.start() :] for line in res.outlines if (m := re.search(r"\[gw\d\] \[lab\] ", line))]
    assert lines, res.outlines
    assert all(LINE.match(line.split(" ", 1)[1]) for line in lines), lines[:5]
    assert sum(line.endswith("-- done") for line in lines) == 2


@pytest.mark.parametrize("args", [("-q", "--lab-progress=0"), ("--lab-progress=off",), ()], ids=["q", "off", "short"])
def test_progress_is_quiet_under_q_off_and_for_short_runs(small_project, args):
    """-q and --lab-progress=off print nothing; by default a run shorter than the interval
    (10 s) prints nothing either, so the smoke profile stays quiet."""
    if args == ():
        args = ("--lab-progress=600",)
    res = _run(small_project, *args)
    res.assert_outcomes(passed=2)
    assert not [line for line in res.outlines + res.errlines if "[lab] " in line]


def _tiny_run(tmp_path, monkeypatch, **overrides):
    from lab.session import Lab

    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    lab = Lab("smoke", progress=False)
    data = lab.data("tinyshakespeare", "char")
    config = lab.model_config(data)
    kw = dict(seed=0, max_steps=8, eval_interval=4, **overrides)
    return lab, data, config, kw


def test_a_pretraining_run_writes_tensorboard_events_its_reader_loads(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lab, data, config, kw = _tiny_run(tmp_path, monkeypatch)
    run = lab.pretrain(data, config, **kw)
    run_dir = lab.run_dir(data, config, **kw)
    (events,) = (run_dir / "tb").iterdir()  # one run, named for what it trains
    assert events.name == "GPT-1L-2H-32d-ctx-32-on-tinyshakespeare-char-seed-0"
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/val_loss", "eval/train_loss"):
        assert tag in tags["scalars"], tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert [e.value for e in loss] == pytest.approx([h["train_loss"] for h in run.history], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [0, 4, 8]
    assert [e.value for e in acc.Scalars("eval/val_loss")] == pytest.approx([e["val_loss"] for e in run.evals])
    samples = acc.Tensors("sample/text_summary")
    assert [s.step for s in samples] == [0, 4, 8]
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert "⟶" in text and len(text) > 20  # the prompt, then the model's continuation
    about = json.loads((run_dir / "about.json").read_text())
    assert about["description"] == "GPT 1L/2H/32d ctx 32 on tinyshakespeare/char, seed 0"
    assert about["tokenizer"]["name"] == "char" and (run_dir / about["tokenizer"]["file"]).exists()


def test_logging_changes_no_number_of_a_run(tmp_path, monkeypatch):
    """Events, samples and progress consume no random numbers: a run with them (out_dir)
    trains exactly as one without."""
    from lab.train import train

    lab, data, config, kw = _tiny_run(tmp_path, monkeypatch)
    tc = lab.train_config(seed=0, max_steps=8, eval_interval=4)
    torch.manual_seed(123)
    plain = train(config, tc, data, progress=False)
    logged = train(config, tc, data, out_dir=tmp_path / "out", progress=True)
    assert [h["train_loss"] for h in logged.history] == [h["train_loss"] for h in plain.history]
    assert [e["val_loss"] for e in logged.evals] == [e["val_loss"] for e in plain.evals]
    for a, b in zip(plain.model.parameters(), logged.model.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "out" / "tb").is_dir()


def _lab_train(cache: Path, *extra) -> list[str]:
    return [*LAB, "train", "--profile", "smoke", "max_steps=300", "eval_interval=25", *extra]


def test_lab_train_resumes_after_ctrl_c_exactly(tmp_path):
    """Ctrl-C stops after the current step with a checkpoint there; the same command
    resumes it; the result equals an uninterrupted run's, bit for bit."""
    env = dict(os.environ, LAB_CACHE=str(tmp_path / "a"), LAB_PROFILE="smoke")
    proc = subprocess.Popen(
        _lab_train(tmp_path / "a"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "a" / "runs").glob("*/last/config.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, out + err
    (run_dir,) = [p for p in (tmp_path / "a" / "runs").iterdir() if p.is_dir()]
    step = json.loads((run_dir / "last" / "config.json").read_text())["step"]
    assert 25 <= step < 300, "interrupted too late to test resume; make the run longer"
    assert "Run the same command to resume" in err and f"checkpoint at step {step}" in err
    assert not (run_dir / "done").exists()

    again = subprocess.run(_lab_train(tmp_path / "a"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run_dir} from step {step}" in again.stdout
    assert "300 steps" in again.stdout and (run_dir / "done").exists()

    env_b = dict(env, LAB_CACHE=str(tmp_path / "b"))
    straight = subprocess.run(_lab_train(tmp_path / "b"), cwd=ROOT, env=env_b, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    from lab.train.checkpoint import load_checkpoint

    (other,) = [p for p in (tmp_path / "b" / "runs").iterdir() if p.is_dir()]
    assert other.name == run_dir.name  # the same settings and code: the same cache key
    resumed, uninterrupted = load_checkpoint(run_dir / "last"), load_checkpoint(other / "last")
    for a, b in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(a, b)
    evals = [json.loads((d / "done").read_text())["evals"] for d in (run_dir, other)]
    assert [e["val_loss"] for e in evals[0]] == [e["val_loss"] for e in evals[1]]


def test_lab_train_refuses_unknown_settings(tmp_path):
    env = dict(os.environ, LAB_CACHE=str(tmp_path))
    res = subprocess.run(
        [*LAB, "train", "--profile", "smoke", "n_layers=3"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 2
    assert "unknown setting 'n_layers'" in res.stderr and "n_layer" in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lab_board_serves_the_cached_runs_in_tensorboard(tmp_path, monkeypatch):
    lab, data, config, kw = _tiny_run(tmp_path, monkeypatch)
    lab.pretrain(data, config, **kw)
    printed = subprocess.run(
        [*LAB, "board", "--print"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, LAB_CACHE=str(tmp_path / "cache")),
    )
    assert printed.returncode == 0 and f"--logdir {tmp_path / 'cache'}" in printed.stdout
    port = _free_port()
    board = subprocess.Popen(
        [*LAB, "board", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, LAB_CACHE=str(tmp_path / "cache")),
    )
    try:
        runs, deadline = [], time.time() + 120
        while time.time() < deadline and not runs:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as r:
                    runs = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        key = lab.run_dir(data, config, **kw).name
        assert runs == [f"runs/{key}/tb/GPT-1L-2H-32d-ctx-32-on-tinyshakespeare-char-seed-0"], runs
    finally:
        board.send_signal(signal.SIGINT)
        try:
            board.wait(timeout=30)
        except subprocess.TimeoutExpired:
            board.kill()
