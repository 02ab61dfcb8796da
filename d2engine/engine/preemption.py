"""Preemption: stop training with a checkpoint on a signal, then exit so the job is requeued.

While :meth:`~d2engine.engine.train_loop.TrainerBase.train` runs (in the main thread) the signals
in ``trainer.preemption_signals`` (default ``(SIGTERM,)``; add e.g. ``signal.SIGUSR1`` for Slurm's
``--signal``) only set a flag (:func:`preemption_handlers`). After the current iteration (all its
hooks included) the trainer writes a checkpoint through every registered hook with a
``save_for_preemption()`` method (the PeriodicCheckpointer hook: ``{prefix}_{iter:07d}.pth``,
waited for), logs one line, runs the hooks' ``after_train`` and returns with
``trainer.preempted == True`` and ``trainer.preemption_signal`` set. Scripts should then exit with
:data:`PREEMPTION_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later"), as ``d2engine-train`` does,
so that a scheduler can requeue the job; resuming continues bit-identically. The previous signal
handlers are restored when ``train`` returns.

In a multi-process job every rank must stop at the same iteration: the flag is combined over the
ranks (one ``all_gather`` of a small int over gloo, :func:`preemption_signal_to_stop_on`) every
``trainer.preemption_check_period`` iterations (default 10), not every iteration, to keep
collectives out of the hot loop; a signal therefore stops the job within at most that many
iterations. Lower it when iterations are slow compared with the scheduler's grace period. A
single process checks its flag every iteration (a Python attribute read).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from d2engine.utils import comm

__all__ = [
    "PREEMPTION_EXIT_CODE",
    "preempted_signal",
    "record_preemption",
    "preemption_handlers",
    "preemption_signal_to_stop_on",
    "saves_for_preemption",
    "signal_name",
]

PREEMPTION_EXIT_CODE = 75
"""The exit code of a job stopped by a preemption signal after saving a checkpoint (``EX_TEMPFAIL``
of sysexits.h: a temporary failure, "try again later"). ``d2engine-train`` exits with it; make the
scheduler requeue the job on it (e.g. in a Slurm batch script: ``[ $? -eq 75 ] && scontrol
requeue $SLURM_JOB_ID``)."""

logger = logging.getLogger(__name__)

_preempted_by: int | None = None


def record_preemption(signum: int | None) -> None:
    """Record, for this process, that training stopped for preemption (None clears the record).

    Trainers call it when they stop for a signal, so that code which did not see the trainer
    (``launch``'s worker wrapper) can turn a preempted run into :data:`PREEMPTION_EXIT_CODE`.

    Args:
        signum: the signal that stopped training, or None to clear.
    """
    global _preempted_by
    _preempted_by = signum


def preempted_signal() -> int | None:
    """The signal that stopped a training run of this process for preemption, or None."""
    return _preempted_by


@contextlib.contextmanager
def preemption_handlers(
    signals: Iterable[int] | None, on_signal: Callable[[int], None]
) -> Iterator[None]:
    """Within the block, call ``on_signal(signum)`` on each of ``signals``; restore afterwards.

    Handlers can only be installed in the main thread: elsewhere (or without signals) nothing is
    installed. ``on_signal`` runs in a signal handler: it should only set a flag.

    Args:
        signals: the signal numbers to catch (None or empty: none).
        on_signal: called with the signal number when one arrives.

    Yields:
        None, while the handlers are installed.
    """
    signals = tuple(signals or ())
    if not signals:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        logger.info("train() runs outside the main thread: no preemption signal handler installed.")
        yield
        return

    def handler(signum: int, frame: Any) -> None:  # only sets a flag: async-signal-safe
        on_signal(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def preemption_signal_to_stop_on(
    received: int | None, iteration: int, check_period: int
) -> int | None:
    """The signal to stop on after ``iteration``, the same on every rank, or None to go on.

    A single process answers with its own flag. In a multi-process job the ranks' flags are
    combined (a collective: call it on every rank at the same iteration) only after every
    ``check_period``-th iteration; None in between.

    Args:
        received: the signal this process received (None: none).
        iteration: the iteration just finished.
        check_period: combine the ranks' flags every this many iterations.

    Returns:
        A signal number, or None.
    """
    if comm.get_world_size() == 1:
        return received
    if (iteration + 1) % max(1, int(check_period)) != 0:
        return None
    return max(int(x or 0) for x in comm.all_gather(received or 0)) or None


def saves_for_preemption(hook: Any) -> bool:
    """Whether ``hook`` writes checkpoints: it has a ``save_for_preemption()`` method.

    Args:
        hook: a trainer hook.

    Returns:
        True for checkpointing hooks.
    """
    return callable(getattr(hook, "save_for_preemption", None))


def signal_name(signum: int) -> str:
    """The name of a signal number (``"SIGTERM"``), or ``"signal N"`` for an unknown one.

    Args:
        signum: a signal number.

    Returns:
        Its name.
    """
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
