"""`lab run` on every core (issue 20): the worker-count rule, and the pytest arguments it
becomes. (Two processes training one cached run: tests/test_reliability.py::
test_two_processes_training_the_same_run_train_it_once.)"""

from __future__ import annotations

import argparse

import pytest

from lab.cli import _workers, run_argv
from lab.parallel import (
    GIB,
    WORKER_MEMORY_BYTES,
    plan_workers,
    thread_env,
    usable_cores,
    wants_own_workers,
    workers_of,
    xdist_args,
)


@pytest.mark.parametrize(
    ("profile", "cores", "memory", "expected"),
    [
        ("cpu", 2, 22 * GIB, 2),  # the reference machine: cores bind
        ("cpu", 64, 16 * GIB, 8),  # memory binds: 16 GiB / 2 GiB
        ("cpu", 8, 1 * GIB, 1),  # less than one worker's memory: still one
        ("smoke", 16, 4 * GIB + 1, 4),
        ("gpu", 64, 512 * GIB, 1),  # sized for one GPU
    ],
)
def test_worker_count_fits_cores_and_memory(profile, cores, memory, expected):
    assert plan_workers(profile, cores=cores, memory=memory).workers == expected


def test_the_rule_names_what_bound_it_and_refuses_an_unknown_profile():
    plan = plan_workers("cpu", cores=64, memory=16 * GIB)
    assert "64 core(s)" in plan.why and "2 GiB per cpu-profile worker" in plan.why
    with pytest.raises(ValueError, match="'tpu'"):
        plan_workers("tpu")
    assert set(WORKER_MEMORY_BYTES) == {"smoke", "cpu", "gpu"}
    assert 1 <= plan_workers("smoke").workers <= usable_cores()


@pytest.mark.parametrize(
    ("extra", "own"),
    [
        ([], False),
        (["-n", "4"], True),
        (["-n4"], True),
        (["-nauto"], True),
        (["--numprocesses=3"], True),
        (["-p", "no:xdist"], True),
        (["-x", "-q"], False),
    ],
)
def test_pytests_own_worker_options_override(extra, own):
    assert wants_own_workers(extra) is own


def _args(**kw):
    base = dict(profile="cpu", markexpr=None, store=None, workers=None)
    return argparse.Namespace(**{**base, **kw})


def test_lab_run_arguments(monkeypatch):
    monkeypatch.setattr("lab.parallel.usable_cores", lambda: 4)
    monkeypatch.setattr("lab.parallel.available_memory", lambda: 64 * GIB)
    assert run_argv(_args(), []) == ["hypotheses", "--lab-profile", "cpu", "-n", "4", "--dist", "loadfile"]
    assert run_argv(_args(workers=1), []) == ["hypotheses", "--lab-profile", "cpu"]  # serial
    assert run_argv(_args(workers=3, markexpr="track_d"), [])[-4:] == ["-n", "3", "--dist", "loadfile"]
    assert run_argv(_args(), ["-n", "2"]) == ["hypotheses", "--lab-profile", "cpu", "-n", "2"]
    assert _workers("auto") is None and _workers("3") == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            _workers(bad)
    with pytest.raises(ValueError, match="at least 1"):
        xdist_args(0)


@pytest.mark.parametrize(
    "argv, workers",
    [(["hypotheses"], 1), (["-n", "2", "--dist", "loadfile"], 2), (["-n4"], 4), (["--numprocesses=3"], 3)],
)
def test_the_worker_count_is_read_from_pytests_arguments(argv, workers):
    assert workers_of(argv) == workers


def test_workers_share_the_cores_instead_of_oversubscribing_them():
    assert thread_env(2, {}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert thread_env(2, {}, cores=16)["OMP_NUM_THREADS"] == "8"
    assert thread_env(3, {}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in thread_env(1, {}, cores=2)  # serial: torch's own default
    assert thread_env(2, {"OMP_NUM_THREADS": "2"}, cores=2)["OMP_NUM_THREADS"] == "2"  # the user's choice stands
