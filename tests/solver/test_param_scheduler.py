"""Tests for d2engine.solver.param_scheduler: values at known points, computed by hand."""

from __future__ import annotations

import math

import pytest

from d2engine.solver.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    ExponentialParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
    PolynomialDecayParamScheduler,
    StepParamScheduler,
    StepWithFixedGammaParamScheduler,
    WarmupParamScheduler,
)


def test_constant() -> None:
    s = ConstantParamScheduler(0.3)
    assert [s(0.0), s(0.5), s(1.0)] == [0.3, 0.3, 0.3]


def test_linear() -> None:
    s = LinearParamScheduler(1.0, 3.0)
    assert s(0.0) == 1.0
    assert s(0.25) == pytest.approx(1.5)  # 1 + 0.25 * (3 - 1)
    assert s(1.0) == 3.0


def test_cosine() -> None:
    s = CosineParamScheduler(1.0, 0.0)
    assert s(0.0) == 1.0
    assert s(0.5) == pytest.approx(0.5)  # 0.5 * (1 + cos(pi/2)) = 0.5
    assert s(0.25) == pytest.approx(0.8535533905932737)  # 0.5 * (1 + cos(pi/4)) = 0.5 * 1.7071...
    assert s(1.0) == pytest.approx(0.0)
    s2 = CosineParamScheduler(2.0, 0.5)
    # 0.5 + 0.5 * (2 - 0.5) * (1 + cos(pi/3)) = 0.5 + 0.75 * 1.5 = 1.625
    assert s2(1 / 3) == pytest.approx(1.625)


def test_exponential_and_polynomial() -> None:
    assert ExponentialParamScheduler(2.0, 0.25)(0.5) == pytest.approx(1.0)  # 2 * 0.25**0.5
    assert PolynomialDecayParamScheduler(1.0, 2.0)(0.5) == pytest.approx(0.25)  # (1 - 0.5)**2
    with pytest.raises(ValueError, match="decay > 0"):
        ExponentialParamScheduler(1.0, 0.0)


def test_multistep_with_milestones_and_num_updates() -> None:
    s = MultiStepParamScheduler([1.0, 0.1, 0.01], num_updates=10, milestones=[3, 7])
    # update = where * 10; values[i] from milestone i-1 (inclusive) to milestone i (exclusive)
    assert s(0.0) == 1.0
    assert s(0.2) == 1.0  # update 2
    assert s(0.3) == 0.1  # update 3: first milestone
    assert s(0.69) == 0.1  # update 6.9
    assert s(0.7) == 0.01  # update 7
    assert s(1.0) == 0.01


def test_multistep_last_milestone_is_num_updates() -> None:
    s = MultiStepParamScheduler([1.0, 0.5], milestones=[4, 10])
    assert s(0.3) == 1.0  # update 3
    assert s(0.4) == 0.5  # update 4


def test_multistep_equal_parts() -> None:
    # ceil(10 / 3) = 4 updates per part -> milestones [4, 8]
    s = MultiStepParamScheduler([1.0, 0.5, 0.25], num_updates=10)
    assert [s(0.35), s(0.4), s(0.79), s(0.8)] == [1.0, 0.5, 0.5, 0.25]
    assert StepParamScheduler(10, [1.0, 0.5, 0.25])(0.4) == 0.5


@pytest.mark.parametrize("num_updates", [1000, 999_983, 10**7])
def test_multistep_boundary_exact_at_every_scale(num_updates: int) -> None:
    """A milestone at iteration m takes effect exactly at iteration m (where = m / num_updates).

    fvcore adds an absolute 1e-6 to `where`, which moves the boundary 10 iterations early at 1e7.
    """
    m = num_updates // 3
    s = MultiStepParamScheduler([1.0, 0.1], num_updates=num_updates, milestones=[m])
    for it in range(m - 12, m + 3):
        expected = 1.0 if it < m else 0.1
        assert s(it / num_updates) == expected, it


def test_multistep_every_iteration_of_a_short_schedule() -> None:
    s = MultiStepParamScheduler([1.0, 0.1, 0.01], num_updates=30, milestones=[7, 19])
    values = [s(i / 30) for i in range(30)]
    assert values == [1.0] * 7 + [0.1] * 12 + [0.01] * 11


def test_multistep_errors() -> None:
    with pytest.raises(ValueError, match="num_updates or milestones"):
        MultiStepParamScheduler([1.0, 0.1])
    with pytest.raises(ValueError, match="expected 1 milestones"):
        MultiStepParamScheduler([1.0, 0.1], num_updates=10, milestones=[3, 5])
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiStepParamScheduler([1.0, 0.1, 0.01], num_updates=10, milestones=[5, 3])
    with pytest.raises(ValueError, match=r"\(0, num_updates=10\)"):
        MultiStepParamScheduler([1.0, 0.1], num_updates=10, milestones=[10])
    with pytest.raises(ValueError, match="num_updates >= len"):
        MultiStepParamScheduler([1.0, 0.1, 0.01], num_updates=2)
    with pytest.raises(ValueError, match="at least one value"):
        MultiStepParamScheduler([], num_updates=2)


def test_step_with_fixed_gamma() -> None:
    # values 2 * 0.5**k = [2, 1, 0.5, 0.25]; ceil(10 / 4) = 3 -> milestones [3, 6, 9]
    s = StepWithFixedGammaParamScheduler(base_value=2.0, num_decays=3, gamma=0.5, num_updates=10)
    assert [s(0.0), s(0.2), s(0.3), s(0.5), s(0.6), s(0.9), s(1.0)] == [
        2.0,
        2.0,
        1.0,
        1.0,
        0.5,
        0.25,
        0.25,
    ]
    with pytest.raises(ValueError, match="num_decays"):
        StepWithFixedGammaParamScheduler(1.0, -1, 0.1, 10)
    with pytest.raises(ValueError, match="num_updates > num_decays"):
        StepWithFixedGammaParamScheduler(1.0, 3, 0.1, 3)


