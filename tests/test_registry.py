"""The prediction registry: fingerprints, `lab register`, --check, amendments,
exploratory predictions, renames; and what a run records about registration."""

import json
import sqlite3
import textwrap
import tomllib

import pytest
import scipy.stats  # noqa: F401  (imported once here: in-process pytester runs cannot re-import C extensions)

import lab.session  # noqa: F401
from lab.report.fingerprint import Follower, normalised_source
from lab.report.registry import Entry, RegistryError, Results, check, dumps, load, register

HYP = '''
import pytest
from lab.report import prediction, check, at_least, at_most, greater_than

LIMIT = 1.0


def helper(x):
    return x + 0.5


@pytest.fixture
def offset():
    return 0.25


@pytest.mark.pretraining
@prediction("x is at least {bound}", metric="x", expect=at_least(LIMIT))
@pytest.mark.parametrize("k", [1, 2])
def test_param(outcome, k, offset):
    """Does x reach the limit?

    Method: record three seeds."""
    for s in range(3):
        outcome.record("x", helper(k) + offset + 0.01 * s * s, seed=s)


@prediction("a beats b", metric="a", expect=greater_than("b"))
@check("b is positive", metric="b", expect=at_least(0))
def test_pair(outcome):
    """Does a beat b?"""
    for s in range(3):
        outcome.record("a", 2 + 0.1 * s * s, seed=s)
        outcome.record("b", 1 + 0.05 * s, seed=s)
'''


@pytest.fixture
def project(pytester):
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makeini("[pytest]\nmarkers =\n    pretraining: p\n")
    (pytester.path / "hypotheses").mkdir()
    (pytester.path / "hypotheses" / "test_h.py").write_text(HYP)
    return pytester


def _edit(project, old, new):
    path = project.path / "hypotheses" / "test_h.py"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def _register(project, *args):
    return project.runpytest_inprocess(
        "hypotheses", "--lab-store", str(project.path / "store.sqlite"), "-p", "no:cacheprovider", *args
    )


def _registry(project):
    return tomllib.loads((project.path / "hypotheses" / "registry.toml").read_text())


def _run(project, profile="cpu", *args):
    return project.runpytest_inprocess(
        "hypotheses", "--lab-profile", profile, "--lab-store", str(project.path / "store.sqlite"),
        "-p", "no:cacheprovider", *args,
    )  # fmt: skip


def _verdict_rows(project):
    con = sqlite3.connect(project.path / "store.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return [
            dict(r)
            for r in con.execute(
                "SELECT r.nodeid, r.verdict AS hyp_verdict, r.run_id, v.* FROM verdicts v "
                "JOIN results r USING(result_id) ORDER BY r.result_id, v.idx"
            )
        ]
    finally:
        con.close()


def test_register_writes_every_prediction_and_check_passes(project):
    res = _register(project, "--lab-register")
    assert res.ret == 0
    reg = _registry(project)
    ids = sorted(p["id"] for p in reg["prediction"])
    assert ids == [
        "hypotheses/test_h.py::test_pair#0",
        "hypotheses/test_h.py::test_pair#1",
        "hypotheses/test_h.py::test_param[1]#0",
        "hypotheses/test_h.py::test_param[2]#0",
    ]
    by_id = {p["id"]: p for p in reg["prediction"]}
    assert by_id["hypotheses/test_h.py::test_param[1]#0"]["text"] == "x is at least 1"  # {bound} from expect=
    assert by_id["hypotheses/test_h.py::test_pair#1"]["kind"] == "check"
    assert all(p["status"] == "preregistered" and p["registered"] for p in reg["prediction"])
    assert set(by_id["hypotheses/test_h.py::test_pair#0"]["parts"]) == {
        "prediction", "code", "data", "settings_cpu", "settings_gpu",
    }  # fmt: skip
    assert _register(project, "--lab-register-check").ret == 0


