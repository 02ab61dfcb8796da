"""Preemption: on a signal, stop training with a checkpoint so that the job can be requeued.

:class:`Preemption` is the part of a trainer (``trainer.preemption``) that handles it during
``train()``; :func:`preemption_guard` handles the same signals in the rest of a job's main function
(start-up, after training), and :func:`preemption_handlers` is the one mechanism both (and
``launch``, which passes the signals on to its workers) install signal handlers with. How a
preempted job behaves, its exit codes, and how to requeue it: ``docs/resume.md`` ("Preemption").
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
    "INTERRUPT_EXIT_CODE",
    "PREEMPTION_EXIT_CODE",
    "CheckpointHook",
    "JobStopped",
    "Preemption",
    "ignore_until_exit",
    "preempted_signal",
    "preemption_guard",
    "preemption_attribute",
    "preemption_handlers",
    "preemption_signal_to_stop_on",
    "record_preemption",
    "saves_for_preemption",
    "signal_name",
    "stop_exit_code",
]

PREEMPTION_EXIT_CODE = 75
"""The exit code of a job stopped by a preemption signal after saving a checkpoint (``EX_TEMPFAIL``
of sysexits.h: a temporary failure, "try again later"). ``d2engine-train`` exits with it; make the
scheduler requeue the job on it (e.g. in a Slurm batch script: ``[ $? -eq 75 ] && scontrol
requeue $SLURM_JOB_ID``)."""

INTERRUPT_EXIT_CODE = 130
"""The exit code of a job stopped by Ctrl-C (SIGINT) after saving a checkpoint: 128 + SIGINT, the
shell's code for an interrupted command. A scheduler should not requeue it."""

logger = logging.getLogger(__name__)

_preempted_by: int | None = None


def stop_exit_code(signum: int) -> int:
    """The exit code of a job stopped by ``signum``: :data:`INTERRUPT_EXIT_CODE` (130) for SIGINT,
    :data:`PREEMPTION_EXIT_CODE` (75) for the others.

    Args:
        signum: the signal that stopped the job.

    Returns:
        The exit code.
    """
    return INTERRUPT_EXIT_CODE if signum == signal.SIGINT else PREEMPTION_EXIT_CODE


