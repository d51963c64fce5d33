"""The pytest plugin end to end, in throwaway projects made by pytester."""

import json
import signal
import sqlite3
import subprocess
import sys

import pytest

from lab.report.store import Store

HYPOTHESES = '''
import math
import pytest
from lab.report import prediction, at_least, at_most, greater_than

@pytest.mark.pretraining
@prediction("x is at least {k}", metric="x", expect=at_least(1.0))
@pytest.mark.parametrize("k", [1, 2])
def test_param(outcome, k):
    """Parametrized hypothesis.

    Method: record three seeds."""
    for s in range(3):
        outcome.record("x", k + 0.5 + 0.01 * s, seed=s)

@prediction("a beats b", metric="a", expect=greater_than("b"))
def test_refuted(outcome):
    for s in range(3):
        outcome.record("a", 1 + 0.01 * s, seed=s)
        outcome.record("b", 2 + 0.01 * s, seed=s)

@prediction("y recorded", metric="y", expect=at_most(0))
def test_missing_metric(outcome):
    outcome.record("x", 1.0)

@prediction("nothing recorded", metric="x", expect=at_most(0))
def test_no_outcome(outcome):
    pass

@prediction("nan", metric="x", expect=at_most(0))
def test_nan(outcome):
    outcome.record("x", math.nan)

@prediction("crash", metric="x", expect=at_most(0))
def test_crash(outcome):
    raise RuntimeError("boom")

@pytest.mark.skip(reason="needs a GPU")
@prediction("skipped", metric="x", expect=at_most(0))
def test_skipped(outcome):
    pass

def test_plain_unit_test():
    assert True
'''


@pytest.fixture
def project(pytester):
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makeini("[pytest]\nmarkers =\n    pretraining: p\n")
    pytester.makepyfile(test_hyp=HYPOTHESES)
    return pytester


def _run(pytester, *args):
    return pytester.runpytest_subprocess(
        "--lab-profile", "smoke", "--lab-store", str(pytester.path / "store.sqlite"), "-p", "no:cacheprovider", *args
    )


