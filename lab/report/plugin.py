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
from lab.report import registry as reg
from lab.report.outcome import Outcome
from lab.report.predictions import (
    CHECK,
    CONFIRMED,
    INCONCLUSIVE,
    INVALID,
    REFUTED,
    Evidence,
    Judgement,
    Prediction,
    combine,
    invalidate,
    judge,
)
from lab.report.store import (
    DEFAULT_STORE,
    Heartbeat,
    ResultRecord,
    Store,
    StoreError,
    check_store,
    host_name,
    process_start_time,
)

VERDICT_KEY = "lab_verdict"
pytest_plugins = ["lab.report.progress"]  # live progress of training runs (its own module)


@dataclass
class LabState:
    profile: Profile
    store_path: Path
    run_id: str
    strict: bool
    is_controller: bool
    started_at: float
    rootpath: Path
    pid: int = 0  # the process that owns the run (xdist: the controller), for interrupted-run detection
    pid_started: float | None = None
    argv: str = ""  # the command that started the run (xdist: the controller's, not a worker's)
    cache_state: str | None = None  # the training cache when the run began (provenance.training_cache_state)
    store: Store | None = None
    run_started: bool = False
    summaries: list = field(default_factory=list)
    registry: dict | None = None
    heartbeat: Heartbeat | None = None

    def load_registry(self) -> dict:
        """The committed registry ({} when there is none yet), read once per process."""
        if self.registry is None:
            try:
                self.registry, _ = reg.load(self.rootpath / reg.REGISTRY_PATH)
            except reg.RegistryError as exc:
                raise pytest.UsageError(str(exc)) from None
        return self.registry

    def get_store(self) -> Store:
        if self.store is None:
            try:
                # the controller verified the file at start-up; a worker need not scan it again
                self.store = Store(self.store_path, verify=self.is_controller)
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
            host=host_name(),
            pid=self.pid,
            pid_started=self.pid_started,
            heartbeat_at=time.time(),
            argv=self.argv or provenance.argv(),
            cache_state=self.cache_state,
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
        help="after the run, regenerate the result pages from the store: under docs/ for the reference store "
        "(results/lab.sqlite), in <store>-site/ beside any other store",
    )
    group.addoption("--lab-list", action="store_true", help="list hypotheses and their predictions; run nothing")
    group.addoption(
        "--lab-register",
        action="store_true",
        help=f"register every prediction in {reg.REGISTRY_PATH} (commit it before running them); run nothing",
    )
    group.addoption(
        "--lab-register-check",
        action="store_true",
        help="fail when a prediction, its code, data or settings changed since registration; run nothing",
    )
    group.addoption(
        "--lab-register-backfill",
        default=None,
        metavar="NOTES",
        help="one-time: date and classify predictions that predate the registry from git, the store and NOTES",
    )
    group.addoption(
        "--lab-register-reason",
        default=None,
        help="why registered predictions with results are being changed (each becomes an amendment)",
    )


def _parse_seeds(raw: str | None):
    if raw is None:
        return None
    try:
        return tuple(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise pytest.UsageError(f"--lab-seeds expects comma-separated ints, got {raw!r}") from None


def _records_results(config) -> bool:
    """Whether this pytest invocation may run tests and so write to the store."""
    opt = config.option
    if getattr(opt, "help", False) or getattr(opt, "version", False) or getattr(opt, "collectonly", False):
        return False
    return not any(config.getoption(o) for o in ("--lab-list", "--lab-register", "--lab-register-check"))


def _check_store_at_startup(path: Path) -> None:
    """Fail at start-up, not after an hour of training, when the store is unusable: an
    existing file must be an intact, writable store (checked without writing to it, so
    a run of unit tests leaves it as it is); a missing one must be creatable."""
    try:
        check_store(path, write=True)
    except StoreError as exc:
        raise pytest.UsageError(str(exc)) from None


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
    workerinput = getattr(config, "workerinput", None)
    records = _records_results(config)
    if records and workerinput is None:
        _check_store_at_startup(store_path)
    state = LabState(
        profile=profile,
        store_path=store_path,
        run_id=workerinput["lab_run_id"] if workerinput else uuid.uuid4().hex[:12],
        strict=config.getoption("--lab-strict"),
        is_controller=workerinput is None,
        started_at=workerinput["lab_started_at"] if workerinput else time.time(),
        rootpath=config.rootpath,
        pid=workerinput["lab_pid"] if workerinput else os.getpid(),
        pid_started=workerinput["lab_pid_started"] if workerinput else process_start_time(os.getpid()),
        argv=workerinput.get("lab_argv", "") if workerinput else provenance.argv(),
        cache_state=workerinput.get("lab_cache_state") if workerinput else provenance.training_cache_state(),
    )
    config.stash[_STATE] = state
    if records and workerinput is None:
        # renews the run's heartbeat_at (once a hypothesis has created the run row), so a
        # store shared between machines can tell this run from one that died
        state.heartbeat = Heartbeat(store_path, state.run_id).start()
    if config.getoption("--lab-register") or config.getoption("--lab-register-check"):
        config.pluginmanager.register(_Register(config), "lab-register")
    config.pluginmanager.register(_Summary(state), "lab-summary")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(state), "lab-xdist")