class JobStopped(SystemExit):
    """A signal ended a job's main function outside training (:func:`preemption_guard`).

    A ``SystemExit`` whose ``code`` is :func:`stop_exit_code` of the signal; ``launch`` ends the
    job with that code.

    Args:
        signum: the signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(stop_exit_code(signum))
        self.signum = signum


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
    flag; the first one decides: a repeated signal changes nothing, except that a SIGINT after
    the first signal (a second Ctrl-C) raises ``KeyboardInterrupt`` at once. After each iteration
    the trainer asks :meth:`should_stop`; a single process answers with its flag, a multi-process
    job combines the ranks' flags every ``check_period`` iterations (one small ``all_gather``; no
    collective in between), so every rank stops at the same iteration, at most ``check_period``
    iterations after the signal. Then :meth:`stop` saves the checkpoint
    through every :class:`CheckpointHook` and returns the reason and note the trainer stops with
    (``trainer.request_stop``). Nothing is checked during the last iteration: training completes
    anyway. How a preempted job is requeued: ``docs/resume.md``.

    Saving is a collective (the ranks' RNG states are gathered), so :meth:`watch` also checks, once
    per ``train()``, that every rank registered the same checkpoint hooks; when they differ it warns
    and :attr:`collective_saves` is False (the hooks then save without gathering).

    Args:
        signals: the signals that stop training with a checkpoint (empty: none are caught). Give
            every rank the same. The default catches SIGTERM (preemption: exit code 75) and SIGINT
            (Ctrl-C: exit code 130); leave SIGINT out (``(signal.SIGTERM,)``) for Ctrl-C to
            abort at once, as Python does by default.
        check_period: in a multi-process job, combine the ranks' flags every this many iterations.
            Lower it when iterations are slow compared with the scheduler's grace period.

    Attributes:
        signal: the signal the last watched run stopped for, or None.
        collective_saves: whether the checkpoint hooks may gather state across ranks when saving.
    """

    def __init__(
        self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT), check_period: int = 10
    ) -> None:
        self.signals = signals  # the setter makes a tuple
        self.check_period = check_period
        self.signal: int | None = None
        self.collective_saves = True
        self._received: int | None = None
        self._world_size = 1
        self._hooks: list[CheckpointHook] = []

    @property
    def preempted(self) -> bool:
        """Whether the last watched run stopped for a signal."""
        return self.signal is not None

    @property
    def exit_code(self) -> int | None:
        """The exit code for the last watched run's stop (:func:`stop_exit_code`), or None."""
        return None if self.signal is None else stop_exit_code(self.signal)

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
        self._world_size = comm.get_world_size()
        self._hooks = [h for h in hooks if isinstance(h, CheckpointHook)]
        self.collective_saves = self._hooks_agree()
        try:
            with preemption_handlers(self.signals, self._on_signal, "train()"):
                yield
        finally:
            self._hooks = []
        self._warn_if_received_too_late()

    def _warn_if_received_too_late(self) -> None:
        # Its own method: after watch() reset both to None, mypy would take them as still None.
        if self._received is not None and self.signal is None:
            logger.warning(
                "Received signal %d too late to stop training early (during the last "
                "iteration or after the last preemption check); training completed.",
                self._received,
            )

    def _on_signal(self, signum: int) -> None:
        # In a signal handler: set a flag. The first signal decides; a second Ctrl-C aborts.
        if self._received is None:
            self._received = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

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
        if self._world_size == 1:  # asked after every iteration: attribute reads only
            if self._received is None or iteration >= max_iter - 1:
                return False
            self.signal = self._received
            return True
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
            The reason (``"Preempted by SIGTERM"``, ``"Interrupted by SIGINT"``) and a note for
            the trainer's log line (where the checkpoint is, the exit code, the iteration a
            resumed run starts at).
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
        if self.signal == signal.SIGINT:
            return "Interrupted by SIGINT", (
                f"{where}. Exit with code {INTERRUPT_EXIT_CODE}; run again with --resume to "
                f"continue at iteration {iteration + 1} (a second Ctrl-C aborts at once)."
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
    """Record, for this process, that the job stopped for a signal (None clears the record).

    :meth:`Preemption.stop` (and :func:`preemption_guard`) call it, so that code which did not see
    the trainer (``launch``'s worker wrapper) can turn a stopped run into its exit code
    (:func:`stop_exit_code`), and so that later signals are ignored.

    Args:
        signum: the signal that stopped training, or None to clear.
    """
    global _preempted_by
    _preempted_by = signum


def preempted_signal() -> int | None:
    """The signal that stopped a training run (or the start-up) of this process, or None."""
    return _preempted_by


@contextlib.contextmanager
def preemption_handlers(
    signals: Iterable[int] | None, on_signal: Callable[[int], None], owner: str = "train()"
) -> Iterator[None]:
    """Within the block, call ``on_signal(signum)`` on each of ``signals``; restore afterwards.

    The one way d2engine installs signal handlers (the trainer's :class:`Preemption`,
    :func:`preemption_guard`, ``launch``'s forwarding to its workers). Handlers can only be
    installed in the main thread: elsewhere (or without signals) nothing is installed.
    ``on_signal`` runs in the main thread between two Python instructions: it should set a flag,
    or raise to abandon what the main thread is doing.

    Args:
        signals: the signal numbers to catch (None or empty: none).
        on_signal: called with the signal number when one arrives.
        owner: who installs them, for the message when it cannot (outside the main thread).

    Yields:
        None, while the handlers are installed.
    """
    signals = tuple(signals or ())
    if not signals:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        logger.info("%s runs outside the main thread: no signal handler installed.", owner)
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        on_signal(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def preemption_guard(signals: Iterable[int]) -> Iterator[None]:
    """Handle the preemption ``signals`` outside ``train()``: in a job's start-up, after training.

    ``launch`` runs the job's main function (and the process group's start-up) inside it. The
    first signal raises :class:`JobStopped` in the main thread: a start-up (building the model,
    loading data, resuming) ends at once with exit code 75, with nothing to save (a checkpoint
    being loaded is left as it is). Once the job stopped for a signal (a trainer saved its
    checkpoint, or the guard fired), further signals are ignored: they do not change the
    outcome. ``train()`` catches the signals itself (:class:`Preemption`) while it runs. SIGINT
    is left to Python (``KeyboardInterrupt``): outside training Ctrl-C aborts at once.

    Args:
        signals: the preemption signals (SIGINT is ignored here).

    Yields:
        None, while the signals are handled.
    """

    def on_signal(signum: int) -> None:
        if preempted_signal() is not None:
            return  # stopping already: the first signal decided the outcome
        record_preemption(signum)
        raise JobStopped(signum)

    with preemption_handlers([s for s in signals if s != signal.SIGINT], on_signal, "launch()"):
        yield


def ignore_until_exit(signals: Iterable[int]) -> None:
    """Ignore ``signals`` (SIGINT excepted) for the rest of this process (main thread only).

    ``launch`` calls it when it ends a stopped job: a repeated preemption signal during the
    interpreter's exit must not turn exit code 75 into a death by that signal.

    Args:
        signals: the preemption signals.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        if sig != signal.SIGINT:
            signal.signal(sig, signal.SIG_IGN)


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
