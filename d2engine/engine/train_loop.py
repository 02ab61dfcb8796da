"""The training loop: hooks, the base trainer, and the SGD / mixed-precision trainers.

:class:`TrainerBase` runs ``before_train``, then ``before_step / run_step / after_step`` for each
iteration, then ``after_train``, calling the registered :class:`HookBase` objects at each stage in
registration order (see :meth:`HookBase.implements` for which hooks a stage is dispatched to).
:class:`SimpleTrainer` implements ``run_step`` for one model, one data source and one optimizer;
:class:`AMPTrainer` adds ``torch.amp`` mixed precision (fp16 with a GradScaler, or bf16).

A trainer's ``state_dict()`` holds everything an exact continuation needs (the iteration, the
hooks' states, every rank's random generators, the optimizer, the data position, ...); training
stops early, with a checkpoint, on a preemption signal (``trainer.preemption``) or when asked to
(:meth:`TrainerBase.request_stop`). ``docs/resume.md`` tells what is saved, what is guaranteed,
and how preemption works.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from d2engine.checkpoint.state import RankRNGStates
from d2engine.engine.metrics import (
    MAX_PENDING_ITERATIONS,
    PendingLosses,
    scalar_loss_error,
    write_losses,
)
from d2engine.engine.preemption import PREEMPTION_EXIT_CODE, Preemption, preemption_attribute
from d2engine.utils import comm
from d2engine.utils.events import EventStorage, _to_floats, get_event_storage, has_event_storage
from d2engine.utils.validation import check_positive_int

# PREEMPTION_EXIT_CODE lives in d2engine.engine.preemption; re-exported for existing scripts.
__all__ = ["PREEMPTION_EXIT_CODE", "AMPTrainer", "HookBase", "SimpleTrainer", "TrainerBase"]

logger = logging.getLogger(__name__)

_STAGES = ("before_train", "after_train", "before_step", "after_backward", "after_step")


class HookBase:
    """Base class of hooks registered with a :class:`TrainerBase`.

    The trainer calls them like this::

        hook.before_train()
        for iter in range(start_iter, max_iter):
            hook.before_step()
            trainer.run_step()       # calls hook.after_backward() after the backward pass
            hook.after_step()
        iter += 1
        hook.after_train()

    A hook reaches the trainer (model, iteration, storage ...) through ``self.trainer``. Only the
    stages a hook implements are called (see :meth:`implements`). ``before_step`` should take
    negligible time; put real work in ``after_step``.
    """

    trainer: TrainerBase
    """A ``weakref.proxy`` to the trainer, set by :meth:`TrainerBase.register_hooks`. A proxy,
    not a reference: trainer -> hooks -> trainer would be a cycle that keeps the trainer (and its
    model and data) alive until the cyclic garbage collector runs."""

    def before_train(self) -> None:
        """Called before the first iteration."""

    def after_train(self) -> None:
        """Called after the last iteration, also when training failed or stopped early
        (``trainer.completed`` tells whether it ran to ``max_iter``)."""

    def before_step(self) -> None:
        """Called before each iteration."""

    def after_backward(self) -> None:
        """Called after the backward pass of each iteration, before the optimizer step."""

    def after_step(self) -> None:
        """Called after each iteration."""

    def state_dict(self) -> dict[str, Any]:
        """The hook's checkpointable state; hooks are stateless by default (``{}``)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict` (stateless hooks ignore it)."""

    def implements(self, stage: str) -> bool:
        """Whether the trainer calls this hook's ``stage`` (e.g. ``"after_step"``).

        The dispatch rule: a hook implements the stages it overrides (in its class or on the
        instance), so a stage no hook overrides costs nothing per iteration. A hook that decides
        per instance overrides this method (e.g. :class:`~d2engine.engine.hooks.CallbackHook`:
        the stages it was given a function for). The trainer asks when hooks are registered and
        at the start of each ``train()``, never per iteration.

        Args:
            stage: one of ``before_train``, ``after_train``, ``before_step``, ``after_backward``,
                ``after_step``.

        Returns:
            True if the trainer should call it.
        """
        return stage in vars(self) or getattr(type(self), stage) is not getattr(HookBase, stage)