@pytest.mark.parametrize(
    "old, new, part",
    [
        ("expect=at_least(LIMIT)", "expect=at_least(LIMIT), interval='bootstrap'", "prediction"),
        ("LIMIT = 1.0", "LIMIT = 1.5", "prediction"),
        ("+ offset + 0.01", "+ offset + 0.02", "code"),
        ("return x + 0.5", "return x + 0.6", "code"),  # a helper the test calls
        ("return 0.25", "return 0.3", "code"),  # a fixture the test requests
        ('"a beats b", metric="a", expect=greater_than("b")', '"a beats b", metric="a", expect=at_least(1)', ""),
    ],
)
def test_check_fails_on_any_change_that_decides_a_verdict(project, old, new, part):
    _register(project, "--lab-register")
    _edit(project, old, new)
    res = _register(project, "--lab-register-check")
    assert res.ret == 1
    out = res.stdout.str() + res.stderr.str()
    assert "changed since registration" in out and part in out


@pytest.mark.parametrize(
    "old, new",
    [
        ('"""Does a beat b?"""', '"""Does a beat b, really?\n\n    A new method text."""'),
        ("def helper(x):\n    return x + 0.5", "def helper(x):\n    # a comment\n    return (x\n            + 0.5)"),
    ],
)
def test_formatting_comments_and_docstrings_do_not_change_fingerprints(project, old, new):
    _register(project, "--lab-register")
    _edit(project, old, new)
    assert _register(project, "--lab-register-check").ret == 0


def test_check_fails_for_a_new_unregistered_prediction(project):
    _register(project, "--lab-register")
    _edit(project, "@check(", '@prediction("b below 5", metric="b", expect=at_most(5))\n@check(')
    res = _register(project, "--lab-register-check")
    assert res.ret == 1 and "not registered" in res.stdout.str() + res.stderr.str()


def test_registration_refuses_a_subset_of_hypotheses(project):
    res = project.runpytest_subprocess("hypotheses/test_h.py", "--lab-register", "-p", "no:cacheprovider")
    assert res.ret != 0 and "run it on the hypotheses/ folder alone" in res.stderr.str()


def test_change_before_results_is_a_plain_reregistration(project):
    _register(project, "--lab-register")
    _edit(project, "LIMIT = 1.0", "LIMIT = 1.5")
    assert _register(project, "--lab-register").ret == 0
    p = {p["id"]: p for p in _registry(project)["prediction"]}["hypotheses/test_h.py::test_param[1]#0"]
    assert p["text"] == "x is at least 1.5" and p["status"] == "preregistered" and "amendments" not in p


def test_change_after_results_is_an_amendment_that_needs_a_reason(project):
    _register(project, "--lab-register")
    assert _run(project).ret == 0
    _edit(project, "LIMIT = 1.0", "LIMIT = 1.5")
    res = _register(project, "--lab-register")
    assert res.ret != 0 and "amendment" in res.stderr.str() and "--reason" in res.stderr.str()
    assert _register(project, "--lab-register-check").ret == 1  # nothing was written
    res = _register(project, "--lab-register", "--lab-register-reason", "the limit was a typo")
    assert res.ret == 0
    p = {p["id"]: p for p in _registry(project)["prediction"]}["hypotheses/test_h.py::test_param[1]#0"]
    (a,) = p["amendments"]
    assert a["reason"] == "the limit was a typo" and a["changed"] == ["prediction"]
    assert a["old_text"] == "x is at least 1" and a["old_expect"] == "x >= 1"
    assert p["text"] == "x is at least 1.5" and p["status"] == "preregistered"
    # the untouched test keeps its registration as it was
    pair = {p["id"]: p for p in _registry(project)["prediction"]}["hypotheses/test_h.py::test_pair#0"]
    assert "amendments" not in pair
    # the next run records the amendment beside the verdict; the old verdict stays in history
    assert _run(project).ret == 0
    rows = [r for r in _verdict_rows(project) if r["nodeid"].endswith("test_param[1]")]
    assert len(rows) == 2
    first, second = (json.loads(r["registration"]) for r in rows)
    assert first["amendments"] == [] and second["amendments"][0]["reason"] == "the limit was a typo"


