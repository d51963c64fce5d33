"""The registry's rules as plain functions (fast: the mutation-testing suite runs these;
tests/test_registry.py runs the same rules end to end through pytest)."""

import json
import os
import sqlite3
import subprocess

import pytest

from lab.report import backfill as bf
from lab.report.registry import (
    EXPLORATORY,
    PREREGISTERED,
    Entry,
    RegistryError,
    Results,
    check,
    dumps,
    iso_to_ts,
    load,
    register,
    save,
)

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"
PARTS = {"prediction": "p", "code": "c", "data": "d", "settings_cpu": "s", "settings_gpu": "g"}


def entry(test="t.py::test_x", index=0, **kw):
    base = dict(
        id=f"{test}#{index}", test=test, index=index, kind="prediction", text="x >= 1", metric="x",
        expect="x >= 1", interval="t", confidence=0.95, fingerprint="f0", parts=dict(PARTS), registered="",
    )  # fmt: skip
    return Entry(**{**base, **kw})


def changed(e: Entry, **parts) -> Entry:
    new_parts = {**e.parts, **parts}
    return Entry(**{**e.__dict__, "parts": new_parts, "fingerprint": "f" + "".join(sorted(new_parts.values()))})


class FakeResults(Results):
    def __init__(self, first=None):
        self.first = dict(first or {})


NONE = FakeResults()


def with_results(*tests, profile="cpu", at=1.0):
    return FakeResults({(t, profile): at for t in tests})


# -- new predictions -----------------------------------------------------------------


def test_a_new_prediction_without_results_is_preregistered_at_registration_time():
    new, retired, changes = register([entry()], {}, [], NONE, reason=None, when=T0)
    e = new["t.py::test_x#0"]
    assert (e.status, e.registered, e.status_reason, e.amendments, e.moves) == (PREREGISTERED, T0, "", [], [])
    assert [(c.id, c.kind) for c in changes] == [("t.py::test_x#0", "new")] and retired == []


@pytest.mark.parametrize("profile, status", [("cpu", EXPLORATORY), ("gpu", EXPLORATORY), ("smoke", PREREGISTERED)])
def test_a_new_prediction_on_a_test_with_results_is_exploratory(profile, status):
    new, _, changes = register([entry()], {}, [], with_results("t.py::test_x", profile=profile), reason=None, when=T0)
    e = new["t.py::test_x#0"]
    assert e.status == status
    assert (e.status_reason == "registered after results of this test existed") == (status == EXPLORATORY)
    assert changes[0].kind == ("exploratory" if status == EXPLORATORY else "new")


def test_results_of_another_test_do_not_make_a_prediction_exploratory():
    new, _, _ = register([entry()], {}, [], with_results("t.py::test_other"), reason=None, when=T0)
    assert new["t.py::test_x#0"].status == PREREGISTERED


# -- unchanged, re-registered, amended -----------------------------------------------------


def test_an_unchanged_prediction_keeps_everything():
    old = entry(registered=T0, status=EXPLORATORY, status_reason="pilots", amendments=[{"date": T0}])
    new, _, changes = register([entry()], {old.id: old}, [], with_results("t.py::test_x"), reason=None, when=T1)
    e = new[old.id]
    assert (e.registered, e.status, e.status_reason, e.amendments) == (T0, EXPLORATORY, "pilots", [{"date": T0}])
    assert changes == []


@pytest.mark.parametrize("part", ["prediction", "code", "data", "settings_cpu"])
def test_a_change_before_results_is_registered_again_with_its_new_date(part):
    old = entry(registered=T0)
    cur = changed(entry(), **{part: "new"})
    new, _, changes = register([cur], {old.id: old}, [], NONE, reason=None, when=T1)
    e = new[old.id]
    assert e.registered == T1 and e.fingerprint == cur.fingerprint and e.amendments == []
    assert (changes[0].kind, changes[0].changed) == ("reregistered", [part])


@pytest.mark.parametrize("part", ["prediction", "code", "data"])
def test_a_change_after_results_is_an_amendment_and_needs_a_reason(part):
    old = entry(registered=T0)
    cur = changed(entry(), **{part: "new"})
    results = with_results("t.py::test_x", profile="gpu")
    with pytest.raises(RegistryError, match=r"1 prediction\(s\) changed after their results existed.*--reason"):
        register([cur], {old.id: old}, [], results, reason=None, when=T1)
    new, _, changes = register([cur], {old.id: old}, [], results, reason="why", when=T1)
    e = new[old.id]
    assert e.registered == T0 and e.fingerprint == cur.fingerprint and e.status == PREREGISTERED
    (a,) = e.amendments
    assert a == {
        "date": T1, "reason": "why", "changed": [part], "old_text": old.text, "old_expect": old.expect,
        "old_fingerprint": old.fingerprint, "old_registered": T0,
    }  # fmt: skip
    assert (changes[0].kind, changes[0].changed) == ("amended", [part])


def test_amendments_accumulate_and_keep_the_first_registration():
    old = entry(registered=T0, amendments=[{"date": T1, "reason": "first"}])
    cur = changed(entry(), code="c2")
    new, _, _ = register([cur], {old.id: old}, [], with_results("t.py::test_x"), reason="second", when=T2)
    assert [a["reason"] for a in new[old.id].amendments] == ["first", "second"]
    assert new[old.id].registered == T0