class TrainerBase:
    """Base class of iterative trainers with hooks; subclasses implement :meth:`run_step`.

    Attributes:
        iter: the current iteration (after :meth:`train`: ``max_iter``, or the last finished
            iteration when training stopped early or failed).
        start_iter: the iteration training (re)started from.
        max_iter: the iteration training ends at (exclusive).
        storage: the :class:`EventStorage` opened by :meth:`train` (kept afterwards).
        completed: whether the last :meth:`train` ran to ``max_iter`` (False while it runs, after
            a failure, and after a stop); set before the hooks' ``after_train``.
        stop_reason: why the last :meth:`train` stopped early (see :meth:`request_stop`), or None.
        preemption: the :class:`~d2engine.engine.preemption.Preemption` handling of the trainer
            (its signals and check period).
        checkpoint_rng: whether ``state_dict()`` holds (and ``load_state_dict()`` restores) every
            rank's random generators under ``"rng"`` (default True).
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self._stage_calls: dict[str, list[Callable[[], None]]] = {s: [] for s in _STAGES}
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: EventStorage
        self.completed = False
        self.stop_reason: str | None = None
        self._stop_request: tuple[str, int, str] | None = None
        self.preemption = Preemption()
        self.checkpoint_rng = True
        self._rng = RankRNGStates()

    def register_hooks(self, hooks: Sequence[HookBase | None]) -> None:
        """Register hooks; they run in the order given, after those registered before.

        Args:
            hooks: hooks; ``None`` entries are dropped.

        Raises:
            TypeError: if an entry is neither a :class:`HookBase` nor None.
        """
        accepted: list[HookBase] = []
        for h in hooks:
            if h is None:
                continue
            if not isinstance(h, HookBase):
                raise TypeError(
                    f"register_hooks() takes HookBase objects, got {type(h).__name__} ({h!r}). "
                    "HINT: subclass d2engine.engine.train_loop.HookBase, or wrap functions in "
                    "d2engine.engine.hooks.CallbackHook."
                )
            # A proxy: a strong reference would make the cycle trainer -> hook -> trainer.
            h.trainer = weakref.proxy(self)
            accepted.append(h)
        self._hooks.extend(accepted)
        self._build_dispatch()

    def _build_dispatch(self) -> None:
        self._stage_calls = {
            s: [getattr(h, s) for h in self._hooks if h.implements(s)] for s in _STAGES
        }

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``.

        An exception is logged with the iteration and re-raised; ``after_train`` runs in every
        case. Training ends early, after the current iteration, when :meth:`request_stop` was
        called or a preemption signal arrived (then with a checkpoint, see ``preemption``).

        Args:
            start_iter: the first iteration.
            max_iter: the end of training (exclusive).
        """
        logger.info("Starting training from iteration %d", start_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        self.completed, self.stop_reason, self._stop_request = False, None, None
        self._build_dispatch()  # hooks appended to ``_hooks`` directly are honoured too
        with EventStorage(start_iter) as self.storage, self.preemption.watch(self._hooks):
            try:
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                    if self._stops_here():
                        break
                # The losses not read yet, and metrics still being written in the background,
                # belong to this run: checked (and their errors raised) before it completes.
                self.flush_metrics()
                self.storage.raise_pending()
                if self.stop_reason is None:
                    self.iter = max(max_iter, start_iter)
                    self.completed = True
            except Exception:
                logger.exception("Exception during training at iteration %d:", self.iter)
                # A failure, even after a stop was requested (e.g. a NaN found by the last read):
                # hooks that save at a requested stop must not save this state.
                self.stop_reason = None
                if comm.get_world_size() == 1:  # no collective on a failure path
                    with contextlib.suppress(Exception):
                        self.flush_metrics()  # log what the last iterations recorded
                raise
            finally:
                self.storage.wait_pending()
                self.after_train()

    def flush_metrics(self) -> None:
        """Read, check and log the metrics that iterations recorded without reading them.

        Called at the end of :meth:`train` and, on every rank, by the checkpoint hooks before
        they save (a collective in a multi-process job). The base trainer records none: it does
        nothing. :class:`SimpleTrainer` reads its pending losses and raises
        ``FloatingPointError`` for a non-finite one.
        """

    def request_stop(self, reason: str, *, level: int = logging.INFO, note: str = "") -> None:
        """End training after the current iteration (from a hook, during an iteration).

        The hooks' ``after_train`` run, ``iter`` stays the last finished iteration, ``completed``
        is False and ``stop_reason`` is ``reason``, logged once as ``"{reason}: stopped after
        iteration {iter}[, {note}]"``. The first request wins; one in
        the last iteration changes nothing. No collective is made: in a multi-process job call
        it on every rank in the same iteration, with a decision the ranks share (see "Stopping
        early" in ``docs/resume.md``).

        Args:
            reason: why training stops, for the log and ``stop_reason``.
            level: the logging level of the line.
            note: more for the line (e.g. where a checkpoint was saved).
        """
        if self._stop_request is None:
            self._stop_request = (reason, level, note)

    def _stops_here(self) -> bool:
        """After each iteration: stop for a preemption signal or a :meth:`request_stop`?"""
        if self.preemption.should_stop(self.iter, self.max_iter):
            reason, note = self.preemption.stop(self.iter)
            self.request_stop(reason, level=logging.WARNING, note=note)
        if self._stop_request is None or self.iter >= self.max_iter - 1:
            return False
        self.stop_reason, level, note = self._stop_request
        end = f", {note}" if note else "."
        logger.log(level, "%s: stopped after iteration %d%s", self.stop_reason, self.iter, end)
        return True

    # Kept from before ``preemption`` existed: they read (and set) its attributes.
    preempted = preemption_attribute("preempted")
    preemption_signal = preemption_attribute("signal")
    preemption_signals = preemption_attribute("signals")
    preemption_check_period = preemption_attribute("check_period")

    def before_train(self) -> None:
        """Run the hooks' ``before_train``."""
        for call in self._stage_calls["before_train"]:
            call()

    def after_train(self) -> None:
        """Run the hooks' ``after_train`` with ``storage.iter == iter``."""
        self.storage.iter = self.iter
        for call in self._stage_calls["after_train"]:
            call()

    def before_step(self) -> None:
        """Run the hooks' ``before_step`` (after setting ``storage.iter = iter``)."""
        self.storage.iter = self.iter
        for call in self._stage_calls["before_step"]:
            call()

    def after_backward(self) -> None:
        """Run the hooks' ``after_backward``."""
        for call in self._stage_calls["after_backward"]:
            call()

    def after_step(self) -> None:
        """Run the hooks' ``after_step``."""
        for call in self._stage_calls["after_step"]:
            call()

    def run_step(self) -> None:
        """One training iteration; implemented by subclasses."""
        raise NotImplementedError

    def gather_state(self) -> None:
        """Gather every rank's random generators, and the state of each hook that has a
        ``gather_state()`` (e.g. ``PreciseBN``'s data position), for the next ``state_dict()``
        (a collective: the trainer is a :class:`~d2engine.checkpoint.state.CollectiveStateful`;
        every rank must have the same such hooks, in the same order)."""
        if self.checkpoint_rng:
            self._rng.gather(f"iteration {self.iter}")
        for hook in self._hooks:
            gather = getattr(hook, "gather_state", None)
            if callable(gather):
                gather()

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"iteration", "hooks": {key: state}, "rng": [state per rank]}``.

        Hooks are keyed by class name (``.N`` for repeats); empty states are left out. ``"rng"``
        only with ``checkpoint_rng``: every rank's generators when :meth:`gather_state` ran at
        this iteration, else this rank's (the others ``None``, with a warning).
        """
        hooks = {k: h.state_dict() for k, h in zip(_hook_keys(self._hooks), self._hooks)}
        ret: dict[str, Any] = {
            "iteration": self.iter,
            "hooks": {k: s for k, s in hooks.items() if s},
        }
        if self.checkpoint_rng:
            ret["rng"] = self._rng.states(f"iteration {self.iter}")
        return ret

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the iteration (``start_iter = iteration + 1``), hooks' and RNG states; a hook
        missing from this trainer is a warning.

        Args:
            state_dict: a dict returned by :meth:`state_dict`.

        Raises:
            KeyError: if ``state_dict`` has no "iteration".
        """
        if "iteration" not in state_dict:
            raise KeyError(
                f"Trainer state_dict has no 'iteration'; got keys {sorted(state_dict)}. "
                "HINT: pass the dict produced by TrainerBase.state_dict()."
            )
        self.iter = int(state_dict["iteration"])
        self.start_iter = self.iter + 1
        by_key = dict(zip(_hook_keys(self._hooks), self._hooks))
        for key, value in state_dict.get("hooks", {}).items():
            if key in by_key:
                by_key[key].load_state_dict(value)
            else:
                logger.warning("Cannot find the hook '%s'; its state_dict is ignored.", key)
        if self.checkpoint_rng and state_dict.get("rng") is not None:
            self._rng.restore(state_dict["rng"])