def test_smoke_results_do_not_count_as_results(project):
    _register(project, "--lab-register")
    assert _run(project, "smoke").ret == 0
    _edit(project, "LIMIT = 1.0", "LIMIT = 1.5")
    assert _register(project, "--lab-register").ret == 0  # no reason needed


def test_text_and_expectation_cannot_drift(project):
    _edit(
        project, '"a beats b", metric="a", expect=greater_than("b")', '"a is above 2", metric="a", expect=at_least(2)'
    )
    _register(project, "--lab-register")
    _edit(project, "expect=at_least(2)", "expect=at_least(3)")
    res = _register(project, "--lab-register")
    assert res.ret != 0 and "the expectation changed" in res.stderr.str() and "{bound}" in res.stderr.str()


def test_a_new_prediction_on_a_test_with_results_is_exploratory(project):
    _register(project, "--lab-register")
    assert _run(project).ret == 0
    _edit(project, "@check(", '@prediction("b below 5", metric="b", expect=at_most(5))\n@check(')
    assert _register(project, "--lab-register").ret == 0
    by_text = {p["text"]: p for p in _registry(project)["prediction"]}
    assert by_text["b below 5"]["status"] == "exploratory"
    assert "after results" in by_text["b below 5"]["status_reason"]
    assert by_text["a beats b"]["status"] == "preregistered"


def test_a_renamed_test_keeps_its_registration_and_records_the_rename(project):
    _register(project, "--lab-register")
    before = {p["id"]: p for p in _registry(project)["prediction"]}["hypotheses/test_h.py::test_pair#0"]
    assert _run(project).ret == 0
    _edit(project, "def test_pair(", "def test_pair_renamed(")
    assert _register(project, "--lab-register-check").ret == 1
    assert _register(project, "--lab-register").ret == 0  # a move alone needs no reason: it is not an amendment
    reg = _registry(project)
    p = {p["id"]: p for p in reg["prediction"]}["hypotheses/test_h.py::test_pair_renamed#0"]
    assert p["registered"] == before["registered"] and p["status"] == "preregistered"
    assert p["moves"][0]["old_id"] == "hypotheses/test_h.py::test_pair#0" and "amendments" not in p
    assert not reg.get("retired")
    # renamed and changed at once: an amendment that names the old id
    _edit(project, "def test_pair_renamed(", "def test_pair_again(")
    _edit(project, "2 + 0.1 * s * s", "2 + 0.2 * s * s")
    assert _register(project, "--lab-register").ret != 0
    assert _register(project, "--lab-register", "--lab-register-reason", "renamed and rescaled").ret == 0
    p = {p["id"]: p for p in _registry(project)["prediction"]}["hypotheses/test_h.py::test_pair_again#0"]
    assert p["amendments"][0]["old_id"] == "hypotheses/test_h.py::test_pair_renamed#0"
    assert p["amendments"][0]["changed"] == ["id", "code"]


def test_a_removed_prediction_is_retired_not_forgotten(project):
    _register(project, "--lab-register")
    _edit(project, '@check("b is positive", metric="b", expect=at_least(0))\n', "")
    assert _register(project, "--lab-register-check").ret == 1
    assert _register(project, "--lab-register").ret == 0
    (r,) = _registry(project)["retired"]
    assert r["id"] == "hypotheses/test_h.py::test_pair#1" and r["text"] == "b is positive"


def test_runs_record_registration_status(project):
    assert _run(project).ret == 0  # nothing registered yet
    assert {json.loads(r["registration"])["status"] for r in _verdict_rows(project)} == {"unregistered"}
    _register(project, "--lab-register", "--lab-register-reason", "first")
    assert _run(project).ret == 0
    rows = _verdict_rows(project)[-4:]
    assert {json.loads(r["registration"])["status"] for r in rows} == {"exploratory"}  # results came first
    _edit(project, "+ offset + 0.01", "+ offset + 0.02")  # edited without re-registering
    assert _run(project).ret == 0
    rows = {r["nodeid"]: r for r in _verdict_rows(project)[-4:]}
    assert json.loads(rows["hypotheses/test_h.py::test_param[1]"]["registration"])["status"] == "changed"
    assert json.loads(rows["hypotheses/test_h.py::test_pair"]["registration"])["status"] == "exploratory"


