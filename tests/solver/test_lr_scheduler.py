"""Tests for d2engine.solver.lr_scheduler and build_lr_scheduler: lrs at known iterations."""

from __future__ import annotations

import gc
import io
import itertools
import logging
import math
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.config import get_cfg
from d2engine.solver.build import build_lr_scheduler
from d2engine.solver.lr_scheduler import (
    LRMultiplier,
    WarmupCosineLR,
    WarmupMultiStepLR,
    WarmupStepWithFixedGammaLR,
)
from d2engine.solver.param_scheduler import LinearParamScheduler, MultiStepParamScheduler


def _optimizer(*lrs: float) -> torch.optim.SGD:
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [g["lr"] for g in optimizer.param_groups]


def _run(optimizer: torch.optim.Optimizer, sched: Any, iters: int) -> list[float]:
    """The lr of group 0 used at iterations 0 .. iters-1 (stepped as the LRScheduler hook does)."""
    out = []
    for _ in range(iters):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return out


def test_lr_multiplier_values_per_group_and_past_the_end() -> None:
    opt = _optimizer(1.0, 0.5)
    sched = LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=4)
    seen = []
    for _ in range(6):
        seen.append(_lrs(opt))
        opt.step()
        sched.step()
    # iteration i: base_lr * (1 - i / 4); iterations >= 4 are clamped to where = 1 -> 0
    expected = [[1.0, 0.5], [0.75, 0.375], [0.5, 0.25], [0.25, 0.125], [0.0, 0.0], [0.0, 0.0]]
    for got, want in zip(seen, expected, strict=True):
        assert got == pytest.approx(want)
    assert sched.get_last_lr() == pytest.approx([0.0, 0.0])
    assert sched.max_iter == 4


def test_lr_multiplier_accepts_a_plain_callable() -> None:
    opt = _optimizer(2.0)
    LRMultiplier(opt, lambda where: 0.25, max_iter=10)
    assert _lrs(opt) == [0.5]


def test_lr_multiplier_resume_from_last_iter() -> None:
    opt = _optimizer(1.0)
    first = LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=10)
    _run(opt, first, 3)  # now at iteration 3, lr 0.7, group has initial_lr = 1.0
    resumed = LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=10, last_iter=2)
    assert resumed.base_lrs == [1.0]
    assert _lrs(opt) == pytest.approx([0.7])  # 1 - 3 / 10
    resumed.step()
    assert _lrs(opt) == pytest.approx([0.6])


def test_lr_multiplier_resume_without_initial_lr_warns(caplog: pytest.LogCaptureFixture) -> None:
    opt = _optimizer(1.0)
    with caplog.at_level(logging.WARNING, logger="d2engine.solver.lr_scheduler"):
        LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=10, last_iter=4)
    assert "no 'initial_lr'" in caplog.text
    assert _lrs(opt) == pytest.approx([0.5])  # 1 * (1 - 5 / 10)


def test_state_dict_is_plain_and_weights_only_loadable() -> None:
    opt = _optimizer(1.0, 0.1)
    sched = LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=10)
    _run(opt, sched, 4)
    state = sched.state_dict()
    assert state == {"base_lrs": [1.0, 0.1], "last_epoch": 4}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    opt2 = _optimizer(1.0, 0.1)
    sched2 = LRMultiplier(opt2, LinearParamScheduler(1.0, 0.0), max_iter=10)
    sched2.load_state_dict(loaded)
    assert sched2.last_epoch == 4
    assert _lrs(opt2) == pytest.approx([0.6, 0.06])  # lr of iteration 4: base * (1 - 4/10)
    assert sched2.get_last_lr() == pytest.approx([0.6, 0.06])
    opt2.step()
    sched2.step()
    assert _lrs(opt2) == pytest.approx([0.5, 0.05])


def test_load_state_dict_errors() -> None:
    opt = _optimizer(1.0)
    sched = LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=10)
    with pytest.raises(KeyError, match=r"lacks \['last_epoch'\]"):
        sched.load_state_dict({"base_lrs": [1.0]})
    with pytest.raises(ValueError, match="2 base lrs but the optimizer has 1 param groups"):
        sched.load_state_dict({"base_lrs": [1.0, 2.0], "last_epoch": 0})


