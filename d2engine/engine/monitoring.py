"""Hooks that show a person how training goes: a live progress bar and loss-curve plots.

:class:`ProgressBar` draws one tqdm bar on the console; :class:`PlotCurves` draws
``curves.png`` from ``metrics.json``. Both run on the main process only and add no host-device
synchronisation: the bar reads the storage on the iterations the event writers read it, and the
curves are drawn only after evaluations and after training. Re-exported by
:mod:`d2engine.engine.hooks`.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from typing import Any

from d2engine.engine.checkpoint_hooks import _is_periodic_eval_step
from d2engine.engine.train_loop import HookBase
from d2engine.utils import comm
from d2engine.utils.events import EventStorage
from d2engine.utils.plotting import plot_metrics, plotting_available
from d2engine.utils.progress import console_logs_above_bars, progress_bar, progress_bar_enabled
from d2engine.utils.validation import check_non_negative_int, check_positive_int

__all__ = ["PlotCurves", "ProgressBar"]

logger = logging.getLogger(__name__)


class ProgressBar(HookBase):
    """Show a live bar on the console: iteration / max, it/s, elapsed, ETA, loss and LR.

    ``before_train`` opens the bar at ``start_iter`` of ``max_iter`` (so a resumed run shows the
    right ETA) and makes console log lines print above it (files still get every line);
    ``after_step`` advances it by one (tqdm redraws it at most twice a second) and, every
    ``period`` iterations and after the last one, shows ``total_loss`` (the median over
    ``window_size`` iterations, as the console writer prints it) and the latest ``lr``; after the
    last iteration the bar is closed, full; ``after_train`` closes it when training ended early
    or failed, and gives the console its log handlers back. Use the :class:`PeriodicWriter`'s
    period: the values are then read on the iterations the writers read them, so the bar adds no
    host-device synchronisation.

    The bar is drawn only where a person watches (see
    :func:`~d2engine.utils.progress.progress_bar_enabled`): ``enabled``, the main process,
    ``sys.stderr`` a terminal and ``D2ENGINE_PROGRESS`` not ``0``. Otherwise the hook implements
    no stage and costs nothing. Stateless.

    Args:
        period: read the loss and LR every this many iterations.
        window_size: the smoothing window of ``total_loss``.
        enabled: False turns the bar off (e.g. ``cfg.OUTPUT.PROGRESS_BAR``).

    Raises:
        ValueError: ``period`` or ``window_size`` is not a positive integer.
    """

    def __init__(self, period: int = 20, window_size: int = 20, enabled: bool = True) -> None:
        self._period = check_positive_int(period, "period", "ProgressBar")
        self._window_size = check_positive_int(window_size, "window_size", "ProgressBar")
        self.enabled = progress_bar_enabled(enabled)
        self._bar: Any = None
        self._stack: ExitStack | None = None
        self._storage: EventStorage | None = None

    def implements(self, stage: str) -> bool:
        """The bar's stages when it is drawn; none otherwise."""
        return self.enabled and stage in ("before_train", "after_step", "after_train")

    def before_train(self) -> None:
        trainer = self.trainer
        self._storage = trainer.storage
        self._stack = ExitStack()
        self._stack.enter_context(console_logs_above_bars())
        self._bar = progress_bar(
            total=trainer.max_iter, initial=trainer.start_iter, desc="train", unit="it"
        )

    def after_step(self) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.update(1)
        it = self.trainer.iter
        last = it == self.trainer.max_iter - 1
        if (it + 1) % self._period == 0 or last:
            self._show_metrics()
        if last:  # the bar ends at max_iter, before the final evaluation (which has its own)
            bar.close()
            self._bar = None

    def _show_metrics(self) -> None:
        storage = self._storage
        assert storage is not None  # set in before_train
        histories = storage.histories()
        postfix = {}
        if "total_loss" in histories:  # the median the writers of this period computed
            postfix["loss"] = f"{histories['total_loss'].median_within(self._window_size):.4g}"
        if "lr" in histories:
            postfix["lr"] = f"{histories['lr'].latest():.3g}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def after_train(self) -> None:
        try:
            if self._bar is not None:
                self._bar.close()
        finally:
            self._bar = None
            self._storage = None
            if self._stack is not None:
                self._stack.close()
                self._stack = None


class PlotCurves(HookBase):
    """Draw ``curves.png`` from ``metrics.json`` after each evaluation and after training.

    ``after_step``: after an evaluation iteration (every ``eval_period`` iterations, EvalHook's
    schedule), the curves are drawn at the first iteration the event writers write
    (every ``write_period`` iterations and the last one), so that ``metrics.json`` holds the
    evaluation's results. ``after_train`` draws them once more (register this hook after the
    :class:`PeriodicWriter`, whose final write comes first). Only on the main process. Nothing is
    done per iteration but a counter check; a drawing takes about a second (see
    :func:`d2engine.utils.plotting.plot_metrics`).

    Without matplotlib, ``before_train`` logs once how to install it
    (``pip install 'd2engine[plot]'``) and nothing is drawn; a missing or empty
    ``metrics.json`` is skipped. Stateless.

    Args:
        metrics_file: the ``metrics.json`` written by a :class:`~d2engine.utils.events.JSONWriter`.
        out_file: the PNG to write (replaced atomically).
        eval_period: the evaluation period of the :class:`EvalHook` (0: only after training).
        write_period: the period of the :class:`PeriodicWriter`.

    Raises:
        ValueError: ``eval_period`` is negative or ``write_period`` not positive.
    """

    def __init__(
        self,
        metrics_file: str | os.PathLike[str],
        out_file: str | os.PathLike[str],
        eval_period: int = 0,
        write_period: int = 20,
    ) -> None:
        self._metrics_file = os.fspath(metrics_file)
        self._out_file = os.fspath(out_file)
        self._eval_period = check_non_negative_int(eval_period, "eval_period", "PlotCurves")
        self._write_period = check_positive_int(write_period, "write_period", "PlotCurves")
        self._due = False
        self._available = True

    def implements(self, stage: str) -> bool:
        """Nothing on processes other than the main one."""
        return comm.is_main_process() and super().implements(stage)

    def before_train(self) -> None:
        self._due = False
        self._available = plotting_available()
        if not self._available:
            logger.info(
                "Not drawing %s: matplotlib is not installed. HINT: pip install 'd2engine[plot]'.",
                self._out_file,
            )

    def after_step(self) -> None:
        if not self._available:
            return
        if _is_periodic_eval_step(self._eval_period, self.trainer):
            self._due = True
        it = self.trainer.iter
        if self._due and ((it + 1) % self._write_period == 0 or it == self.trainer.max_iter - 1):
            self._due = False
            self.draw()

    def after_train(self) -> None:
        if self._available:
            self.draw()

    def draw(self) -> None:
        """Draw the curves now (a missing or empty metrics file is skipped with a debug line)."""
        if not os.path.isfile(self._metrics_file) or os.path.getsize(self._metrics_file) == 0:
            logger.debug("No metrics in %s yet: curves not drawn.", self._metrics_file)
            return
        start = time.perf_counter()
        try:
            plot_metrics([self._metrics_file], self._out_file)
        except ValueError as e:  # no plottable values yet
            logger.debug("Curves not drawn: %s", e)
            return
        logger.info("Curves drawn to %s in %.2f s.", self._out_file, time.perf_counter() - start)
