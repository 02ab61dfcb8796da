"""The training loop: hooks, the base trainer, and the SGD / mixed-precision trainers.

:class:`TrainerBase` runs ``before_train``, then ``before_step / run_step / after_step`` for each
iteration, then ``after_train``, calling the registered :class:`HookBase` objects at each stage in
registration order. Each stage is dispatched only to the hooks that override it, so a stage that
no hook implements costs nothing per iteration.

:class:`SimpleTrainer` implements ``run_step`` for one model, one data source and one optimizer;
:class:`AMPTrainer` adds ``torch.amp`` mixed precision (fp16 with a GradScaler, or bf16).

Exact resume
------------
``trainer.state_dict()`` holds everything a continuation needs, under predictable keys:
``"iteration"`` (the last finished one), ``"hooks"`` (each stateful hook's state, e.g. the LR
scheduler under ``"LRScheduler"``), ``"rng"`` (python, numpy, torch CPU and per-device CUDA
generator states, one entry per rank), and for :class:`SimpleTrainer` ``"optimizer"`` and
``"data"`` (the data loader's ``state_dict()``, when it has one: the data position of
:func:`d2engine.data.build_train_loader`, O(1) to restore), for :class:`AMPTrainer`
``"grad_scaler"``. ``load_state_dict`` restores all of it and sets ``start_iter = iteration + 1``.
Register the trainer as a checkpointable (``Checkpointer(model, dir, trainer=trainer)``) and a
run killed at any moment and resumed from its last checkpoint ends with the same weights, bit for
bit, as an uninterrupted run, given:

* ``num_workers=0``: exact. With ``num_workers > 0`` the batch order and the samples drawn are
  still exact (the position is counted in batches handed to the trainer and the sampler restarts
  there), but random augmentations that run *inside worker processes* draw from the workers'
  generators, which are seeded per worker start and not saved: they are bit-identical only if the
  mapper seeds its randomness from the sample index (or is deterministic).
* CUDA: the CUDA generators are saved and restored, but many CUDA kernels (atomics in
  scatter/index_add, cuDNN algorithm choice) are non-deterministic: bit-identical results need
  ``torch.use_deterministic_algorithms(True)``, ``torch.backends.cudnn.benchmark = False`` and
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8``. Without them a resumed run is statistically, not bitwise,
  equal.
* The random generators are captured when the checkpoint is written (the PeriodicCheckpointer
  hook's ``after_step``); hooks running after it in the same iteration must not draw random
  numbers (EvalHook restores the generators after evaluating, so evaluation does not count).
* In a multi-process job each rank's generators are gathered at the save point
  (:meth:`TrainerBase.prepare_checkpoint`, called by the checkpointing hooks on every rank), so
  register PeriodicCheckpointer on every rank: it writes on the main process only.

Preemption
----------
While :meth:`TrainerBase.train` runs, the signals in ``trainer.preemption_signals`` (default
``(SIGTERM,)``) stop training after the current iteration with a checkpoint; ``train`` then
returns with ``trainer.preempted == True`` and scripts exit with :data:`PREEMPTION_EXIT_CODE`
(75) so that the scheduler requeues the job. In a multi-process job the ranks agree on stopping
every ``trainer.preemption_check_period`` iterations. Details: :mod:`d2engine.engine.preemption`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from d2engine.checkpoint.state import capture_rng_state, gather_rng_states, restore_rng_state
from d2engine.engine.preemption import (
    PREEMPTION_EXIT_CODE,
    preemption_handlers,
    preemption_signal_to_stop_on,
    record_preemption,
    saves_for_preemption,
    signal_name,
)
from d2engine.utils import comm
from d2engine.utils.events import EventStorage, get_event_storage
from d2engine.utils.validation import check_positive_int

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

    A hook reaches the trainer (model, iteration, storage ...) through ``self.trainer``. Only
    stages a hook overrides are called. ``before_step`` should take negligible time; put real
    work in ``after_step``.
    """

    trainer: TrainerBase
    """A ``weakref.proxy`` to the trainer, set by :meth:`TrainerBase.register_hooks`. A proxy,
    not a reference: trainer -> hooks -> trainer would be a cycle that keeps the trainer (and its
    model and data) alive until the cyclic garbage collector runs."""

    def before_train(self) -> None:
        """Called before the first iteration."""

    def after_train(self) -> None:
        """Called after the last iteration (also when training failed)."""

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

    def _implements(self, stage: str) -> bool:
        """Whether the trainer should call ``stage`` on this hook (it overrides it)."""
        if stage in vars(self):
            return True
        return getattr(type(self), stage) is not getattr(HookBase, stage)