def test_no_reference_cycles() -> None:
    """Dropping the last reference frees the scheduler and optimizer at once, without gc."""
    gc.collect()
    gc.disable()
    try:
        opt = _optimizer(1.0)
        sched = LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=10)
        sched_ref, opt_ref = weakref.ref(sched), weakref.ref(opt)
        del sched
        assert sched_ref() is None, "LRMultiplier is part of a reference cycle"
        assert gc.get_referrers(opt) == [], "something still refers to the optimizer"
        del opt
        assert opt_ref() is None, "the optimizer is part of a reference cycle"
    finally:
        gc.enable()


def test_constructor_errors() -> None:
    opt = _optimizer(1.0)
    with pytest.raises(TypeError, match="needs a torch Optimizer, got list"):
        LRMultiplier([], LinearParamScheduler(1.0, 0.0), max_iter=10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got float"):
        LRMultiplier(opt, 0.5, max_iter=10)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="LRMultiplier: max_iter must be a positive integer, got 0"
    ):
        LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=0)
    with pytest.raises(ValueError, match="last_iter >= -1"):
        LRMultiplier(opt, LinearParamScheduler(1.0, 0.0), max_iter=5, last_iter=-3)


# ------------------------------------------------------------------ named schedulers / builder


def _cfg(**solver: Any) -> Any:
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 1.0
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def test_build_warmup_multistep(caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(
        LR_SCHEDULER_NAME="WarmupMultiStepLR",
        MAX_ITER=20,
        STEPS=(10, 15, 20, 25),
        GAMMA=0.1,
        WARMUP_FACTOR=0.001,
        WARMUP_ITERS=5,
        WARMUP_METHOD="linear",
    )
    opt = _optimizer(1.0)
    with caplog.at_level(logging.WARNING, logger="d2engine.solver.lr_scheduler"):
        sched = build_lr_scheduler(cfg, opt)
    assert isinstance(sched, WarmupMultiStepLR) and isinstance(sched, LRMultiplier)
    assert "[20, 25]" in caplog.text and "ignored" in caplog.text
    lrs = _run(opt, sched, 21)
    # warm-up: 0.001 + (1 - 0.001) * i / 5
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[1] == pytest.approx(0.2008)
    assert lrs[4] == pytest.approx(0.8002)
    assert lrs[5:10] == pytest.approx([1.0] * 5)
    assert lrs[10:15] == pytest.approx([0.1] * 5)
    assert lrs[15:] == pytest.approx([0.01] * 6)  # iteration 20 (= MAX_ITER) keeps the last value


def test_build_warmup_multistep_constant_warmup() -> None:
    cfg = _cfg(MAX_ITER=20, STEPS=(10,), WARMUP_ITERS=5, WARMUP_METHOD="constant")
    opt = _optimizer(1.0)
    lrs = _run(opt, build_lr_scheduler(cfg, opt), 12)
    assert lrs == pytest.approx([0.001] * 5 + [1.0] * 5 + [0.1] * 2)


def test_build_warmup_cosine_ends_at_base_lr_end() -> None:
    cfg = _cfg(
        LR_SCHEDULER_NAME="WarmupCosineLR",
        BASE_LR=2.0,
        BASE_LR_END=0.2,
        MAX_ITER=10,
        WARMUP_ITERS=0,
    )
    opt = _optimizer(2.0)
    sched = build_lr_scheduler(cfg, opt)
    assert isinstance(sched, WarmupCosineLR)
    lrs = _run(opt, sched, 11)
    # lr = 0.2 + 0.5 * (2 - 0.2) * (1 + cos(pi * i / 10))
    assert lrs[0] == pytest.approx(2.0)
    assert lrs[2] == pytest.approx(0.2 + 0.9 * (1 + math.cos(0.2 * math.pi)))
    assert lrs[2] == pytest.approx(1.8281152949374527)
    assert lrs[5] == pytest.approx(1.1)  # 0.2 + 0.9
    assert lrs[10] == pytest.approx(0.2)


def test_build_warmup_cosine_with_linear_warmup() -> None:
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupCosineLR", MAX_ITER=10, WARMUP_ITERS=2, WARMUP_FACTOR=0.1)
    opt = _optimizer(1.0)
    lrs = _run(opt, build_lr_scheduler(cfg, opt), 3)
    # warm-up ends at cos value of iteration 2: 0.5 * (1 + cos(0.2 pi)) = 0.9045084971874737
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[1] == pytest.approx(0.1 + 0.5 * (0.9045084971874737 - 0.1))
    assert lrs[2] == pytest.approx(0.9045084971874737)


def test_build_step_with_fixed_gamma() -> None:
    cfg = _cfg(
        LR_SCHEDULER_NAME="WarmupStepWithFixedGammaLR",
        MAX_ITER=12,
        NUM_DECAYS=2,
        GAMMA=0.5,
        WARMUP_ITERS=0,
    )
    opt = _optimizer(1.0)
    sched = build_lr_scheduler(cfg, opt)
    assert isinstance(sched, WarmupStepWithFixedGammaLR)
    # ceil(12 / 3) = 4 iterations per value: 1, 0.5, 0.25
    assert _run(opt, sched, 12) == pytest.approx([1.0] * 4 + [0.5] * 4 + [0.25] * 4)


def test_build_step_with_fixed_gamma_rescale_interval() -> None:
    cfg = _cfg(
        LR_SCHEDULER_NAME="WarmupStepWithFixedGammaLR",
        MAX_ITER=12,
        NUM_DECAYS=2,
        GAMMA=0.5,
        WARMUP_ITERS=4,
        WARMUP_FACTOR=0.1,
        WARMUP_METHOD="constant",
        RESCALE_INTERVAL=True,
    )
    opt = _optimizer(1.0)
    # after warm-up: local = (i - 4) / 8, update = local * 12, milestones at updates 4 and 8
    # i=6: 3 -> 1; i=7: 4.5 -> 0.5; i=9: 7.5 -> 0.5; i=10: 9 -> 0.25
    expected = [0.1] * 4 + [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert _run(opt, build_lr_scheduler(cfg, opt), 12) == pytest.approx(expected)


def test_build_warmup_longer_than_training_is_capped() -> None:
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupCosineLR", MAX_ITER=4, WARMUP_ITERS=100, WARMUP_FACTOR=0.0)
    opt = _optimizer(1.0)
    # warm-up over all 4 iterations from 0 to cos(1.0) = 0
    assert _run(opt, build_lr_scheduler(cfg, opt), 4) == pytest.approx([0.0] * 4)


def test_build_errors() -> None:
    opt = _optimizer(1.0)
    with pytest.raises(
        ValueError, match=r"Unknown SOLVER.LR_SCHEDULER_NAME 'Poly'.*WarmupCosineLR"
    ):
        build_lr_scheduler(_cfg(LR_SCHEDULER_NAME="Poly"), opt)
    with pytest.raises(ValueError, match=r"Unknown warmup_method 'cubic'.*'constant', 'linear'"):
        build_lr_scheduler(_cfg(WARMUP_METHOD="cubic"), opt)
    with pytest.raises(ValueError, match="BASE_LR_END <= SOLVER.BASE_LR"):
        build_lr_scheduler(_cfg(LR_SCHEDULER_NAME="WarmupCosineLR", BASE_LR_END=3.0), opt)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        build_lr_scheduler(_cfg(MAX_ITER=0), opt)


def test_warmup_multistep_without_max_iter_and_bad_milestones() -> None:
    opt = _optimizer(1.0)
    sched = WarmupMultiStepLR(opt, [2, 4], gamma=0.5, warmup_iters=0)
    assert _run(opt, sched, 7) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25])
    with pytest.raises(ValueError, match="milestones must be increasing"):
        WarmupMultiStepLR(_optimizer(1.0), [4, 2])