def test_checks_are_counted_apart_and_validity_makes_invalid(project):
    _edit(
        project,
        '"""Does a beat b?"""',
        '"""Does a beat b?"""\n    outcome.require("trained", False, "loss stayed at ln 10")',
    )
    res = _run(project)
    assert res.ret == 0
    out = res.stdout.str()
    assert "INVALID" in out and "1 invalid" in out
    rows = {(r["nodeid"], r["idx"]): r for r in _verdict_rows(project)}
    pred, chk = rows[("hypotheses/test_h.py::test_pair", 0)], rows[("hypotheses/test_h.py::test_pair", 1)]
    assert pred["verdict"] == "invalid" and "loss stayed at ln 10" in pred["detail"]
    assert chk["kind"] == "check" and chk["verdict"] == "confirmed"  # checks are judged regardless
    assert pred["hyp_verdict"] == "invalid"


def test_a_check_that_does_not_hold_fails_the_test(project):
    _edit(project, "expect=at_least(0))\ndef test_pair", "expect=at_least(10))\ndef test_pair")
    res = _run(project)
    res.assert_outcomes(passed=2, failed=1)
    assert "a check (an invariant that holds by construction) does not hold: b is positive" in res.stdout.str()


def test_a_test_with_only_checks_is_a_check(project):
    _edit(project, '@prediction("a beats b", metric="a", expect=greater_than("b"))\n', "")
    assert _run(project).ret == 0
    (row,) = [r for r in _verdict_rows(project) if r["nodeid"].endswith("test_pair")]
    assert row["hyp_verdict"] == "check"


# -- unit level ----------------------------------------------------------------------


def _entry(**kw):
    base = dict(
        id="t.py::test_x#0", test="t.py::test_x", index=0, kind="prediction", text="x >= 1",
        metric="x", expect="x >= 1", interval="t", confidence=0.95, fingerprint="f0",
        parts={"prediction": "p", "code": "c", "data": "d", "settings_cpu": "s", "settings_gpu": "g"},
        registered="",
    )  # fmt: skip
    return Entry(**{**base, **kw})


class _NoResults(Results):
    def __init__(self, first=None):
        self.first = first or {}


def test_registry_round_trips_through_toml(tmp_path):
    e = _entry(registered="2026-01-01T00:00:00Z", text='quote " and \\ and ünïcode\nnewline')
    e.amendments = [{"date": "2026-01-02T00:00:00Z", "reason": "r", "changed": ["code"]}]
    path = tmp_path / "registry.toml"
    path.write_text(dumps([e], [{"id": "gone#0", "text": "t", "retired": "2026-01-03T00:00:00Z"}]))
    entries, retired = load(path)
    assert entries[e.id] == e and retired[0]["id"] == "gone#0"


