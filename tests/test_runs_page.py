"""The Runs page's serial-vs-all-cores table (issue 20) and the command a run records
under pytest-xdist (the controller's, not a worker's `-c`)."""

import sqlite3

import pytest

from lab.report.site import _serial_vs_parallel, run_command, run_selection, run_workers

PYTEST = "/v/lib/python3.11/site-packages/pytest/__main__.py"


@pytest.mark.parametrize(
    "argv, workers",
    [
        (f"{PYTEST} hypotheses --lab-profile cpu -m pretraining", 1),
        (f"{PYTEST} hypotheses --lab-profile cpu -m m02 -n 2 --dist loadfile", 2),
        (f"{PYTEST} hypotheses -n4", 4),
        (f"{PYTEST} hypotheses --numprocesses=3", 3),
        (f"{PYTEST} hypotheses -n auto", None),
        ("-c", None),  # an xdist worker's own argv (older runs)
        ("", None),
    ],
)
def test_run_workers_reads_the_worker_count(argv, workers):
    assert run_workers(argv) == workers


def test_run_selection_drops_only_the_worker_options():
    a = run_selection(f"{PYTEST} hypotheses --lab-profile cpu -m m02 or m04 -n 2 --dist loadfile")
    b = run_selection(f"{PYTEST} hypotheses --lab-profile cpu -m m02 or m04")
    assert a == b == "hypotheses --lab-profile cpu -m m02 or m04"
    assert run_selection(f"{PYTEST} hypotheses -m m05") != a


def _run(run_id, argv, wall, started, profile="cpu", status="complete", cache="empty"):
    return {
        "run_id": run_id,
        "argv": f"{PYTEST} hypotheses --lab-profile {profile} {argv}",
        "wall_time_s": wall,
        "started_at": started,
        "profile": profile,
        "status": status,
        "cache_state": cache,
    }


def test_the_table_pairs_a_serial_run_with_its_parallel_twin():
    runs = {
        r["run_id"]: r
        for r in [
            _run("a", "-m m02", 600.0, 1),
            _run("b", "-m m02 -n 2 --dist loadfile", 400.0, 2),
            _run("c", "-m m05 -n 2 --dist loadfile", 100.0, 3),  # never run serially: no row
            _run("d", "-m m02 -n 2 --dist loadfile", 10.0, 0, status="interrupted"),
            _run("e", "-m m02 -n 2 --dist loadfile", 20.0, 5, cache="warm"),  # reused the models: no row
            _run("f", "-m m02", 30.0, 6, cache=None),  # recorded before the store knew the cache: no row
        ]
    }
    text = "\n".join(_serial_vs_parallel(runs))
    assert "| cpu | `hypotheses --lab-profile cpu -m m02` | 10 min | 2 | 7 min | 1.50x |" in text
    assert "m05" not in text


def test_without_pairs_the_section_says_so():
    text = "\n".join(_serial_vs_parallel({"a": _run("a", "-m m02", 60.0, 1)}))
    assert "No selection has run both serially and with several workers yet." in text


def test_an_xdist_run_records_the_controllers_command(pytester):
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makepyfile(
        test_one="""
        from lab.report import at_least, prediction

        @prediction("x is at least 0", metric="x", expect=at_least(0.0))
        def test_x(outcome):
            '''Is x at least 0?'''
            outcome.record("x", 1.0, seed=0)
            outcome.record("x", 1.0, seed=1)
        """
    )
    store = pytester.path / "s.sqlite"
    result = pytester.runpytest_subprocess("--lab-profile", "smoke", f"--lab-store={store}", "-n", "2")
    assert result.ret == 0, result.stdout.str()
    import sqlite3

    (argv,) = sqlite3.connect(store).execute("SELECT argv FROM runs").fetchone()
    assert run_workers(argv) == 2 and "--lab-store" in argv


def _split_runs(serial_e_tests, serial_not_e_tests):
    runs = {
        r["run_id"]: r
        for r in [
            _run("whole", "-n 2 --dist loadfile", 3600.0, 1),
            _run("e", "-m track_d", 1800.0, 2),
            _run("note", "-m not (track_d)", 2700.0, 3),
            _run("other", "-m m02", 60.0, 4),  # a serial run of another part: never summed
        ]
    }
    nodeids = {"whole": {"d1", "d2", "a1"}, "e": set(serial_e_tests), "note": set(serial_not_e_tests), "other": {"a1"}}
    return "\n".join(_serial_vs_parallel(runs, nodeids))


def test_a_serial_run_in_two_parts_pairs_with_the_whole_parallel_run():
    text = _split_runs({"d1", "d2"}, {"a1"})
    row = (
        "| cpu | `hypotheses --lab-profile cpu` | 1 h 15 min (`-m track_d` 30 min + `-m not (track_d)` 45 min) "
        "| 2 | 1 h 00 min | 1.25x |"
    )
    assert row in text


@pytest.mark.parametrize(
    "e_tests, not_e_tests",
    [({"d1", "d2"}, {"a1", "d2"}), ({"d1"}, {"a1"}), ({"d1", "d2"}, set())],
    ids=["a test ran twice", "a test is missing", "a part recorded nothing"],
)
def test_parts_that_did_not_run_exactly_the_same_tests_are_not_summed(e_tests, not_e_tests):
    text = _split_runs(e_tests, not_e_tests)
    assert "No selection has run both serially and with several workers yet." in text


def test_a_run_records_the_training_cache_it_began_on(pytester, tmp_path, monkeypatch):
    """Empty until a trained model is in runs/, finetune/ or windtunnel/; under xdist the
    controller's view, taken before any test ran."""
    from lab.report.provenance import training_cache_state

    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    assert training_cache_state() == "empty"
    (tmp_path / "cache" / "tokens" / "x").mkdir(parents=True)  # data caches do not count
    assert training_cache_state() == "empty"
    pytester.makeconftest('pytest_plugins = ["lab.report.plugin"]')
    pytester.makepyfile(
        test_one="""
        import os, pathlib

        def test_trains(outcome):
            pathlib.Path(os.environ["LAB_CACHE"], "runs", "k").mkdir(parents=True, exist_ok=True)
            outcome.record("x", 1.0, seed=0)
        """
    )
    store = pytester.path / "s.sqlite"
    for _ in range(2):
        result = pytester.runpytest_subprocess("--lab-profile", "smoke", f"--lab-store={store}", "-n", "2")
        assert result.ret == 0, result.stdout.str()
    states = [r[0] for r in sqlite3.connect(store).execute("SELECT cache_state FROM runs ORDER BY started_at")]
    assert states == ["empty", "warm"]


@pytest.mark.parametrize(
    "argv, command",
    [
        (
            f"{PYTEST} hypotheses --lab-profile cpu -m track_d or m02 -n 2",
            "pytest hypotheses --lab-profile cpu -m track_d or m02 -n 2",
        ),
        ("/usr/bin/pytest tests -q", "pytest tests -q"),
        ("-c", "-"),  # an xdist worker's own argv (older runs)
        ("", "-"),
    ],
)
def test_run_command_shows_the_whole_selection(argv, command):
    assert run_command(argv) == command