def test_multistep_param_scheduler_in_lr_multiplier_at_every_iteration() -> None:
    opt = _optimizer(0.1)
    sched = LRMultiplier(
        opt, MultiStepParamScheduler([1.0, 0.1], num_updates=7, milestones=[3]), max_iter=7
    )
    assert _run(opt, sched, 7) == pytest.approx([0.1] * 3 + [0.01] * 4)


# ------------------------------------------------------------------ with the LRScheduler hook


class _ScaleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": (self.w * data).sum()}


def _train_with_param_scheduler(
    optimizer: torch.optim.Optimizer, model: nn.Module, start_iter: int, max_iter: int
) -> tuple[list[float], list[float]]:
    """Train with LRScheduler(scheduler=<ParamScheduler>); return the lr used at each step and
    the lrs the hook logged."""
    from d2engine.engine.hooks import LRScheduler
    from d2engine.engine.train_loop import HookBase, SimpleTrainer

    used: list[float] = []

    class RecordLR(HookBase):
        def before_step(self) -> None:
            used.append(self.trainer.optimizer.param_groups[0]["lr"])

    trainer = SimpleTrainer(model, itertools.repeat(torch.ones(1)), optimizer)
    trainer.register_hooks([RecordLR(), LRScheduler(scheduler=LinearParamScheduler(1.0, 0.0))])
    trainer.train(start_iter, max_iter)
    logged = [v for v, _ in trainer.storage.history("lr").values()]
    return used, logged


