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


def test_family_run_asks_for_curriculum_13s_run(monkeypatch):
    """Tracks B and C reuse the scaling family's cached runs only if family_run makes the
    same lab.pretrain call as curriculum 13's Family.run."""
    from hypotheses.curriculum.test_m13_scaling_laws import Family
    from lab.scaling import family_run
    from lab.session import Lab

    lab = Lab("smoke", progress=False)
    data = lab.data("tinyshakespeare", "char")
    calls = []
    monkeypatch.setattr(lab, "pretrain", lambda *a, **kw: calls.append((a, kw)))
    family = Family(lab, data)
    family.run(len(lab.profile.scaling.sizes) - 1, len(lab.profile.scaling.budgets) - 1, 0)
    family_run(lab, data, lab.profile.scaling.sizes[-1], 0)
    assert calls[0] == calls[1]
