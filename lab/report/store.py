"""The results store: one SQLite file holding runs, results, measurements, verdicts,
pre-registered predictions and artifacts (plots, tables).

Every result is written in one transaction, so a run killed mid-way leaves whole
rows or none. WAL mode plus a busy timeout lets pytest-xdist workers write to the
same file concurrently.

Opening validates the file before anything uses it: a missing, empty (0 bytes),
truncated, corrupt, foreign or read-only store raises StoreError with one message that
names the path and what to do. Commands that only read open it with `readonly=True`
(SQLite's `mode=ro`, and `immutable=1` on read-only media), which never writes. Opening
also settles runs left "running" by a process that died (kill -9, power loss): a run
whose process is gone (same host) or whose heartbeat went stale (another host) is marked
"interrupted" (read-only opens show it so without writing).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
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
    ("runs", "pid", "INTEGER"),  # the pytest process (xdist: the controller) that owns the run
    ("runs", "pid_started", "REAL"),  # its start time, so a reused pid is not taken for it
    ("runs", "heartbeat_at", "REAL"),  # last sign of life, renewed every HEARTBEAT_S while it runs
    ("runs", "cache_state", "TEXT"),  # empty | warm: the training cache when the run began
)

# A running run renews its heartbeat this often; another host's run whose heartbeat is
# older than STALE_AFTER_S is taken for dead (on the same host the process is checked).
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
# how a user points a command at another store; the CLI passes its own wording
DEFAULT_HOW = "--lab-store PATH (or LAB_STORE)"
_SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(RuntimeError):
    """The store cannot be used as asked; the message names the path and what to do."""


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
    """A handle on the SQLite results file. Cheap to open; one per process.

    Store(path) opens for writing, creating a missing store (and its folder) unless
    create=False. Store(path, readonly=True) opens an existing store for reading only:
    nothing is written, so it works on read-only media. `how` is how the user names
    another store, for the messages; `verify=False` skips SQLite's quick_check (for a
    process whose parent has just verified the same file)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        readonly: bool = False,
        create: bool = True,
        how: str = DEFAULT_HOW,
        verify: bool = True,
    ):
        self.path = Path(path)
        self.readonly = readonly
        self._how = how
        self._conn: sqlite3.Connection | None = None
        try:
            if readonly:
                self._open_readonly(verify)
            else:
                self._open_writable(create, verify)
        except StoreError:
            self._close_quietly()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._close_quietly()
            raise self._explain(exc) from exc

    # -- opening and validation ---------------------------------------------------------

    def _check_file(self, *, must_exist: bool) -> bool:
        """StoreError for what is not a store file; False when there is no file (yet)."""
        path, how = self.path, self._how
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not a results store file: pass the store's file with {how}")
        if not path.exists():
            if not must_exist:
                return False
            missing = next((p for p in reversed(path.parents) if not p.exists()), None)
            where = f" (the directory {missing} does not exist)" if missing is not None else ""
            raise StoreError(
                f"no results store at {path}{where}: pass the right path with {how}, or create the store "
                "by running hypotheses (`lab run`)"
            )
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(len(_SQLITE_HEADER))
        except OSError as exc:
            raise StoreError(f"cannot read the results store {path}: {exc.strerror or exc}") from exc
        if size == 0:
            raise StoreError(
                f"the results store {path} is empty (0 bytes), so it holds no results: most likely a copy or "
                "download that failed, or a truncated file. Restore the last good copy (from git or a backup), "
                "or delete the empty file to start a new store there"
            )
        if head != _SQLITE_HEADER:
            raise StoreError(
                f"{path} is not an SQLite results store (it does not start with SQLite's header): it is "
                f"corrupt, or another kind of file. {self._recovery()}"
            )
        return True

    def _recovery(self) -> str:
        p = self.path
        return (
            "Nothing was written to it. Restore the last good copy (from git or a backup), or salvage "
            f"what SQLite can still read with `sqlite3 {p} .recover | sqlite3 {p.with_name(p.stem + '-recovered')}"
            f"{p.suffix}` and pass the recovered file with {self._how}"
        )

    def _damaged(self, detail: str) -> StoreError:
        detail = " ".join(detail.split())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        return StoreError(f"the results store {self.path} is damaged ({detail}). {self._recovery()}")

    def _read_only(self, why: str) -> StoreError:
        return StoreError(
            f"the results store {self.path} is read-only ({why}), and this command records into it: copy it "
            f"somewhere writable and pass that path with {self._how}, or make it writable. Reading it works: "
            "`lab show` and `lab site build` open it read-only"
        )

    def _explain(self, exc: BaseException) -> StoreError:
        """One message for an error SQLite (or the OS) raised while opening."""
        text = str(exc)
        low = text.lower()
        if isinstance(exc, sqlite3.DatabaseError) and any(
            w in low for w in ("malformed", "not a database", "corrupt", "disk i/o error")
        ):
            return self._damaged(text)
        if "readonly" in low or "read-only" in low:
            return self._read_only(text)
        if "locked" in low or "busy" in low:
            return StoreError(
                f"the results store {self.path} stayed locked by another process for over a minute ({text}): "
                "wait for the other run to finish, or pass another store with " + self._how
            )
        return StoreError(f"cannot open the results store {self.path}: {text}. Pass another store with {self._how}")

    def _connect(self, **params) -> sqlite3.Connection:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?{query}"
        conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        return conn

    def _validate(self, verify: bool) -> set[str]:
        """Check the open file is an intact store this code can read; returns its tables."""
        c = self._conn
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if verify:
            problems = [r[0] for r in c.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise self._damaged("; ".join(problems))
        if tables and not {"runs", "results"} <= tables:
            raise StoreError(
                f"{self.path} is an SQLite database but not an LLM Lab results store (it has no runs and results "
                f"tables): pass the store's path with {self._how}"
            )
        if "meta" in tables:
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row and str(row[0]).isdigit() else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"the results store {self.path} was written by a newer LLM Lab (schema {version}; this one "
                    f"reads up to {SCHEMA_VERSION}): update the lab (git pull, then bash install.sh)"
                )
        return tables

    def _check_writable(self) -> None:
        # os.access also answers for root: EROFS on read-only media, EPERM for immutable files
        if not os.access(self.path, os.W_OK):
            raise self._read_only("the file is not writable")
        if not os.access(self.path.parent, os.W_OK):
            # SQLite writes its -wal and -shm files beside the store
            raise self._read_only(f"its directory {self.path.parent} is not writable: read-only media?")

    def _open_writable(self, create: bool, verify: bool) -> None:
        path = self.path
        if not self._check_file(must_exist=not create):
            _create_store(path, self._how)
        else:
            self._check_writable()
        self._conn = self._connect(mode="rw")
        tables = self._validate(verify)
        if self._conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        # BEGIN IMMEDIATE also proves the file can be written; nothing changes on disk
        # unless the schema needs columns or a dead run needs marking
        with self.transaction() as c:
            if not {"meta", "runs", "results"} <= tables:
                _write_schema(c)
            _migrate(c)
            _set_schema_version(c)
            _mark_interrupted(c, _dead_runs(c))

    def _open_readonly(self, verify: bool) -> None:
        path = self.path
        self._check_file(must_exist=True)
        # a WAL store on read-only media cannot get its -shm file: SQLite then needs
        # immutable=1, which promises that nothing changes the file while it is open
        attempts = [{"mode": "ro"}, {"mode": "ro", "immutable": 1}]
        for i, params in enumerate(attempts):
            self._conn = self._connect(**params)
            try:
                self._conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                break
            except sqlite3.OperationalError:
                self._close_quietly()
                if i == len(attempts) - 1 or os.access(path.parent, os.W_OK):
                    raise
        if "immutable" in params:
            wal = path.with_name(path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise StoreError(
                    f"the results store {path} is on read-only media with writes not yet merged into it "
                    f"({wal}): copy the store together with its -wal file somewhere writable and open the copy"
                )
        tables = self._validate(verify)
        if not tables:
            raise StoreError(
                f"{path} is an empty SQLite database, not an LLM Lab results store: pass the store's path with "
                f"{self._how}"
            )
        dead = _dead_runs(self._conn)
        if dead or _missing_columns(self._conn):
            # bring an older store up to date, and show dead runs as interrupted, in a
            # private in-memory copy: the file itself is never written
            mem = sqlite3.connect(":memory:", isolation_level=None)
            self._conn.backup(mem)
            self._conn.close()
            self._conn = mem
            self.readonly = False
            with self.transaction() as c:
                _migrate(c)
                _mark_interrupted(c, dead)
            self.readonly = True

    def _close_quietly(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"the results store {self.path} was opened read-only: open it with Store(path) to write")
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


def _missing_columns(c: sqlite3.Connection) -> list[tuple[str, str]]:
    have: dict[str, set[str]] = {}
    for table, _column, _ in _ADDED_COLUMNS:
        if table not in have:
            have[table] = {row[1] for row in c.execute(f"PRAGMA table_info({table})")}
    return [(t, col) for t, col, _ in _ADDED_COLUMNS if col not in have[t]]


def _write_schema(c: sqlite3.Connection) -> None:
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            c.execute(stmt)


def _set_schema_version(c: sqlite3.Connection) -> None:
    row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None or row[0] != str(SCHEMA_VERSION):
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def check_store(path: str | os.PathLike, *, write: bool, how: str = DEFAULT_HOW) -> bool:
    """Validate the store at `path` without changing anything (not even creating it):
    an existing file must be an intact store this code can read and, for write=True,
    writable; a missing one must be creatable (write=True) or is an error. Raises
    StoreError with one message; returns whether the file exists. For a command's
    start-up: fail in a second, not after an hour of training."""
    path = Path(path)
    if not path.exists():
        if not write:
            Store(path, readonly=True, how=how)  # raises the "no results store" message
        _check_creatable(path, how)
        return False
    if not write:
        Store(path, readonly=True, how=how).close()
        return True
    # a writer's check: open for writing and take the write lock, then let go without a
    # change (unlike a read-only open, this leaves no -wal/-shm files behind)
    probe = Store.__new__(Store)
    probe.path, probe.readonly, probe._how, probe._conn = path, False, how, None
    try:
        probe._check_file(must_exist=True)
        probe._check_writable()
        probe._conn = probe._connect(mode="rw")
        probe._validate(verify=True)
        probe._conn.execute("BEGIN IMMEDIATE")
        probe._conn.execute("ROLLBACK")
    except (sqlite3.Error, OSError) as exc:
        raise probe._explain(exc) from exc
    finally:
        probe._close_quietly()
    return True


def _check_creatable(path: Path, how: str) -> None:
    probe = next((p for p in path.parents if p.exists()), Path("/"))
    if not probe.is_dir():
        raise StoreError(
            f"cannot write the results store at {str(path)!r}: {probe} is not a directory. "
            f"Pass a writable path with {how}."
        )
    if not os.access(probe, os.W_OK):
        raise StoreError(
            f"cannot write the results store at {str(path)!r}: {probe} is not writable (read-only media?). "
            f"Pass a writable path with {how}."
        )


def _create_store(path: Path, how: str) -> None:
    """Create an empty store at `path` (and its folders) all at once: the schema is
    written into a sibling file that is then linked into place, so no other process
    ever sees a half-made (0-byte) store, and one made meanwhile by another is kept."""
    _check_creatable(path, how)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot write the results store at {str(path)!r}: cannot create the directory {path.parent} "
            f"({exc.strerror or exc}). Pass a writable path with {how}."
        ) from exc
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            _write_schema(conn)
            _migrate(conn)
            _set_schema_version(conn)
            conn.execute("COMMIT")
        finally:
            conn.close()  # checkpoints the write-ahead log into the file
        try:
            os.link(tmp, path)  # never replaces a store that appeared meanwhile
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(
            f"cannot write the results store at {str(path)!r}: {exc}. Pass a writable path with {how}."
        ) from exc
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            leftover.unlink(missing_ok=True)


