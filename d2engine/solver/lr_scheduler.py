"""Learning-rate schedulers: a torch ``LRScheduler`` driven by a :class:`ParamScheduler`.

:class:`LRMultiplier` sets every param group's lr to ``base_lr * multiplier(iter / max_iter)``.
It is stepped once per iteration (the :class:`~d2engine.engine.hooks.LRScheduler` hook does this
after each ``optimizer.step()``). The named schedulers :class:`WarmupMultiStepLR`,
:class:`WarmupCosineLR` and :class:`WarmupStepWithFixedGammaLR` are LRMultipliers over a
:class:`~d2engine.solver.param_scheduler.WarmupParamScheduler`, as detectron2 builds them.

Checkpoints: the state of a scheduler is only ``{"base_lrs", "last_epoch"}`` (plain numbers), so a
checkpoint never pickles the schedule itself and loads with ``torch.load(weights_only=True)``.
The schedule is rebuilt from code or config when resuming.

Past the end: iterations at or beyond ``max_iter`` use the schedule's final value
(``multiplier(1.0)``); the progress is clamped rather than raising, because the hook steps the
scheduler once more after the last iteration and users sometimes train a little longer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from d2engine.solver.param_scheduler import (
    CosineParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
    StepWithFixedGammaParamScheduler,
    WarmupParamScheduler,
)
from d2engine.utils.validation import check_positive_int

# WarmupParamScheduler is re-exported here because detectron2 users import it from this module;
# LRScheduler (torch's base class) because detectron2 projects subclass it from here for custom
# schedules (DeepLab's WarmupPolyLR), together with _get_warmup_factor_at_iter.
__all__ = [
    "LRMultiplier",
    "LRScheduler",
    "WarmupCosineLR",
    "WarmupMultiStepLR",
    "WarmupParamScheduler",
    "WarmupStepWithFixedGammaLR",
]

logger = logging.getLogger(__name__)


class LRMultiplier(LRScheduler):
    """A torch LR scheduler with ``lr = base_lr * multiplier(iter / max_iter)`` for every group.

    Construction sets the lr for iteration ``last_iter + 1``; each :meth:`step` advances one
    iteration. Typical use (one ``step()`` per training iteration, after ``optimizer.step()``)::

        sched = LRMultiplier(opt, WarmupParamScheduler(CosineParamScheduler(1, 0), 0.001, 0.01),
                             max_iter=90000)
        for it in range(90000):
            ...; opt.step(); sched.step()

    State: ``state_dict()`` holds ``base_lrs`` and ``last_epoch`` only. Loading it also sets the
    optimizer's lrs to the values for the loaded iteration.

    Args:
        optimizer: the optimizer whose param groups' lrs are set.
        multiplier: a :class:`ParamScheduler` (or any callable ``float -> float``) giving the lr
            multiplier at training progress ``where`` in ``[0, 1]``.
        max_iter: the number of training iterations; ``where = iter / max_iter``, clamped to
            ``[0, 1]`` so that iterations past ``max_iter`` keep the final value.
        last_iter: the last iteration done, ``-1`` for a fresh start. When resuming (``>= 0``)
            the base lrs come from each group's ``"initial_lr"``, which torch schedulers store in
            the optimizer (and so in its checkpoint); a group without it uses its current lr.

    Raises:
        TypeError: if ``optimizer`` is not an Optimizer or ``multiplier`` is not callable.
        ValueError: if ``max_iter`` is not a positive integer or ``last_iter < -1``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        multiplier: ParamScheduler | Callable[[float], float],
        max_iter: int,
        last_iter: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"LRMultiplier needs a torch Optimizer, got {type(optimizer).__name__}")
        if not callable(multiplier):
            raise TypeError(
                f"LRMultiplier needs a ParamScheduler (a callable where -> multiplier) as "
                f"multiplier, got {type(multiplier).__name__}"
            )
        max_iter = check_positive_int(max_iter, "max_iter", "LRMultiplier")
        if int(last_iter) != last_iter or last_iter < -1:
            raise ValueError(
                f"LRMultiplier needs last_iter >= -1 (-1 for a fresh start), got {last_iter!r}"
            )
        if last_iter >= 0:
            missing = [i for i, g in enumerate(optimizer.param_groups) if "initial_lr" not in g]
            if missing:
                logger.warning(
                    "LRMultiplier resumes at iteration %d but param groups %s have no "
                    "'initial_lr' (the optimizer state was not loaded from a checkpoint?); "
                    "using their current lr as the base lr.",
                    last_iter + 1,
                    missing,
                )
                for i in missing:
                    lr = optimizer.param_groups[i]["lr"]
                    optimizer.param_groups[i]["initial_lr"] = (
                        lr.clone() if isinstance(lr, torch.Tensor) else lr
                    )
        self._multiplier = multiplier
        self._max_iter = int(max_iter)
        # d2engine's schedules depend on the iteration alone: their multipliers are computed
        # _AHEAD iterations at a time, (first iteration, multipliers).
        self._ahead = isinstance(multiplier, ParamScheduler) and multiplier._depends_on_where_only()
        self._factors: tuple[int, list[float]] = (0, [])
        super().__init__(optimizer, last_epoch=int(last_iter))

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"base_lrs": [...], "last_epoch": int}``; the schedule itself is not saved.

        Returns:
            The plain state of the scheduler.
        """
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``base_lrs`` and ``last_epoch`` and set the lrs for that iteration.

        Args:
            state_dict: a dict returned by :meth:`state_dict`. Extra keys written by torch's
                default ``state_dict`` (older checkpoints) are ignored.

        Raises:
            KeyError: if ``base_lrs`` or ``last_epoch`` is missing.
            ValueError: if the number of base lrs differs from the number of param groups.
        """
        missing = [k for k in ("base_lrs", "last_epoch") if k not in state_dict]
        if missing:
            raise KeyError(
                f"LRMultiplier state_dict lacks {missing}; got keys {sorted(state_dict)}. "
                "Hint: pass a dict produced by LRMultiplier.state_dict()."
            )
        base_lrs = list(state_dict["base_lrs"])
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"LRMultiplier state_dict has {len(base_lrs)} base lrs but the optimizer has "
                f"{len(self.optimizer.param_groups)} param groups. Hint: build the optimizer the "
                "same way as in the run that saved the checkpoint."
            )
        self.base_lrs = base_lrs
        self.last_epoch = int(state_dict["last_epoch"])
        for group, lr in zip(self.optimizer.param_groups, self._lrs_at(self.last_epoch)):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(float(lr))
            else:
                group["lr"] = lr
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]

    @property
    def max_iter(self) -> int:
        """The number of iterations that ``where`` is computed against."""
        return self._max_iter

    @property
    def multiplier(self) -> ParamScheduler | Callable[[float], float]:
        """The schedule of lr multipliers."""
        return self._multiplier

    def step(self, epoch: int | None = None) -> None:
        """Advance one iteration and set every group's lr for it (after ``optimizer.step()``).

        The same values and state as torch's ``LRScheduler.step``, which still does the first
        steps (where torch checks the call order), a step given the deprecated ``epoch``, tensor
        lrs and subclasses with their own ``get_lr``; otherwise without torch's per-call
        bookkeeping: ``base_lr * multiplier`` is set in each group directly.

        Args:
            epoch: deprecated in torch; passed on to torch's ``step`` when given.
        """
        groups = self.optimizer.param_groups
        if epoch is not None or self._step_count < 2 or type(self).get_lr is not _MULTIPLIER_GET_LR:
            super().step(epoch)
            return
        for group in groups:
            if isinstance(group["lr"], torch.Tensor):
                super().step(epoch)
                return
        base_lrs = self.base_lrs
        if len(base_lrs) != len(groups):  # as torch's zip(strict=True)
            raise ValueError(
                f"LRMultiplier has {len(base_lrs)} base lrs but the optimizer has {len(groups)} "
                "param groups. HINT: create the scheduler after adding every param group."
            )
        self._step_count += 1
        self.last_epoch = iteration = self.last_epoch + 1
        self._last_lr = lrs = self._lrs_at(iteration)
        for group, lr in zip(groups, lrs):
            group["lr"] = lr

    def _lrs_at(self, iteration: int) -> list[float | torch.Tensor]:
        factor = self._factor_at(iteration)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _multiplier_at(self, iteration: int) -> float:
        return self._multiplier(min(max(iteration / self._max_iter, 0.0), 1.0))

    def _factor_at(self, iteration: int) -> float:
        """The multiplier at ``iteration``. A schedule of d2engine's (a function of the
        iteration alone) is computed for the next _AHEAD iterations at once and kept: its code
        then runs once every _AHEAD steps, warm, instead of once per step between training
        iterations (the same values, a fraction of the cost)."""
        if not self._ahead:
            return self._multiplier_at(iteration)
        first, factors = self._factors
        if 0 <= iteration - first < len(factors):
            return factors[iteration - first]
        factors = [self._multiplier_at(i) for i in range(iteration, iteration + _AHEAD)]
        self._factors = (iteration, factors)
        return factors[0]

    def get_lr(self) -> list[float | torch.Tensor]:
        """Return the lrs of the current iteration (``last_epoch``).

        Returns:
            One lr per param group.
        """
        return self._lrs_at(self.last_epoch)


