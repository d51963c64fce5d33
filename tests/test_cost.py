"""FLOP counts and interleaved timing behind curriculum 08's and 15's cost hypotheses."""

import pytest
import torch

from lab.cost import forward_flops, interleaved_seconds


def test_forward_flops_of_a_linear_layer_is_2_m_n_k():
    layer = torch.nn.Linear(8, 5, bias=False)
    assert forward_flops(layer, torch.zeros(3, 8)) == 2 * 3 * 8 * 5


def test_interleaved_seconds_rotates_the_order_and_counts_calls():
    calls = []
    out = interleaved_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, iterations=2)
    assert calls == ["a", "b", "a", "a", "b", "b", "b", "b", "a", "a"]
    assert [len(v) for v in out.values()] == [2, 2] and all(s >= 0 for v in out.values() for s in v)


def test_interleaved_seconds_refuses_bad_arguments():
    with pytest.raises(ValueError, match="rounds"):
        interleaved_seconds({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="at least one"):
        interleaved_seconds({}, rounds=1)


def test_interleaved_seconds_without_warm_up_times_every_call():
    calls = []
    interleaved_seconds({"a": lambda: calls.append("a")}, rounds=3, warm_up=False)
    assert calls == ["a", "a", "a"]
