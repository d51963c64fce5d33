"""Live progress of training runs under pytest.

pytest captures what tests print, so the trainers' tqdm bars would stay invisible until a
test ends (`lab run -m pretraining` on the cpu profile would show a file name and
nothing else for minutes). This plugin routes lab.progress tasks to the terminal as
lines instead: what is training, step / total, loss, tokens/s, elapsed and ETA, about
every `--lab-progress` seconds (default 10) while a run lasts, and one line when it ends.
Runs shorter than that print nothing (the smoke profile stays as quiet as before).

- Without xdist, lines go through pytest's terminal reporter with capture suspended.
- Under pytest-xdist, each worker appends its lines to a file in a folder the controller
  made; a thread in the controller prints them through its terminal reporter, prefixed
  with the worker's id, so two workers never interleave inside a line.
- `-q` (or `--lab-progress off`) prints nothing.

Loaded by lab.report.plugin (`pytest_plugins`).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lab import progress

DEFAULT_INTERVAL = 10.0
_KEY = pytest.StashKey["_Reporter"]()


def pytest_addoption(parser):
    parser.getgroup("lab", "LLM Lab").addoption(
        "--lab-progress",
        default=None,
        metavar="SECONDS",
        help="seconds between progress lines of a training run (default "
        f"{DEFAULT_INTERVAL:g}; 0: every step; 'off': none; -q also silences them)",
    )


def _interval(config) -> float | None:
    raw = config.getoption("--lab-progress")
    if config.getoption("verbose") < 0:  # -q means quiet, whatever the interval
        return None
    if raw is None:
        return DEFAULT_INTERVAL
    if str(raw).lower() in ("off", "no", "none", "false"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(f"--lab-progress expects seconds or 'off', got {raw!r}") from None
    if value < 0:
        raise pytest.UsageError(f"--lab-progress expects seconds >= 0 or 'off', got {raw!r}")
    return value


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    reporter = _Reporter(config, _interval(config))
    config.stash[_KEY] = reporter
    config.pluginmanager.register(reporter, "lab-progress")
    progress.install(reporter)


def pytest_unconfigure(config):
    reporter = config.stash.get(_KEY, None)
    if reporter is not None:
        progress.uninstall(reporter)
        reporter.stop()


class _Reporter:
    """A lab.progress sink printing a line per task every `interval` seconds."""

    def __init__(self, config, interval: float | None):
        self.config = config
        self.interval = interval
        self.nodeid = ""
        self.workerid = getattr(config, "workerinput", {}).get("workerid")
        self.outbox: Path | None = None  # worker: the file its lines go to
        self.inbox: Path | None = None  # controller under xdist: the folder the workers write to
        self.offsets: dict[Path, int] = {}
        self.last: dict[int, float] = {}
        self.printed: set[int] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        if self.workerid is not None and interval is not None:
            folder = config.workerinput.get("lab_progress_dir")
            self.outbox = Path(folder) / f"{self.workerid}.log" if folder else None

    # -- xdist: the controller hands the workers a folder and prints what they write ---------

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        if self.interval is None:
            return
        if self.inbox is None:
            self.inbox = Path(tempfile.mkdtemp(prefix="lab-progress-"))
            self.thread = threading.Thread(target=self._pump, name="lab-progress", daemon=True)
            self.thread.start()
        node.workerinput["lab_progress_dir"] = str(self.inbox)

    def _pump(self) -> None:
        while not self.stopping.wait(0.5):
            self._drain()

    def _drain(self) -> None:
        if self.inbox is None:
            return
        for path in sorted(self.inbox.glob("*.log")):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # complete lines only
            if end:
                self.offsets[path] = self.offsets.get(path, 0) + end
                for line in data[:end].decode("utf-8", "replace").splitlines():
                    self._terminal(f"[{path.stem}] {line}")

    def stop(self) -> None:
        if self.thread is not None:
            self.stopping.set()
            self.thread.join(timeout=2)
            self._drain()
            self.thread = None
        if self.inbox is not None:
            shutil.rmtree(self.inbox, ignore_errors=True)
            self.inbox = None

    # -- where a line goes -------------------------------------------------------------

    def _terminal(self, line: str) -> None:
        tr = self.config.pluginmanager.getplugin("terminalreporter")
        if tr is None:
            return
        with self.lock:
            tr.write_line(line)
            tr.flush()  # seen at once also when stdout is a file or a pipe (`lab run > log`)

    def _emit(self, line: str) -> None:
        if self.outbox is not None:  # an xdist worker: the controller prints it
            with open(self.outbox, "a", encoding="utf-8") as f:
                f.write(line.replace("\n", " ") + "\n")
            return
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            self._terminal(line)
            return
        with capman.global_and_fixture_disabled():
            self._terminal(line)

    def _line(self, task: progress.Task) -> str:
        test = self.nodeid.rsplit("/", 1)[-1]
        return f"[lab] {test}: {task.line()}" if test else f"[lab] {task.line()}"

    # -- pytest ---------------------------------------------------------------------------

    def pytest_runtest_logstart(self, nodeid, location):
        self.nodeid = nodeid

    # -- the lab.progress sink -------------------------------------------------------------

    def start(self, task: progress.Task) -> None:
        self.last[id(task)] = time.monotonic()

    def update(self, task: progress.Task) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self.last.get(id(task), task.started) >= self.interval:
            self.last[id(task)] = now
            self.printed.add(id(task))
            self._emit(self._line(task))

    def finish(self, task: progress.Task) -> None:
        self.last.pop(id(task), None)
        if id(task) in self.printed:
            self.printed.discard(id(task))
            state = "done" if task.ok else "stopped"
            self._emit(f"{self._line(task)} -- {state}")