_MULTIPLIER_GET_LR = LRMultiplier.get_lr
_AHEAD = 64  # iterations whose multipliers LRMultiplier computes together


def _get_warmup_factor_at_iter(
    method: str, iter: int, warmup_iters: int, warmup_factor: float
) -> float:
    """The lr warm-up multiplier at iteration ``iter`` (detectron2's helper for custom schedules).

    Args:
        method: "linear" (from ``warmup_factor`` at iteration 0 up to 1 at ``warmup_iters``) or
            "constant" (``warmup_factor`` throughout the warm-up).
        iter: the iteration.
        warmup_iters: the number of warm-up iterations; from then on the factor is 1.
        warmup_factor: the factor at the start of the warm-up.

    Returns:
        The factor; 1.0 once ``iter >= warmup_iters``.

    Raises:
        ValueError: for an unknown ``method``.
    """
    if iter >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    if method == "linear":
        alpha = iter / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    raise ValueError(
        f"Unknown warm-up method {method!r}; expected 'linear' or 'constant' "
        "(cfg.SOLVER.WARMUP_METHOD)."
    )


def _warmup(
    sched: ParamScheduler,
    max_iter: int,
    warmup_factor: float,
    warmup_iters: int,
    warmup_method: str,
    rescale_interval: bool,
) -> WarmupParamScheduler:
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
    return WarmupParamScheduler(
        sched,
        warmup_factor,
        min(warmup_iters / max_iter, 1.0),
        warmup_method,
        rescale_interval,
    )