class _XdistHooks:
    def __init__(self, state: LabState):
        self.state = state

    def pytest_configure_node(self, node):
        node.workerinput["lab_run_id"] = self.state.run_id
        node.workerinput["lab_started_at"] = self.state.started_at
        node.workerinput["lab_pid"] = self.state.pid
        node.workerinput["lab_pid_started"] = self.state.pid_started
        node.workerinput["lab_argv"] = self.state.argv
        node.workerinput["lab_cache_state"] = self.state.cache_state


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


def registry_entries(item) -> list[reg.Entry]:
    """The registry entries the collected hypothesis `item` would have now."""
    from lab.session import Lab

    cached = getattr(item, "_lab_registry_entries", None)
    if cached is None:
        cached = reg.entries_for_item(item, _predictions(item), _evidence_profiles(), item.config.rootpath, Lab)
        item._lab_registry_entries = cached
    return cached


def _evidence_profiles() -> dict:
    return {name: get_profile(name) for name in reg.EVIDENCE_PROFILES}


class _Register:
    """--lab-register / --lab-register-check: runs on the whole collection, before -m / -k
    deselect anything, so a partial selection can never retire other predictions."""

    def __init__(self, config):
        self.config = config
        self.message: str | None = None
        self.returncode = 0

    def _finish(self, items, message: str, returncode: int) -> None:
        # a message and an exit status, not pytest.exit: that prints an "Exit" banner
        items[:] = []
        self.message, self.returncode = message, returncode

    def pytest_terminal_summary(self, terminalreporter):
        if self.message is not None:
            for line in self.message.splitlines():
                terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if self.message is not None:
            session.exitstatus = self.returncode

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session, config, items):
        root = config.rootpath
        if [Path(a).resolve() for a in config.args] != [root / "hypotheses"]:
            raise pytest.UsageError(
                f"registration reads every hypothesis: run it on the hypotheses/ folder alone "
                f"(`lab register`), not on {' '.join(config.args)}"
            )
        current = [e for item in items if _is_hypothesis(item) for e in registry_entries(item)]
        state = config.stash[_STATE]
        path = root / reg.REGISTRY_PATH
        try:
            registry, retired = reg.load(path)
            if config.getoption("--lab-register-check"):
                problems = reg.check(current, registry)
                if problems:
                    return self._finish(
                        items,
                        f"{len(problems)} prediction(s) not registered as they are now "
                        f"({path.relative_to(root)}):\n  " + "\n  ".join(problems) + "\nRun `lab register`.",
                        1,
                    )
                return self._finish(items, f"registry is current: {len(current)} predictions", 0)
            results = reg.Results(state.store_path)
            notes = config.getoption("--lab-register-backfill")
            if notes is not None:
                new, retired, changes = self._backfill(items, current, registry, root, state, Path(notes))
            else:
                new, retired, changes = reg.register(
                    current, registry, retired, results, reason=config.getoption("--lab-register-reason")
                )
        except reg.RegistryError as exc:
            raise pytest.UsageError(str(exc)) from None
        reg.save(path, new, retired)
        counts: dict[str, int] = {}
        for c in changes:
            counts[c.kind] = counts.get(c.kind, 0) + 1
        lines = [f"  {c.kind:<13} {c.id}" + (f" ({', '.join(c.changed)})" if c.changed else "") for c in changes]
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no changes"
        self._finish(
            items, "\n".join([*lines, f"registered {len(new)} predictions in {path.relative_to(root)}: {summary}"]), 0
        )

    @staticmethod
    def _backfill(items, current, registry, root, state, notes):
        from lab.report.backfill import backfill, retired_from_store

        if registry:
            raise reg.RegistryError("--backfill is for a project without a registry: this one has one already")
        templates, legacy = {}, {}
        for item in items:
            if not _is_hypothesis(item):
                continue
            raw = [m.args[0] for m in reversed(list(item.iter_markers("lab_prediction")))]
            for idx, (r, p) in enumerate(zip(raw, _predictions(item))):
                templates[f"{item.nodeid}#{idx}"] = r.text
                legacy[f"{item.nodeid}#{idx}"] = p.fingerprint()
        when = reg.now_iso()
        new = backfill(current, templates, legacy, root=root, store_path=state.store_path, notes_path=notes, when=when)
        retired = retired_from_store(current, state.store_path, when)
        changes = [reg.Change(e.id, e.status + (" amended" if e.amendments else "")) for e in new.values()]
        changes += [reg.Change(r["id"], "retired") for r in retired]
        return new, retired, changes


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
    evidence = Evidence(out.measurements, frozenset(out.deterministic), out.trials)
    failed = [f"{check} ({detail})" if detail else check for check, _, detail in out.failed_checks]
    judgements = []
    for p in preds:
        try:
            j = judge(p, evidence)
        except (LookupError, ValueError) as exc:
            return [], str(exc)
        judgements.append(invalidate(j, failed) if failed and p.kind == "prediction" else j)
    return judgements, None