def test_lr_scheduler_hook_wraps_a_param_scheduler() -> None:
    model = _ScaleModel()
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    used, logged = _train_with_param_scheduler(opt, model, 0, 4)
    # lr at iteration i: 2 * (1 - i / 4)
    assert used == pytest.approx([2.0, 1.5, 1.0, 0.5])
    assert logged == pytest.approx([2.0, 1.5, 1.0, 0.5])
    # a second run resuming at iteration 2 with the same optimizer continues the schedule
    used, _ = _train_with_param_scheduler(opt, model, 2, 4)
    assert used == pytest.approx([1.0, 0.5])


def test_a_custom_schedule_subclasses_lrscheduler_with_the_warmup_helper() -> None:
    # The shape of detectron2 projects' custom schedules (DeepLab's WarmupPolyLR), imported as
    # they import it: only the prefix changes.
    from d2engine.solver import LRScheduler
    from d2engine.solver.lr_scheduler import _get_warmup_factor_at_iter

    class WarmupPolyLR(LRScheduler):
        def __init__(self, optimizer, max_iters, warmup_iters=4, power=0.9, last_epoch=-1):
            self.max_iters, self.warmup_iters, self.power = max_iters, warmup_iters, power
            super().__init__(optimizer, last_epoch)

        def get_lr(self):
            factor = _get_warmup_factor_at_iter("linear", self.last_epoch, self.warmup_iters, 0.1)
            decay = (1.0 - self.last_epoch / self.max_iters) ** self.power
            return [base_lr * factor * decay for base_lr in self.base_lrs]

    opt = _optimizer(1.0)
    sched = WarmupPolyLR(opt, max_iters=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)  # warm-up starts at the factor
    assert lrs[2] == pytest.approx((0.1 * 0.5 + 0.5) * 0.8**0.9)
    assert lrs[4] == pytest.approx(0.6**0.9)  # warm-up over: poly decay only


def test_warmup_factor_helper() -> None:
    from d2engine.solver.lr_scheduler import _get_warmup_factor_at_iter

    assert _get_warmup_factor_at_iter("linear", 0, 10, 0.001) == pytest.approx(0.001)
    assert _get_warmup_factor_at_iter("linear", 5, 10, 0.0) == pytest.approx(0.5)
    assert _get_warmup_factor_at_iter("constant", 9, 10, 0.3) == 0.3
    assert _get_warmup_factor_at_iter("bogus", 10, 10, 0.3) == 1.0  # past the warm-up
    with pytest.raises(ValueError, match="Unknown warm-up method 'bogus'"):
        _get_warmup_factor_at_iter("bogus", 1, 10, 0.3)