class WarmupMultiStepLR(LRMultiplier):
    """Warm-up, then the lr is multiplied by ``gamma`` at each milestone iteration.

    Args:
        optimizer: the optimizer.
        milestones: increasing iterations at which the lr is multiplied by ``gamma``.
        gamma: the decay factor.
        warmup_factor: the lr multiplier at iteration 0.
        warmup_iters: the length of the warm-up in iterations.
        warmup_method: "linear" (from ``warmup_factor`` to 1) or "constant".
        last_iter: the last iteration done (-1 for a fresh start).
        max_iter: the number of training iterations. Milestones at or past it are dropped with
            a warning (they could never take effect). If None, the schedule is as long as needed
            to hold every milestone and the warm-up.
        rescale_interval: see :class:`WarmupParamScheduler` (False: milestones are absolute).

    Raises:
        ValueError: for decreasing or non-positive milestones or a bad warm-up.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
        last_iter: int = -1,
        *,
        max_iter: int | None = None,
        rescale_interval: bool = False,
    ) -> None:
        milestones = list(milestones)
        if list(sorted(milestones)) != milestones:
            raise ValueError(
                f"WarmupMultiStepLR milestones must be increasing, got {milestones}. "
                "Hint: sort SOLVER.STEPS."
            )
        if max_iter is None:
            max_iter = max([m + 1 for m in milestones] + [warmup_iters, 1])
        else:
            max_iter = check_positive_int(max_iter, "max_iter", type(self).__name__)
            dropped = [m for m in milestones if m >= max_iter]
            if dropped:
                logger.warning(
                    "WarmupMultiStepLR: milestones (SOLVER.STEPS) %s are at or past max_iter=%d "
                    "and are ignored.",
                    dropped,
                    max_iter,
                )
            milestones = [m for m in milestones if m < max_iter]
        sched = MultiStepParamScheduler(
            values=[gamma**k for k in range(len(milestones) + 1)],
            milestones=milestones,
            num_updates=max_iter,
        )
        super().__init__(
            optimizer,
            _warmup(sched, max_iter, warmup_factor, warmup_iters, warmup_method, rescale_interval),
            max_iter=max_iter,
            last_iter=last_iter,
        )


class WarmupCosineLR(LRMultiplier):
    """Warm-up, then half a cosine from the base lr to ``end_factor * base_lr`` at ``max_iters``.

    Args:
        optimizer: the optimizer.
        max_iters: the number of training iterations.
        warmup_factor: the lr multiplier at iteration 0.
        warmup_iters: the length of the warm-up in iterations.
        warmup_method: "linear" or "constant".
        last_iter: the last iteration done (-1 for a fresh start).
        end_factor: the lr multiplier reached at the end (``BASE_LR_END / BASE_LR``).
        rescale_interval: see :class:`WarmupParamScheduler`.

    Raises:
        ValueError: if ``end_factor`` is outside ``[0, 1]`` or the warm-up is invalid.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_iters: int,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
        last_iter: int = -1,
        *,
        end_factor: float = 0.0,
        rescale_interval: bool = False,
    ) -> None:
        max_iters = check_positive_int(max_iters, "max_iters", type(self).__name__)
        if not (math.isfinite(end_factor) and 0.0 <= end_factor <= 1.0):
            raise ValueError(
                f"WarmupCosineLR needs end_factor in [0, 1], got {end_factor}. Hint: "
                "SOLVER.BASE_LR_END must lie between 0 and SOLVER.BASE_LR."
            )
        sched = CosineParamScheduler(1.0, end_factor)
        super().__init__(
            optimizer,
            _warmup(sched, max_iters, warmup_factor, warmup_iters, warmup_method, rescale_interval),
            max_iter=max_iters,
            last_iter=last_iter,
        )


