"""The registry: every prediction, fixed in git before its first result.

`hypotheses/registry.toml` holds one entry per prediction (test id + index): its text,
metric, expectation, interval method, confidence, kind, and a fingerprint of everything
that decides its verdict (see lab.report.fingerprint). `lab register` writes it;
`lab register --check` fails when anything changed without re-registration (CI runs
it). Rules:

- A new prediction of a test that already has results (cpu or gpu profile) in the
  reference store is registered as *exploratory*: it was written knowing results.
- Changing a registered prediction, its code, its data or the settings of a profile
  that has results is an *amendment*: it needs a reason, and the entry keeps the old
  text, claim, fingerprint and date. Before any result it is a plain re-registration.
- A test renamed or a prediction moved keeps its entry (matched by its text, metric
  and claim); an entry whose prediction is gone moves to `retired`.
Smoke results never count: they exercise the code, not the claim.
"""

from __future__ import annotations

import json
import sqlite3
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab.report.fingerprint import INFRA_FIXTURES, Follower, digest

REGISTRY_PATH = Path("hypotheses") / "registry.toml"
EVIDENCE_PROFILES = ("cpu", "gpu")
PREREGISTERED, EXPLORATORY = "preregistered", "exploratory"
_HEADER = """\
# Pre-registered predictions. Written by `lab register`; `lab register --check` (CI) fails
# when a prediction, its code, its data or its profile settings changed without
# re-registration. Commit this file before running new predictions. Do not edit by hand.
"""


class RegistryError(ValueError):
    pass


@dataclass
class Entry:
    id: str  # "<test node id>#<index of the prediction>"
    test: str
    index: int
    kind: str
    text: str
    metric: str
    expect: str
    interval: str
    confidence: float
    fingerprint: str
    parts: dict  # prediction, code, data, settings_cpu, settings_gpu -> hash
    registered: str  # ISO time (UTC) of the registration that counts
    status: str = PREREGISTERED
    status_reason: str = ""
    amendments: list = field(default_factory=list)
    moves: list = field(default_factory=list)  # renames / reorders: {date, old_id}

    def as_run_record(self, current_fingerprint: str) -> dict:
        """What a verdict row stores about its registration."""
        rec = {
            "status": self.status,
            "registered": self.registered,
            "reason": self.status_reason,
            "amendments": self.amendments,
            "moves": self.moves,
        }
        if current_fingerprint != self.fingerprint:
            rec["status"] = "changed"
            rec["reason"] = "the prediction, its code, data or settings changed since it was registered"
        return rec


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def iso_to_ts(iso: str) -> float:
    import calendar

    return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))


# -- computing entries from collected tests ----------------------------------------


def entries_for_item(item, predictions, profiles: dict, root: Path, lab_class=None) -> list[Entry]:
    """Current entries (unregistered: dates empty) for one collected hypothesis."""
    follower = Follower(root, lab_class)
    follower.follow(item.obj, key="<test>")
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}) or {}
    for name, fdefs in sorted(defs.items()):
        if name in INFRA_FIXTURES:
            continue
        for fdef in fdefs:
            func = getattr(fdef, "func", None)
            if func is not None and follower._in_project(func):
                follower.follow(func)
    code = digest({"functions": follower.code, "constants": follower.constants})
    data = digest(follower.data)
    settings = {f"settings_{p}": digest(follower.settings(prof)) for p, prof in sorted(profiles.items())}
    out = []
    for idx, p in enumerate(predictions):
        parts = {
            "prediction": digest(
                {
                    "text": p.text,
                    "metric": p.metric,
                    "expect": p.expect.to_dict(),
                    "interval": p.interval,
                    "confidence": p.confidence,
                    "kind": p.kind,
                }
            ),
            "code": code,
            "data": data,
            **settings,
        }
        out.append(
            Entry(
                id=f"{item.nodeid}#{idx}",
                test=item.nodeid,
                index=idx,
                kind=p.kind,
                text=p.text,
                metric=p.metric,
                expect=p.claim,
                interval=p.interval,
                confidence=p.confidence,
                fingerprint=digest(parts),
                parts=parts,
                registered="",
            )
        )
    return out


# -- reading and writing ------------------------------------------------------------


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to the registry")