# ------------------------------------------------------- the fast step: torch's values, exactly


def _schedulers(opt: torch.optim.Optimizer, last_iter: int = -1) -> list[LRMultiplier]:
    """DefaultTrainer's schedules: warm-up + multistep, warm-up + cosine, fixed-gamma steps."""
    return [
        WarmupMultiStepLR(
            opt, [30, 70], gamma=0.3, warmup_iters=20, max_iter=100, last_iter=last_iter
        ),
        WarmupCosineLR(opt, 100, warmup_iters=20, last_iter=last_iter, end_factor=0.05),
        WarmupStepWithFixedGammaLR(opt, 100, num_decays=3, warmup_iters=10, last_iter=last_iter),
        WarmupMultiStepLR(opt, [50], warmup_iters=15, warmup_method="constant", max_iter=100),
    ][: 4 if last_iter < 0 else 3]


def _trajectory(opt: torch.optim.Optimizer, sched: LRMultiplier, step: Any) -> list[Any]:
    """Every group's lr (as exact bits), the scheduler's state and last lrs after each step."""
    out = []
    for _ in range(110):  # past max_iter: the final value
        opt.step()
        step(sched)
        out.append(
            (
                [float(g["lr"]).hex() for g in opt.param_groups],
                [float(lr).hex() for lr in sched.get_last_lr()],
                sched.last_epoch,
                sched._step_count,
                sched.state_dict(),
            )
        )
    return out


@pytest.mark.parametrize("case", range(4))
def test_lr_multiplier_step_is_bit_identical_to_torchs_step(case: int) -> None:
    # LRMultiplier.step sets base_lr * multiplier itself; torch's LRScheduler.step (get_lr and
    # its bookkeeping) must give the very same bits at every iteration, for every group.
    fast_opt, torch_opt = _optimizer(0.1, 0.037), _optimizer(0.1, 0.037)
    fast, slow = _schedulers(fast_opt)[case], _schedulers(torch_opt)[case]
    assert _trajectory(fast_opt, fast, type(fast).step) == _trajectory(
        torch_opt, slow, torch.optim.lr_scheduler.LRScheduler.step
    )


@pytest.mark.parametrize("case", range(3))
def test_lr_multiplier_step_after_resume_is_bit_identical_to_torchs_step(case: int) -> None:
    def resumed() -> tuple[torch.optim.SGD, LRMultiplier]:
        opt = _optimizer(0.1, 0.037)
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
        return opt, _schedulers(opt, last_iter=41)[case]

    (fast_opt, fast), (torch_opt, slow) = resumed(), resumed()
    assert _trajectory(fast_opt, fast, type(fast).step) == _trajectory(
        torch_opt, slow, torch.optim.lr_scheduler.LRScheduler.step
    )


def test_lr_multiplier_leaves_torchs_step_after_the_first_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fast path is taken: torch's step (and its per-call bookkeeping) runs for the initial
    # step and the first call only, where torch checks that optimizer.step() came first.
    calls = []
    torch_step = torch.optim.lr_scheduler.LRScheduler.step

    def counting_step(self: Any, epoch: Any = None) -> None:
        calls.append(self.last_epoch)
        torch_step(self, epoch)

    monkeypatch.setattr(torch.optim.lr_scheduler.LRScheduler, "step", counting_step)
    opt = _optimizer(0.1)
    sched = WarmupCosineLR(opt, 100, warmup_iters=10)
    for _ in range(20):
        opt.step()
        sched.step()
    assert calls == [-1, 0]
    assert sched.last_epoch == 20 and sched._step_count == 21