def hypothesis_verdict(judgements: list[Judgement]) -> str | None:
    """The page's verdict: from the predictions; a test with only checks is a *check*
    when they all hold (inconclusive otherwise: the invariant was not shown)."""
    if not judgements:
        return None
    claims = [j.verdict for j in judgements if j.prediction.kind == "prediction"]
    if claims:
        return combine(claims)
    return CHECK if all(j.verdict == CONFIRMED for j in judgements) else INCONCLUSIVE


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
        broken = [j for j in judgements if j.prediction.kind == "check" and j.verdict == REFUTED]
        if error:
            _fail(report, f"[lab] {error}")
            status = "failed"
        elif broken:
            _fail(
                report,
                "[lab] a check (an invariant that holds by construction) does not hold: "
                + "; ".join(f"{j.prediction.text} -- {j.prediction.claim}: {j.interval.describe()}" for j in broken),
            )
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
    verdict = hypothesis_verdict(judgements) if status == "passed" else None
    registrations = _registrations(item, state) if judgements else []
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
        verdicts=[_verdict_row(i, j, registrations) for i, j in enumerate(judgements)],
        artifacts=[(a.name, a.kind, a.caption, a.data) for a in (out.artifacts if out else [])],
        benchmarks=_benchmark_rows(item),
        validity=[list(v) for v in (out.validity if out else [])],
        deterministic=sorted(out.deterministic) if out else [],
        trials=dict(out.trials) if out else {},
        source_hash=registrations[0]["fingerprint"] if registrations else None,
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


def _registrations(item, state: LabState) -> list[dict]:
    """For each prediction: its fingerprint now and what the registry says of it."""
    registry = state.load_registry()
    current = registry_entries(item)
    out = []
    for e in current:
        reg = registry.get(e.id)
        rec = reg.as_run_record(e.fingerprint) if reg else {"status": "unregistered", "registered": None}
        out.append({"fingerprint": e.fingerprint, **rec})
    return out


def _verdict_row(idx: int, j: Judgement, registrations: list[dict]) -> dict:
    reg = registrations[idx] if idx < len(registrations) else None
    return {
        "kind": j.prediction.kind,
        "fingerprint": reg["fingerprint"] if reg else None,
        "registration": {k: v for k, v in reg.items() if k != "fingerprint"} if reg else None,
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
        counts = {CONFIRMED: 0, REFUTED: 0, INCONCLUSIVE: 0, INVALID: 0, CHECK: 0, "failed": 0, "skipped": 0}
        for s in state.summaries:
            if s["status"] in ("failed", "skipped"):
                counts[s["status"]] += 1
            elif s["verdict"]:
                counts[s["verdict"]] += 1
        tr.write_sep("=", f"LLM Lab verdicts (profile: {state.profile.name}, store: {state.store_path})")
        colors = {
            CONFIRMED: {"green": True},
            REFUTED: {"red": True},
            INCONCLUSIVE: {"yellow": True},
            INVALID: {"purple": True},
            CHECK: {"cyan": True},
        }
        for s in state.summaries:
            label = (s["verdict"] or s["status"]).upper()
            style = colors.get(s["verdict"], {"red": True} if s["status"] == "failed" else {})
            tr.write(f"{label:<12} ", bold=True, **style)
            tr.line(s["nodeid"])
            for line in s["lines"]:
                tr.line(f"    {line}")
        tr.line(
            f"{counts[CONFIRMED]} confirmed, {counts[REFUTED]} refuted, "
            f"{counts[INCONCLUSIVE]} inconclusive, {counts[INVALID]} invalid, {counts[CHECK]} checks, "
            f"{counts['failed']} failed, {counts['skipped']} skipped",
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
        from lab.report.site import site_location, write_site_pages

        where = site_location(state.store_path, session.config.rootpath)
        pages = write_site_pages(state.store_path, where, session.config.rootpath)
        session.config.get_terminal_writer().line(f"[lab] wrote {pages} result pages under {where.docs}")


def pytest_unconfigure(config):
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    if state.heartbeat is not None:
        state.heartbeat.stop()
        state.heartbeat = None
    # closing checkpoints SQLite's write-ahead log into the store file itself
    if state.store is not None:
        state.store.close()
        state.store = None