@pytest.mark.parametrize("profile, amends", [("cpu", True), ("gpu", False)])
def test_settings_of_a_profile_amend_only_where_that_profile_has_results(profile, amends):
    old = entry(registered=T0)
    cur = changed(entry(), settings_cpu="s2")
    results = with_results("t.py::test_x", profile=profile)
    if amends:
        with pytest.raises(RegistryError):
            register([cur], {old.id: old}, [], results, reason=None, when=T1)
    else:
        new, _, changes = register([cur], {old.id: old}, [], results, reason=None, when=T1)
        assert changes[0].kind == "reregistered" and new[old.id].amendments == []


def test_an_expectation_changed_under_the_same_text_is_refused():
    old = entry(registered=T0)
    cur = changed(entry(expect="x >= 2"), prediction="p2")
    with pytest.raises(RegistryError, match=r"the expectation changed \('x >= 1' -> 'x >= 2'\).*\{bound\}"):
        register([cur], {old.id: old}, [], NONE, reason="r", when=T1)
    cur = changed(entry(expect="x >= 2", text="x >= 2"), prediction="p2")
    new, _, _ = register([cur], {old.id: old}, [], NONE, reason=None, when=T1)
    assert new[old.id].expect == "x >= 2"


# -- moves, renames, retirement --------------------------------------------------------------


def test_reordered_predictions_follow_their_content():
    a = entry(index=0, registered=T0, text="a", parts={**PARTS, "prediction": "pa"})
    b = entry(index=1, registered=T1, text="b", parts={**PARTS, "prediction": "pb"})
    swapped = [entry(index=0, text="b", parts={**PARTS, "prediction": "pb"}),
               entry(index=1, text="a", parts={**PARTS, "prediction": "pa"})]  # fmt: skip
    new, retired, changes = register(
        swapped, {a.id: a, b.id: b}, [], with_results("t.py::test_x"), reason=None, when=T2
    )
    assert new["t.py::test_x#0"].text == "b" and new["t.py::test_x#0"].registered == T1
    assert new["t.py::test_x#1"].text == "a" and new["t.py::test_x#1"].registered == T0
    assert new["t.py::test_x#0"].moves == [{"date": T2, "old_id": "t.py::test_x#1"}]
    assert {c.kind for c in changes} == {"moved"} and retired == []


def test_a_renamed_test_keeps_its_entry_and_its_results_count():
    old = entry(registered=T0)
    cur = entry(test="t.py::test_y")
    results = with_results("t.py::test_x")
    new, retired, changes = register([cur], {old.id: old}, [], results, reason=None, when=T1)
    e = new["t.py::test_y#0"]
    assert e.registered == T0 and e.moves == [{"date": T1, "old_id": "t.py::test_x#0"}] and retired == []
    # later, changed: the results under the old name still make it an amendment
    with pytest.raises(RegistryError):
        register([changed(cur, code="c2")], new, [], results, reason=None, when=T2)
    again, _, _ = register([changed(cur, code="c2")], new, [], results, reason="r", when=T2)
    assert again["t.py::test_y#0"].amendments[0]["changed"] == ["code"]


def test_renamed_and_changed_is_one_amendment_naming_the_old_id():
    old = entry(registered=T0)
    cur = changed(entry(test="t.py::test_y"), code="c2")
    new, _, changes = register([cur], {old.id: old}, [], with_results("t.py::test_x"), reason="r", when=T1)
    (a,) = new["t.py::test_y#0"].amendments
    assert a["changed"] == ["id", "code"] and a["old_id"] == "t.py::test_x#0"
    assert changes[0].kind == "amended"


def test_an_edited_prediction_in_place_is_matched_by_position():
    old = entry(registered=T0)
    cur = changed(entry(text="x is at least one"), prediction="p2")
    new, retired, _ = register([cur], {old.id: old}, [], NONE, reason=None, when=T1)
    assert list(new) == [old.id] and retired == []


def test_a_vanished_prediction_is_retired_with_its_record():
    old = entry(registered=T0)
    new, retired, changes = register([], {old.id: old}, [{"id": "earlier"}], NONE, reason=None, when=T1)
    assert new == {}
    assert retired == [
        {"id": "earlier"},
        {"id": old.id, "text": old.text, "expect": old.expect, "registered": T0, "retired": T1},
    ]
    assert changes[0].kind == "retired"


def test_checks_and_predictions_with_the_same_claim_are_not_confused():
    old = entry(registered=T0, kind="check")
    cur = entry(test="t.py::test_y", kind="prediction")
    new, retired, _ = register([cur], {old.id: old}, [], NONE, reason=None, when=T1)
    assert new["t.py::test_y#0"].moves == [] and retired[0]["id"] == old.id


# -- check ------------------------------------------------------------------------------------


def test_check_reports_each_kind_of_problem_once():
    reg = {"t.py::test_x#0": entry(registered=T0), "t.py::gone#0": entry(test="t.py::gone")}
    problems = check([changed(entry(), code="c2", data="d2"), entry(test="t.py::new")], reg)
    assert problems == [
        "t.py::test_x#0: changed since registration (code, data)",
        "t.py::new#0: not registered ('x >= 1')",
        "t.py::gone#0: registered but no longer exists (run `lab register` to retire it)",
    ]
    assert check([entry()], {"t.py::test_x#0": entry(registered=T0)}) == []


# -- the file ---------------------------------------------------------------------------------


def test_the_file_round_trips_and_is_sorted(tmp_path):
    b = entry(test="t.py::test_b", registered=T0, moves=[{"date": T1, "old_id": "t.py::old#0"}])
    a = entry(test="t.py::test_a", registered=T0, text='q"uote\\ ünï\ncode\x7f', status=EXPLORATORY)
    a.amendments = [{"date": T1, "reason": "r", "changed": ["code", "data"], "old_registered": ""}]
    path = tmp_path / "registry.toml"
    save(path, {b.id: b, a.id: a}, [{"id": "gone#0", "retired": T2}])
    text = path.read_text()
    assert text.index("test_a") < text.index("test_b") and text.startswith("# Pre-registered predictions.")
    entries, retired = load(path)
    assert entries == {a.id: a, b.id: b} and retired == [{"id": "gone#0", "retired": T2}]
    assert not path.with_suffix(".toml.tmp").exists()