def test_composite_rescaled_and_fixed() -> None:
    rescaled = CompositeParamScheduler(
        [ConstantParamScheduler(1.0), LinearParamScheduler(0.0, 10.0)],
        lengths=[0.3, 0.7],
        interval_scaling=["fixed", "rescaled"],
    )
    assert rescaled(0.2) == 1.0
    assert rescaled(0.3) == pytest.approx(0.0)  # second part starts: local where 0
    assert rescaled(0.65) == pytest.approx(5.0)  # local (0.65 - 0.3) / 0.7 = 0.5
    assert rescaled(1.0) == pytest.approx(10.0)
    fixed = CompositeParamScheduler(
        [ConstantParamScheduler(1.0), LinearParamScheduler(0.0, 10.0)],
        lengths=[0.3, 0.7],
        interval_scaling=["fixed", "fixed"],
    )
    assert fixed(0.65) == pytest.approx(6.5)  # global where 0.65 -> 0 + 0.65 * 10


def test_composite_zero_length_part_is_skipped() -> None:
    s = CompositeParamScheduler(
        [ConstantParamScheduler(7.0), ConstantParamScheduler(1.0)],
        lengths=[0.0, 1.0],
        interval_scaling=["rescaled", "fixed"],
    )
    assert s(0.0) == 1.0


def test_composite_errors() -> None:
    c = ConstantParamScheduler(1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        CompositeParamScheduler([c, c], lengths=[0.5, 0.6], interval_scaling=["fixed", "fixed"])
    with pytest.raises(ValueError, match="one length and one interval_scaling"):
        CompositeParamScheduler([c, c], lengths=[1.0], interval_scaling=["fixed", "fixed"])
    with pytest.raises(ValueError, match="interval_scaling 'stretched'"):
        CompositeParamScheduler([c], lengths=[1.0], interval_scaling=["stretched"])


def test_warmup_linear() -> None:
    s = WarmupParamScheduler(CosineParamScheduler(1.0, 0.0), 0.1, 0.2, "linear")
    # start = 0.1 * cos_sched(0) = 0.1; end = cos_sched(0.2) = 0.5 * (1 + cos(0.2 pi)) = 0.904508...
    end = 0.9045084971874737
    assert s(0.0) == pytest.approx(0.1)
    assert s(0.1) == pytest.approx(0.1 + 0.5 * (end - 0.1))  # halfway: 0.502254...
    assert s(0.1) == pytest.approx(0.5022542485937369)
    assert s(0.2) == pytest.approx(end)
    # after warm-up the wrapped scheduler sees the global where: 0.5 * (1 + cos(0.6 pi))
    assert s(0.6) == pytest.approx(0.3454915028125263)


def test_warmup_constant() -> None:
    s = WarmupParamScheduler(CosineParamScheduler(1.0, 0.0), 0.1, 0.2, "constant")
    assert s(0.0) == pytest.approx(0.1)
    assert s(0.19) == pytest.approx(0.1)
    assert s(0.2) == pytest.approx(0.9045084971874737)


def test_warmup_rescale_interval() -> None:
    s = WarmupParamScheduler(CosineParamScheduler(1.0, 0.0), 0.1, 0.5, rescale_interval=True)
    # after warm-up, local where = (0.75 - 0.5) / 0.5 = 0.5 -> 0.5 * (1 + cos(pi/2)) = 0.5
    assert s(0.75) == pytest.approx(0.5)
    assert s(0.5) == pytest.approx(1.0)


def test_warmup_zero_and_full_length() -> None:
    base = LinearParamScheduler(1.0, 0.0)
    none = WarmupParamScheduler(base, 0.001, 0.0)
    assert none(0.0) == 1.0  # no warm-up at all
    full = WarmupParamScheduler(base, 0.5, 1.0)
    # warm-up covers everything: from 0.5 * 1 to base(1.0) = 0
    assert full(0.5) == pytest.approx(0.25)
    assert full(1.0) == pytest.approx(0.0)


def test_warmup_errors() -> None:
    with pytest.raises(ValueError, match=r"Unknown warmup_method 'cubic'.*'linear'"):
        WarmupParamScheduler(ConstantParamScheduler(1.0), 0.1, 0.1, "cubic")
    with pytest.raises(ValueError, match="warmup_length in"):
        WarmupParamScheduler(ConstantParamScheduler(1.0), 0.1, 1.5)


@pytest.mark.parametrize("where", [-0.1, 1.5, math.nan])
def test_where_outside_range_is_an_error(where: float) -> None:
    with pytest.raises(ValueError, match=r"where=.*expected the fraction of training done"):
        LinearParamScheduler(1.0, 0.0)(where)


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="start_value must be finite"):
        LinearParamScheduler(math.inf, 0.0)
    with pytest.raises(TypeError, match="value must be a real number"):
        ConstantParamScheduler("big")  # type: ignore[arg-type]


def test_base_class_is_abstract_and_repr_names_fields() -> None:
    with pytest.raises(NotImplementedError):
        ParamScheduler()(0.5)
    assert repr(LinearParamScheduler(1.0, 2.0)) == (
        "LinearParamScheduler(start_value=1.0, end_value=2.0)"
    )
