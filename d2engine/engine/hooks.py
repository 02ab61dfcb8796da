"""Hooks for :class:`~d2engine.engine.train_loop.TrainerBase`: timing, writing, LR, eval, ...

Each hook is a small class; its docstring says when it runs and what state it saves. Hooks reach
the trainer through ``self.trainer`` (a weak proxy set at registration). The checkpointing hooks
(:class:`PeriodicCheckpointer`, :class:`BestCheckpointer`) live in
:mod:`d2engine.engine.checkpoint_hooks`, the profiling hooks in :mod:`d2engine.engine.profiling`,
the progress bar and curves (:class:`ProgressBar`, :class:`PlotCurves`) in
:mod:`d2engine.engine.monitoring`, :class:`HangWatchdog` in :mod:`d2engine.engine.watchdog`,
:class:`EMAHook` in :mod:`d2engine.engine.ema_hook`, and the hooks driven by evaluations
(:class:`LossEvalHook`, :class:`EarlyStopping`) in :mod:`d2engine.engine.evaluation_hooks`; all
are re-exported here.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from d2engine.checkpoint.state import capture_rng_state, restore_rng_state
from d2engine.engine.checkpoint_hooks import (
    BestCheckpointer,
    PeriodicCheckpointer,
    _is_periodic_eval_step,
)
from d2engine.engine.ema_hook import EMAHook
from d2engine.engine.evaluation_hooks import EarlyStopping, LossEvalHook
from d2engine.engine.monitoring import PlotCurves, ProgressBar
from d2engine.engine.profiling import AutogradProfiler, TorchMemoryStats, TorchProfiler
from d2engine.engine.train_loop import HookBase
from d2engine.engine.watchdog import HangWatchdog
from d2engine.solver.lr_scheduler import LRMultiplier
from d2engine.solver.param_scheduler import ParamScheduler
from d2engine.utils import comm
from d2engine.utils.events import EventStorage, EventWriter
from d2engine.utils.precise_bn import get_bn_modules, update_bn_stats
from d2engine.utils.validation import check_positive_int

__all__ = [
    "AutogradProfiler",
    "BestCheckpointer",
    "CallbackHook",
    "EMAHook",
    "EarlyStopping",
    "EvalHook",
    "HangWatchdog",
    "IterationTimer",
    "LRScheduler",
    "LossEvalHook",
    "PeriodicCheckpointer",
    "PeriodicWriter",
    "PlotCurves",
    "PreciseBN",
    "ProgressBar",
    "TorchMemoryStats",
    "TorchProfiler",
]

logger = logging.getLogger(__name__)


class CallbackHook(HookBase):
    """A hook made of functions, each called with the trainer.

    Runs the given functions at their stages; stages without a function are not dispatched (it
    overrides :meth:`~d2engine.engine.train_loop.HookBase.implements`). Stateless. The functions
    receive the trainer as their argument: they should not capture it (that would keep it alive
    through the hook).

    Args:
        before_train: called as ``before_train(trainer)``.
        after_train: called after the last iteration.
        before_step: called before each iteration.
        after_backward: called after each backward pass.
        after_step: called after each iteration.
    """

    def __init__(
        self,
        *,
        before_train: Callable[[Any], None] | None = None,
        after_train: Callable[[Any], None] | None = None,
        before_step: Callable[[Any], None] | None = None,
        after_backward: Callable[[Any], None] | None = None,
        after_step: Callable[[Any], None] | None = None,
    ) -> None:
        self._callbacks = {
            "before_train": before_train,
            "after_train": after_train,
            "before_step": before_step,
            "after_backward": after_backward,
            "after_step": after_step,
        }
        for stage, fn in self._callbacks.items():
            if fn is not None and not callable(fn):
                raise TypeError(f"CallbackHook({stage}=...) must be callable, got {fn!r}")

    def implements(self, stage: str) -> bool:
        """The stages given a function."""
        return self._callbacks.get(stage) is not None

    def _call(self, stage: str) -> None:
        fn = self._callbacks[stage]
        if fn is not None:
            fn(self.trainer)

    def before_train(self) -> None:
        self._call("before_train")

    def after_train(self) -> None:
        self._call("after_train")

    def before_step(self) -> None:
        self._call("before_step")

    def after_backward(self) -> None:
        self._call("after_backward")

    def after_step(self) -> None:
        self._call("after_step")


class IterationTimer(HookBase):
    """Put the time of each iteration as ``time``, and log the training speed at the end.

    Runs at every stage: the time of an iteration is measured from this hook's ``before_step`` to
    its ``after_step``, so register it first to exclude the other hooks' time. The first
    ``warmup_iter`` iterations (counted from ``start_iter``) minus one are not timed. At the end
    it logs the speed over the timed iterations and the total time, with the part spent in hooks.
    Stateless.

    Args:
        warmup_iter: iteration ``start_iter + warmup_iter - 1`` is the first one timed.
    """

    def __init__(self, warmup_iter: int = 3) -> None:
        self._warmup_iter = warmup_iter
        self._start_time = time.perf_counter()
        self._step_start = 0.0
        self._timed_seconds = 0.0
        self._timed_iters = 0
        self._storage: EventStorage | None = None
        self._first_timed = warmup_iter - 1  # set at before_train: start_iter + warmup_iter - 1

    def before_train(self) -> None:
        self._start_time = time.perf_counter()
        self._timed_seconds = 0.0
        self._timed_iters = 0
        self._storage = self.trainer.storage
        self._first_timed = self.trainer.start_iter + self._warmup_iter - 1

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        now = time.perf_counter()
        storage = self._storage
        assert storage is not None
        if self.trainer.iter >= self._first_timed:  # (the storage's iter)
            seconds = now - self._step_start
            storage.put_scalar("time", seconds)
            self._timed_seconds += seconds
            self._timed_iters += 1
        else:
            self._start_time = now  # the warm-up does not count in the totals

    def after_train(self) -> None:
        total_time = time.perf_counter() - self._start_time
        hook_time = total_time - self._timed_seconds
        if self._timed_iters > 0 and self._timed_seconds > 0:
            logger.info(
                "Overall training speed: %d iterations in %s (%.4f s / it)",
                self._timed_iters,
                datetime.timedelta(seconds=int(self._timed_seconds)),
                self._timed_seconds / self._timed_iters,
            )
        logger.info(
            "Total training time: %s (%s on hooks)",
            datetime.timedelta(seconds=int(total_time)),
            datetime.timedelta(seconds=int(hook_time)),
        )
        self._storage = None


class PeriodicWriter(HookBase):
    """Run event writers every ``period`` iterations and after the last one.

    Runs after every ``period``-th iteration (``(iter + 1) % period == 0``) and the last
    iteration; in ``after_train`` it writes once more and closes the writers. The period does not
    change how writers smooth values. Stateless.

    Args:
        writers: the writers.
        period: the writing period in iterations.

    Raises:
        TypeError: if a writer is not an :class:`EventWriter`.
        ValueError: if ``period`` is not positive.
    """

    def __init__(self, writers: Sequence[EventWriter], period: int = 20) -> None:
        for w in writers:
            if not isinstance(w, EventWriter):
                raise TypeError(
                    f"PeriodicWriter takes EventWriter objects, got {type(w).__name__}. HINT: "
                    "subclass d2engine.utils.events.EventWriter."
                )
        self._writers = list(writers)
        self._period = check_positive_int(period, "period", "PeriodicWriter")

    def after_step(self) -> None:
        it = self.trainer.iter
        if (it + 1) % self._period == 0 or it == self.trainer.max_iter - 1:
            for writer in self._writers:
                writer.write()

    def after_train(self) -> None:
        for writer in self._writers:
            # the final write includes what the hooks logged at the end (e.g. evaluation)
            writer.write()
            writer.close()


class LRScheduler(HookBase):
    """Step an LR scheduler after every iteration and put the learning rate as ``lr``.

    Runs ``after_step``: puts the (unsmoothed) lr of the param group with the most parameters,
    then steps the scheduler. A :class:`~d2engine.solver.param_scheduler.ParamScheduler` is wrapped
    at ``before_train`` in an :class:`~d2engine.solver.lr_scheduler.LRMultiplier` continuing
    after iteration ``trainer.iter - 1``. State: the scheduler's ``state_dict()``.

    Args:
        optimizer: the optimizer; default ``trainer.optimizer``.
        scheduler: a torch LR scheduler or a ParamScheduler; default ``trainer.scheduler``.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
    ) -> None:
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._pending_state: dict[str, Any] | None = None
        self._best_param_group_id = 0

    def before_train(self) -> None:
        if self._optimizer is None:
            self._optimizer = self._from_trainer("optimizer")
        if self._scheduler is None:
            self._scheduler = self._from_trainer("scheduler")
        if isinstance(self._scheduler, ParamScheduler):
            self._scheduler = LRMultiplier(
                self._optimizer,
                multiplier=self._scheduler,
                max_iter=self.trainer.max_iter,
                last_iter=self.trainer.iter - 1,
            )
        if not callable(getattr(self._scheduler, "step", None)):
            raise TypeError(
                f"LRScheduler hook needs a torch LR scheduler or a ParamScheduler, got "
                f"{type(self._scheduler).__name__}."
            )
        if self._pending_state is not None:
            self._scheduler.load_state_dict(self._pending_state)
            self._pending_state = None
        self._best_param_group_id = LRScheduler.get_best_param_group_id(self._optimizer)

    def _from_trainer(self, name: str) -> Any:
        try:
            return getattr(self.trainer, name)
        except AttributeError:
            raise AttributeError(
                f"LRScheduler hook got no {name} and the trainer "
                f"({type(self.trainer).__name__}) has no attribute '{name}'. HINT: pass "
                f"LRScheduler({name}=...)."
            ) from None

    @staticmethod
    def get_best_param_group_id(optimizer: torch.optim.Optimizer) -> int:
        """The param group whose lr is logged: the one with the most parameters.

        Ties go to the group whose lr is the most common among all groups, then the first.

        Args:
            optimizer: the optimizer.

        Returns:
            The index of the group.
        """
        groups = optimizer.param_groups
        largest = max(len(g["params"]) for g in groups)
        candidates = [i for i, g in enumerate(groups) if len(g["params"]) == largest]
        if len(candidates) == 1:
            return candidates[0]
        lr_count = Counter(float(g["lr"]) for g in groups)
        return max(candidates, key=lambda i: (lr_count[float(groups[i]["lr"])], -i))

    def after_step(self) -> None:
        lr = self._optimizer.param_groups[self._best_param_group_id]["lr"]  # type: ignore[union-attr]
        if isinstance(lr, torch.Tensor):
            lr = lr.detach().clone()  # the scheduler changes it in place
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self._scheduler.step()

    @property
    def scheduler(self) -> Any:
        """The scheduler being stepped (the LRMultiplier once a ParamScheduler is wrapped)."""
        return self._scheduler if self._scheduler is not None else self._from_trainer("scheduler")

    def _loaded_scheduler(self) -> Any:
        """The torch-style scheduler in use, or None before a ParamScheduler is wrapped."""
        sched = self._scheduler
        if sched is None or isinstance(sched, ParamScheduler):
            return None
        return sched if callable(getattr(sched, "load_state_dict", None)) else None

    def state_dict(self) -> dict[str, Any]:
        sched = self._loaded_scheduler()
        if sched is not None:
            return sched.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sched = self._loaded_scheduler()
        if sched is None:  # the scheduler is known at before_train: load it then
            self._pending_state = dict(state_dict)
        else:
            logger.info("Loading scheduler from state_dict ...")
            sched.load_state_dict(state_dict)


