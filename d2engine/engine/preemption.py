"""Preemption: on a signal, stop training with a checkpoint so that the job can be requeued.

:class:`Preemption` is the part of a trainer (``trainer.preemption``) that handles it; how a
preempted job behaves, and how to requeue it, is told in ``docs/resume.md`` ("Preemption").
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from d2engine.utils import comm
from d2engine.utils.validation import check_positive_int

__all__ = [
    "PREEMPTION_EXIT_CODE",
    "CheckpointHook",
    "Preemption",
    "preempted_signal",
    "preemption_attribute",
    "preemption_handlers",
    "preemption_signal_to_stop_on",
    "record_preemption",
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


@runtime_checkable
class CheckpointHook(Protocol):
    """A hook that writes the trainer's checkpoints (the ``PeriodicCheckpointer`` hook).

    When training stops for a preemption signal, :meth:`Preemption.stop` calls
    :meth:`save_for_preemption` on every rank.
    """

    def save_for_preemption(self) -> str:
        """Save a checkpoint of the current iteration now, wait until it is complete and return
        its path (``""`` on a process that does not write)."""
        ...


class Preemption:
    """The preemption handling of a trainer: its signals, their flag, the ranks' agreement on when
    to stop, and the stop step.

    While :meth:`watch` is active (during ``train()``, in the main thread) the signals only set a
    flag. After each iteration the trainer asks :meth:`should_stop`; a single process answers with
    its flag, a multi-process job combines the ranks' flags every ``check_period`` iterations (one
    small ``all_gather``; no collective in between), so every rank stops at the same iteration,
    at most ``check_period`` iterations after the signal. Then :meth:`stop` saves the checkpoint
    through every :class:`CheckpointHook` and returns the reason and note the trainer stops with
    (``trainer.request_stop``). Nothing is checked during the last iteration: training completes
    anyway. How a preempted job is requeued: ``docs/resume.md``.

    Saving is a collective (the ranks' RNG states are gathered), so :meth:`watch` also checks, once
    per ``train()``, that every rank registered the same checkpoint hooks; when they differ it warns
    and :attr:`collective_saves` is False (the hooks then save without gathering).

    Args:
        signals: the signals that stop training with a checkpoint (empty: none are caught). Give
            every rank the same.
        check_period: in a multi-process job, combine the ranks' flags every this many iterations.
            Lower it when iterations are slow compared with the scheduler's grace period.

    Attributes:
        signal: the signal the last watched run stopped for, or None.
        collective_saves: whether the checkpoint hooks may gather state across ranks when saving.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), check_period: int = 10) -> None:
        self.signals = signals  # the setter makes a tuple
        self.check_period = check_period
        self.signal: int | None = None
        self.collective_saves = True
        self._received: int | None = None
        self._hooks: list[CheckpointHook] = []

    @property
    def preempted(self) -> bool:
        """Whether the last watched run stopped for a signal."""
        return self.signal is not None

    @property
    def signals(self) -> tuple[int, ...]:
        """The signals that stop training with a checkpoint (set from any iterable)."""
        return self._signals

    @signals.setter
    def signals(self, value: Iterable[int]) -> None:
        self._signals = tuple(value)

    @property
    def check_period(self) -> int:
        """Combine the ranks' flags every this many iterations (a positive int)."""
        return self._check_period

    @check_period.setter
    def check_period(self, value: int) -> None:
        self._check_period = check_positive_int(value, "check_period", "Preemption")

    @contextlib.contextmanager
    def watch(self, hooks: Sequence[Any]) -> Iterator[None]:
        """Handle preemption for one training run (the trainer wraps ``train()`` in it).

        Clears :attr:`signal`, checks that the ranks' checkpoint hooks agree (a collective in a
        multi-process job), and catches the signals until the block ends; the previous handlers
        are restored then. A signal that arrived too late to stop training is a warning.

        Args:
            hooks: the trainer's hooks; the :class:`CheckpointHook` ones save at a stop.

        Yields:
            None, while the signals are caught.
        """
        self.signal = self._received = None
        self._hooks = [h for h in hooks if isinstance(h, CheckpointHook)]
        self.collective_saves = self._hooks_agree()
        try:
            with preemption_handlers(self.signals, self._on_signal):
                yield
        finally:
            self._hooks = []
        if self._received is not None and self.signal is None:
            logger.warning(
                "Received signal %d too late to stop training early (during the last "
                "iteration or after the last preemption check); training completed.",
                self._received,
            )

    def _on_signal(self, signum: int) -> None:
        self._received = signum  # in a signal handler: only set a flag

    def _hooks_agree(self) -> bool:
        if comm.get_world_size() == 1:
            return True
        names = [type(h).__qualname__ for h in self._hooks]
        all_names = comm.all_gather(names)
        if any(n != all_names[0] for n in all_names):
            logger.warning(
                "The checkpoint hooks differ between ranks (%s): the other ranks' RNG states "
                "cannot be gathered into the checkpoints, so a resumed run is not exact on them. "
                "HINT: register PeriodicCheckpointer on every rank (it writes on the main "
                "process only).",
                all_names,
            )
            return False
        return True

    def should_stop(self, iteration: int, max_iter: int) -> bool:
        """Whether training stops after ``iteration`` for a signal; the same answer on every rank.

        Call it on every rank after each iteration (a collective every ``check_period``
        iterations in a multi-process job).

        Args:
            iteration: the iteration just finished.
            max_iter: the end of training (exclusive).

        Returns:
            True when :meth:`stop` should be called now.
        """
        if not self.signals or iteration >= max_iter - 1:
            return False
        self.signal = preemption_signal_to_stop_on(self._received, iteration, self.check_period)
        return self.signal is not None

    def stop(self, iteration: int) -> tuple[str, str]:
        """Save the checkpoint of ``iteration`` through the checkpoint hooks and record the stop.

        Call it on every rank when :meth:`should_stop` said so. It returns once every rank's
        checkpoint is complete, and records the signal for :func:`preempted_signal`.

        Args:
            iteration: the last finished iteration.

        Returns:
            The reason (``"Preempted by SIGTERM"``) and a note for the trainer's log line (where
            the checkpoint is, the exit code, the iteration a resumed run starts at).
        """
        if self.signal is None:
            raise RuntimeError(
                "Preemption.stop() was called but no signal was agreed on. HINT: call it only "
                "when should_stop() returned True."
            )
        written = [path for path in (h.save_for_preemption() for h in self._hooks) if path]
        comm.synchronize()  # no rank leaves before the checkpoint is complete
        record_preemption(self.signal)
        where = (
            f"checkpoint saved to {', '.join(written)}"
            if written
            else "no checkpoint written here (no PeriodicCheckpointer hook on this process)"
        )
        return f"Preempted by {signal_name(self.signal)}", (
            f"{where}. Exit with code {PREEMPTION_EXIT_CODE} to have the job requeued; it resumes "
            f"at iteration {iteration + 1}."
        )


def preemption_attribute(name: str) -> Any:
    """A trainer property that reads and sets ``trainer.preemption.<name>``.

    It keeps the trainer attributes that predate :class:`Preemption` (``preempted``,
    ``preemption_signal``, ``preemption_signals``, ``preemption_check_period``) working.

    Args:
        name: the attribute of :class:`Preemption`.

    Returns:
        A ``property``.
    """

    def get(trainer: Any) -> Any:
        return getattr(trainer.preemption, name)

    def set_(trainer: Any, value: Any) -> None:
        setattr(trainer.preemption, name, value)

    return property(get, set_, doc=f"``trainer.preemption.{name}``.")


def record_preemption(signum: int | None) -> None:
    """Record, for this process, that training stopped for preemption (None clears the record).

    :meth:`Preemption.stop` calls it, so that code which did not see the trainer (``launch``'s
    worker wrapper) can turn a preempted run into :data:`PREEMPTION_EXIT_CODE`.

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
    """Whether ``hook`` writes checkpoints: it is a :class:`CheckpointHook`.

    Args:
        hook: a trainer hook.

    Returns:
        True for checkpointing hooks.
    """
    return isinstance(hook, CheckpointHook)


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
