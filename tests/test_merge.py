"""`lab merge` (issue 20): stores from other machines or Ray tasks fold into one, losslessly,
idempotently and all or nothing; a store of another schema or a damaged one is refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.report.merge import merge_stores, schema_version
from lab.report.store import SCHEMA_VERSION, ResultRecord, Store, StoreError

ROOT = Path(__file__).resolve().parents[1]


def _store(path: Path, run_id: str, nodes: list[str], *, status: str = "complete", first_seen: float = 0.0) -> Path:
    """A store holding one run of `nodes`, each with a measurement, a verdict, a plot and a
    registered prediction."""
    s = Store(path)
    s.start_run(run_id, profile="smoke", host="elsewhere", started_at=1000.0)
    for i, node in enumerate(nodes):
        with s.transaction() as c:
            c.execute(
                "INSERT INTO predictions VALUES (?, 0, 'h', 'x grows', 'x', '>= 0', ?, ?)",
                (node, first_seen or time.time(), run_id),
            )
        s.add_result(
            ResultRecord(
                run_id=run_id,
                profile="smoke",
                nodeid=node,
                hypothesis=node.split("[")[0],
                status="passed",
                verdict="confirmed",
                measurements=[("x", 0, float(i)), ("x", 1, float(i) + 0.5)],
                verdicts=[
                    dict(
                        idx=0, pred_hash="h", text="x grows", metric="x", claim=">= 0", verdict="confirmed",
                        estimate=i, low=0.0, high=None, n=2, method="t", confidence=0.95,
                    )
                ],
                artifacts=[("plot", "png", "a plot", bytes([i]) * 10)],
                benchmarks=[dict(name="b", mean=1.0, stddev=0.1, min=0.9, max=1.1, median=1.0, rounds=5)],
            )
        )  # fmt: skip
    if status != "running":
        s.finish_run(run_id, exitstatus=0, status=status)
    s.close()
    return path


def _content(path: Path) -> dict[str, list]:
    """Every row of every table, with result ids replaced by the result's identity, sorted:
    two stores with the same content compare equal whatever ids SQLite gave."""
    conn = sqlite3.connect(path)
    key = {
        rid: (run, node, created)
        for rid, run, node, created in conn.execute("SELECT result_id, run_id, nodeid, created_at FROM results")
    }
    out = {}
    for table in ("runs", "predictions", "results", "measurements", "verdicts", "artifacts", "benchmarks"):
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        rows = []
        for row in conn.execute(f"SELECT * FROM {table}"):
            rec = dict(zip(cols, row, strict=True))
            if "result_id" in rec:
                rec["result_id"] = key[rec["result_id"]]
            rows.append(tuple(sorted(rec.items(), key=lambda kv: kv[0])))
        out[table] = sorted(rows, key=repr)
    conn.close()
    return out


def test_merge_copies_everything_and_twice_adds_nothing(tmp_path):
    a = _store(tmp_path / "a.sqlite", "run-a", ["h.py::t[1]", "h.py::t[2]"])
    main = tmp_path / "main.sqlite"
    (count,) = merge_stores(main, [a])
    assert (count.runs, count.results, count.predictions, count.already) == (1, 2, 2, 0)
    assert _content(main) == _content(a)  # lossless: every row of every table, run ids kept
    before = _content(main)
    (again,) = merge_stores(main, [a])
    assert (again.runs, again.results, again.predictions, again.already) == (0, 0, 0, 2)
    assert _content(main) == before


def test_merge_keeps_history_and_the_earliest_registration(tmp_path):
    main = _store(tmp_path / "main.sqlite", "run-old", ["h.py::t[1]"], first_seen=2000.0)
    b = _store(tmp_path / "b.sqlite", "run-new", ["h.py::t[1]", "h.py::t[3]"], first_seen=1500.0)
    merge_stores(main, [b])
    conn = sqlite3.connect(main)
    runs = dict(conn.execute("SELECT run_id, status FROM runs"))
    assert runs == {"run-old": "complete", "run-new": "complete"}
    history = [r[0] for r in conn.execute("SELECT run_id FROM results WHERE nodeid = 'h.py::t[1]' ORDER BY result_id")]
    assert history == ["run-old", "run-new"]  # the older result stays; the newer is the latest
    regs = dict(conn.execute("SELECT nodeid, first_run FROM predictions"))
    seen = dict(conn.execute("SELECT nodeid, first_seen FROM predictions"))
    assert seen["h.py::t[1]"] == 1500.0 and regs["h.py::t[1]"] == "run-new"  # registered first in b
    assert regs["h.py::t[3]"] == "run-new"
    # each merged result keeps its own measurements, verdicts and plots
    rid = conn.execute("SELECT result_id FROM results WHERE nodeid = 'h.py::t[3]'").fetchone()[0]
    assert sorted(conn.execute("SELECT value FROM measurements WHERE result_id = ?", (rid,))) == [(1.0,), (1.5,)]
    assert conn.execute("SELECT data FROM artifacts WHERE result_id = ?", (rid,)).fetchone()[0] == bytes([1]) * 10
    conn.close()


def test_a_run_still_running_here_takes_the_finished_row(tmp_path):
    main = _store(tmp_path / "main.sqlite", "run-x", ["h.py::t[1]"], status="running")
    done = _store(tmp_path / "done.sqlite", "run-x", ["h.py::t[1]"])
    merge_stores(main, [done])
    conn = sqlite3.connect(main)
    assert conn.execute("SELECT status FROM runs WHERE run_id = 'run-x'").fetchone()[0] == "complete"
    conn.close()


def _bump_schema(path: Path, version: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    conn.commit()
    conn.close()


def test_a_store_of_another_schema_is_refused_and_nothing_is_merged(tmp_path):
    main = _store(tmp_path / "main.sqlite", "run-m", ["h.py::t[1]"])
    good = _store(tmp_path / "good.sqlite", "run-g", ["h.py::t[2]"])
    newer = _store(tmp_path / "newer.sqlite", "run-n", ["h.py::t[3]"])
    _bump_schema(newer, SCHEMA_VERSION + 1)
    assert schema_version(newer) == SCHEMA_VERSION + 1
    before = _content(main)
    with pytest.raises(StoreError) as err:
        merge_stores(main, [good, newer])
    msg = str(err.value)
    assert str(newer) in msg and f"schema {SCHEMA_VERSION + 1}" in msg and f"schema {SCHEMA_VERSION}" in msg
    assert _content(main) == before  # all or nothing: the good store was not merged either


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_store_is_refused_naming_it(tmp_path, damage):
    main = _store(tmp_path / "main.sqlite", "run-m", ["h.py::t[1]"])
    bad = _store(tmp_path / "bad.sqlite", "run-b", [f"h.py::t[{i}]" for i in range(20)])
    data = bad.read_bytes()
    bad.write_bytes(
        {"truncated": data[: len(data) // 3], "garbage": data[:100] + b"\xff" * (len(data) - 100), "empty": b""}[damage]
    )
    before = _content(main)
    with pytest.raises(StoreError, match=str(bad)):
        merge_stores(main, [bad])
    assert _content(main) == before


def test_merging_the_main_store_into_itself_is_refused(tmp_path):
    main = _store(tmp_path / "main.sqlite", "run-m", ["h.py::t[1]"])
    with pytest.raises(StoreError, match="main store itself"):
        merge_stores(main, [main])


def test_lab_merge_command(tmp_path):
    a = _store(tmp_path / "a.sqlite", "run-a", ["h.py::t[1]"])
    newer = _store(tmp_path / "newer.sqlite", "run-n", ["h.py::t[2]"])
    _bump_schema(newer, SCHEMA_VERSION + 1)
    main = tmp_path / "main.sqlite"
    lab = [sys.executable, "-m", "lab", "merge", "--store", str(main)]
    ok = subprocess.run([*lab, str(a)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 new result(s)" in ok.stdout
    bad = subprocess.run([*lab, str(newer)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and str(newer) in bad.stderr and "schema" in bad.stderr
