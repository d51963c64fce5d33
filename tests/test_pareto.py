"""The Pareto frontier behind curriculum 13's time-and-memory hypothesis."""

import pytest

from lab.scaling import pareto_front


def test_pareto_front_keeps_the_undominated_points_by_cost():
    costs = [1.0, 2.0, 3.0, 2.5, 4.0]
    losses = [3.0, 2.0, 2.5, 1.5, 1.5]
    # 2 is dominated by 1 (cheaper, lower), 4 by 3 (cheaper, equal loss)
    assert pareto_front(costs, losses) == [0, 1, 3]


def test_pareto_front_refuses_bad_input():
    with pytest.raises(ValueError, match="same length"):
        pareto_front([1.0, 2.0], [1.0])
