"""Registration for predictions that predate the registry (a one-time migration).

Before hypotheses/registry.toml existed, a prediction was recorded only in the results
store, seconds before its experiment, in the same run. `lab register --backfill NOTES`
gives every current prediction the registration that the record supports:

- registered: the time of the first commit whose test file holds the prediction's first
  version (the earliest text the store saw under this test and index, else the current
  text), found with `git log -S`.
- status: pre-registered when that commit precedes the first cpu/gpu result of its test;
  exploratory when it came after ("committed only after its first result"), when git does
  not have it although results exist (the store registered it seconds before it ran,
  which is no evidence), and where the notes file says it was written after pilot
  results. A prediction with no results and no commit is registered now.
- amendments: every earlier version of the prediction in the store (another text or
  claim under the same test and index) that already had results when it was replaced;
  a current version the store has never seen, replacing one with results; and the
  changes the notes file lists (code and data changes the store cannot see), each with
  its date and reason.

The notes file (hypotheses/registry-notes.toml) is committed beside the registry, so
each backfilled status can be traced to its evidence.
"""

from __future__ import annotations

import subprocess
import time
import tomllib
from dataclasses import asdict
from pathlib import Path

from lab.report.registry import (
    EXPLORATORY,
    PREREGISTERED,
    Entry,
    RegistryError,
    Results,
    _read_store,
    iso_to_ts,
    now_iso,
)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def snippets(text: str, length: int = 40) -> list[str]:
    """Stretches of a prediction's text to look for in git: the start, middle and end of
    each stretch without placeholders, longest first (a source line may split the rest)."""
    import re

    out = []
    for part in sorted(re.split(r"\{[^}]*\}", text), key=len, reverse=True):
        part = part.strip()
        if len(part) < 12:
            break
        mid = max(0, (len(part) - length) // 2)
        for s in (part[:length], part[mid : mid + length], part[-length:]):
            if s not in out:
                out.append(s)
    return out


def git_time(root: Path, path: str, text: str) -> float | None:
    """When `text` first appeared in `path` in git, trying each of its snippets."""
    for s in snippets(text):
        t = first_commit_time(root, path, s)
        if t is not None:
            return t
    return None


def first_commit_time(root: Path, path: str, text: str) -> float | None:
    """Commit time of the oldest commit that added `text` to `path`, or None."""
    try:
        out = subprocess.run(
            ["git", "log", "--reverse", "--format=%ct", "-S", text, "--", path],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return float(lines[0]) if out.returncode == 0 and lines else None


def load_notes(path: Path | None) -> dict:
    if path is None:
        return {"exploratory": [], "amendment": []}
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"cannot read the backfill notes {path}: {exc}") from None
    for kind in ("exploratory", "amendment"):
        for note in raw.get(kind, []):
            if not note.get("test") or not note.get("reason"):
                raise RegistryError(f"{path}: every [[{kind}]] needs test and reason, got {note!r}")
    return {"exploratory": raw.get("exploratory", []), "amendment": raw.get("amendment", [])}


def _applies(note: dict, entry: Entry) -> bool:
    indexes = note.get("index")
    return entry.test.startswith(note["test"]) and (indexes is None or entry.index in indexes)


class _StoreHistory:
    """Earlier versions of each prediction, as the store registered them at run time."""

    def __init__(self, store_path: Path | None):
        self.versions: dict[tuple[str, int], list[dict]] = {}
        self.judged: set[tuple[str, int, str]] = set()
        if store_path is None or not Path(store_path).is_file():
            return
        what = "the store's prediction history"
        rows = _read_store(store_path, "SELECT * FROM predictions ORDER BY first_seen", what)
        cols = ("nodeid", "idx", "pred_hash", "text", "metric", "claim", "first_seen", "first_run")
        for r in rows:
            row = dict(zip(cols, r))
            self.versions.setdefault((row["nodeid"], row["idx"]), []).append(row)
        judged = _read_store(
            store_path,
            "SELECT res.nodeid, v.idx, v.pred_hash FROM verdicts v JOIN results res USING(result_id) "
            "WHERE res.profile != 'smoke'",
            what,
        )
        self.judged = {(r[0], r[1], r[2]) for r in judged}


def backfill(
    current: list[Entry],
    templates: dict[str, str],
    legacy_hashes: dict[str, str],
    *,
    root: Path,
    store_path: Path | None,
    notes_path: Path | None,
    when: str | None = None,
) -> dict[str, Entry]:
    """Registry entries for `current`, dated and classified from git, the store and the
    notes. `templates`: each entry's unrendered text; `legacy_hashes`: each entry's hash
    as the store recorded predictions (text, metric, expectation)."""
    when = when or now_iso()
    results = Results(store_path)
    history = _StoreHistory(store_path)
    notes = load_notes(notes_path)
    out: dict[str, Entry] = {}
    for e in current:
        versions = history.versions.get((e.test, e.index), [])
        path = e.test.split("::")[0]
        # the registration that counts is the first version's: later ones are amendments
        committed = git_time(root, path, versions[0]["text"]) if versions else None
        unchanged = not versions or versions[0]["pred_hash"] == legacy_hashes.get(e.id)
        if committed is None and unchanged:  # the source holds the text with its {placeholders}
            committed = git_time(root, path, templates.get(e.id, e.text))
        first_result = min(
            (t for (test, p), t in results.first.items() if test == e.test and p in ("cpu", "gpu")), default=None
        )
        status, reason = PREREGISTERED, ""
        if committed is not None:
            registered = committed
            if first_result is not None and committed > first_result:
                status = EXPLORATORY
                reason = (
                    "committed only after its first result (before the registry existed)"
                    if versions
                    else "added to a test that already had results"
                )
        elif first_result is not None:
            # the store registered it seconds before its first run: that is no evidence it was fixed first
            registered = versions[0]["first_seen"] if versions else iso_to_ts(when)
            status, reason = EXPLORATORY, "not found in git before its first result"
        else:
            registered = iso_to_ts(when)
        for note in notes["exploratory"]:
            if _applies(note, e):
                status, reason = EXPLORATORY, note["reason"]
        amendments = _store_amendments(e, versions, history, legacy_hashes.get(e.id), when)
        amendments = _merge_notes(e, amendments, notes["amendment"], results, when)
        out[e.id] = Entry(
            **{
                **asdict(e),
                "registered": _iso(registered),
                "status": status,
                "status_reason": reason,
                "amendments": amendments,
                "moves": [],
            }
        )
    return out


def retired_from_store(current: list[Entry], store_path: Path | None, when: str) -> list[dict]:
    """Predictions the store ran that no longer exist (a removed or renamed test whose
    prediction also changed): their last version, kept as the registry's trace of them."""
    history = _StoreHistory(store_path)
    ids = {(e.test, e.index) for e in current}
    retired = []
    for (nodeid, idx), versions in sorted(history.versions.items()):
        if (nodeid, idx) in ids:
            continue
        last = versions[-1]
        retired.append(
            {
                "id": f"{nodeid}#{idx}",
                "text": last["text"],
                "expect": last["claim"],
                "registered": _iso(versions[0]["first_seen"]),
                "retired": when,
            }
        )
    return retired


def _store_amendments(e: Entry, versions, history, legacy_hash, when) -> list[dict]:
    amendments = []
    for before, after in zip(versions, versions[1:]):
        if (e.test, e.index, before["pred_hash"]) in history.judged:
            amendments.append(
                {
                    "date": _iso(after["first_seen"]),
                    "reason": "the prediction's text or claim changed after it had results (found in the "
                    "store's history, before the registry existed)",
                    "changed": ["prediction"],
                    "old_text": before["text"],
                    "old_expect": before["claim"],
                    "old_fingerprint": before["pred_hash"],
                    "old_registered": _iso(before["first_seen"]),
                }
            )
    hashes = [v["pred_hash"] for v in versions]
    if versions and legacy_hash not in hashes and (e.test, e.index, hashes[-1]) in history.judged:
        last = versions[-1]
        amendments.append(
            {
                "date": when,
                "reason": "the prediction's text or claim changed after it had results",
                "changed": ["prediction"],
                "old_text": last["text"],
                "old_expect": last["claim"],
                "old_fingerprint": last["pred_hash"],
                "old_registered": _iso(last["first_seen"]),
            }
        )
    return amendments


def _merge_notes(e: Entry, amendments: list[dict], notes: list[dict], results, when) -> list[dict]:
    if not results.exist(e.test):
        return amendments
    for note in notes:
        if not _applies(note, e):
            continue
        date = note.get("date", when)
        same_day = next((a for a in amendments if a["date"] == date), None)
        if same_day is not None:
            # the store saw the same change: the note gives its reason; two notes on one day both stand
            from_note = same_day["old_fingerprint"] == ""
            same_day["reason"] = f"{same_day['reason']} {note['reason']}" if from_note else note["reason"]
            same_day["changed"] = sorted(set(same_day["changed"]) | set(note.get("changed", [])))
            continue
        amendments.append(
            {
                "date": date,
                "reason": note["reason"],
                "changed": list(note.get("changed", ["code"])),
                "old_text": e.text,
                "old_expect": e.expect,
                "old_fingerprint": "",
                "old_registered": "",
            }
        )
    return sorted(amendments, key=lambda a: a["date"])