def dumps(entries: list[Entry], retired: list[dict]) -> str:
    lines = [_HEADER]
    for e in sorted(entries, key=lambda e: (e.test, e.index)):
        d = asdict(e)
        parts, amendments, moves = d.pop("parts"), d.pop("amendments"), d.pop("moves")
        lines.append("[[prediction]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items()]
        lines.append("parts = {" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in sorted(parts.items())) + "}")
        for a in amendments:
            lines.append("[[prediction.amendments]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in a.items()]
        for m in moves:
            lines.append("[[prediction.moves]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in m.items()]
        lines.append("")
    for r in retired:
        lines.append("[[retired]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in r.items()]
        lines.append("")
    return "\n".join(lines)


def load(path: Path) -> tuple[dict[str, Entry], list[dict]]:
    if not path.exists():
        return {}, []
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"the registry {path} is not valid TOML: {exc}") from None
    entries = {}
    for d in raw.get("prediction", []):
        try:
            e = Entry(**{**d, "amendments": d.get("amendments", []), "moves": d.get("moves", [])})
        except TypeError as exc:
            raise RegistryError(f"{path}: malformed entry {d.get('id', d)!r}: {exc}") from None
        entries[e.id] = e
    return entries, list(raw.get("retired", []))


def save(path: Path, entries: dict[str, Entry], retired: list[dict]) -> None:
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dumps(list(entries.values()), retired))
    tmp.replace(path)


# -- results that already exist -------------------------------------------------------


class Results:
    """First result times per test in the reference store, by profile (smoke ignored)."""

    def __init__(self, store_path: Path | None):
        self.first: dict[tuple[str, str], float] = {}
        if store_path is None or not Path(store_path).is_file():
            return
        rows = _read_store(
            store_path,
            "SELECT nodeid, profile, MIN(created_at) FROM results WHERE profile != 'smoke' GROUP BY nodeid, profile",
            "results",
        )
        self.first = {(r[0], r[1]): r[2] for r in rows}

    def exist(self, test: str, profiles=EVIDENCE_PROFILES, before: float | None = None) -> bool:
        return any((test, p) in self.first and (before is None or self.first[(test, p)] < before) for p in profiles)


def _read_store(store_path, sql: str, what: str) -> list:
    """Rows of a read-only query on the results store (never written, even to migrate)."""
    from lab.report.store import Store, StoreError

    try:
        store = Store(store_path, readonly=True, verify=False)
        try:
            return [tuple(r) for r in store.query(sql)]
        finally:
            store.close()
    except (StoreError, sqlite3.Error) as exc:
        raise RegistryError(f"cannot read {what} from {store_path}: {exc}") from None


# -- registering --------------------------------------------------------------------


@dataclass
class Change:
    id: str
    kind: str  # new | exploratory | reregistered | amended | moved | retired

    changed: list = field(default_factory=list)
    detail: str = ""


def _tests_of(entry: Entry) -> set[str]:
    """The test ids this prediction has had: results under any of them are its results."""
    old_ids = [m.get("old_id") for m in entry.moves] + [a.get("old_id") for a in entry.amendments]
    return {entry.test} | {i.rsplit("#", 1)[0] for i in old_ids if i}


def _has_results(entry: Entry, results: Results, profiles=EVIDENCE_PROFILES) -> bool:
    return any(results.exist(t, profiles) for t in _tests_of(entry))


def _amendment_needed(old: Entry, changed: list[str], results: Results) -> bool:
    for part in changed:
        if part.startswith("settings_"):
            if _has_results(old, results, (part.removeprefix("settings_"),)):
                return True
        elif _has_results(old, results):
            return True
    return False


def register(
    current: list[Entry],
    registry: dict[str, Entry],
    retired: list[dict],
    results: Results,
    *,
    reason: str | None,
    when: str | None = None,
) -> tuple[dict[str, Entry], list[dict], list[Change]]:
    """The registry after registering `current`. Raises RegistryError when an amendment
    has no reason."""
    when = when or now_iso()
    free = dict(registry)
    pairs = _pair(current, free)
    new: dict[str, Entry] = {}
    changes: list[Change] = []
    for e in current:
        o = pairs.get(e.id)
        if o is not None:
            new[e.id] = _update(o, e, results, reason, when, changes)
            continue
        status, why = PREREGISTERED, ""
        if results.exist(e.test):
            status, why = EXPLORATORY, "registered after results of this test existed"
        new[e.id] = Entry(**{**asdict(e), "registered": when, "status": status, "status_reason": why})
        changes.append(Change(e.id, "exploratory" if status == EXPLORATORY else "new"))
    retired = list(retired)
    for g in free.values():
        retired.append({"id": g.id, "text": g.text, "expect": g.expect, "registered": g.registered, "retired": when})
        changes.append(Change(g.id, "retired"))
    missing_reason = [c.id for c in changes if c.detail == "needs reason"]
    if missing_reason:
        raise RegistryError(
            f"{len(missing_reason)} prediction(s) changed after their results existed, which makes each an "
            f"amendment: {', '.join(missing_reason)}. "
            'Say why with `lab register --reason "..."` (it is shown beside their verdicts).'
        )
    return new, retired, changes


def _pair(current: list[Entry], free: dict[str, Entry]) -> dict[str, Entry]:
    """Pair current predictions with registered ones (taken out of `free`): the same
    prediction at the same place, then the same prediction elsewhere in its test
    (moved), then the same place (edited), then the same prediction in another test
    (renamed). Unpaired current ones are new; what is left in `free` is gone."""

    def same(a: Entry, b: Entry) -> bool:
        return a.parts["prediction"] == b.parts["prediction"] and a.kind == b.kind

    rules = (
        lambda e, g: g.id == e.id and same(g, e),
        lambda e, g: g.test == e.test and same(g, e),
        lambda e, g: g.id == e.id,
        same,
    )
    pairs: dict[str, Entry] = {}
    for rule in rules:
        for e in current:
            if e.id in pairs:
                continue
            match = next((g for g in free.values() if rule(e, g)), None)
            if match is not None:
                pairs[e.id] = free.pop(match.id)
    return pairs


def _update(old: Entry, cur: Entry, results, reason, when, changes) -> Entry:
    renamed_from = old.id if old.id != cur.id else None
    changed = [k for k in sorted(set(cur.parts) | set(old.parts)) if old.parts.get(k) != cur.parts.get(k)]
    if old.expect != cur.expect and old.text == cur.text:
        raise RegistryError(
            f"{cur.id}: the expectation changed ({old.expect!r} -> {cur.expect!r}) but the prediction's text "
            f"did not ({cur.text!r}): say the new claim in the text, or write the bound as {{bound}} / "
            "{low} / {high} so the text is built from it"
        )
    if not changed:
        kept = _kept(old)
        if renamed_from:  # the same prediction under a new test name or position: a trace, not an amendment
            kept["moves"] = [*old.moves, {"date": when, "old_id": renamed_from}]
            changes.append(Change(cur.id, "moved", ["id"], f"from {renamed_from}"))
        return Entry(**{**asdict(cur), **kept})
    if renamed_from:
        changed = ["id", *changed]
    if not _amendment_needed(old, [c for c in changed if c != "id"], results):
        changes.append(Change(cur.id, "reregistered", changed))
        keep = _kept(old)
        keep["registered"] = when  # the registration that counts is the last one before any result
        return Entry(**{**asdict(cur), **keep})
    if not reason:
        changes.append(Change(cur.id, "amended", changed, "needs reason"))
        return old
    amendment = {
        "date": when,
        "reason": reason,
        "changed": changed,
        "old_text": old.text,
        "old_expect": old.expect,
        "old_fingerprint": old.fingerprint,
        "old_registered": old.registered,
    }
    if renamed_from:
        amendment["old_id"] = renamed_from
    changes.append(Change(cur.id, "amended", changed))
    kept = _kept(old)
    kept["amendments"] = [*old.amendments, amendment]
    return Entry(**{**asdict(cur), **kept})


def _kept(old: Entry) -> dict:
    return {
        "registered": old.registered,
        "status": old.status,
        "status_reason": old.status_reason,
        "amendments": list(old.amendments),
        "moves": list(old.moves),
    }


def check(current: list[Entry], registry: dict[str, Entry]) -> list[str]:
    """Problems that `lab register` would fix: empty when the registry is current."""
    problems = []
    for e in current:
        old = registry.get(e.id)
        if old is None:
            problems.append(f"{e.id}: not registered ({e.text!r})")
        elif old.fingerprint != e.fingerprint:
            changed = [k for k in sorted(set(e.parts) | set(old.parts)) if old.parts.get(k) != e.parts.get(k)]
            problems.append(f"{e.id}: changed since registration ({', '.join(changed)})")
    ids = {e.id for e in current}
    problems += [
        f"{k}: registered but no longer exists (run `lab register` to retire it)" for k in registry if k not in ids
    ]
    return problems
