"""The pytest plugin: profiles, fixtures, verdicts, the store, the terminal summary.

Registered by the project's conftest.py (`pytest_plugins = ["lab.report.plugin"]`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.profiles import PROFILES, Profile, get_profile
from lab.report import provenance
from lab.report.outcome import Outcome
from lab.report.predictions import (
    CONFIRMED,
    INCONCLUSIVE,
    REFUTED,
    Judgement,
    Prediction,
    combine,
    judge,
)
from lab.report.store import DEFAULT_STORE, ResultRecord, Store, StoreError

VERDICT_KEY = "lab_verdict"


@dataclass
class LabState:
    profile: Profile
    store_path: Path
    run_id: str
    strict: bool
    is_controller: bool
    started_at: float
    rootpath: Path
    store: Store | None = None
    run_started: bool = False
    summaries: list = field(default_factory=list)

    def get_store(self) -> Store:
        if self.store is None:
            try:
                self.store = Store(self.store_path)
            except StoreError as exc:
                raise pytest.UsageError(str(exc)) from None
        if not self.run_started:
            # whichever process writes first (controller or xdist worker) creates the run row
            self.run_started = True
            self._start_run()
        return self.store

    def _start_run(self) -> None:
        commit, dirty = provenance.git_state(self.rootpath)
        versions = provenance.package_versions()
        self.store.start_run(
            self.run_id,
            started_at=self.started_at,
            profile=self.profile.name,
            device=provenance.device_description(self.profile.device),
            git_commit=commit,
            git_dirty=int(bool(dirty)) if dirty is not None else None,
            seeds=list(self.profile.seeds),
            python=versions["python"],
            torch=versions.get("torch"),
            packages=versions,
            host=os.uname().nodename,
            argv=provenance.argv(),
        )


_STATE = pytest.StashKey[LabState]()


def pytest_addoption(parser):
    group = parser.getgroup("lab", "LLM Lab")
    group.addoption(
        "--lab-profile",
        default=None,
        help=f"scale of the experiments: one of {sorted(PROFILES)} "
        "(default: $LAB_PROFILE, else gpu when CUDA is available, else cpu)",
    )
    group.addoption(
        "--lab-store",
        default=None,
        help=f"results store (SQLite file); default $LAB_STORE or {DEFAULT_STORE}",
    )
    group.addoption("--lab-seeds", default=None, help="comma-separated seeds overriding the profile's, e.g. 0,1,2")
    group.addoption("--lab-strict", action="store_true", help="a refuted prediction fails its test")
    group.addoption(
        "--lab-site",
        action="store_true",
        help="after the run, regenerate the result pages under docs/ from the store",
    )
    group.addoption("--lab-list", action="store_true", help="list hypotheses and their predictions; run nothing")


def _parse_seeds(raw: str | None):
    if raw is None:
        return None
    try:
        return tuple(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise pytest.UsageError(f"--lab-seeds expects comma-separated ints, got {raw!r}") from None


def _check_writable(path: Path) -> None:
    """Fail at start-up, not after an hour of training, when the store can't be written."""
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    if path.exists() and not path.is_file():
        problem = "it is not a file"
    elif not path.exists() and not probe.is_dir():
        problem = f"{probe} is not a directory"
    elif not os.access(probe, os.W_OK):
        problem = f"{probe} is not writable"
    else:
        return
    raise pytest.UsageError(
        f"cannot write the results store at {str(path)!r}: {problem}. "
        "Pass a writable path with --lab-store PATH or set LAB_STORE."
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "lab_prediction: a recorded prediction (use lab.report.prediction)")
    try:
        profile = get_profile(config.getoption("--lab-profile"), seeds=_parse_seeds(config.getoption("--lab-seeds")))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if profile.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"profile {profile.name!r} needs CUDA, which is not available here; use --lab-profile cpu or smoke"
            )
    store_path = Path(config.getoption("--lab-store") or os.environ.get("LAB_STORE") or config.rootpath / DEFAULT_STORE)
    _check_writable(store_path)
    workerinput = getattr(config, "workerinput", None)
    state = LabState(
        profile=profile,
        store_path=store_path,
        run_id=workerinput["lab_run_id"] if workerinput else uuid.uuid4().hex[:12],
        strict=config.getoption("--lab-strict"),
        is_controller=workerinput is None,
        started_at=workerinput["lab_started_at"] if workerinput else time.time(),
        rootpath=config.rootpath,
    )
    config.stash[_STATE] = state
    config.pluginmanager.register(_Summary(state), "lab-summary")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(state), "lab-xdist")


class _XdistHooks:
    def __init__(self, state: LabState):
        self.state = state

    def pytest_configure_node(self, node):
        node.workerinput["lab_run_id"] = self.state.run_id
        node.workerinput["lab_started_at"] = self.state.started_at


def _is_hypothesis(item) -> bool:
    return bool(list(item.iter_markers("lab_prediction"))) or "outcome" in getattr(item, "fixturenames", ())