def test_a_corrupt_registry_is_a_clear_error(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text("[[prediction]\nbroken")
    with pytest.raises(RegistryError, match="not valid TOML"):
        load(path)
    path.write_text('[[prediction]]\nid = "x"\n')
    with pytest.raises(RegistryError, match="malformed entry 'x'"):
        load(path)


def test_settings_change_amends_only_where_that_profile_has_results():
    old = _entry(registered="2026-01-01T00:00:00Z")
    cur = _entry(parts={**old.parts, "settings_gpu": "g2"}, fingerprint="f1")
    results = _NoResults({("t.py::test_x", "cpu"): 1.0})
    new, _, changes = register([cur], {old.id: old}, [], results, reason=None, when="2026-02-01T00:00:00Z")
    assert changes[0].kind == "reregistered" and not new[old.id].amendments
    cur2 = _entry(parts={**old.parts, "settings_cpu": "s2"}, fingerprint="f2")
    with pytest.raises(RegistryError, match="amendment"):
        register([cur2], {old.id: old}, [], results, reason=None)
    new, _, changes = register([cur2], {old.id: old}, [], results, reason="longer runs")
    assert new[old.id].amendments[0]["changed"] == ["settings_cpu"]


def test_check_lists_missing_changed_and_stale_entries():
    reg = {"t.py::test_x#0": _entry(), "t.py::gone#0": _entry(id="t.py::gone#0")}
    problems = check([_entry(fingerprint="f9", parts={"prediction": "p2"}), _entry(id="t.py::new#0")], reg)
    assert any("changed since registration" in p for p in problems)
    assert any("t.py::new#0: not registered" in p for p in problems)
    assert any("t.py::gone#0: registered but no longer exists" in p for p in problems)
    assert check([_entry()], {"t.py::test_x#0": _entry()}) == []


def test_normalised_source_ignores_layout_and_docstrings_only():
    a = normalised_source('def f(x):\n    """Doc."""\n    return x+1\n')
    b = normalised_source("def f(x):\n    # comment\n    return (x +\n        1)\n")
    c = normalised_source("def f(x):\n    return x + 2\n")
    assert a == b != c


def test_follower_reads_profile_settings_and_lab_calls():
    import types

    from lab.profiles import get_profile
    from lab.session import Lab

    src = textwrap.dedent(
        """
        def test_x(lab, outcome):
            p = lab.profile.pretraining
            for seed in lab.seeds:
                lab.pretrain(None, None, seed=seed, max_steps=p.steps)
        """
    )
    ns = {}
    exec(compile(src, "<hyp>", "exec"), ns)
    f = Follower(__import__("pathlib").Path("."), Lab)
    f.follow = types.MethodType(Follower.follow, f)
    f.follow(ns["test_x"])  # source unavailable for exec'd code: nothing followed, no crash
    assert f.code == {}
    f._scan_profile(__import__("ast").parse(src))
    settings = f.settings(get_profile("cpu"))
    assert (
        set(settings) == {"pretraining", "seeds"}
        and settings["pretraining"]["steps"] == get_profile("cpu").pretraining.steps
    )


def test_the_lab_register_command(project):
    import subprocess
    import sys

    (project.path / "mkdocs.yml").write_text("site_name: x\n")
    store = str(project.path / "store.sqlite")

    def lab(*args):
        return subprocess.run(
            [sys.executable, "-m", "lab", *args], cwd=project.path, capture_output=True, text=True, timeout=300
        )

    assert lab("register", "--check").returncode == 1
    assert lab("register", "--store", store).returncode == 0
    assert lab("register", "--check").returncode == 0
    assert _run(project).ret == 0
    _edit(project, "LIMIT = 1.0", "LIMIT = 1.5")
    res = lab("register", "--store", store)
    assert res.returncode != 0 and "--reason" in res.stderr
    assert lab("register", "--store", store, "--reason", "a typo in two words").returncode == 0
    amended = [p for p in _registry(project)["prediction"] if p.get("amendments")]
    assert {a["reason"] for p in amended for a in p["amendments"]} == {"a typo in two words"}


def test_retired_tests_get_no_page_and_are_listed_on_the_home_page(project):
    from lab.report.site import write_pages

    _register(project, "--lab-register")
    assert _run(project).ret == 0
    _edit(project, '@prediction("a beats b", metric="a", expect=greater_than("b"))\n', "")
    _edit(project, '@check("b is positive", metric="b", expect=at_least(0))\ndef test_pair(', "def _gone(")
    assert _register(project, "--lab-register").ret == 0
    assert {r["id"] for r in _registry(project)["retired"]} == {
        "hypotheses/test_h.py::test_pair#0",
        "hypotheses/test_h.py::test_pair#1",
    }
    docs = project.path / "docs"
    write_pages(project.path / "store.sqlite", docs)
    assert not (docs / "hypotheses" / "test_h" / "test_pair.md").exists()
    assert (docs / "hypotheses" / "test_h" / "test_param.md").exists()
    home = (docs / "index.md").read_text()
    assert "## Retired hypotheses" in home and "`hypotheses/test_h.py::test_pair`" in home and "a beats b" in home
