import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.diversity import distinct_n, loop_start


def test_distinct_n():
    assert distinct_n([[1, 2, 3, 4]], 2) == 1.0
    assert distinct_n([[1, 1, 1, 1]], 2) == 1 / 3
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        distinct_n([[1]], 0)
    with pytest.raises(ValueError, match="no 3-grams"):
        distinct_n([[1, 2]], 3)


def test_loop_start_finds_the_cycle():
    assert loop_start([5, 6, 1, 2, 3, 1, 2, 3, 1, 2, 3]) == 2
    assert loop_start([1, 2, 3, 4, 5, 6]) is None
    assert loop_start([9, 7, 7, 7, 7]) == 1


@given(st.lists(st.integers(0, 3), max_size=20), st.lists(st.integers(0, 3), min_size=1, max_size=5), st.integers(2, 6))
def test_loop_start_on_constructed_loops(prefix, cycle, reps):
    seq = prefix + cycle * reps
    s = loop_start(seq, max_period=len(cycle))
    assert s is not None and s <= len(prefix)
    tail = seq[s:]
    p = len(cycle)
    assert all(tail[i] == tail[i + p] for i in range(len(tail) - p))
