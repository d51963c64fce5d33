"""`lab run --ray` (issue 20): the selection fans out as Ray tasks on a local instance (smoke
profile, 2 workers) and the merged store holds exactly the verdicts of a serial run."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lab.ray_run import collect, group_by_file, passed_env, task_options

ROOT = Path(__file__).resolve().parents[1]

# A small project: a file whose hypotheses train tiny GPTs (two seeds each), one whose
# predictions are refuted, and one without predictions: three files, three tasks.
_TRAINS = """
import pytest
from lab.report import at_most, prediction

@prediction("a tiny GPT beats the uniform guess", metric="val_loss", expect=at_most(4.0))
@pytest.mark.parametrize("n_embd", [16, 24])
def test_tiny_gpt(lab, outcome, n_embd):
    data = lab.data("tinyshakespeare", "char")
    cfg = lab.model_config(data, n_layer=1, n_head=2, n_embd=n_embd, block_size=16)
    for seed in (0, 1):
        run = lab.pretrain(data, cfg, seed=seed, max_steps=8, eval_interval=4, eval_batches=2, batch_size=4)
        outcome.record("val_loss", run.final_val_loss, seed=seed)
"""
_REFUTED = """
import random
import pytest
from lab.report import at_most, prediction

@prediction("draws stay small", metric="x", expect=at_most(0.1))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_draws(outcome, k):
    rng = random.Random(k)
    for seed in (0, 1, 2):
        outcome.record("x", rng.uniform(0.5, 0.51), seed=seed)
"""
_PLAIN = """
def test_arithmetic():
    assert 1 + 1 == 2
"""


@pytest.fixture
def project(tmp_path):
    proj = tmp_path / "proj"
    (proj / "hypotheses").mkdir(parents=True)
    for name, text in (("test_trains", _TRAINS), ("test_refuted", _REFUTED), ("test_plain", _PLAIN)):
        (proj / "hypotheses" / f"{name}.py").write_text(text)
    (proj / "conftest.py").write_text('pytest_plugins = ["lab.report.plugin"]\n')
    (proj / "pytest.ini").write_text("[pytest]\n")
    (proj / "mkdocs.yml").write_text("site_name: x\n")
    return proj


def _verdicts(store: Path) -> list:
    conn = sqlite3.connect(store)
    try:
        rows = conn.execute(
            "SELECT r.nodeid, r.status, r.verdict, v.idx, v.text, v.verdict, v.estimate, v.low, v.high, v.n "
            "FROM results r LEFT JOIN verdicts v ON v.result_id = r.result_id ORDER BY r.nodeid, v.idx"
        ).fetchall()
        measurements = conn.execute(
            "SELECT r.nodeid, m.metric, m.seed, m.value FROM measurements m JOIN results r USING (result_id) "
            "ORDER BY r.nodeid, m.metric, m.seed"
        ).fetchall()
    finally:
        conn.close()
    return rows, measurements


def test_ray_tasks_merge_into_the_verdicts_of_a_serial_run(project, tmp_path):
    pytest.importorskip("ray", reason="the `ray` extra (bash install.sh --test installs it)")
    env = {k: v for k, v in os.environ.items() if k not in ("LAB_STORE", "LAB_PROFILE")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    common = ["-p", "no:randomly", "-p", "no:cacheprovider"]
    serial_store, ray_store = tmp_path / "serial.sqlite", tmp_path / "ray.sqlite"
    # separate caches: the Ray tasks train their models afresh, not from the serial run's cache
    serial = subprocess.run(
        [sys.executable, "-m", "pytest", "hypotheses", "--lab-profile", "smoke", f"--lab-store={serial_store}"]
        + common,
        cwd=project,
        # Ray runs a task of one CPU with OMP_NUM_THREADS=1; torch's CPU kernels add up in
        # another order on another thread count (1e-8 apart), so the serial run uses one too
        env={**env, "LAB_CACHE": str(tmp_path / "cache-serial"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert serial.returncode == 0, serial.stdout[-3000:]
    ray = subprocess.run(
        [sys.executable, "-m", "lab", "run", "--ray", "--workers", "2", "--profile", "smoke"]
        + ["--store", str(ray_store), "--no-site"]
        + common,
        cwd=project,
        env={**env, "LAB_CACHE": str(tmp_path / "cache-ray")},
        capture_output=True,
        text=True,
        # about 30 s alone; minutes on a 2-core machine busy with other tests (Ray adds its own daemons)
        timeout=900,
    )
    assert ray.returncode == 0, ray.stdout[-3000:] + ray.stderr[-3000:]
    assert "6 tests in 3 tasks on a local Ray instance (2 CPUs)" in ray.stderr
    (got, got_values), (want, want_values) = _verdicts(ray_store), _verdicts(serial_store)
    assert {"confirmed", "refuted"} <= {row[2] for row in want}  # the selection has both kinds
    assert len(want) == 5 and got == want  # test_plain has no prediction: nothing recorded
    assert len(want_values) == 13 and got_values == want_values  # the same numbers, trained afresh
    conn = sqlite3.connect(ray_store)
    runs = conn.execute("SELECT run_id, profile, status, argv FROM runs").fetchall()
    conn.close()
    # one run per task that recorded results (test_plain's records none), each with its own id
    assert len({r[0] for r in runs}) == 2 and {r[1:3] for r in runs} == {("smoke", "complete")}
    assert all("--lab-profile smoke" in r[3] for r in runs)
    assert not (tmp_path / ".ray.sqlite-ray").exists()  # the tasks' copies are gone once merged


def test_tasks_are_files_and_get_no_test_paths(tmp_path):
    ids = ["h/a.py::t[1]", "h/b.py::u", "h/a.py::t[2]"]
    assert group_by_file(ids) == {"h/a.py": ["h/a.py::t[1]", "h/a.py::t[2]"], "h/b.py": ["h/b.py::u"]}
    (tmp_path / "hypotheses").mkdir()
    opts = task_options(["-x", "hypotheses", "h/a.py::t[1]", "-p", "no:randomly", "-k", "slow"], tmp_path)
    assert opts == ["-x", "-p", "no:randomly", "-k", "slow"]


def test_tasks_get_the_lab_settings_but_not_the_store():
    environ = {"LAB_HF_MODEL": "/models/7b", "LAB_STORE": "s.sqlite", "LAB_CACHE": "/c", "HOME": "/root"}
    assert passed_env(environ, local=True) == {"LAB_HF_MODEL": "/models/7b", "LAB_CACHE": "/c"}
    assert passed_env(environ, local=False) == {"LAB_HF_MODEL": "/models/7b"}  # each node its own cache


def test_the_selection_is_collected_as_node_ids_whatever_the_verbosity(project):
    for extra, want in ((["-q"], 6), (["-v", "-k", "draws"], 3)):
        ids = collect(project, ["hypotheses", "-p", "no:randomly", *extra])
        assert len(ids) == want and all("::" in i for i in ids), (extra, ids)