class TrainerBase:
    """Base class of iterative trainers with hooks.

    The only assumption is that training runs in a loop; subclasses implement :meth:`run_step`.

    Its ``state_dict()`` holds the iteration, the hooks' states and the random generators' states
    (see "Exact resume" in the module docstring); :meth:`train` handles preemption signals (see
    "Preemption").

    Attributes:
        iter: the current iteration.
        start_iter: the iteration training (re)started from; ``load_state_dict`` sets it to the
            saved iteration + 1.
        max_iter: the iteration training ends at (exclusive).
        storage: the :class:`EventStorage` opened by :meth:`train` (kept afterwards).
        preemption_signals: the signals that stop training with a checkpoint (default
            ``(signal.SIGTERM,)``; empty: no handler is installed). Same value on every rank.
        preemption_check_period: in a multi-process job, combine the ranks' preemption flags
            every this many iterations (default 10).
        preempted: whether the last :meth:`train` stopped early because of a preemption signal.
        preemption_signal: the signal number that caused it (None otherwise).
        checkpoint_rng: whether ``state_dict()`` holds and ``load_state_dict()`` restores the
            random generators' states (default True).
    """

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self._stage_calls: dict[str, list[Callable[[], None]]] = {s: [] for s in _STAGES}
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.storage: EventStorage
        self.preemption_signals: tuple[int, ...] = (signal.SIGTERM,)
        self.preemption_check_period: int = 10
        self.preempted: bool = False
        self.preemption_signal: int | None = None
        self.checkpoint_rng: bool = True
        self._signal_received: int | None = None
        self._gathered_rng: tuple[int, list[Any]] | None = None
        self._collective_checkpoints: bool = True
        self._warned_rng = False

    def register_hooks(self, hooks: Sequence[HookBase | None]) -> None:
        """Register hooks; they run in the order given, after those registered before.

        Args:
            hooks: hooks; ``None`` entries are dropped.

        Raises:
            TypeError: if an entry is neither a :class:`HookBase` nor None.
        """
        hooks = [h for h in hooks if h is not None]
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(
                    f"register_hooks() takes HookBase objects, got {type(h).__name__} ({h!r}). "
                    "HINT: subclass d2engine.engine.train_loop.HookBase, or wrap functions in "
                    "d2engine.engine.hooks.CallbackHook."
                )
        for h in hooks:
            # A proxy: a strong reference would make the cycle trainer -> hook -> trainer.
            h.trainer = weakref.proxy(self)
        self._hooks.extend(hooks)
        self._build_dispatch()

    def _build_dispatch(self) -> None:
        self._stage_calls = {
            stage: [getattr(h, stage) for h in self._hooks if h._implements(stage)]
            for stage in _STAGES
        }

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``.

        After success ``iter == max_iter``. An exception is logged with the iteration and
        re-raised; ``after_train`` runs in every case. A preemption signal (see
        ``preemption_signals``) stops training after the current iteration with a checkpoint:
        then ``preempted`` is True and ``iter`` is the last finished iteration.

        Args:
            start_iter: the first iteration.
            max_iter: the end of training (exclusive).
        """
        logger.info("Starting training from iteration %d", start_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        self.preempted = False
        self.preemption_signal = None
        self._signal_received = None
        self._build_dispatch()  # hooks appended to ``_hooks`` directly are honoured too
        with (
            EventStorage(start_iter) as self.storage,
            preemption_handlers(self.preemption_signals, self._on_preemption_signal),
        ):
            try:
                self._check_checkpoint_hooks()
                self.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.before_step()
                    self.run_step()
                    self.after_step()
                    self._after_iteration()
                    if self.preempted:
                        break
                # Errors of metrics still being computed in the background belong to this run.
                self.storage.raise_pending()
                if not self.preempted:
                    # The hooks' after_train (and anything that reads ``iter`` afterwards) sees
                    # max_iter; a preempted run keeps the last finished iteration.
                    self.iter = max(max_iter, start_iter)
            except Exception:
                logger.exception("Exception during training at iteration %d:", self.iter)
                raise
            finally:
                self.storage.wait_pending()
                self.after_train()
        if self._signal_received is not None and not self.preempted:
            logger.warning(
                "Received signal %d too late to stop training early (during the last "
                "iteration or after the last preemption check); training completed.",
                self._signal_received,
            )

    # ------------------------------------------------------------------ preemption
    def _on_preemption_signal(self, signum: int) -> None:
        """The signal handler (see :mod:`d2engine.engine.preemption`): only sets a flag."""
        self._signal_received = signum

    def _check_checkpoint_hooks(self) -> None:
        """Multi-process: whether every rank has the same checkpointing hooks (one collective).

        Gathering the ranks' RNG states at a save point is a collective; it is only done when
        every rank runs the same checkpointing hooks, else it would deadlock.
        """
        self._gathered_rng = None
        self._warned_rng = False
        if comm.get_world_size() == 1:
            self._collective_checkpoints = True
            return
        keys = [k for k, h in zip(self._hook_keys(), self._hooks) if saves_for_preemption(h)]
        all_keys = comm.all_gather(keys)
        self._collective_checkpoints = all(k == all_keys[0] for k in all_keys)
        if not self._collective_checkpoints:
            logger.warning(
                "The checkpointing hooks differ between ranks (%s): the other ranks' RNG states "
                "cannot be gathered into the checkpoints, so a resumed run is not exact on them. "
                "HINT: register PeriodicCheckpointer on every rank (it writes on the main "
                "process only).",
                all_keys,
            )

    def _after_iteration(self) -> None:
        """After ``after_step``: stop with a checkpoint when a preemption signal arrived."""
        if not self.preemption_signals or self.iter >= self.max_iter - 1:
            return  # the last iteration: training is complete anyway
        signum = preemption_signal_to_stop_on(
            self._signal_received, self.iter, self.preemption_check_period
        )
        if signum is not None:
            self._stop_for_preemption(signum)

    def _stop_for_preemption(self, signum: int) -> None:
        paths = []
        for hook in self._hooks:
            save = getattr(hook, "save_for_preemption", None)
            if callable(save):
                paths.append(save())
        comm.synchronize()  # no rank leaves before the checkpoint is complete
        self.preempted = True
        self.preemption_signal = signum
        record_preemption(signum)
        name = signal_name(signum)
        written = [p for p in paths if p]
        where = (
            f"checkpoint saved to {', '.join(written)}"
            if written
            else "no checkpoint written here (no PeriodicCheckpointer hook on this process)"
        )
        logger.warning(
            "Preempted by %s: stopped after iteration %d, %s. Exit with code %d to have the job "
            "requeued; it resumes at iteration %d.",
            name,
            self.iter,
            where,
            PREEMPTION_EXIT_CODE,
            self.iter + 1,
        )

    def prepare_checkpoint(self) -> None:
        """Gather every rank's RNG state for a checkpoint of the current iteration.

        A collective in a multi-process job: checkpointing hooks call it on every rank right
        before saving (only the main process writes). ``state_dict()`` then holds all ranks'
        generators. No-op in a single process, or when the ranks' checkpointing hooks differ.
        """
        if not self.checkpoint_rng or comm.get_world_size() == 1:
            return
        if self._collective_checkpoints:
            self._gathered_rng = (self.iter, gather_rng_states())

    def _rng_states(self) -> list[Any]:
        world_size = comm.get_world_size()
        if world_size == 1:
            return [capture_rng_state()]
        if self._gathered_rng is not None and self._gathered_rng[0] == self.iter:
            return list(self._gathered_rng[1])
        if not self._warned_rng:
            self._warned_rng = True
            logger.warning(
                "Saving a checkpoint at iteration %d without the other ranks' RNG states (they "
                "were not gathered): a run resumed from it restores rank %d's generators only. "
                "HINT: call trainer.prepare_checkpoint() on every rank before saving.",
                self.iter,
                comm.get_rank(),
            )
        states: list[Any] = [None] * world_size
        states[comm.get_rank()] = capture_rng_state()
        return states

    def _restore_rng(self, states: Any) -> None:
        rank, world_size = comm.get_rank(), comm.get_world_size()
        states = list(states)
        if len(states) != world_size:
            logger.warning(
                "The checkpoint holds the RNG states of %d rank(s); this job has %d. Ranks "
                "without a saved state keep their current generators.",
                len(states),
                world_size,
            )
        state = states[rank] if rank < len(states) else None
        if state is None:
            logger.warning("The checkpoint has no RNG state for rank %d; not restored.", rank)
            return
        restore_rng_state(state)

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

    def _hook_keys(self) -> list[str]:
        """A key per hook: its qualified class name, suffixed ``.N`` for the N-th repeat."""
        seen: dict[str, int] = {}
        keys = []
        for h in self._hooks:
            name = type(h).__qualname__
            n = seen.get(name, 0)
            seen[name] = n + 1
            keys.append(name if n == 0 else f"{name}.{n}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"iteration", "hooks": {qualname: state}, "rng": [state per rank]}``.

        Empty hook states are left out; ``"rng"`` only with ``checkpoint_rng``.

        Returns:
            The trainer's checkpointable state.
        """
        hooks_state = {}
        for key, h in zip(self._hook_keys(), self._hooks):
            state = h.state_dict()
            if state:
                hooks_state[key] = state
        ret: dict[str, Any] = {"iteration": self.iter, "hooks": hooks_state}
        if self.checkpoint_rng:
            ret["rng"] = self._rng_states()
        return ret

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the iteration (``start_iter = iteration + 1``), hooks' and RNG states.

        A hook missing from this trainer is a warning.

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
        by_key = dict(zip(self._hook_keys(), self._hooks))
        for key, value in state_dict.get("hooks", {}).items():
            hook = by_key.get(key)
            if hook is None:
                logger.warning("Cannot find the hook '%s'; its state_dict is ignored.", key)
                continue
            hook.load_state_dict(value)
        if self.checkpoint_rng and state_dict.get("rng") is not None:
            self._restore_rng(state_dict["rng"])