def _predictions(item) -> list[Prediction]:
    preds = []
    # iter_markers yields closest first; reverse to keep decorator order top-down
    for mark in reversed(list(item.iter_markers("lab_prediction"))):
        if len(mark.args) != 1 or not isinstance(mark.args[0], Prediction):
            raise pytest.UsageError(
                f"{item.nodeid}: use lab.report.prediction(...) to attach predictions, got mark args {mark.args!r}"
            )
        preds.append(mark.args[0])
    params = getattr(getattr(item, "callspec", None), "params", {})
    return [p.render(params) for p in preds]


@pytest.hookimpl(trylast=True)  # after -m / -k deselection, so the list honours them
def pytest_collection_modifyitems(session, config, items):
    if config.getoption("--lab-list"):
        _list_hypotheses(config, items)
        items[:] = []


def _list_hypotheses(config, items) -> None:
    tw = config.get_terminal_writer()
    tw.line()
    for item in items:
        if not _is_hypothesis(item):
            continue
        tw.line(item.nodeid, bold=True)
        try:
            for p in _predictions(item):
                tw.line(f"    predicts: {p.text}  [{p.claim}]")
        except (ValueError, pytest.UsageError) as exc:
            tw.line(f"    bad prediction: {exc}", red=True)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lab_profile(pytestconfig) -> Profile:
    """The active profile (sizes, steps, seeds, device)."""
    return pytestconfig.stash[_STATE].profile


@pytest.fixture(scope="session")
def lab(lab_profile):
    """The lab: corpora, tokenizers, cached training runs, at the active profile's scale."""
    from lab.session import Lab

    return Lab(lab_profile)


@pytest.fixture
def outcome(request) -> Outcome:
    """Record what the hypothesis measured: outcome.record(metric, value, seed=...),
    outcome.plot(...), outcome.table(...), outcome.note(...)."""
    out = Outcome()
    request.node._lab_outcome = out
    return out


# -- running hypotheses ---------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not _is_hypothesis(item):
        yield
        return
    state = item.config.stash[_STATE]
    preds = _predictions(item)
    # pre-registration: the prediction is in the store before the experiment runs
    for idx, p in enumerate(preds):
        state.get_store().register_prediction(
            item.nodeid, idx, p.fingerprint(), p.text, p.metric, p.claim, state.run_id
        )
    mem = provenance.PeakMemory(state.profile.device).start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        item._lab_wall_time = time.perf_counter() - t0
        item._lab_peak_memory = mem.stop()


def _judge_all(item, out: Outcome | None) -> tuple[list[Judgement], str | None]:
    preds = _predictions(item)
    if not preds:
        return [], None
    if out is None:
        return [], "hypothesis has predictions but does not use the `outcome` fixture"
    if not out.measurements:
        return [], "missing outcome: the test recorded no measurements"
    judgements = []
    for p in preds:
        try:
            judgements.append(judge(p, out.measurements))
        except (LookupError, ValueError) as exc:
            return [], str(exc)
    return judgements, None


def _benchmark_rows(item) -> list[dict]:
    bm = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(bm, "stats", None), "stats", None)
    if bm is None or stats is None:
        return []
    return [
        {
            "name": item.name,
            "group": bm.group,
            "params": getattr(getattr(item, "callspec", None), "params", {}),
            "mean": stats.mean,
            "stddev": stats.stddev,
            "min": stats.min,
            "max": stats.max,
            "median": stats.median,
            "rounds": stats.rounds,
            "extra": dict(bm.extra_info),
        }
    ]


def _doc(item) -> tuple[str, str]:
    doc = (getattr(item, "obj", None).__doc__ or "").strip() if getattr(item, "obj", None) else ""
    import inspect

    doc = inspect.cleandoc(doc) if doc else ""
    title = doc.splitlines()[0].rstrip(".") if doc else item.originalname.replace("_", " ")
    return title, doc