# -- runs left "running" by a process that died -------------------------------------------


def host_name() -> str:
    return os.uname().nodename


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _process_alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return False  # the pid now belongs to another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _dead_runs(c: sqlite3.Connection, now: float | None = None) -> list[tuple[str, float]]:
    """(run_id, last sign of life) of each run marked running whose process is gone: on
    this host, its pid is no longer that process; elsewhere (or without a recorded pid),
    its heartbeat (else its start or latest result) is older than STALE_AFTER_S."""
    have = {row[1] for row in c.execute("PRAGMA table_info(runs)")}
    cols = [col if col in have else f"NULL AS {col}" for col in ("host", "pid", "pid_started", "heartbeat_at")]
    rows = c.execute(
        f"SELECT run_id, started_at, {', '.join(cols)}, "
        "(SELECT MAX(created_at) FROM results r WHERE r.run_id = runs.run_id) FROM runs WHERE status = 'running'"
    ).fetchall()
    now = time.time() if now is None else now
    here = host_name()
    dead = []
    for run_id, started_at, host, pid, pid_started, heartbeat_at, last_result in rows:
        last = max(x for x in (started_at, heartbeat_at, last_result) if x is not None)
        if host == here and pid is not None:
            gone = not _process_alive(int(pid), pid_started)
        else:
            gone = now - last > STALE_AFTER_S
        if gone:
            dead.append((run_id, last))
    return dead