def test_a_missing_registry_is_empty_and_bad_ones_are_clear(tmp_path):
    assert load(tmp_path / "none.toml") == ({}, [])
    bad = tmp_path / "bad.toml"
    bad.write_text("[[prediction]\n")
    with pytest.raises(RegistryError, match="not valid TOML"):
        load(bad)
    bad.write_text('[[prediction]]\nid = "x"\n')
    with pytest.raises(RegistryError, match="malformed entry 'x'"):
        load(bad)
    with pytest.raises(TypeError, match="cannot write"):
        dumps([entry(confidence={"no": 1})], [])


def test_dates_round_trip():
    assert iso_to_ts("1970-01-01T00:01:00Z") == 60.0
    assert bf._iso(60.0) == "1970-01-01T00:01:00Z"


# -- results in the store -----------------------------------------------------------------------


def _store(path, rows, predictions=(), verdicts=()):
    """A real results store holding results (nodeid, profile, created_at), predictions
    (nodeid, idx, hash, text, claim, first_seen) and verdicts (result_id, idx, hash)."""
    from lab.report.store import Store

    Store(path).close()
    con = sqlite3.connect(path)
    con.execute("INSERT INTO runs(run_id, started_at, status, profile) VALUES ('r', 0, 'complete', 'cpu')")
    con.executemany(
        "INSERT INTO results(run_id, profile, nodeid, hypothesis, status, created_at) "
        "VALUES ('r', ?, ?, 'h', 'passed', ?)",
        [(p, n, t) for n, p, t in rows],
    )
    con.executemany("INSERT INTO predictions VALUES (?, ?, ?, ?, 'x', ?, ?, 'r')", predictions)
    con.executemany(
        "INSERT INTO verdicts(result_id, idx, pred_hash, text, metric, claim, verdict) "
        "VALUES (?, ?, ?, 't', 'x', 'c', 'v')",
        verdicts,
    )
    con.commit()
    con.close()


def test_results_read_first_times_and_ignore_smoke(tmp_path):
    path = tmp_path / "s.sqlite"
    _store(path, [("a", "cpu", 5.0), ("a", "cpu", 3.0), ("a", "smoke", 1.0), ("b", "gpu", 7.0)])
    r = Results(path)
    assert r.first == {("a", "cpu"): 3.0, ("b", "gpu"): 7.0}
    assert r.exist("a") and r.exist("b") and not r.exist("c")
    assert not r.exist("a", ("gpu",)) and r.exist("a", ("cpu",))
    assert r.exist("a", before=3.5) and not r.exist("a", before=3.0)
    assert Results(None).first == {} and Results(tmp_path / "missing.sqlite").first == {}
    (tmp_path / "junk.sqlite").write_text("not a database" * 100)
    with pytest.raises(RegistryError, match="cannot read results"):
        Results(tmp_path / "junk.sqlite")


# -- backfill -----------------------------------------------------------------------------------


def test_snippets_try_start_middle_and_end_of_each_long_stretch():
    assert bf.snippets("lr={lr} underfits by at least {bound} nats") == ["underfits by at least"]
    text = "a" * 30 + "b" * 40 + "c" * 30
    assert bf.snippets(text) == [text[:40], text[30:70], text[-40:]]
    assert bf.snippets("{a} short {b}") == []
    assert bf.snippets("a" * 12) == ["a" * 12] and bf.snippets("a" * 11) == []
    assert bf.snippets("first long stretch here {x} second long stretch") == [
        "first long stretch here", "second long stretch",
    ]  # fmt: skip