def _to_floats(loss_dict: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Convert scalar tensors to floats: one host-device transfer for accelerator tensors."""
    names = list(loss_dict)
    values = [loss_dict[k] for k in names]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    devices = {v.device for v in tensors}
    on_accelerator = len(devices) == 1 and next(iter(devices)).type != "cpu"
    if len(tensors) == len(values) > 1 and on_accelerator:
        floats = torch.stack([v.detach().reshape(()).double() for v in tensors]).tolist()
    else:  # CPU tensors: .item() is cheaper than stacking
        floats = [float(v.item()) if isinstance(v, torch.Tensor) else float(v) for v in values]
    return dict(zip(names, floats))


def _write_metrics(
    loss_dict: Mapping[str, torch.Tensor | float],
    data_time: float,
    cur_iter: int | None,
    prefix: str,
    storage: EventStorage,
    group: Any = None,
) -> None:
    metrics = _to_floats(loss_dict)
    storage.put_scalar("rank_data_time", data_time, cur_iter=cur_iter)
    if comm.get_world_size() == 1:
        mean = metrics
    else:
        # all_gather (not gather): every rank must see a non-finite loss and raise together.
        gathered = comm.all_gather({"losses": metrics, "data_time": data_time}, group=group)
        data_time = max(x["data_time"] for x in gathered)
        mean = {k: sum(x["losses"][k] for x in gathered) / len(gathered) for k in metrics}
    total = sum(mean.values())
    if not math.isfinite(total):
        iteration = storage.iter if cur_iter is None else cur_iter
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration={iteration}!\nloss_dict = {mean}"
        )
    if comm.is_main_process():
        storage.put_scalar("data_time", data_time, cur_iter=cur_iter)
        storage.put_scalar(f"{prefix}total_loss", total, cur_iter=cur_iter)
        if len(mean) > 1:
            for k, v in mean.items():
                storage.put_scalar(f"{prefix}{k}", v, cur_iter=cur_iter)


class SimpleTrainer(TrainerBase):
    """A trainer for one model, one data loader and one optimizer.

    Each :meth:`run_step`: read a batch (timed as ``data_time``), ``loss_dict = model(data)`` (a
    bare tensor becomes ``{"total_loss": t}``), sum the losses, ``zero_grad``, ``backward``, the
    hooks' ``after_backward``, write metrics, ``optimizer.step()``.

    Metrics (every ``gather_metric_period`` iterations; no host-device sync in between): each
    rank puts ``rank_data_time``; the main process puts the max ``data_time`` over ranks, the
    mean of each loss and their sum as ``total_loss``. A non-finite total raises
    ``FloatingPointError`` on every rank. With ``async_write_metrics=True`` the metrics are
    gathered in a background thread; its error is raised in the training thread at the next
    iteration (or at the end of :meth:`train`).

    Args:
        model: a module in training mode returning a dict of scalar losses (or one tensor).
        data_loader: an iterable of model inputs; its iterator is created at the first step and
            kept across :meth:`train` calls.
        optimizer: a torch optimizer.
        gather_metric_period: write metrics every this many iterations.
        zero_grad_before_forward: call ``zero_grad`` before the forward pass instead of after.
        async_write_metrics: gather and write metrics in a background thread.

    Raises:
        ValueError: if ``gather_metric_period`` is not a positive integer.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader: Iterable[Any],
        optimizer: torch.optim.Optimizer,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        async_write_metrics: bool = False,
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
        self.zero_grad_before_forward = zero_grad_before_forward
        self.async_write_metrics = async_write_metrics
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
        if isinstance(out, torch.Tensor):
            return {"total_loss": out}, out
        if not isinstance(out, Mapping) or not out:
            raise TypeError(
                f"The model must return a dict of scalar losses or a loss tensor, got "
                f"{type(out).__name__}. HINT: return e.g. {{'loss_cls': loss}} in training mode."
            )
        return dict(out), sum(out.values())  # type: ignore[return-value]

    def run_step(self) -> None:
        """One iteration of the standard training logic (see the class docstring)."""
        self._check_training_mode()
        data, data_time = self._next_batch()
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        loss_dict, losses = self._as_loss_dict(self.model(data))
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._record_metrics(loss_dict, data_time)
        self.optimizer.step()

    def _record_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float) -> None:
        """Write (or submit) the metrics of this iteration when the period says so."""
        if self._pending_metrics is not None:
            self._collect_pending_metrics()
        if (self.iter + 1) % self.gather_metric_period != 0:
            return
        if self.async_write_metrics:
            self._submit_metrics(loss_dict, data_time)
        else:
            self.write_metrics(loss_dict, data_time, cur_iter=self.iter)

    def _submit_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float) -> None:
        storage = get_event_storage()
        if self._metrics_executor is None:
            self._metrics_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="d2engine-metrics"
            )
        if comm.get_world_size() > 1 and self._metrics_group is None:
            # Created once, here in the training thread, at the same step on every rank: the
            # background collective then never interleaves with DDP's on the default group.
            import torch.distributed as dist

            self._metrics_group = dist.new_group(backend="gloo")
        detached = {k: v.detach() for k, v in loss_dict.items()}
        future = self._metrics_executor.submit(
            _write_metrics, detached, data_time, self.iter, "", storage, self._metrics_group
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

    def close(self) -> None:
        """Wait for background metrics and stop their thread (a later async step restarts it)."""
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
        """Reduce the losses over ranks and put them into the current event storage.

        Args:
            loss_dict: scalar losses.
            data_time: the time spent reading the batch.
            cur_iter: the iteration to log at; default the storage's current one.
            prefix: prefix of the logged loss names.

        Raises:
            FloatingPointError: if the total loss is infinite or NaN (on every rank).
        """
        _write_metrics(loss_dict, data_time, cur_iter, prefix, get_event_storage())

    def state_dict(self) -> dict[str, Any]:
        """The base state plus ``"optimizer"`` and ``"data"`` (the loader's, when it has one)."""
        ret = super().state_dict()
        ret["optimizer"] = self.optimizer.state_dict()
        if callable(getattr(self.data_loader, "state_dict", None)):
            ret["data"] = self.data_loader.state_dict()  # type: ignore[attr-defined]
        return ret

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


def _device_type_of(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


class AMPTrainer(SimpleTrainer):
    """A :class:`SimpleTrainer` that runs the forward pass under ``torch.amp.autocast``.

    The autocast device type is the one of the model's parameters. fp16 on CUDA scales the loss
    with a ``torch.amp.GradScaler("cuda")`` (created when not given); bf16 (CUDA or CPU) needs no
    scaler. fp16 is refused on CPU: use bf16 there.

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
        )
        if grad_scaler is None and precision == torch.float16:
            grad_scaler = torch.amp.GradScaler(device_type)
        self.grad_scaler = grad_scaler
        self.precision = precision
        self.log_grad_scaler = log_grad_scaler
        self._device_type = device_type

    def run_step(self) -> None:
        """One mixed-precision iteration (see :class:`SimpleTrainer`)."""
        self._check_training_mode()
        data, data_time = self._next_batch()
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.amp.autocast(device_type=self._device_type, dtype=self.precision):
            loss_dict, losses = self._as_loss_dict(self.model(data))
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        scaler = self.grad_scaler
        if scaler is not None:
            scaler.scale(losses).backward()
        else:
            losses.backward()
        if (
            self.log_grad_scaler
            and scaler is not None
            and (self.iter + 1) % self.gather_metric_period == 0
        ):
            # the scale as a tensor copy (updated in place later): no sync here
            get_event_storage().put_scalar("[metric]grad_scaler", self._scale_tensor(scaler))
        self.after_backward()
        self._record_metrics(loss_dict, data_time)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
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