def _hook_keys(hooks: Sequence[HookBase]) -> list[str]:
    """A key per hook in a trainer's state: its qualified class name, ``.N`` for the N-th repeat."""
    seen: dict[str, int] = {}
    keys = []
    for h in hooks:
        name = type(h).__qualname__
        seen[name] = n = seen.get(name, 0) + 1
        keys.append(name if n == 1 else f"{name}.{n - 1}")
    return keys


class SimpleTrainer(TrainerBase):
    """A trainer for one model, one data loader and one optimizer.

    Each :meth:`run_step`: read a batch (timed as ``data_time``), ``loss_dict = model(data)`` (a
    bare tensor becomes ``{"total_loss": t}``), sum the losses, ``zero_grad``, ``backward``, the
    hooks' ``after_backward``, record the losses, ``optimizer.step()``. With
    ``grad_accum_steps=k`` an iteration is still one optimizer step, over ``k`` micro-batches each
    read from the data loader: each micro-batch's loss is divided by ``k`` before its backward pass,
    a DDP model (``no_sync()``) or an FSDP2 one (``set_requires_gradient_sync``) reduces the
    gradients in the last one only, and ``after_backward`` runs once, after the last.
    ``zero_grad`` is ``optimizer.zero_grad()`` (gradients set to None); with torch's own method
    and no profiler recording, the gradients are set to None directly, without the empty
    profiler range torch opens around it (10-20 us per iteration on a CPU).

    Metrics, without a host-device sync between reads: the losses of every iteration are kept on
    the device (:class:`~d2engine.engine.metrics.PendingLosses`) and read in one transfer every
    ``gather_metric_period`` iterations, before every checkpoint (:meth:`flush_metrics`) and at
    the end of training. Each iteration's values are then logged at their iteration: every rank
    puts ``rank_data_time``; the main process puts the max ``data_time`` over ranks, the mean of
    each loss over ranks (and micro-batches) and their sum as ``total_loss``. A non-finite total
    raises ``FloatingPointError`` on every rank naming the first such iteration, before any
    checkpoint of it is written. With ``async_write_metrics=True`` the reads happen in a
    background thread; its error is raised in the training thread at the next iteration, and
    before any checkpoint (:meth:`flush_metrics` waits for it). The thread is stopped at the end
    of :meth:`train` (and by :meth:`close`).

    Args:
        model: a module in training mode returning a dict of scalar losses (or one tensor).
        data_loader: an iterable of model inputs; its iterator is created at the first step and
            kept across :meth:`train` calls.
        optimizer: a torch optimizer.
        gather_metric_period: read (and log, and check) the losses every this many iterations.
            1 reads every iteration, as detectron2 does; a writer's period avoids any read in
            between (``DefaultTrainer`` uses its writers' period, 20).
        zero_grad_before_forward: call ``zero_grad`` before the forward pass instead of after.
        async_write_metrics: read and write the metrics in a background thread.
        grad_accum_steps: micro-batches per iteration (per optimizer step).

    Raises:
        ValueError: if ``gather_metric_period`` or ``grad_accum_steps`` is not a positive integer.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        async_write_metrics: bool = False,
        grad_accum_steps: int = 1,
    ) -> None:
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_loader_iter_obj: Iterator[Any] | None = None
        self.optimizer = optimizer
        self.gather_metric_period = check_positive_int(
            gather_metric_period, "gather_metric_period", type(self).__name__
        )
        self.grad_accum_steps = check_positive_int(
            grad_accum_steps, "grad_accum_steps", type(self).__name__
        )
        self.zero_grad_before_forward = zero_grad_before_forward
        self.async_write_metrics = async_write_metrics
        self._losses = PendingLosses()
        self._metrics_executor: ThreadPoolExecutor | None = None
        self._metrics_group: Any = None
        self._pending_metrics: tuple[Future[None], EventStorage] | None = None

    @property
    def _data_loader_iter(self) -> Iterator[Any]:
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj

    def reset_data_loader(self, data_loader_builder: Callable[[], Iterable[Any]]) -> None:
        """Replace the data loader by ``data_loader_builder()`` (its iterator restarts).

        Args:
            data_loader_builder: a function returning the new data loader.
        """
        del self.data_loader
        self._data_loader_iter_obj = None
        self.data_loader = data_loader_builder()

    def _check_training_mode(self) -> None:
        if not self.model.training:
            raise RuntimeError(
                f"[SimpleTrainer] the model is in eval mode at iteration {self.iter}. HINT: "
                "call model.train() after evaluating (e.g. at the end of an EvalHook function)."
            )

    def _next_batch(self) -> tuple[Any, float]:
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        return data, time.perf_counter() - start

    @staticmethod
    def _as_loss_dict(out: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The loss dict and the total of what the model returned (every loss a scalar tensor)."""
        if isinstance(out, torch.Tensor):
            if out.numel() != 1:
                raise scalar_loss_error("total_loss", out)
            return {"total_loss": out}, out
        loss_dict = out if type(out) is dict else dict(out) if isinstance(out, Mapping) else None
        if not loss_dict:
            raise TypeError(
                f"The model must return a dict of scalar losses or a loss tensor, got "
                f"{type(out).__name__}. HINT: return e.g. {{'loss_cls': loss}} in training mode."
            )
        total = None
        for k, v in loss_dict.items():  # shapes and types only: no value is read
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                raise scalar_loss_error(k, v)
            total = v if total is None else total + v
        return loss_dict, total  # type: ignore[return-value]

    def _forward(self, data: Any) -> Any:
        """The model's output for ``data`` (AMPTrainer: under autocast)."""
        return self.model(data)

    def _backward(self, loss: torch.Tensor) -> None:
        """The backward pass of ``loss`` (AMPTrainer: scaled)."""
        loss.backward()

    def _optimizer_step(self) -> None:
        """The optimizer step (AMPTrainer: through the grad scaler)."""
        self.optimizer.step()

    def run_step(self) -> None:
        """One iteration of the standard training logic (see the class docstring)."""
        self._check_training_mode()
        if self.grad_accum_steps > 1:
            self._run_accumulated_step()
            return
        data, data_time = self._next_batch()
        if self.zero_grad_before_forward:
            _zero_grad(self.optimizer)
        loss_dict, losses = self._as_loss_dict(self._forward(data))
        if not self.zero_grad_before_forward:
            _zero_grad(self.optimizer)
        self._backward(losses)
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self._optimizer_step()

    def _run_accumulated_step(self) -> None:
        """One iteration of ``grad_accum_steps`` micro-batches and one optimizer step."""
        steps = self.grad_accum_steps
        # DDP (no_sync) and FSDP2 (set_requires_gradient_sync) reduce the gradients in the
        # backward pass of the last micro-batch only.
        no_sync = getattr(self.model, "no_sync", None)
        set_sync = None if no_sync else getattr(self.model, "set_requires_gradient_sync", None)
        if self.zero_grad_before_forward:
            _zero_grad(self.optimizer)
        keys: tuple[str, ...] = ()
        values: list[torch.Tensor] = []
        data_time = 0.0
        for i in range(steps):
            data, seconds = self._next_batch()
            data_time += seconds
            sync = i == steps - 1
            if set_sync is not None:
                set_sync(sync)
            with contextlib.nullcontext() if sync or no_sync is None else no_sync():
                loss_dict, losses = self._as_loss_dict(self._forward(data))
                if i == 0 and not self.zero_grad_before_forward:
                    _zero_grad(self.optimizer)
                self._backward(losses / steps)
            if i == 0:
                keys = tuple(loss_dict)
            elif tuple(loss_dict) != keys:
                raise ValueError(
                    f"The model returned the losses {list(loss_dict)} for micro-batch {i} of "
                    f"iteration {self.iter} but {list(keys)} for its first. HINT: return the "
                    "same losses for every batch (a zero tensor for one that does not apply)."
                )
            values.extend(v.detach() for v in loss_dict.values())
        self.after_backward()
        self._record_losses(keys, tuple(values), data_time, "", self.iter)
        self._optimizer_step()

    def _write_metrics(
        self,
        loss_dict: Mapping[str, torch.Tensor],
        data_time: float,
        prefix: str = "",
        iter: int | None = None,
    ) -> None:
        """Record the losses of iteration ``iter`` (default: the current one) for the metrics.

        Nothing is read here: the losses are read, checked and logged every
        ``gather_metric_period`` iterations (see the class docstring). The standard
        :meth:`run_step` calls it after the backward pass; a ``run_step`` override may call it
        with its own losses (extra ones under a ``prefix``), as in detectron2.

        Args:
            loss_dict: scalar losses (tensors, or numbers).
            data_time: the time spent reading the batch.
            prefix: prefix of the logged loss names.
            iter: the iteration (default: the current one).

        Raises:
            FloatingPointError: when the losses are read and a total is infinite or NaN (on
                every rank).
        """
        it = self.iter if iter is None else iter
        self._record_losses(tuple(loss_dict), _detached(loss_dict), data_time, prefix, it)

    def _record_losses(
        self, keys: tuple[str, ...], values: tuple[Any, ...], data_time: float, prefix: str, it: int
    ) -> None:
        if self._pending_metrics is not None and self._pending_metrics[0].done():
            self._collect_pending_metrics()  # raises a background error at the next iteration
        pending = self._losses.add(it, keys, values, data_time, prefix)
        if (it + 1) % self.gather_metric_period == 0 or pending >= MAX_PENDING_ITERATIONS:
            if self.async_write_metrics:
                self._submit_metrics()
            else:
                write_losses(self._losses.take(), get_event_storage())

    def flush_metrics(self) -> None:
        """Read, check and log the losses of the iterations not read yet, now.

        Waits for the metrics being written in the background (raising their error), then
        reads the rest in one transfer. A collective in a multi-process job: call it on every rank
        at the same iteration. The checkpoint hooks call it before saving, so that no
        checkpoint is written after a non-finite loss; :meth:`train` calls it at the end.

        Raises:
            FloatingPointError: naming the first iteration whose total loss is infinite or NaN.
        """
        if self._pending_metrics is not None:
            self._collect_pending_metrics()
        if len(self._losses):
            write_losses(self._losses.take(), get_event_storage(), self._metrics_group)

    def _submit_metrics(self) -> None:
        if self._pending_metrics is not None:
            self._collect_pending_metrics()
        storage = get_event_storage()
        if self._metrics_executor is None:
            self._metrics_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="d2engine-metrics"
            )
        if comm.get_world_size() > 1 and self._metrics_group is None:
            # Created once, here in the training thread, at the same step on every rank: the
            # background collective then never interleaves with DDP's on the default group.
            self._metrics_group = comm.new_group(backend="gloo")
        future = self._metrics_executor.submit(
            write_losses, self._losses.take(), storage, self._metrics_group
        )
        storage.add_pending(future)
        self._pending_metrics = (future, storage)

    def _collect_pending_metrics(self) -> None:
        """Wait for the metrics submitted last and raise their error in this thread."""
        assert self._pending_metrics is not None
        future, storage = self._pending_metrics
        self._pending_metrics = None
        storage.discard_pending(future)
        future.result()

    def train(self, start_iter: int, max_iter: int) -> None:
        """See :meth:`TrainerBase.train`; the background metrics thread is stopped at the end."""
        try:
            super().train(start_iter, max_iter)
        finally:
            self.close()

    def close(self) -> None:
        """Wait for background metrics and stop their thread (a later async step restarts it).

        :meth:`train` calls it at its end.
        """
        if self._metrics_executor is not None:
            self._metrics_executor.shutdown(wait=True)
            self._metrics_executor = None
        self._pending_metrics = None

    @staticmethod
    def write_metrics(
        loss_dict: Mapping[str, torch.Tensor | float],
        data_time: float,
        cur_iter: int | None = None,
        prefix: str = "",
    ) -> None:
        """Reduce the losses over ranks and put them into the current event storage, now.

        Args:
            loss_dict: scalar losses.
            data_time: the time spent reading the batch.
            cur_iter: the iteration to log at; default the storage's current one.
            prefix: prefix of the logged loss names.

        Raises:
            FloatingPointError: if the total loss is infinite or NaN (on every rank).
        """
        storage = get_event_storage()
        it = storage.iter if cur_iter is None else int(cur_iter)
        losses = PendingLosses()
        losses.add(it, tuple(loss_dict), _detached(loss_dict), data_time, prefix)
        write_losses(losses.take(), storage)

    def gather_state(self) -> None:
        """Gather every rank's random generators and, when the data loader has a
        ``gather_state()`` (d2engine's ``TrainDataLoader``), every rank's data position for the
        next ``state_dict()`` (a collective: call it on every rank at the save point)."""
        super().gather_state()
        gather = getattr(self.data_loader, "gather_state", None)
        if callable(gather):
            gather()

    def state_dict(self) -> dict[str, Any]:
        """The base state plus ``"optimizer"`` and ``"data"`` (the loader's, when it has one).

        Losses not read yet are checked first (on this process), so that a checkpoint is never
        written after a non-finite loss, whoever saves it.

        Raises:
            FloatingPointError: if a loss not read yet is infinite or NaN.
        """
        self._check_pending_losses()
        ret = super().state_dict()
        ret["optimizer"] = self.optimizer.state_dict()
        if callable(getattr(self.data_loader, "state_dict", None)):
            ret["data"] = self.data_loader.state_dict()  # type: ignore[attr-defined]
        return ret

    def _check_pending_losses(self) -> None:
        """Raise if a loss not read yet is not finite (this process's values; no collective)."""
        if self._pending_metrics is not None:
            self._collect_pending_metrics()
        if not len(self._losses):
            return
        if comm.get_world_size() == 1 and has_event_storage():
            self.flush_metrics()
            return
        items = self._losses.take()
        floats = _to_floats([v for item in items for v in item.values])
        pos = 0
        for item in items:
            values = floats[pos : pos + len(item.values)]
            pos += len(item.values)
            if not math.isfinite(sum(values)):
                raise FloatingPointError(
                    f"Loss became infinite or NaN at iteration={item.iteration}!\n"
                    f"loss_dict = {dict(zip(item.keys, values))}\nHINT: no checkpoint was "
                    "written; see SimpleTrainer.flush_metrics."
                )
        # Put them back, read: the next flush logs them (with the other ranks' values).
        for item in items:
            self._losses.add(item.iteration, item.keys, item.values, item.data_time, item.prefix)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the base state, the optimizer and the data position.

        Raises:
            KeyError: if ``state_dict`` has no "optimizer" (or no "iteration").
        """
        if "optimizer" not in state_dict:
            raise KeyError(
                f"SimpleTrainer state_dict has no 'optimizer'; got keys {sorted(state_dict)}. "
                "HINT: pass the dict produced by SimpleTrainer.state_dict()."
            )
        super().load_state_dict(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if "data" in state_dict:
            if callable(getattr(self.data_loader, "load_state_dict", None)):
                self.data_loader.load_state_dict(state_dict["data"])  # type: ignore[attr-defined]
                self._data_loader_iter_obj = None  # the next batch comes from the loaded position
            else:
                logger.warning(
                    "The checkpoint has a data position but the data loader (%s) has no "
                    "load_state_dict(); the data restarts from its beginning.",
                    type(self.data_loader).__name__,
                )


_TORCH_ZERO_GRAD = torch.optim.Optimizer.zero_grad


def _zero_grad(optimizer: Any) -> None:
    """``optimizer.zero_grad()``: every gradient set to None.

    torch's ``Optimizer.zero_grad`` opens a profiler range around its loop even when no profiler
    records: two dispatcher calls that cost 10-20 us per iteration on a CPU, more than the rest
    of the engine's per-iteration work. When the optimizer has torch's own ``zero_grad`` and
    nothing records ranges (no profiler, no CUPTI monitor), the gradients are set to None here:
    the same result without the empty range. Anything else (an optimizer with its own
    ``zero_grad``, as detectron2 suggests for custom accumulation; a profiler running, whose
    trace then shows the range) calls ``optimizer.zero_grad()``.
    """
    if (
        type(optimizer).zero_grad is not _TORCH_ZERO_GRAD
        or "zero_grad" in getattr(optimizer, "__dict__", ())
        or torch.autograd._profiler_enabled()
        or _cupti_monitor_running()
    ):
        optimizer.zero_grad()
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None


def _cupti_monitor_running() -> bool:
    """Whether torch's experimental CUPTI monitor (which records ranges as annotations) runs."""
    monitor = sys.modules.get("torch.profiler._cupti_monitor")
    get_monitor = getattr(monitor, "get_monitor", None)
    return get_monitor is not None and get_monitor() is not None