def _git(repo, *args, date=None):
    env = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else {}
    import os

    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **env})


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@t")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "hypotheses").mkdir()
    f = tmp_path / "hypotheses" / "test_a.py"
    f.write_text("# nothing yet\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "a", date="2026-01-01T00:00:00Z")
    f.write_text('TEXT = "the loss falls below the unigram entropy"\n')
    _git(tmp_path, "commit", "-qam", "b", date="2026-01-05T00:00:00Z")
    return tmp_path


def test_first_commit_time_finds_the_introducing_commit(repo):
    t = bf.first_commit_time(repo, "hypotheses/test_a.py", "falls below the unigram")
    assert t == iso_to_ts("2026-01-05T00:00:00Z")
    assert bf.first_commit_time(repo, "hypotheses/test_a.py", "never written") is None
    assert bf.first_commit_time(repo / "nowhere", "x", "y") is None


def _bf_entry(**kw):
    return entry(test="hypotheses/test_a.py::test_a", text="the loss falls below the unigram entropy", **kw)


def test_backfill_dates_from_git_and_classifies_against_the_first_result(repo):
    store = repo / "s.sqlite"
    day = iso_to_ts("2026-01-05T00:00:00Z")
    e = _bf_entry()
    for first_result, status in ((day + 60, PREREGISTERED), (day - 60, EXPLORATORY)):
        if store.exists():
            store.unlink()
        _store(store, [(e.test, "cpu", first_result), (e.test, "smoke", day - 999)])
        out = bf.backfill([e], {}, {}, root=repo, store_path=store, notes_path=None, when=T2)[e.id]
        assert out.registered == "2026-01-05T00:00:00Z" and out.status == status
        reason = "added to a test that already had results" if status == EXPLORATORY else ""
        assert out.status_reason == reason  # the store never saw this prediction: it was added


def test_backfill_without_git_is_exploratory_if_results_exist_else_registered_now(repo):
    e = entry(test="hypotheses/test_a.py::test_a", text="a text git has never seen anywhere")
    store = repo / "s.sqlite"
    _store(store, [(e.test, "cpu", 150.0)], predictions=[(e.test, 0, "h", e.text, e.expect, 100.0)])
    out = bf.backfill([e], {}, {e.id: "h"}, root=repo, store_path=store, notes_path=None, when=T2)[e.id]
    assert (out.registered, out.status) == (bf._iso(100.0), EXPLORATORY)
    assert out.status_reason == "not found in git before its first result"
    out = bf.backfill([e], {}, {}, root=repo, store_path=None, notes_path=None, when=T2)[e.id]
    assert (out.registered, out.status) == (T2, PREREGISTERED)


def test_backfill_dates_an_amended_prediction_by_its_first_version(repo):
    # the store saw an earlier text (committed before its result); the current text is new
    e = entry(test="hypotheses/test_a.py::test_a", text="a rewritten claim that git never saw")
    store = repo / "s.sqlite"
    first = "the loss falls below the unigram entropy"
    day = iso_to_ts("2026-01-05T00:00:00Z")
    _store(store, [(e.test, "cpu", day + 60)], predictions=[(e.test, 0, "h1", first, "x", day + 30)],
           verdicts=[(1, 0, "h1")])  # fmt: skip
    out = bf.backfill([e], {}, {e.id: "h2"}, root=repo, store_path=store, notes_path=None, when=T2)[e.id]
    assert (out.registered, out.status) == ("2026-01-05T00:00:00Z", PREREGISTERED)
    assert [a["old_text"] for a in out.amendments] == [first]


def test_backfill_finds_edits_in_the_store_history(repo):
    e = _bf_entry()
    store = repo / "s.sqlite"
    preds = [(e.test, 0, "h1", "old text", "x >= 0", 10.0), (e.test, 0, "h2", "newer text", "x >= 1", 20.0)]
    # h1 had a cpu result, h2 did not; the current version (h3) is new
    _store(store, [(e.test, "cpu", 11.0)], predictions=preds, verdicts=[(1, 0, "h1")])
    out = bf.backfill([e], {}, {e.id: "h3"}, root=repo, store_path=store, notes_path=None, when=T2)[e.id]
    (a,) = out.amendments
    assert (a["date"], a["old_text"], a["old_expect"], a["old_fingerprint"]) == (
        bf._iso(20.0),
        "old text",
        "x >= 0",
        "h1",
    )
    # when the version before the current one had results, the current one is an amendment dated now
    _store(repo / "s2.sqlite", [(e.test, "cpu", 11.0)], predictions=preds[:1], verdicts=[(1, 0, "h1")])
    out = bf.backfill([e], {}, {e.id: "h3"}, root=repo, store_path=repo / "s2.sqlite", notes_path=None, when=T2)
    assert [a["date"] for a in out[e.id].amendments] == [T2]
    out = bf.backfill([e], {}, {e.id: "h1"}, root=repo, store_path=repo / "s2.sqlite", notes_path=None, when=T2)
    assert out[e.id].amendments == []  # the store's version is the current one


def test_backfill_notes_mark_pilots_and_add_invisible_changes(repo):
    notes = repo / "notes.toml"
    notes.write_text(
        '[[exploratory]]\ntest = "hypotheses/test_a.py::test_a"\nindex = [0]\nreason = "seed-0 pilots"\n'
        '[[amendment]]\ntest = "hypotheses/test_a.py::"\ndate = "2026-01-09T00:00:00Z"\nchanged = ["data"]\n'
        'reason = "split changed"\n'
        '[[amendment]]\ntest = "hypotheses/test_a.py::test_a"\nreason = "now a check"\nchanged = ["prediction"]\n'
    )
    store = repo / "s.sqlite"
    e, other = _bf_entry(), _bf_entry(index=1)
    _store(store, [(e.test, "cpu", iso_to_ts("2026-01-06T00:00:00Z"))])
    out = bf.backfill([e, other], {}, {}, root=repo, store_path=store, notes_path=notes, when=T2)
    assert (out[e.id].status, out[e.id].status_reason) == (EXPLORATORY, "seed-0 pilots")
    assert out[other.id].status == PREREGISTERED  # index 1 is not named
    assert [(a["date"], a["reason"], a["changed"]) for a in out[e.id].amendments] == [
        ("2026-01-09T00:00:00Z", "split changed", ["data"]),
        (T2, "now a check", ["prediction"]),
    ]
    # without results, notes of changes do not apply: there was nothing to amend
    out = bf.backfill([e], {}, {}, root=repo, store_path=None, notes_path=notes, when=T2)
    assert out[e.id].amendments == []


def test_a_note_on_the_same_change_the_store_saw_gives_it_its_reason(repo):
    e = _bf_entry()
    store = repo / "s.sqlite"
    _store(
        store, [(e.test, "cpu", 11.0)], predictions=[(e.test, 0, "h1", "old", "x >= 0", 10.0)], verdicts=[(1, 0, "h1")]
    )
    notes = repo / "notes.toml"
    notes.write_text(
        '[[amendment]]\ntest = "hypotheses/test_a.py::test_a"\nreason = "fixed metric"\nchanged = ["code"]\n'
    )
    out = bf.backfill([e], {}, {e.id: "h2"}, root=repo, store_path=store, notes_path=notes, when=T2)[e.id]
    (a,) = out.amendments
    assert a["reason"] == "fixed metric" and a["changed"] == ["code", "prediction"] and a["old_text"] == "old"


def test_two_notes_on_one_change_both_give_their_reasons(repo):
    """Two issues changed one test in the same round: one amendment carries both reasons,
    while a note on a change the store saw replaces the store's generic reason."""
    e = _bf_entry()
    store = repo / "s.sqlite"
    _store(store, [(e.test, "cpu", 11.0)])
    notes = repo / "notes.toml"
    notes.write_text(
        '[[amendment]]\ntest = "hypotheses/test_a.py::test_a"\nreason = "exact values"\nchanged = ["code"]\n'
        '[[amendment]]\ntest = "hypotheses/test_a.py::"\nreason = "more seeds"\nchanged = ["data"]\n'
    )
    (a,) = bf.backfill([e], {}, {}, root=repo, store_path=store, notes_path=notes, when=T2)[e.id].amendments
    assert (a["reason"], a["changed"]) == ("exact values more seeds", ["code", "data"])


def test_bad_notes_are_clear(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text('[[amendment]]\ntest = "x"\n')
    with pytest.raises(RegistryError, match="needs test and reason"):
        bf.load_notes(p)
    with pytest.raises(RegistryError, match="cannot read the backfill notes"):
        bf.load_notes(tmp_path / "missing.toml")
    assert bf.load_notes(None) == {"exploratory": [], "amendment": []}


def test_run_record_marks_a_changed_fingerprint():
    e = entry(registered=T0, amendments=[{"date": T1}], moves=[{"date": T2}])
    assert e.as_run_record("f0") == {
        "status": PREREGISTERED, "registered": T0, "reason": "", "amendments": [{"date": T1}], "moves": [{"date": T2}],
    }  # fmt: skip
    rec = e.as_run_record("other")
    assert rec["status"] == "changed" and "changed since it was registered" in rec["reason"]
    json.dumps(rec)


def test_entries_for_an_item_hash_each_part_apart(tmp_path):
    import importlib.util
    import types

    from lab.report.predictions import Prediction, at_least
    from lab.report.registry import entries_for_item

    (tmp_path / "hypotheses").mkdir()
    src = tmp_path / "hypotheses" / "mod.py"

    def build(body):
        src.write_text(body)
        spec = importlib.util.spec_from_file_location(f"mod_{abs(hash(body))}", src)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fixture = types.SimpleNamespace(func=mod.fix)
        info = types.SimpleNamespace(name2fixturedefs={"fix": [fixture], "outcome": [fixture]})
        item = types.SimpleNamespace(obj=mod.test_x, nodeid="hypotheses/mod.py::test_x", _fixtureinfo=info)
        preds = [Prediction("x >= 1", "x", at_least(1)), Prediction("x >= 2", "x", at_least(2), kind="check")]
        from lab.profiles import get_profile

        return entries_for_item(item, preds, {"cpu": get_profile("cpu")}, tmp_path)

    base = "def fix():\n    return 1\n\ndef test_x(fix, lab):\n    return fix + lab.profile.pretraining.steps\n"
    a = build(base)
    assert [e.id for e in a] == ["hypotheses/mod.py::test_x#0", "hypotheses/mod.py::test_x#1"]
    assert [e.kind for e in a] == ["prediction", "check"] and a[0].expect == "x >= 1"
    assert set(a[0].parts) == {"prediction", "code", "data", "settings_cpu"}
    assert a[0].parts["code"] == a[1].parts["code"] and a[0].parts["prediction"] != a[1].parts["prediction"]
    assert a[0].fingerprint != a[1].fingerprint and a[0].registered == ""
    b = build(base.replace("return 1", "return 2"))  # the fixture's code is part of the test's code
    assert b[0].parts["code"] != a[0].parts["code"] and b[0].parts["prediction"] == a[0].parts["prediction"]
    c = build(base.replace("pretraining.steps", "finetune.steps"))  # another profile scale
    assert c[0].parts["settings_cpu"] != a[0].parts["settings_cpu"]


# -- exact records ------------------------------------------------------------------------------


def test_change_records_are_complete():
    from lab.report.registry import Change

    old = entry(registered=T0)
    _, _, changes = register([entry(test="t.py::test_y")], {old.id: old}, [], NONE, reason=None, when=T1)
    assert changes == [Change("t.py::test_y#0", "moved", ["id"], "from t.py::test_x#0")]
    _, _, changes = register([changed(entry(), code="c9")], {old.id: old}, [], NONE, reason=None, when=T1)
    assert changes == [Change("t.py::test_x#0", "reregistered", ["code"], "")]
    _, _, changes = register([], {old.id: old}, [], NONE, reason=None, when=T1)
    assert changes == [Change("t.py::test_x#0", "retired", [], "")]
    _, _, changes = register([entry()], {}, [], NONE, reason=None, when=T1)
    assert changes == [Change("t.py::test_x#0", "new", [], "")]


def test_the_amendment_error_lists_every_prediction_and_the_command():
    olds = {f"t.py::test_{i}#0": entry(test=f"t.py::test_{i}", registered=T0) for i in range(7)}
    cur = [changed(entry(test=f"t.py::test_{i}"), code="c2") for i in range(7)]
    results = FakeResults({(f"t.py::test_{i}", "cpu"): 1.0 for i in range(7)})
    with pytest.raises(RegistryError) as exc:
        register(cur, olds, [], results, reason=None, when=T1)
    ids = ", ".join(f"t.py::test_{i}#0" for i in range(7))
    assert str(exc.value) == (
        f"7 prediction(s) changed after their results existed, which makes each an amendment: {ids}. "
        'Say why with `lab register --reason "..."` (it is shown beside their verdicts).'
    )


def test_the_drift_error_is_exact():
    old = entry(registered=T0)
    with pytest.raises(RegistryError) as exc:
        register([changed(entry(expect="x >= 2"), prediction="p2")], {old.id: old}, [], NONE, reason=None)
    assert str(exc.value) == (
        "t.py::test_x#0: the expectation changed ('x >= 1' -> 'x >= 2') but the prediction's text did not "
        "('x >= 1'): say the new claim in the text, or write the bound as {bound} / {low} / {high} so the "
        "text is built from it"
    )


def test_a_part_that_appears_or_disappears_is_a_change():
    old = entry(registered=T0)
    cur = Entry(**{**entry().__dict__, "parts": {**PARTS, "settings_tpu": "t"}, "fingerprint": "f9"})
    _, _, changes = register([cur], {old.id: old}, [], NONE, reason=None, when=T1)
    assert changes[0].changed == ["settings_tpu"]


def test_tests_of_follow_moves_and_renames_even_with_hash_signs_in_parameters():
    from lab.report.registry import _tests_of

    e = entry(
        test="t.py::test_z[a#b]",
        moves=[{"date": T1, "old_id": "t.py::test_y[c#d]#0"}],
        amendments=[{"date": T2, "old_id": "t.py::test_x[e#f]#1"}, {"date": T2}],
    )
    assert _tests_of(e) == {"t.py::test_z[a#b]", "t.py::test_y[c#d]", "t.py::test_x[e#f]"}


def test_results_under_an_old_name_reached_through_an_amendment_count():
    old = entry(test="t.py::test_y", registered=T0, amendments=[{"date": T1, "old_id": "t.py::test_x#0"}])
    cur = changed(entry(test="t.py::test_y"), data="d9")
    with pytest.raises(RegistryError):
        register([cur], {old.id: old}, [], with_results("t.py::test_x"), reason=None, when=T2)


def test_now_iso_is_utc_seconds():
    import re
    import time

    from lab.report.registry import now_iso

    stamp = now_iso()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert abs(iso_to_ts(stamp) - time.time()) < 5


def test_toml_values_and_strings():
    from lab.report.registry import _toml_str, _toml_value

    assert (_toml_value(True), _toml_value(False), _toml_value(3), _toml_value(0.5)) == ("true", "false", "3", "0.5")
    assert _toml_value(["a", 1]) == '["a", 1]'
    assert _toml_str("ünï\x7f\n") == '"ünï\\u007f\\n"'


def test_a_registry_with_only_retired_or_only_predictions_loads(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[[retired]]\nid = "a#0"\n')
    assert load(p) == ({}, [{"id": "a#0"}])
    save(p, {"t.py::test_x#0": entry(registered=T0)}, [])
    entries, retired = load(p)
    assert list(entries) == ["t.py::test_x#0"] and retired == []
    p.write_text('[[prediction]]\ntext = "no id"\n')
    with pytest.raises(RegistryError, match=r"malformed entry \{'text': 'no id'\}"):
        load(p)


def test_run_record_reason_is_exact():
    rec = entry(registered=T0).as_run_record("other")
    assert rec["reason"] == "the prediction, its code, data or settings changed since it was registered"


def test_entries_follow_project_fixtures_but_not_infrastructure(tmp_path):
    import importlib.util
    import types

    from lab.report.predictions import Prediction, at_least
    from lab.report.registry import entries_for_item
    from lab.session import Lab

    (tmp_path / "hypotheses").mkdir()
    counter = iter(range(10_000))

    def module(path, body):
        path.write_text(body)
        spec = importlib.util.spec_from_file_location(f"fx{next(counter)}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def build(fix_body=1, infra_body=1, outside_body=1, test_name="test_x", pred_kw=None, lab_call="data"):
        conf = module(tmp_path / "hypotheses" / "conftest_fx.py", f"def fix():\n    return {fix_body}\n")
        infra = module(tmp_path / "hypotheses" / "infra_fx.py", f"def lab():\n    return {infra_body}\n")
        out = module(tmp_path / "outside.py", f"def other():\n    return {outside_body}\n")
        test = module(
            tmp_path / "hypotheses" / "test_fx.py", f"def {test_name}(fix, lab):\n    return lab.{lab_call}(fix)\n"
        )
        defs = {
            "fix": [types.SimpleNamespace(func=conf.fix)],
            "lab": [types.SimpleNamespace(func=infra.lab)],  # infrastructure: never followed
            "ext": [types.SimpleNamespace(func=out.other)],  # outside hypotheses/: not followed
            "nofunc": [types.SimpleNamespace()],
        }
        item = types.SimpleNamespace(
            obj=getattr(test, test_name),
            nodeid=f"hypotheses/test_fx.py::{test_name}",
            _fixtureinfo=types.SimpleNamespace(name2fixturedefs=defs),
        )
        pred = Prediction("x is at least 1", "x", at_least(1), **(pred_kw or {}))
        return entries_for_item(item, [pred], {}, tmp_path, Lab)[0]

    base = build()
    assert build(fix_body=2).parts["code"] != base.parts["code"]  # a project fixture is followed
    assert build(infra_body=2, outside_body=2).parts["code"] == base.parts["code"]
    assert build(test_name="test_renamed").parts["code"] == base.parts["code"]  # a rename is not a change
    assert build(lab_call="tokenizer").parts["code"] != base.parts["code"]  # Lab methods it calls count
    assert (base.test, base.index, base.text, base.metric, base.expect, base.interval, base.confidence, base.kind) == (
        "hypotheses/test_fx.py::test_x", 0, "x is at least 1", "x", "x >= 1", "t", 0.95, "prediction",
    )  # fmt: skip
    # the prediction part is a stable digest of these fields: changing the scheme re-registers everything
    assert base.parts["prediction"] == "3ab5b4565a2f3613"
    for kw in ({"interval": "bootstrap"}, {"confidence": 0.9}, {"kind": "check"}):
        assert build(pred_kw=kw).parts["prediction"] != base.parts["prediction"]
    assert base.parts["data"] != "44136fa355b3678a"  # Lab.data reaches lab.data functions


# -- backfill details ---------------------------------------------------------------------------


def test_first_commit_time_reads_text_output(repo):
    t = bf.first_commit_time(repo, "hypotheses/test_a.py", "unigram entropy")
    assert isinstance(t, float) and t == iso_to_ts("2026-01-05T00:00:00Z")


def test_notes_keys_are_checked_for_both_kinds(tmp_path):
    p = tmp_path / "n.toml"
    p.write_text('[[exploratory]]\ntest = "x"\n')
    with pytest.raises(RegistryError, match=r"every \[\[exploratory\]\] needs test and reason"):
        bf.load_notes(p)
    p.write_text('[[exploratory]]\ntest = "x"\nreason = "r"\n')
    assert bf.load_notes(p) == {"exploratory": [{"test": "x", "reason": "r"}], "amendment": []}


def test_backfill_uses_the_template_for_git_and_gpu_results_count(repo):
    e = entry(test="hypotheses/test_a.py::test_a[p]", text="rendered text that git never saw")
    store = repo / "s.sqlite"
    day = iso_to_ts("2026-01-05T00:00:00Z")
    _store(store, [(e.test, "gpu", day - 10), ("hypotheses/test_a.py::other", "cpu", day - 100)])
    out = bf.backfill(
        [e], {e.id: "the loss falls below the unigram {x}"}, {}, root=repo, store_path=store, notes_path=None, when=T2
    )[e.id]
    assert out.registered == "2026-01-05T00:00:00Z" and out.status == EXPLORATORY
    # registered at the very second of the first result counts as before it
    _store(repo / "s2.sqlite", [(e.test, "cpu", day)])
    out = bf.backfill([e], {e.id: "the loss falls below the unigram {x}"}, {}, root=repo,
                      store_path=repo / "s2.sqlite", notes_path=None, when=T2)[e.id]  # fmt: skip
    assert (out.status, out.status_reason) == (PREREGISTERED, "")


def test_store_history_ignores_smoke_verdicts_and_reads_every_version(repo):
    store = repo / "s.sqlite"
    _store(store, [("n", "smoke", 1.0), ("n", "cpu", 2.0)],
           predictions=[("n", 0, "h1", "a", "x", 1.0), ("n", 0, "h2", "b", "x", 2.0), ("n", 1, "h3", "c", "x", 3.0)],
           verdicts=[(1, 0, "h1"), (2, 0, "h2")])  # fmt: skip
    h = bf._StoreHistory(store)
    assert [v["pred_hash"] for v in h.versions[("n", 0)]] == ["h1", "h2"] and h.versions[("n", 1)][0]["text"] == "c"
    assert h.judged == {("n", 0, "h2")}
    (repo / "junk.sqlite").write_text("junk" * 100)
    with pytest.raises(RegistryError) as exc:
        bf._StoreHistory(repo / "junk.sqlite")
    assert str(exc.value).startswith(f"cannot read the store's prediction history from {repo / 'junk.sqlite'}: ")


def test_store_amendments_are_complete_records(repo):
    e = _bf_entry()
    store = repo / "s.sqlite"
    preds = [(e.test, 0, "h1", "old text", "x >= 0", 10.0), (e.test, 0, "h2", "newer", "x >= 1", 20.0)]
    _store(store, [(e.test, "cpu", 11.0)], predictions=preds, verdicts=[(1, 0, "h1"), (1, 0, "h2")])
    out = bf.backfill([e], {}, {e.id: "h3"}, root=repo, store_path=store, notes_path=None, when=T2)[e.id]
    assert out.amendments == [
        {"date": bf._iso(20.0), "reason": "the prediction's text or claim changed after it had results (found in the "
         "store's history, before the registry existed)", "changed": ["prediction"], "old_text": "old text",
         "old_expect": "x >= 0", "old_fingerprint": "h1", "old_registered": bf._iso(10.0)},
        {"date": T2, "reason": "the prediction's text or claim changed after it had results", "changed": ["prediction"],
         "old_text": "newer", "old_expect": "x >= 1", "old_fingerprint": "h2", "old_registered": bf._iso(20.0)},
    ]  # fmt: skip
    assert out.moves == [] and out.status == EXPLORATORY  # its first result (t=11) predates the commit


def test_note_amendments_are_complete_records(repo):
    e = _bf_entry()
    store = repo / "s.sqlite"
    _store(store, [(e.test, "cpu", iso_to_ts("2026-01-06T00:00:00Z"))])
    notes = repo / "n.toml"
    notes.write_text('[[amendment]]\ntest = "hypotheses/test_a.py::test_a"\nreason = "r"\n')
    out = bf.backfill([e], {}, {}, root=repo, store_path=store, notes_path=notes, when=T2)[e.id]
    assert out.amendments == [
        {"date": T2, "reason": "r", "changed": ["code"], "old_text": e.text, "old_expect": e.expect,
         "old_fingerprint": "", "old_registered": ""},
    ]  # fmt: skip


def test_identical_predictions_in_one_test_keep_their_own_entries():
    a0 = entry(index=0, registered=T0)
    a1 = entry(index=1, registered=T1)
    new, _, changes = register([entry(index=0), entry(index=1)], {a0.id: a0, a1.id: a1}, [], NONE, reason=None)
    assert new[a0.id].registered == T0 and new[a1.id].registered == T1 and changes == []


def test_every_prediction_is_paired_not_only_the_first():
    olds = {
        f"t.py::test_x#{i}": entry(index=i, registered=T0, parts={**PARTS, "prediction": f"p{i}"}) for i in range(3)
    }
    cur = [entry(index=i, parts={**PARTS, "prediction": f"p{i}"}) for i in range(3)]
    cur = [cur[0], cur[2], cur[1]]  # order of collection does not matter
    new, retired, changes = register(cur, olds, [], NONE, reason=None, when=T1)
    assert retired == [] and changes == [] and all(e.registered == T0 for e in new.values())
    moved = [entry(test="t.py::test_y", index=i, parts={**PARTS, "prediction": f"p{i}"}) for i in range(3)]
    new, retired, changes = register(moved, olds, [], NONE, reason=None, when=T1)
    assert retired == [] and [c.kind for c in changes] == ["moved"] * 3


def test_an_amendment_is_reported_as_such():
    from lab.report.registry import Change

    old = entry(registered=T0)
    _, _, changes = register([changed(entry(), code="c2")], {old.id: old}, [], with_results(old.test), reason="r")
    assert changes == [Change(old.id, "amended", ["code"], "")]


def test_a_move_with_a_gpu_only_change_and_cpu_results_is_not_an_amendment():
    old = entry(registered=T0)
    cur = changed(entry(test="t.py::test_y"), settings_gpu="g2")
    new, _, changes = register([cur], {old.id: old}, [], with_results(old.test, profile="cpu"), reason=None, when=T1)
    assert changes[0].kind == "reregistered" and new[cur.id].amendments == []


def test_check_sees_parts_that_appear():
    reg = {"t.py::test_x#0": entry(registered=T0)}
    cur = Entry(**{**entry().__dict__, "parts": {**PARTS, "settings_tpu": "t"}, "fingerprint": "f9"})
    assert check([cur], reg) == ["t.py::test_x#0: changed since registration (settings_tpu)"]


def test_backfill_reads_only_its_own_results(repo):
    e = _bf_entry()
    store = repo / "s.sqlite"
    late = iso_to_ts("2026-01-06T00:00:00Z")
    # another test's early result must not make this one exploratory
    _store(store, [("hypotheses/test_a.py::other", "cpu", 5.0), (e.test, "cpu", late)])
    out = bf.backfill([e], {}, {}, root=repo, store_path=store, notes_path=None, when=T2)
    assert out[e.id].registered == "2026-01-05T00:00:00Z" and out[e.id].status == PREREGISTERED


def test_notes_that_do_not_apply_are_skipped_and_merges_keep_changes(repo):
    e = _bf_entry()
    store = repo / "s.sqlite"
    _store(
        store, [(e.test, "cpu", 11.0)], predictions=[(e.test, 0, "h1", "old", "x >= 0", 10.0)], verdicts=[(1, 0, "h1")]
    )
    notes = repo / "notes.toml"
    notes.write_text(
        '[[amendment]]\ntest = "hypotheses/other.py::"\nreason = "elsewhere"\n'
        '[[amendment]]\ntest = "hypotheses/test_a.py::test_a"\nreason = "fixed metric"\n'
    )
    out = bf.backfill([e], {}, {e.id: "h2"}, root=repo, store_path=store, notes_path=notes, when=T2)[e.id]
    (a,) = out.amendments
    assert a["reason"] == "fixed metric" and a["changed"] == ["prediction"]


def test_predictions_the_store_ran_that_no_longer_exist_are_retired(repo):
    store = repo / "s.sqlite"
    preds = [
        ("t.py::gone", 0, "h1", "old", "x >= 0", 10.0),
        ("t.py::gone", 0, "h2", "new", "x >= 1", 20.0),
        ("t.py::test_x", 0, "h3", "x >= 1", "x >= 1", 30.0),
    ]
    _store(store, [], predictions=preds)
    assert bf.retired_from_store([entry()], store, T2) == [
        {"id": "t.py::gone#0", "text": "new", "expect": "x >= 1", "registered": bf._iso(10.0), "retired": T2}
    ]
    assert bf.retired_from_store([entry()], None, T2) == []


def test_a_prediction_that_ran_before_its_commit_is_exploratory(repo):
    e = _bf_entry()
    store = repo / "s.sqlite"
    _store(store, [(e.test, "cpu", 11.0)], predictions=[(e.test, 0, "h1", e.text, e.expect, 10.0)])
    out = bf.backfill([e], {}, {e.id: "h1"}, root=repo, store_path=store, notes_path=None, when=T2)[e.id]
    assert (out.status, out.status_reason) == (
        EXPLORATORY,
        "committed only after its first result (before the registry existed)",
    )
    assert out.registered == "2026-01-05T00:00:00Z" and out.amendments == []


def test_constants_hash_the_same_in_every_process():
    """A set constant's repr follows string hashing, randomised per process: the
    fingerprint sorts it, so a registered test that reads one does not drift."""
    import subprocess
    import sys

    code = "from lab.report.fingerprint import stable_repr; print(stable_repr({'k': frozenset('aeiou'), 't': (1,)}))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(s)}, capture_output=True, text=True
        ).stdout
        for s in range(4)
    }
    assert len(outs) == 1 and "frozenset" in outs.pop()
