"""The checkpointing hooks: :class:`PeriodicCheckpointer` (the trainer's full state, for resuming)
and :class:`BestCheckpointer` (a side copy of the best model). Re-exported by
:mod:`d2engine.engine.hooks`.

What a trainer checkpoint holds and how a run resumes from it: ``docs/resume.md``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from torch import nn

from d2engine.checkpoint import Checkpointer, file_io
from d2engine.checkpoint import PeriodicCheckpointer as _PeriodicCheckpointer
from d2engine.checkpoint.interop import as_checkpointer
from d2engine.engine.train_loop import HookBase
from d2engine.utils import comm

__all__ = ["BestCheckpointer", "PeriodicCheckpointer", "warn_if_saved_before"]

logger = logging.getLogger(__name__)


def _is_periodic_eval_step(period: int, trainer: Any) -> bool:
    """Whether a periodic evaluation runs after this step (the last one runs in after_train).

    EvalHook's schedule, which BestCheckpointer follows (hooks imports it from here).
    """
    next_iter = trainer.iter + 1
    return period > 0 and next_iter % period == 0 and next_iter != trainer.max_iter


class PeriodicCheckpointer(_PeriodicCheckpointer, HookBase):
    """Save the trainer's checkpoint every ``period`` iterations, after the last one, when
    training is stopped early, and on preemption.

    :class:`d2engine.checkpoint.PeriodicCheckpointer` as a hook: ``before_train`` takes
    ``max_iter`` from the trainer when it was not given; ``after_step`` calls
    ``step(trainer.iter)`` (``{file_prefix}_{iter:07d}.pth`` when ``(iter + 1) % period == 0``,
    ``{file_prefix}_final.pth`` after the last iteration); ``after_train`` writes
    ``{file_prefix}_final.pth`` when training ended early on ``trainer.request_stop`` (e.g.
    early stopping: a requested stop ends training; not after a failure or a preemption), then
    waits for pending asynchronous saves. When training stops for a preemption signal the trainer
    calls :meth:`save_for_preemption`.

    A run resumed when it had already finished its iterations (killed after the last periodic
    checkpoint, before the final one: ``start_iter >= max_iter``) still gets its final file:
    ``after_train`` then writes ``{file_prefix}_final.pth`` from the state it resumed (unless it
    resumed from that very file) and logs that it did. The files hold what the checkpointer's
    checkpointables hold: register the trainer as one (``Checkpointer(model, dir,
    trainer=trainer)``, as DefaultTrainer does) for exact resume.

    Register it on every rank of a multi-process job: only the checkpointer's main process writes,
    but before each save every rank gathers the checkpointables' cross-rank state
    (:meth:`~d2engine.checkpoint.Checkpointer.gather_states`: the ranks' RNG states), unless the
    trainer found that the ranks' checkpoint hooks differ (``trainer.preemption.collective_saves``).

    State: the periodic files kept for ``max_to_keep`` (see the base class).

    Any checkpointer with fvcore's interface works too (``fvcore.common.checkpoint.Checkpointer``
    and its subclasses, as detectron2's code passes them); it then saves synchronously and has no
    cross-rank state to gather (see :mod:`d2engine.checkpoint.interop`).

    Args:
        checkpointer: the checkpointer that writes the files.
        period: save every this many iterations.
        max_iter: the last iteration + 1 (None: the trainer's ``max_iter``).
        max_to_keep: keep at most this many periodic files (None: all).
        file_prefix: the file name prefix.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        period: int,
        max_iter: int | None = None,
        max_to_keep: int | None = None,
        file_prefix: str = "model",
    ) -> None:
        super().__init__(checkpointer, period, max_iter, max_to_keep, file_prefix)
        self._max_iter_given = max_iter is not None
        self._saved: tuple[int, str] | None = None  # the last iteration saved, and its file

    def before_train(self) -> None:
        if not self._max_iter_given:
            self.max_iter = self.trainer.max_iter
        self._saved = None

    def after_step(self) -> None:
        self.step(self.trainer.iter)

    def save(self, name: str, **kwargs: Any) -> None:
        """Check the losses not read yet and gather the cross-rank state, then save (every save
        of the hook comes here).

        Args:
            name: the file name without ``.pth``.
            kwargs: more entries for the checkpoint.

        Raises:
            FloatingPointError: a loss since the last read is not finite: nothing is saved.
        """
        if self.trainer.preemption.collective_saves:
            # Collectives: every rank saves at the same points. No checkpoint of the weights a
            # non-finite loss produced (trainer.flush_metrics raises).
            self.trainer.flush_metrics()
            self.checkpointer.gather_states()
        super().save(name, **kwargs)
        self._saved = (self.trainer.iter, self.checkpointer.checkpoint_path(name))

    def save_for_preemption(self) -> str:
        """Save ``{file_prefix}_{iter:07d}`` now (unless this iteration was just saved) and wait.

        Called by the trainer on every rank when it stops for a preemption signal. The file
        counts as a periodic one for ``max_to_keep``.

        Returns:
            The path of the complete checkpoint of this iteration, or ``""`` on a process that
            does not write.
        """
        it = self.trainer.iter
        if self._saved is None or self._saved[0] != it:
            self._save_periodic(it)
        self.checkpointer.wait()
        return self._saved[1] if self._saved and self.checkpointer.writes else ""

    def after_train(self) -> None:
        trainer = self.trainer
        if trainer.stop_reason is not None and not trainer.preempted:
            # A requested stop (e.g. early stopping) ends training: save it as the final model.
            # Preemption saved its own checkpoint; a failure (stop_reason None) saves nothing.
            self.save(f"{self.file_prefix}_final", iteration=trainer.iter)
            self.checkpointer.wait()
            return
        if not self._final_is_missing():
            self.checkpointer.wait()
            return
        name = f"{self.file_prefix}_final"
        last_done = trainer.start_iter - 1  # the iteration of the checkpoint it resumed from
        iteration, trainer.iter = trainer.iter, last_done  # save the state as of that iteration
        try:
            self.save(name, iteration=last_done)
        finally:
            trainer.iter = iteration
        self.checkpointer.wait()
        logger.info(
            "Training was already complete (resumed after iteration %d, max_iter %d): wrote the "
            "missing final checkpoint %s.",
            last_done,
            self.max_iter,
            self.checkpointer.checkpoint_path(name),
        )

    def _final_is_missing(self) -> bool:
        """Whether this run resumed a finished run whose final file was never written."""
        trainer = self.trainer
        if self.max_iter is None or not trainer.completed or self._saved is not None:
            return False
        if not 0 < self.max_iter <= trainer.start_iter:
            return False  # iterations ran (and saved the final file), or nothing to finish
        resumed = self.checkpointer.resumed_from.rsplit("/", 1)[-1]  # a path or a URL
        final = f"{self.file_prefix}_final"
        return resumed not in (f"{final}.pth", final)  # a file, or a sharded directory


def warn_if_saved_before(hook: HookBase, what: str) -> None:
    """Warn when a :class:`PeriodicCheckpointer` runs before ``hook`` in each iteration.

    For hooks whose state changes in ``after_step`` (an EMA update, an early-stopping count): a
    checkpoint written before them holds the state of the previous iteration, so a run resumed
    from it would miss this iteration's change. Call it from ``before_train``.

    Args:
        hook: a registered hook.
        what: the state at stake, for the message.
    """
    hooks = list(hook.trainer._hooks)
    position = next((i for i, h in enumerate(hooks) if h is hook), len(hooks))
    if any(isinstance(h, PeriodicCheckpointer) for h in hooks[:position]):
        logger.warning(
            "%s is registered after the PeriodicCheckpointer hook: a checkpoint does not hold "
            "%s of its own iteration, so a run resumed from it is not exact. HINT: register %s "
            "before the PeriodicCheckpointer.",
            type(hook).__name__,
            what,
            type(hook).__name__,
        )


class BestCheckpointer(HookBase):
    """Save the model as ``{file_prefix}.pth`` whenever ``val_metric`` reaches a new best.

    Runs on EvalHook's schedule (after every ``eval_period``-th iteration except the last, and in
    ``after_train`` when training completed): register it after the EvalHook. It reads the latest
    value of ``val_metric`` from the event storage; a missing metric is a warning, a NaN or
    infinite value is never the best, and only a strict improvement saves. The file is written with
    ``save_untagged``, so ``last_checkpoint`` keeps pointing to the latest checkpoint; a small
    ``{file_prefix}.json`` next to it records the metric, its value and iteration. A checkpointer
    with fvcore's interface works too: its save moves ``last_checkpoint``, which is then put back
    (see :mod:`d2engine.checkpoint.interop`). With a sharded (FSDP) model the checkpoint is a
    directory written by every rank: register the hook on every rank; they all follow the main
    process's value of the metric.

    State: the best value and its iteration. A resumed run therefore never replaces a better model
    by a worse one; when resumed (``start_iter > 0``) it also reads ``{file_prefix}.json``, which
    covers a best found after the checkpoint it resumed from was written.

    Args:
        eval_period: the EvalHook's period.
        checkpointer: the checkpointer that writes the file (its main process writes).
        val_metric: the name of the metric in the storage, e.g. ``"accuracy/top1"``.
        mode: ``"max"`` (higher is better) or ``"min"``.
        file_prefix: the file name without extension.

    Raises:
        ValueError: if ``mode`` is neither "max" nor "min".
    """

    def __init__(
        self,
        eval_period: int,
        checkpointer: Checkpointer,
        val_metric: str,
        mode: str = "max",
        file_prefix: str = "model_best",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"BestCheckpointer mode must be 'max' or 'min', got {mode!r}.")
        self._period = eval_period
        self._val_metric = val_metric
        self._mode = mode
        self.checkpointer = as_checkpointer(checkpointer)
        self._file_prefix = file_prefix
        self.best_metric: float | None = None
        self.best_iter: int | None = None

    def _better(self, value: float, best: float) -> bool:
        return value > best if self._mode == "max" else value < best

    def _record_path(self) -> str:
        return file_io.join(self.checkpointer.save_dir, f"{self._file_prefix}.json")

    def before_train(self) -> None:
        if self.trainer.start_iter <= 0 or not self.checkpointer.writes:
            return
        path = self._record_path()
        try:
            record = json.loads(file_io.read_text(path))
            value, it = float(record["value"]), int(record["iteration"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("Ignoring the unreadable best-model record %s: %s", path, e)
            return
        usable = record.get("metric") == self._val_metric and math.isfinite(value)
        if usable and (self.best_metric is None or self._better(value, self.best_metric)):
            self.best_metric, self.best_iter = value, it

    def _best_checking(self) -> None:
        latest = self.trainer.storage.latest().get(self._val_metric)
        model = getattr(self.checkpointer, "model", None)
        if isinstance(model, nn.Module) and comm.is_sharded_module(model):
            # Saving a sharded model is a collective: every rank decides as the main process,
            # which may be the only one with the evaluation results.
            latest = comm.all_gather(latest)[0]
        if latest is None:
            # Only the writing process warns: others may not receive the evaluation results.
            log = logger.warning if self.checkpointer.writes else logger.debug
            log(
                "BestCheckpointer: the metric '%s' is not in the event storage; no best "
                "checkpoint saved. HINT: register BestCheckpointer after the EvalHook that "
                "computes it, and check its name.",
                self._val_metric,
            )
            return
        value, metric_iter = float(latest[0]), int(latest[1])
        if not math.isfinite(value):
            logger.warning(
                "BestCheckpointer: %s = %s is not finite; never the best.", self._val_metric, value
            )
            return
        if self.best_metric is not None and not self._better(value, self.best_metric):
            logger.info(
                "Not saving: %s = %.5f is not better than the best %.5f at iteration %d.",
                self._val_metric,
                value,
                self.best_metric,
                self.best_iter,
            )
            return
        previous = self.best_metric
        self.best_metric, self.best_iter = value, metric_iter
        self.checkpointer.save_untagged(self._file_prefix, iteration=metric_iter)
        if self.checkpointer.writes:
            self.checkpointer.wait()  # the record names a complete file
            record = {"metric": self._val_metric, "value": value, "iteration": metric_iter}
            file_io.atomic_write_text(self._record_path(), json.dumps(record))
        logger.info(
            "Saved the best model: %s = %.5f at iteration %d (previous best: %s).",
            self._val_metric,
            value,
            metric_iter,
            "none" if previous is None else f"{previous:.5f}",
        )

    def after_step(self) -> None:
        if _is_periodic_eval_step(self._period, self.trainer):  # EvalHook's schedule
            self._best_checking()

    def after_train(self) -> None:
        if self.trainer.completed:  # not after a failure or an early stop
            self._best_checking()

    def state_dict(self) -> dict[str, Any]:
        """``{"best_metric", "best_iter"}`` once a best exists (``{}`` before)."""
        if self.best_metric is None:
            return {}
        return {"best_metric": self.best_metric, "best_iter": self.best_iter}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best value (a better one already known is kept)."""
        value = state_dict.get("best_metric")
        if value is None:
            return
        if self.best_metric is None or self._better(float(value), self.best_metric):
            self.best_metric = float(value)
            self.best_iter = state_dict.get("best_iter")
