"""The :class:`HangWatchdog` hook: end a training run that stopped making progress, with a report.

The mechanism (the watchdog thread, stack dumps) is :mod:`d2engine.utils.watchdog`; how a hung
job ends, with and without :func:`~d2engine.engine.launch.launch`, is told in
``docs/distributed.md`` ("Hangs").
"""

from __future__ import annotations

from d2engine.engine.train_loop import HookBase
from d2engine.utils.watchdog import ProgressWatchdog, check_hang_timeout

__all__ = ["HangWatchdog"]


class HangWatchdog(HookBase):
    """End the process with a report when an iteration makes no progress for ``timeout`` seconds.

    From ``before_train`` to ``after_train`` a :class:`~d2engine.utils.watchdog.ProgressWatchdog`
    thread samples ``trainer.iter``. When it stays the same for ``timeout`` seconds (and nothing
    called :func:`~d2engine.utils.watchdog.keep_alive`, as evaluation does after each batch), the
    thread logs and writes to stderr the rank, the iteration, where the training thread is and the
    stack of every thread, and ends the process with
    :data:`~d2engine.utils.watchdog.HANG_EXIT_CODE` (124). In a multi-process job every rank stalls
    when one does (the others wait for it in a collective), so every rank's watchdog reports.

    Free per iteration: the hook implements no per-step stage (the trainer does not call it) and the
    thread reads the iteration the loop writes anyway. ``timeout`` must exceed the longest stretch
    without a new iteration: an iteration itself (the first one includes ``torch.compile``), a
    checkpoint save, an evaluator's final computation. Register it first: its ``after_train`` then
    stops the thread before another hook's ``after_train`` can fail (the final evaluation, run by
    ``EvalHook.after_train``, is then not watched; a collective timeout still ends it). Stateless.
    ``DefaultTrainer`` registers it, first, from ``SOLVER.HANG_TIMEOUT``.

    Args:
        timeout: seconds without progress before the process is ended; 0 turns the hook off.
        end_process: end the process (default), or only report (once per stall).
        poll: seconds between samples (default: see ``ProgressWatchdog``).
        grace: seconds between the report and the end (default: see ``ProgressWatchdog``).

    Raises:
        ValueError: if ``timeout`` is negative or not a number.
    """

    def __init__(
        self,
        timeout: float,
        *,
        end_process: bool = True,
        poll: float | None = None,
        grace: float | None = None,
    ) -> None:
        self.timeout = check_hang_timeout(timeout, "HangWatchdog timeout")
        self.end_process = end_process
        self._poll = poll
        self._grace = grace
        self.watchdog: ProgressWatchdog | None = None
        """The watchdog of the current run (None outside ``train()`` or when off)."""

    def before_train(self) -> None:
        if self.timeout == 0:
            return
        trainer = self.trainer  # a weak proxy: the thread must not keep the trainer alive

        def describe() -> str:
            it, last = trainer.iter, trainer.max_iter - 1
            return f"in iteration {it} (this run: iterations {trainer.start_iter} to {last})"

        self.watchdog = ProgressWatchdog(
            self.timeout,
            lambda: trainer.iter,
            describe=describe,
            hint=(
                "HINT: if this rank is only slow (a long checkpoint save or evaluation, the "
                "first iteration's compilation), raise the hang timeout (SOLVER.HANG_TIMEOUT, "
                "or HangWatchdog(timeout=...); 0 turns it off)."
            ),
            end_process=self.end_process,
            poll=self._poll,
            grace=self._grace,
        )
        self.watchdog.start()

    def after_train(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