def _rows(pytester, sql):
    con = sqlite3.connect(pytester.path / "store.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def test_verdicts_failures_and_summary(project):
    res = _run(project)
    # refuted is a finding: passes; errors, NaN and missing outcomes fail
    res.assert_outcomes(passed=4, failed=4, skipped=1)
    out = res.stdout.str()
    assert "names metric(s) ['y'] that the test never recorded" in out
    assert "missing outcome: the test recorded no measurements" in out
    assert "is nan (not finite)" in out
    assert "LLM Lab verdicts (profile: smoke" in out
    assert "2 confirmed, 1 refuted, 0 inconclusive, 0 invalid, 0 checks, 4 failed, 1 skipped" in out
    assert "x is at least 2 -- x >= 1" in out  # parameters fill the prediction text

    runs = _rows(project, "SELECT * FROM runs")
    assert len(runs) == 1 and runs[0]["status"] == "complete" and runs[0]["profile"] == "smoke"
    assert runs[0]["torch"] and json.loads(runs[0]["packages"])["torch"]
    results = _rows(project, "SELECT * FROM results")
    assert len(results) == 8  # every hypothesis, not the plain unit test
    by_id = {r["nodeid"].split("::")[1]: r for r in results}
    assert by_id["test_param[2]"]["verdict"] == "confirmed"
    assert by_id["test_refuted"]["verdict"] == "refuted" and by_id["test_refuted"]["status"] == "passed"
    assert by_id["test_crash"]["status"] == "failed" and "boom" in by_id["test_crash"]["error"]
    assert by_id["test_skipped"]["status"] == "skipped" and "needs a GPU" in by_id["test_skipped"]["error"]
    assert json.loads(by_id["test_param[1]"]["seeds"]) == [0, 1, 2]
    assert by_id["test_param[1]"]["docstring"].endswith("Method: record three seeds.")
    assert json.loads(by_id["test_param[1]"]["markers"]) == ["pretraining"]
    # the crash happened after pre-registration: the prediction is in the store
    regs = _rows(project, "SELECT text FROM predictions WHERE nodeid LIKE '%test_crash'")
    assert regs == [{"text": "crash"}]


def test_strict_turns_refutations_into_failures(project):
    res = _run(project, "--lab-strict", "-k", "refuted")
    res.assert_outcomes(failed=1)
    assert "--lab-strict: prediction refuted: a beats b" in res.stdout.str()


def test_bad_profile_seeds_and_store_are_usage_errors(project):
    res = project.runpytest_subprocess("--lab-profile", "huge")
    assert "unknown profile 'huge'; expected one of ['cpu', 'gpu', 'smoke']" in res.stderr.str()
    res = project.runpytest_subprocess("--lab-seeds", "1,x")
    assert "--lab-seeds expects comma-separated ints, got '1,x'" in res.stderr.str()
    (project.path / "afile").write_text("")
    res = project.runpytest_subprocess(
        "--lab-profile", "smoke", "--lab-store", str(project.path / "afile" / "s.sqlite")
    )
    assert "cannot write the results store at" in res.stderr.str()
    assert "is not a directory" in res.stderr.str()
    assert res.ret == pytest.ExitCode.USAGE_ERROR


def test_profile_fixture_env_and_seed_override(pytester, monkeypatch):
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makepyfile(
        """
        def test_profile(lab_profile):
            assert lab_profile.name == "smoke"
            assert lab_profile.seeds == (3, 4)
        """
    )
    monkeypatch.setenv("LAB_PROFILE", "smoke")
    res = pytester.runpytest_subprocess("--lab-seeds", "3,4", "--lab-store", str(pytester.path / "s.sqlite"))
    res.assert_outcomes(passed=1)
    assert not (pytester.path / "s.sqlite").exists()  # no hypothesis ran: store untouched


def test_list_shows_predictions_and_runs_nothing(project):
    res = _run(project, "--lab-list")
    out = res.stdout.str()
    assert "test_hyp.py::test_param[1]" in out
    assert "predicts: x is at least 1  [x >= 1]" in out
    assert "test_plain_unit_test" not in out
    assert not (project.path / "store.sqlite").exists()


def test_list_honours_keyword_and_marker_selection(project):
    out = _run(project, "--lab-list", "-k", "refuted").stdout.str()
    assert "test_hyp.py::test_refuted" in out
    assert "test_param" not in out and "test_nan" not in out


def test_xdist_workers_share_one_run(project):
    res = _run(project, "-n", "2")
    res.assert_outcomes(passed=4, failed=4, skipped=1)
    runs = _rows(project, "SELECT * FROM runs")
    assert len(runs) == 1 and runs[0]["status"] == "complete"
    results = _rows(project, "SELECT run_id FROM results")
    assert len(results) == 8 and {r["run_id"] for r in results} == {runs[0]["run_id"]}
    assert "2 confirmed, 1 refuted" in res.stdout.str()


def test_killed_run_leaves_no_half_rows(pytester):
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makepyfile(
        test_kill="""
        import os, signal
        from lab.report import prediction, at_least

        @prediction("fine", metric="x", expect=at_least(0))
        def test_a_completes(outcome):
            for s in range(3):
                outcome.record("x", 1.0 + s, seed=s)

        @prediction("never stored", metric="x", expect=at_least(0))
        def test_b_killed(outcome):
            outcome.record("x", 1.0)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    store = pytester.path / "s.sqlite"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--lab-profile", "smoke", "--lab-store", str(store), "-p", "no:cacheprovider"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(store)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    nodes = [r[0] for r in con.execute("SELECT nodeid FROM results")]
    assert nodes == ["test_kill.py::test_a_completes"]
    assert con.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 3
    assert con.execute("SELECT status FROM runs").fetchone()[0] == "running"  # shown as unfinished
    con.close()


def test_edited_prediction_is_flagged_on_the_site(pytester, tmp_path):
    from lab.report.site import write_pages

    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    body = '''
        from lab.report import prediction, at_least

        @prediction("{text}", metric="x", expect=at_least(0))
        def test_h(outcome):
            """Title."""
            outcome.record("x", 1.0)
        '''
    pytester.makepyfile(test_h=body.replace("{text}", "original claim"))
    store = str(pytester.path / "s.sqlite")
    pytester.runpytest_subprocess("--lab-profile", "smoke", "--lab-store", store).assert_outcomes(passed=1)
    write_pages(store, tmp_path / "docs")
    page = (tmp_path / "docs/hypotheses/test_h/test_h.md").read_text()
    assert "edited after results existed" not in page
    pytester.makepyfile(test_h=body.replace("{text}", "rewritten claim"))
    pytester.runpytest_subprocess("--lab-profile", "smoke", "--lab-store", store).assert_outcomes(passed=1)
    write_pages(store, tmp_path / "docs")
    page = (tmp_path / "docs/hypotheses/test_h/test_h.md").read_text()
    assert "rewritten claim" in page
    assert "prediction edited after results existed" in page and "original claim" in page


def test_benchmark_stats_are_stored(pytester, monkeypatch):
    # pytest-benchmark switches itself off inside an xdist worker; the inner run is not one
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", [10, 1000])
        def test_sum(benchmark, outcome, n):
            benchmark.group = "sums"
            benchmark.extra_info["n"] = n
            benchmark(lambda: sum(range(n)))
            outcome.record("mean_s", benchmark.stats.stats.mean)
        """
    )
    store = pytester.path / "s.sqlite"
    pytester.runpytest_subprocess("--lab-profile", "smoke", "--lab-store", str(store)).assert_outcomes(passed=2)
    rows = Store(store).query("SELECT name, grp, mean_s, rounds, extra FROM benchmarks ORDER BY name")
    assert [r["name"] for r in rows] == ["test_sum[1000]", "test_sum[10]"]
    assert all(r["grp"] == "sums" and r["mean_s"] > 0 and r["rounds"] >= 1 for r in rows)
    assert json.loads(rows[0]["extra"]) == {"n": 1000}


def test_forget_removes_a_test_ids_results_whole(project):
    from lab.report.store import forget

    _run(project)
    store = Store(project.path / "store.sqlite")
    nodeid = "test_hyp.py::test_param[1]"
    assert forget(store, nodeid) == 1
    assert not store.query("SELECT * FROM results WHERE nodeid = ?", (nodeid,))
    orphans = store.query(
        "SELECT COUNT(*) AS n FROM measurements WHERE result_id NOT IN (SELECT result_id FROM results)"
    )
    assert orphans[0]["n"] == 0
    assert store.query("SELECT COUNT(*) AS n FROM predictions WHERE nodeid = ?", (nodeid,))[0]["n"] == 1