def _flatten_results(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten_results(v, key + "/"))
        else:
            out[key] = v
    return out


class EvalHook(HookBase):
    """Run an evaluation function periodically and after training.

    Runs after every ``eval_period``-th iteration except the last, and in ``after_train`` when
    training completed (``trainer.completed``: not after a failure or an early stop) and
    ``eval_after_train``. The
    results (a nested dict) are flattened with "/" and put with ``smoothing_hint=False``. Every
    evaluation ends with a barrier across processes, so register it on every rank (give others a
    no-op function if only some evaluate). The random generators (python, numpy, torch) are
    restored after each evaluation: evaluating does not change the training's random numbers.
    Stateless.

    Args:
        eval_period: evaluate every this many iterations; 0 only after training.
        eval_function: a function taking no arguments and returning a nested dict of numbers
            (or None).
        eval_after_train: evaluate after the last iteration.

    Attributes:
        last_eval_iter: the iteration after which it last evaluated (on every rank), or None;
            :class:`EarlyStopping` acts after these evaluations.
    """

    def __init__(
        self,
        eval_period: int,
        eval_function: Callable[[], Mapping[str, Any] | None],
        eval_after_train: bool = True,
    ) -> None:
        if not callable(eval_function):
            raise TypeError(f"EvalHook needs a callable eval_function, got {eval_function!r}")
        self._period = eval_period
        self._func = eval_function
        self._eval_after_train = eval_after_train
        self.last_eval_iter: int | None = None

    @property
    def eval_period(self) -> int:
        """The evaluation period in iterations (0: only after training)."""
        return self._period

    def _do_eval(self) -> None:
        rng = capture_rng_state()
        try:
            results = self._func()
        finally:
            # What the evaluation draws does not shift the training's random streams, so a run
            # resumed from a checkpoint written before this evaluation continues identically.
            restore_rng_state(rng)
        if results:
            if not isinstance(results, Mapping):
                raise TypeError(
                    f"EvalHook's eval_function must return a nested dict of numbers, got "
                    f"{type(results).__name__}."
                )
            flattened = {}
            for k, v in _flatten_results(results).items():
                try:
                    flattened[k] = float(v)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"[EvalHook] eval_function should return a nested dict of numbers; "
                        f"got '{k}: {v!r}'. HINT: leave non-numbers out of the results."
                    ) from e
            storage = self.trainer.storage
            for k, v in flattened.items():
                storage.put_scalar(k, v, smoothing_hint=False)
        self.last_eval_iter = self.trainer.iter
        comm.synchronize()

    def after_step(self) -> None:
        if _is_periodic_eval_step(self._period, self.trainer):
            self._do_eval()

    def after_train(self) -> None:
        if self._eval_after_train and self.trainer.completed:  # not after a failure or a stop
            self._do_eval()