def _markers(item) -> list[str]:
    names = {m.name for m in item.iter_markers()}
    return sorted(n for n in names if n not in ("parametrize", "lab_prediction", "usefixtures", "filterwarnings"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    result = yield
    report = result.get_result()
    if not _is_hypothesis(item):
        return
    state = item.config.stash[_STATE]
    if call.when == "setup" and report.outcome == "passed":
        return
    if call.when == "teardown":
        return
    out: Outcome | None = getattr(item, "_lab_outcome", None)
    judgements: list[Judgement] = []
    error = None
    status = report.outcome
    if call.when == "setup":
        error = _longrepr_text(report) if report.failed else _skip_reason(report)
    elif report.passed:
        judgements, error = _judge_all(item, out)
        if error:
            _fail(report, f"[lab] {error}")
            status = "failed"
        elif state.strict and any(j.verdict == REFUTED for j in judgements):
            _fail(
                report,
                "[lab] --lab-strict: prediction refuted: "
                + "; ".join(j.prediction.text for j in judgements if j.verdict == REFUTED),
            )
            status = "failed"
    else:
        error = _skip_reason(report) if report.skipped else _longrepr_text(report)
    verdict = combine([j.verdict for j in judgements]) if judgements and status == "passed" else None
    title, doc = _doc(item)
    params = getattr(getattr(item, "callspec", None), "params", {})
    record = ResultRecord(
        run_id=state.run_id,
        profile=state.profile.name,
        nodeid=item.nodeid,
        hypothesis=item.nodeid.split("[")[0],
        status=status,
        params={k: _jsonable(v) for k, v in params.items()},
        title=title,
        docstring=doc,
        markers=_markers(item),
        verdict=verdict,
        error=error,
        seeds=sorted({s for m in (out.measurements.values() if out else []) for s in m if s is not None}),
        wall_time_s=getattr(item, "_lab_wall_time", None),
        peak_memory_bytes=getattr(item, "_lab_peak_memory", None),
        notes=list(out.notes) if out else [],
        units=dict(out.units) if out else {},
        measurements=[
            (m, s, v) for m, samples in (out.measurements.items() if out else []) for s, v in samples.items()
        ],
        verdicts=[_verdict_row(i, j) for i, j in enumerate(judgements)],
        artifacts=[(a.name, a.kind, a.caption, a.data) for a in (out.artifacts if out else [])],
        benchmarks=_benchmark_rows(item),
    )
    state.get_store().add_result(record)
    report.user_properties.append(
        (
            VERDICT_KEY,
            json.dumps(
                {
                    "nodeid": item.nodeid,
                    "status": status,
                    "verdict": verdict,
                    "lines": [
                        f"{j.verdict.upper():<12} {j.prediction.text} -- {j.prediction.claim}: {j.interval.describe()}"
                        for j in judgements
                    ],
                }
            ),
        )
    )


def _verdict_row(idx: int, j: Judgement) -> dict:
    return {
        "idx": idx,
        "pred_hash": j.prediction.fingerprint(),
        "text": j.prediction.text,
        "metric": j.prediction.metric,
        "claim": j.prediction.claim,
        "verdict": j.verdict,
        "estimate": j.interval.estimate,
        "low": j.interval.low,
        "high": j.interval.high,
        "n": j.interval.n,
        "method": j.interval.method,
        "confidence": j.interval.confidence,
        "detail": j.detail,
    }


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)


def _fail(report, message: str) -> None:
    report.outcome = "failed"
    report.longrepr = message


def _longrepr_text(report) -> str:
    text = str(report.longrepr) if report.longrepr else ""
    return text[-4000:]


def _skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return str(lr or "")


# -- summary --------------------------------------------------------------------------


class _Summary:
    """Collects verdict lines from reports (also those xdist workers send) and prints them."""

    def __init__(self, state: LabState):
        self.state = state

    def pytest_runtest_logreport(self, report):
        for key, value in getattr(report, "user_properties", []):
            if key == VERDICT_KEY:
                self.state.summaries.append(json.loads(value))

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        state = self.state
        if not state.is_controller or not state.summaries:
            return
        tr = terminalreporter
        counts = {CONFIRMED: 0, REFUTED: 0, INCONCLUSIVE: 0, "failed": 0, "skipped": 0}
        for s in state.summaries:
            if s["status"] in ("failed", "skipped"):
                counts[s["status"]] += 1
            elif s["verdict"]:
                counts[s["verdict"]] += 1
        tr.write_sep("=", f"LLM Lab verdicts (profile: {state.profile.name}, store: {state.store_path})")
        colors = {CONFIRMED: {"green": True}, REFUTED: {"red": True}, INCONCLUSIVE: {"yellow": True}}
        for s in state.summaries:
            label = (s["verdict"] or s["status"]).upper()
            style = colors.get(s["verdict"], {"red": True} if s["status"] == "failed" else {})
            tr.write(f"{label:<12} ", bold=True, **style)
            tr.line(s["nodeid"])
            for line in s["lines"]:
                tr.line(f"    {line}")
        tr.line(
            f"{counts[CONFIRMED]} confirmed, {counts[REFUTED]} refuted, "
            f"{counts[INCONCLUSIVE]} inconclusive, {counts['failed']} failed, "
            f"{counts['skipped']} skipped",
            bold=True,
        )
        if state.profile.name == "smoke":
            tr.line("(smoke profile: one seed, tiny models -- verdicts test the machinery, not the claims)")


def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(_STATE, None)
    if state is None or not state.is_controller:
        return
    if not state.summaries:
        return  # no hypothesis ran: leave the store alone
    status = "interrupted" if exitstatus == pytest.ExitCode.INTERRUPTED else "complete"
    store = state.store or Store(state.store_path)
    store.finish_run(state.run_id, exitstatus=int(exitstatus), status=status)
    if session.config.getoption("--lab-site"):
        from lab.report.site import write_pages

        pages = write_pages(state.store_path, session.config.rootpath / "docs")
        session.config.get_terminal_writer().line(f"[lab] wrote {pages} result pages under docs/")


def pytest_unconfigure(config):
    # closing checkpoints SQLite's write-ahead log into the store file itself
    state = config.stash.get(_STATE, None)
    if state is not None and state.store is not None:
        state.store.close()
        state.store = None