def _mark_interrupted(c: sqlite3.Connection, dead: list[tuple[str, float]]) -> None:
    for run_id, last in dead:
        c.execute(
            "UPDATE runs SET status = 'interrupted', finished_at = ?, wall_time_s = ? - started_at, "
            "peak_memory_bytes = COALESCE(peak_memory_bytes, "
            "(SELECT MAX(peak_memory_bytes) FROM results WHERE run_id = ?)) WHERE run_id = ? AND status = 'running'",
            (last, last, run_id, run_id),
        )


class Heartbeat:
    """Renews a run's heartbeat_at every `interval` seconds from a daemon thread (with its
    own connection), so a store shared between hosts can tell a live run from a dead one.
    Never creates the store: a beat before the run row exists changes nothing."""

    def __init__(self, path: str | os.PathLike, run_id: str, interval: float = HEARTBEAT_S):
        self.path = Path(path)
        self.run_id = run_id
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        if not self.path.is_file():
            return
        try:
            uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=rw"
            conn = sqlite3.connect(uri, uri=True, timeout=10, isolation_level=None)
            try:
                conn.execute(
                    "UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND status = 'running'",
                    (time.time(), self.run_id),
                )
            finally:
                conn.close()
        except sqlite3.Error:
            pass  # a missed beat is harmless; STALE_AFTER_S spans many

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._loop, name="lab-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


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