def _detached(loss_dict: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of ``loss_dict``, tensors detached (no copy, no read)."""
    return tuple([v.detach() if isinstance(v, torch.Tensor) else v for v in loss_dict.values()])


def _device_type_of(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


class AMPTrainer(SimpleTrainer):
    """A :class:`SimpleTrainer` that runs the forward pass under ``torch.amp.autocast``.

    The autocast device type is the one of the model's parameters. fp16 on CUDA scales the loss
    with a ``torch.amp.GradScaler("cuda")`` (created when not given); bf16 (CUDA or CPU) needs no
    scaler. fp16 is refused on CPU: use bf16 there. With ``grad_accum_steps > 1`` the scaler
    scales every micro-batch's loss and steps (and updates its scale) once per iteration.

    Args:
        model: see :class:`SimpleTrainer`.
        data_loader: see :class:`SimpleTrainer`.
        optimizer: see :class:`SimpleTrainer`.
        grad_scaler: a ``torch.amp.GradScaler``; default one for fp16 on CUDA, none for bf16.
        precision: ``torch.float16`` or ``torch.bfloat16``.
        log_grad_scaler: put the scaler's scale as ``[metric]grad_scaler`` with the metrics.
        async_write_metrics: see :class:`SimpleTrainer`.
        gather_metric_period: see :class:`SimpleTrainer`.
        zero_grad_before_forward: see :class:`SimpleTrainer`.
        grad_accum_steps: see :class:`SimpleTrainer`.

    Raises:
        ValueError: for a precision other than fp16/bf16, or fp16 on a CPU model.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        grad_scaler: torch.amp.GradScaler | None = None,
        precision: torch.dtype = torch.float16,
        log_grad_scaler: bool = False,
        async_write_metrics: bool = False,
        *,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        grad_accum_steps: int = 1,
    ) -> None:
        if precision not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"AMPTrainer precision must be torch.float16 or torch.bfloat16, got {precision}."
            )
        device_type = _device_type_of(model)
        if precision == torch.float16 and device_type == "cpu":
            raise ValueError(
                "AMPTrainer got precision=torch.float16 for a model on the CPU. fp16 autocast "
                "is meant for CUDA. HINT: pass precision=torch.bfloat16 on CPU, or move the "
                "model to a GPU first."
            )
        super().__init__(
            model,
            data_loader,
            optimizer,
            gather_metric_period=gather_metric_period,
            zero_grad_before_forward=zero_grad_before_forward,
            async_write_metrics=async_write_metrics,
            grad_accum_steps=grad_accum_steps,
        )
        if grad_scaler is None and precision == torch.float16:
            grad_scaler = torch.amp.GradScaler(device_type)
        self.grad_scaler = grad_scaler
        self.precision = precision
        self.log_grad_scaler = log_grad_scaler
        self._device_type = device_type

    def _forward(self, data: Any) -> Any:
        with torch.amp.autocast(device_type=self._device_type, dtype=self.precision):
            return self.model(data)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        else:
            loss.backward()

    def after_backward(self) -> None:
        """Put the scale (``log_grad_scaler``, at metric iterations), then run the hooks'."""
        scaler = self.grad_scaler
        if (
            self.log_grad_scaler
            and scaler is not None
            and (self.iter + 1) % self.gather_metric_period == 0
        ):
            # the scale as a tensor copy (updated in place later): no sync here
            get_event_storage().put_scalar("[metric]grad_scaler", self._scale_tensor(scaler))
        super().after_backward()

    def _optimizer_step(self) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    @staticmethod
    def _scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor | float:
        get_async = getattr(scaler, "_get_scale_async", None)
        scale = get_async() if get_async is not None else None
        if isinstance(scale, torch.Tensor):
            return scale.detach().clone()
        return scaler.get_scale()

    def state_dict(self) -> dict[str, Any]:
        """The :class:`SimpleTrainer` state plus ``"grad_scaler"`` when a scaler is used."""
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the :class:`SimpleTrainer` state and the scaler's."""
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