class WarmupStepWithFixedGammaLR(LRMultiplier):
    """Warm-up, then ``num_decays`` equally spaced decays by ``gamma``.

    The decays happen every ``ceil(max_iter / (num_decays + 1))`` iterations.

    Args:
        optimizer: the optimizer.
        max_iter: the number of training iterations.
        gamma: the decay factor.
        num_decays: the number of decays.
        warmup_factor: the lr multiplier at iteration 0.
        warmup_iters: the length of the warm-up in iterations.
        warmup_method: "linear" or "constant".
        last_iter: the last iteration done (-1 for a fresh start).
        rescale_interval: see :class:`WarmupParamScheduler` (True: the decays are spread over
            the iterations after the warm-up).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_iter: int,
        gamma: float = 0.1,
        num_decays: int = 3,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
        last_iter: int = -1,
        *,
        rescale_interval: bool = False,
    ) -> None:
        max_iter = check_positive_int(max_iter, "max_iter", type(self).__name__)
        sched = StepWithFixedGammaParamScheduler(
            base_value=1.0, num_decays=num_decays, gamma=gamma, num_updates=max_iter
        )
        super().__init__(
            optimizer,
            _warmup(sched, max_iter, warmup_factor, warmup_iters, warmup_method, rescale_interval),
            max_iter=max_iter,
            last_iter=last_iter,
        )
