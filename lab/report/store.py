"""The results store: one SQLite file holding runs, results, measurements, verdicts,
pre-registered predictions and artifacts (plots, tables).

Every result is written in one transaction, so a run killed mid-way leaves whole
rows or none. WAL mode plus a busy timeout lets pytest-xdist workers write to the
same file concurrently.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 2
DEFAULT_STORE = Path("results") / "lab.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,              -- running | complete | interrupted
    exitstatus INTEGER,
    profile TEXT NOT NULL,
    device TEXT,
    git_commit TEXT,
    git_dirty INTEGER,
    seeds TEXT,                         -- JSON list
    python TEXT,
    torch TEXT,
    packages TEXT,                      -- JSON {name: version}
    host TEXT,
    argv TEXT,
    wall_time_s REAL,
    peak_memory_bytes INTEGER
);
CREATE TABLE IF NOT EXISTS results (
    result_id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    profile TEXT NOT NULL,
    nodeid TEXT NOT NULL,
    hypothesis TEXT NOT NULL,           -- module::function (one page each)
    params TEXT,                        -- JSON
    title TEXT,
    docstring TEXT,
    markers TEXT,                       -- JSON list
    status TEXT NOT NULL,               -- passed | failed | skipped
    verdict TEXT,                       -- confirmed | refuted | inconclusive | NULL (no prediction / failed)
    error TEXT,
    seeds TEXT,                         -- JSON list
    wall_time_s REAL,
    peak_memory_bytes INTEGER,
    notes TEXT,                         -- JSON list
    units TEXT,                         -- JSON {metric: unit}
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_node ON results(nodeid, profile, created_at);
CREATE TABLE IF NOT EXISTS measurements (
    result_id INTEGER NOT NULL REFERENCES results(result_id),
    metric TEXT NOT NULL,
    seed INTEGER,
    value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
    result_id INTEGER NOT NULL REFERENCES results(result_id),
    idx INTEGER NOT NULL,
    pred_hash TEXT NOT NULL,
    text TEXT NOT NULL,
    metric TEXT NOT NULL,
    claim TEXT NOT NULL,
    verdict TEXT NOT NULL,
    estimate REAL, low REAL, high REAL, n INTEGER,
    method TEXT, confidence REAL,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS predictions (
    nodeid TEXT NOT NULL,
    idx INTEGER NOT NULL,
    pred_hash TEXT NOT NULL,
    text TEXT NOT NULL,
    metric TEXT NOT NULL,
    claim TEXT NOT NULL,
    first_seen REAL NOT NULL,
    first_run TEXT,
    PRIMARY KEY (nodeid, idx, pred_hash)
);
CREATE TABLE IF NOT EXISTS artifacts (
    result_id INTEGER NOT NULL REFERENCES results(result_id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    caption TEXT,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS benchmarks (
    result_id INTEGER NOT NULL REFERENCES results(result_id),
    name TEXT NOT NULL,
    grp TEXT,
    params TEXT,
    mean_s REAL, stddev_s REAL, min_s REAL, max_s REAL, median_s REAL,
    rounds INTEGER,
    extra TEXT                           -- JSON extra_info
);
"""


# Columns added after schema 1, as (table, column, SQL type): added in place when an
# older store is opened, so history written by earlier versions stays readable.
_ADDED_COLUMNS = (
    ("results", "validity", "TEXT"),  # JSON [[check, passed, detail], ...]
    ("results", "deterministic", "TEXT"),  # JSON list of metrics declared exact
    ("results", "trials", "TEXT"),  # JSON {metric: {seed: [successes, trials]}}
    ("results", "source_hash", "TEXT"),  # fingerprint of the test's code when it ran
    ("verdicts", "kind", "TEXT"),  # prediction | check
    ("verdicts", "fingerprint", "TEXT"),  # the registry's fingerprint of the prediction when judged
    ("verdicts", "registration", "TEXT"),  # JSON: the registry entry's status, dates, amendments
)


class StoreError(RuntimeError):
    pass


@dataclass
class ResultRecord:
    """Everything one test contributes; written in a single transaction."""

    run_id: str
    profile: str
    nodeid: str
    hypothesis: str
    status: str
    params: dict = field(default_factory=dict)
    title: str = ""
    docstring: str = ""
    markers: list = field(default_factory=list)
    verdict: str | None = None
    error: str | None = None
    seeds: list = field(default_factory=list)
    wall_time_s: float | None = None
    peak_memory_bytes: int | None = None
    notes: list = field(default_factory=list)
    units: dict = field(default_factory=dict)
    measurements: list = field(default_factory=list)  # (metric, seed, value)
    verdicts: list = field(default_factory=list)  # dicts matching the verdicts table
    artifacts: list = field(default_factory=list)  # (name, kind, caption, bytes)
    benchmarks: list = field(default_factory=list)  # dicts matching the benchmarks table
    validity: list = field(default_factory=list)  # (check, passed, detail)
    deterministic: list = field(default_factory=list)  # metrics declared exact
    trials: dict = field(default_factory=dict)  # {metric: {seed: (successes, trials)}}
    source_hash: str | None = None