def test_lr_multiplier_tensor_lrs_and_custom_get_lr_use_torchs_step() -> None:
    # Tensor lrs (filled in place by torch) and subclasses with their own get_lr keep torch's
    # step: same values as a float-lr twin, the lr tensor object unchanged.
    opt = _optimizer(0.1)
    opt.param_groups[0]["lr"] = torch.tensor(0.1, dtype=torch.float64)
    lr_tensor = opt.param_groups[0]["lr"]
    twin_opt = _optimizer(0.1)
    sched, twin = (
        WarmupCosineLR(opt, 50, warmup_iters=5),
        WarmupCosineLR(twin_opt, 50, warmup_iters=5),
    )
    for _ in range(30):
        opt.step(), twin_opt.step()
        sched.step(), twin.step()
        assert opt.param_groups[0]["lr"] is lr_tensor
        assert float(lr_tensor) == twin_opt.param_groups[0]["lr"]

    class Halved(LRMultiplier):
        def get_lr(self) -> list[float | torch.Tensor]:
            return [lr / 2 for lr in super().get_lr()]

    opt = _optimizer(0.1)
    halved = Halved(opt, LinearParamScheduler(1.0, 0.0), max_iter=10)
    for _ in range(5):
        opt.step()
        halved.step()
    assert _lrs(opt) == [0.1 * (1 - 5 / 10) / 2]


def test_lr_multiplier_computes_d2engines_schedules_ahead_with_the_same_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # d2engine's schedules depend on the iteration alone: their multipliers are computed
    # _AHEAD iterations at a time (warm, a fraction of the cost of one call per training
    # iteration), with the very bits of base_lr * multiplier(iter / max_iter) at every step.
    from d2engine.solver import lr_scheduler

    opt = _optimizer(0.1, 0.037)
    sched = WarmupMultiStepLR(opt, [300, 700], gamma=0.3, warmup_iters=200, max_iter=1000)
    multiplier = sched.multiplier
    calls: list[float] = []
    monkeypatch.setattr(
        sched, "_multiplier", lambda where: calls.append(where) or multiplier(where)
    )
    seen = []
    for it in range(1, 1100):
        opt.step()
        sched.step()
        seen.append([float(lr).hex() for lr in _lrs(opt)])
        expected = multiplier(min(it / 1000, 1.0))
        assert seen[-1] == [(base * expected).hex() for base in (0.1, 0.037)], it
        # the schedule's code runs at the first step of each block of _AHEAD iterations only
        # (construction computed iterations 0 .. _AHEAD - 1)
        assert len(calls) == lr_scheduler._AHEAD * (it // lr_scheduler._AHEAD), it
    resumed_opt = _optimizer(0.1, 0.037)
    resumed = WarmupMultiStepLR(resumed_opt, [300, 700], gamma=0.3, warmup_iters=200, max_iter=1000)
    resumed.load_state_dict({"base_lrs": [0.1, 0.037], "last_epoch": 500})
    for _ in range(3):  # the values ahead are recomputed from the loaded iteration
        resumed_opt.step()
        resumed.step()
    assert [float(lr).hex() for lr in _lrs(resumed_opt)] == seen[502]


class _CountingSchedule(LinearParamScheduler):
    """A schedule defined outside d2engine: it may keep state, so it is called at every step."""

    def __init__(self) -> None:
        super().__init__(1.0, 0.0)
        self.calls = 0

    def _value(self, where: float) -> float:
        self.calls += 1
        return super()._value(where)


def test_lr_multiplier_calls_a_schedule_defined_elsewhere_at_every_step() -> None:
    schedule = _CountingSchedule()
    opt = _optimizer(0.1)
    sched = LRMultiplier(opt, schedule, max_iter=100)
    assert schedule.calls == 1  # the initial step
    for it in range(1, 11):
        opt.step()
        sched.step()
        assert schedule.calls == 1 + it
    assert _lrs(opt) == [0.1 * (1.0 - 10 / 100)]
    # d2engine's composite schedules are computed ahead only when all their parts are its own
    from d2engine.solver.param_scheduler import CompositeParamScheduler

    mixed = CompositeParamScheduler(
        [_CountingSchedule(), LinearParamScheduler(1.0, 0.5)], [0.5, 0.5], ["rescaled"] * 2
    )
    assert not LRMultiplier(_optimizer(0.1), mixed, max_iter=10)._ahead
    assert LRMultiplier(_optimizer(0.1), LinearParamScheduler(1, 0), max_iter=10)._ahead
