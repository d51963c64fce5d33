"""`lab merge`: fold other results stores (another machine's, a Ray task's) into one.

A merge is lossless and idempotent. Runs keep their run ids; a result is the same
result when its (run_id, nodeid, profile, created_at) match, so merging a store twice,
or a store that already holds some of the results, adds only what is missing, with its
measurements, verdicts, artifacts and benchmarks. Registered predictions keep their
earliest registration (first_seen and first_run), whichever store saw them first. A run
still "running" in the main store that finished in the merged one takes the finished row.

A merge is atomic: every source is opened and checked (intact, a results store, a schema
this code reads) before anything is written, and all of them go in under one transaction,
so an error leaves the main store exactly as it was.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from lab.report.store import SCHEMA_VERSION, Store, StoreError

# tables whose rows belong to one result (result_id), copied with the result
_CHILDREN = ("measurements", "verdicts", "artifacts", "benchmarks")
_RESULT_KEY = ("run_id", "nodeid", "profile", "created_at")


@dataclass
class MergeCount:
    """What one source added to the main store (and what it already held)."""

    source: Path
    runs: int = 0
    results: int = 0
    predictions: int = 0
    already: int = 0  # results the main store already held

    def line(self) -> str:
        return (
            f"{self.source}: {self.runs} new run(s), {self.results} new result(s), "
            f"{self.predictions} new prediction registration(s); {self.already} result(s) already present"
        )


def schema_version(path: str | os.PathLike) -> int | None:
    """The schema version a store file says it has (None: no meta table or no version,
    i.e. a store older than versioning). Opens the file read-only and writes nothing."""
    uri = f"file:{urllib.parse.quote(str(Path(path).absolute()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row and str(row[0]).isdigit() else None
    finally:
        conn.close()


def open_source(path: str | os.PathLike, main: Path) -> Store:
    """Open a store to merge from, read-only: StoreError naming the file for one that is
    missing, damaged, not a store, the main store itself, or of a schema this code cannot read."""
    path = Path(path)
    how = "the STORE arguments of lab merge"
    if path.exists() and main.exists() and path.samefile(main):
        raise StoreError(f"{path} is the main store itself: merge other stores into it")
    try:
        version = schema_version(path) if path.is_file() else None
    except sqlite3.Error:
        version = None  # not readable as SQLite: Store below says how it is damaged
    if version is not None and not 1 <= version <= SCHEMA_VERSION:
        raise StoreError(
            f"cannot merge {path}: it is a store of schema {version}, and this LLM Lab merges stores of schema "
            f"1 to {SCHEMA_VERSION} (the main store {main} is schema {SCHEMA_VERSION}). Nothing was merged; a "
            "newer store needs a newer lab (git pull, then bash install.sh)"
        )
    # missing, empty, damaged, not a store: one message each; an older schema is brought up
    # to date in a private in-memory copy, never in the file
    source = Store(path, readonly=True, how=how)
    return source


def merge_stores(main: str | os.PathLike, sources: list[str | os.PathLike]) -> list[MergeCount]:
    """Merge every store in `sources` into the store at `main` (created if missing), all
    or nothing. Returns what each source added."""
    main = Path(main)
    opened: list[Store] = []
    try:
        for path in sources:
            opened.append(open_source(path, main))
        target = Store(main, how="--store PATH (or LAB_STORE)")
        try:
            with target.transaction() as c:
                counts = [_merge_one(c, src) for src in opened]
        finally:
            target.close()
    finally:
        for s in opened:
            s.close()
    return counts


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _merge_one(c: sqlite3.Connection, source: Store) -> MergeCount:
    src = source._conn
    count = MergeCount(source.path)

    def shared(table: str) -> list[str]:
        have = set(_columns(c, table))
        return [col for col in _columns(src, table) if col in have]

    # runs: new ones as they are; one running here but finished there takes the finished row
    cols = shared("runs")
    for row in src.execute(f"SELECT {', '.join(cols)} FROM runs"):
        rec = dict(zip(cols, row, strict=True))
        mine = c.execute("SELECT status FROM runs WHERE run_id = ?", (rec["run_id"],)).fetchone()
        if mine is None:
            c.execute(f"INSERT INTO runs({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", row)
            count.runs += 1
        elif mine[0] == "running" and rec["status"] != "running":
            sets = ", ".join(f"{col} = ?" for col in cols if col != "run_id")
            c.execute(
                f"UPDATE runs SET {sets} WHERE run_id = ?",
                [rec[col] for col in cols if col != "run_id"] + [rec["run_id"]],
            )

    # predictions: the earliest registration of each (nodeid, idx, pred_hash) wins
    cols = shared("predictions")
    for row in src.execute(f"SELECT {', '.join(cols)} FROM predictions"):
        rec = dict(zip(cols, row, strict=True))
        key = (rec["nodeid"], rec["idx"], rec["pred_hash"])
        mine = c.execute(
            "SELECT first_seen FROM predictions WHERE nodeid = ? AND idx = ? AND pred_hash = ?", key
        ).fetchone()
        if mine is None:
            c.execute(f"INSERT INTO predictions({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", row)
            count.predictions += 1
        elif rec["first_seen"] < mine[0]:
            c.execute(
                "UPDATE predictions SET first_seen = ?, first_run = ? WHERE nodeid = ? AND idx = ? AND pred_hash = ?",
                (rec["first_seen"], rec["first_run"], *key),
            )

    # results, each with its children under a fresh result_id in the main store
    cols = [col for col in shared("results") if col != "result_id"]
    child_cols = {t: [col for col in shared(t) if col != "result_id"] for t in _CHILDREN}
    where = " AND ".join(f"{k} = ?" for k in _RESULT_KEY)
    for row in src.execute(f"SELECT result_id, {', '.join(cols)} FROM results ORDER BY result_id"):
        old_id, rec = row[0], dict(zip(cols, row[1:], strict=True))
        if c.execute(f"SELECT 1 FROM results WHERE {where}", [rec[k] for k in _RESULT_KEY]).fetchone():
            count.already += 1
            continue
        new_id = c.execute(
            f"INSERT INTO results({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", row[1:]
        ).lastrowid
        count.results += 1
        for table, tcols in child_cols.items():
            rows = src.execute(f"SELECT {', '.join(tcols)} FROM {table} WHERE result_id = ?", (old_id,)).fetchall()
            c.executemany(
                f"INSERT INTO {table}(result_id, {', '.join(tcols)}) VALUES (?, {', '.join('?' * len(tcols))})",
                [(new_id, *r) for r in rows],
            )
    return count