class PreciseBN(HookBase):
    """Recompute BatchNorm statistics as the true average over ``num_iter`` batches.

    Runs after every ``period``-th iteration and after the last one (see
    :func:`d2engine.utils.precise_bn.update_bn_stats`; momentum restored afterwards). Does
    nothing, at no per-step cost, when the model has no BN layer in training mode. The values
    the model logs meanwhile go to a throw-away storage. State: the data position of its loader
    (when the loader has ``state_dict()``), so a resumed run reads the same batches; with several
    processes every rank's position (:meth:`gather_state`, called through the trainer by the
    checkpoint hook on every rank before a save).

    Args:
        period: run every this many iterations; 0 only after the last iteration.
        model: the model whose training-mode BN layers are updated.
        data_loader: yields model inputs (its iterator is kept between runs).
        num_iter: the number of batches per update.
    """

    def __init__(
        self, period: int, model: nn.Module, data_loader: Iterable[Any], num_iter: int
    ) -> None:
        if num_iter <= 0:
            raise ValueError(f"PreciseBN needs num_iter > 0, got {num_iter}")
        self._model = model
        self._data_loader = data_loader
        self._num_iter = num_iter
        self._period = period
        self._data_iter: Any = None
        self._positioned = False  # the loader was read or given a saved position
        self._disabled = not get_bn_modules(model)
        if self._disabled:
            logger.info(
                "PreciseBN is disabled because the model has no BatchNorm layer in training mode."
            )

    def implements(self, stage: str) -> bool:
        """``after_step``, unless the model has no BN layer in training mode."""
        return stage == "after_step" and not self._disabled

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (
            self._period > 0 and next_iter % self._period == 0
        ):
            self.update_stats()

    def gather_state(self) -> None:
        """Collect every rank's position of the loader for the next :meth:`state_dict` (a
        collective when the loader's ``gather_state`` is one, e.g. d2engine's grouped
        ``TrainDataLoader`` in a multi-process job; the trainer's ``gather_state`` calls it on
        every rank)."""
        gather = getattr(self._data_loader, "gather_state", None)
        if self._positioned and callable(gather):
            gather()

    def state_dict(self) -> dict[str, Any]:
        """``{"data": loader.state_dict()}`` when its loader has one and has been read (or
        resumed): a position restored by :meth:`load_state_dict` is saved again."""
        if self._positioned and callable(getattr(self._data_loader, "state_dict", None)):
            return {"data": self._data_loader.state_dict()}  # type: ignore[attr-defined]
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue reading the loader from the saved position."""
        if "data" in state_dict and callable(getattr(self._data_loader, "load_state_dict", None)):
            self._data_loader.load_state_dict(state_dict["data"])  # type: ignore[attr-defined]
            self._data_iter = None
            self._positioned = True

    def update_stats(self) -> None:
        """Update the model's BN statistics now (can be called by users)."""
        if self._disabled or not get_bn_modules(self._model):
            return
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
            self._positioned = True
        logger.info("Running precise-BN for %d iterations...", self._num_iter)
        with EventStorage():  # what the model logs during these forwards is discarded
            update_bn_stats(self._model, self._data_iter, self._num_iter)