class Store:
    """A handle on the SQLite results file. Cheap to open; one per process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout = 60000")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            with self.transaction() as c:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                _migrate(c)
                c.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(
                f"cannot open results store at {str(path)!r}: {exc}. Pass a writable path with "
                f"--lab-store PATH or set LAB_STORE."
            ) from exc

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue
        # on busy_timeout instead of failing halfway through.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        self._conn.row_factory = sqlite3.Row
        try:
            return self._conn.execute(sql, args).fetchall()
        finally:
            self._conn.row_factory = None

    # -- runs -------------------------------------------------------------------------

    def start_run(self, run_id: str, **fields) -> None:
        """Create the run row (once: later calls for the same run_id are ignored)."""
        fields = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in fields.items()}
        fields.setdefault("started_at", time.time())
        cols = ["run_id", "status", *fields]
        vals = [run_id, "running", *fields.values()]
        with self.transaction() as c:
            c.execute(
                f"INSERT OR IGNORE INTO runs({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                vals,
            )

    def finish_run(self, run_id: str, *, exitstatus: int, status: str = "complete") -> None:
        with self.transaction() as c:
            row = c.execute("SELECT started_at FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return
            peak = c.execute("SELECT MAX(peak_memory_bytes) FROM results WHERE run_id = ?", (run_id,)).fetchone()[0]
            now = time.time()
            c.execute(
                "UPDATE runs SET finished_at = ?, status = ?, exitstatus = ?, wall_time_s = ?, "
                "peak_memory_bytes = ? WHERE run_id = ?",
                (now, status, exitstatus, now - row[0], peak, run_id),
            )

    # -- predictions ------------------------------------------------------------------

    def register_prediction(
        self, nodeid: str, idx: int, pred_hash: str, text: str, metric: str, claim: str, run_id: str
    ) -> None:
        """Pre-register: the first time a prediction (by hash) is seen, keep its text."""
        with self.transaction() as c:
            c.execute(
                "INSERT OR IGNORE INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (nodeid, idx, pred_hash, text, metric, claim, time.time(), run_id),
            )

    # -- results ----------------------------------------------------------------------

    def add_result(self, r: ResultRecord) -> int:
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO results(run_id, profile, nodeid, hypothesis, params, title, docstring, "
                "markers, status, verdict, error, seeds, wall_time_s, peak_memory_bytes, notes, "
                "units, created_at, validity, deterministic, trials, source_hash) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    r.run_id,
                    r.profile,
                    r.nodeid,
                    r.hypothesis,
                    json.dumps(r.params, default=str),
                    r.title,
                    r.docstring,
                    json.dumps(r.markers),
                    r.status,
                    r.verdict,
                    r.error,
                    json.dumps(r.seeds),
                    r.wall_time_s,
                    r.peak_memory_bytes,
                    json.dumps(r.notes),
                    json.dumps(r.units),
                    time.time(),
                    json.dumps(r.validity),
                    json.dumps(sorted(r.deterministic)),
                    json.dumps({m: {str(k): list(v) for k, v in t.items()} for m, t in r.trials.items()}),
                    r.source_hash,
                ),
            )
            rid = cur.lastrowid
            c.executemany(
                "INSERT INTO measurements VALUES (?, ?, ?, ?)",
                [(rid, m, s, v) for m, s, v in r.measurements],
            )
            c.executemany(
                "INSERT INTO verdicts(result_id, idx, pred_hash, text, metric, claim, verdict, estimate, low, "
                "high, n, method, confidence, detail, kind, fingerprint, registration) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        rid,
                        v["idx"],
                        v["pred_hash"],
                        v["text"],
                        v["metric"],
                        v["claim"],
                        v["verdict"],
                        v["estimate"],
                        _num(v["low"]),
                        _num(v["high"]),
                        v["n"],
                        v["method"],
                        v["confidence"],
                        v.get("detail", ""),
                        v.get("kind", "prediction"),
                        v.get("fingerprint"),
                        json.dumps(v["registration"]) if v.get("registration") is not None else None,
                    )
                    for v in r.verdicts
                ],
            )
            c.executemany(
                "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?)",
                [(rid, n, k, cap, sqlite3.Binary(d)) for n, k, cap, d in r.artifacts],
            )
            c.executemany(
                "INSERT INTO benchmarks VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        rid,
                        b["name"],
                        b.get("group"),
                        json.dumps(b.get("params") or {}, default=str),
                        b["mean"],
                        b["stddev"],
                        b["min"],
                        b["max"],
                        b["median"],
                        b["rounds"],
                        json.dumps(b.get("extra") or {}, default=str),
                    )
                    for b in r.benchmarks
                ],
            )
            return rid


def _migrate(c: sqlite3.Connection) -> None:
    for table, column, sqltype in _ADDED_COLUMNS:
        have = {row[1] for row in c.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sqltype}")


def forget(store: Store, nodeid: str) -> int:
    """Delete every result of a test id (e.g. a parametrization that no longer exists),
    with its measurements, verdicts, artifacts and benchmarks, in one transaction.
    Registered predictions stay: they are the record of what was predicted."""
    with store.transaction() as c:
        ids = [r[0] for r in c.execute("SELECT result_id FROM results WHERE nodeid = ?", (nodeid,))]
        for table in ("measurements", "verdicts", "artifacts", "benchmarks"):
            c.executemany(f"DELETE FROM {table} WHERE result_id = ?", [(i,) for i in ids])
        c.executemany("DELETE FROM results WHERE result_id = ?", [(i,) for i in ids])
    return len(ids)


def _num(x):
    # SQLite has no infinity literal in JSON exports; keep +-inf as NULL (= unbounded)
    return None if x is None or x in (float("inf"), float("-inf")) else x


def open_store(path: str | os.PathLike | None = None) -> Store:
    """Open the store at `path`, `$LAB_STORE`, or results/lab.sqlite."""
    return Store(path or os.environ.get("LAB_STORE") or DEFAULT_STORE)
