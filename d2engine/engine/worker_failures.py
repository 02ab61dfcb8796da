"""How :func:`~d2engine.engine.launch.launch` reports and ends the workers of a failed job.

When a spawned worker raises or dies (a signal, ``os._exit``), the launcher raises
:class:`WorkerError`, whose message names the worker, what happened to it and, where it can, why
(:func:`worker_error`); the other workers are ended (:func:`terminate`: SIGTERM, then SIGKILL after
a grace period).

Hangs (``docs/distributed.md`` tells the whole story): when a worker's hang watchdog ended it
(:class:`~d2engine.engine.watchdog.HangWatchdog`, exit code
:data:`~d2engine.utils.watchdog.HANG_EXIT_CODE`), the launcher first gives the other workers'
watchdogs time to report; when a worker's collective (or the rendezvous) timed out, or after that
wait, it logs the Python stack of every worker still running (they write it on
:data:`~d2engine.utils.watchdog.STACK_DUMP_SIGNAL`) before ending them (:func:`end_hung_workers`).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from d2engine.engine.launch_worker import Job
from d2engine.utils.watchdog import (
    HANG_EXIT_CODE,
    STACK_DUMP_SIGNAL,
    is_timeout_error,
    request_stack_dumps,
)

__all__ = ["WorkerError", "end_hung_workers", "pending_traceback", "terminate", "worker_error"]

logger = logging.getLogger(__name__)

_TERMINATE_GRACE_S = 5.0
"""Seconds a worker gets to exit after SIGTERM before it is killed."""

_HANG_PEER_WAIT_S = 15.0
"""Seconds the launcher waits, after a worker's hang watchdog ended it, for the other workers'
watchdogs to report and end them (they stall too, and fire within a few seconds)."""


class WorkerError(RuntimeError):
    """A worker process started by :func:`~d2engine.engine.launch.launch` raised or died.

    Attributes:
        global_rank: the global rank of the failed worker.
        local_rank: its rank on this machine.
        exitcode: its exit code (negative: the number of the signal that killed it; ``n`` for
            a worker that ended with ``SystemExit(n)``, also when its traceback arrived before it
            exited; never ``PREEMPTION_EXIT_CODE``, which is not a failure), or ``None`` when it
            reported an exception before exiting.
        worker_traceback: the formatted traceback of the worker's exception ("" if it died without
            one).
    """

    def __init__(
        self,
        message: str,
        *,
        global_rank: int,
        local_rank: int,
        exitcode: int | None,
        worker_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.global_rank = global_rank
        self.local_rank = local_rank
        self.exitcode = exitcode
        self.worker_traceback = worker_traceback


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def terminate(processes: Sequence[Any]) -> None:
    """SIGTERM every live worker, then SIGKILL those still alive after a grace period.

    Args:
        processes: the ``multiprocessing`` processes of the workers (also those that ended).
    """
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    for proc in processes:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            proc.join()


def worker_error(job: Job, local_rank: int, exitcode: int | None, tb: str) -> WorkerError:
    """The error that reports the failure of worker ``local_rank``, with a hint where one helps.

    Args:
        job: the job of the worker.
        local_rank: its rank on this machine.
        exitcode: its exit code, or None when it reported an exception before exiting.
        tb: the traceback it sent ("" if none).

    Returns:
        The error, for the launcher to raise.
    """
    rank = job.global_rank(local_rank)
    what = "raised an exception" if tb else _describe_exit(exitcode or 0)
    message = f"Worker {rank} (local rank {local_rank}) of the job {what}."
    if tb:
        message += f" Its traceback:\n\n{tb}"
        if is_timeout_error(tb):
            message += (
                f"\nHINT: a collective (or the rendezvous) timed out after {job.timeout} (launch's "
                "timeout): another rank did not take part. The Python stacks of the workers "
                "still running were logged above; the one that is not waiting for the others "
                "is the one that stopped."
            )
    elif exitcode == HANG_EXIT_CODE:
        message += (
            " Its hang watchdog ended it: it made no training progress for the hang timeout. "
            "The watchdogs' reports above name the rank(s), the iteration and where each one "
            "was, with their Python stacks."
        )
    elif exitcode is not None and exitcode > 0:
        message += " Its output above may say why."
    elif exitcode == -signal.SIGKILL:
        message += " HINT: the kernel's out-of-memory killer sends SIGKILL."
    return WorkerError(
        message, global_rank=rank, local_rank=local_rank, exitcode=exitcode, worker_traceback=tb
    )


def pending_traceback(readers: dict[Connection, int], local_rank: int) -> str:
    """The traceback that worker ``local_rank`` sent before it exited, or "".

    Args:
        readers: the launcher's ends of the workers' error pipes, with their local ranks.
        local_rank: the worker.

    Returns:
        The traceback, or "" when it sent none.
    """
    for reader, i in list(readers.items()):
        if i == local_rank and reader.poll():
            try:
                return str(reader.recv()[0])
            except EOFError:  # it died without reporting (a signal, os._exit)
                pass
    return ""


def end_hung_workers(failure: WorkerError, running: dict[Any, tuple[int, Any]], job: Job) -> None:
    """After a hang, log the Python stacks of the other workers still running and kill them.

    A hang: ``failure`` is a watchdog's exit (then the other workers' watchdogs first get
    ``_HANG_PEER_WAIT_S`` to report and exit) or a timeout error. Those still running then are
    stuck (a SIGTERM would wait in vain), so they are killed after their dump.

    Args:
        failure: the first failure of the job.
        running: the workers not yet reaped (sentinel -> (local rank, process)); updated.
        job: the job.
    """
    if failure.exitcode == HANG_EXIT_CODE:
        deadline = time.monotonic() + _HANG_PEER_WAIT_S
        while running and time.monotonic() < deadline:
            for sentinel in wait(list(running), timeout=max(0.0, deadline - time.monotonic())):
                running.pop(sentinel)[1].join()
    elif not is_timeout_error(failure.worker_traceback):
        return
    stuck = sorted(
        (i, proc) for i, proc in running.values() if i != failure.local_rank and proc.is_alive()
    )
    stacks = request_stack_dumps([(proc.pid, job.stack_file(i)) for i, proc in stuck])
    for (i, proc), text in zip(stuck, stacks):
        proc.kill()
        logger.error(
            "Python stacks of worker %d (pid %d), still running when worker %d failed "
            "(dumped on %s, then killed):\n%s",
            job.global_rank(i),
            proc.pid,
            failure.global_rank,
            signal.Signals(STACK_DUMP_SIGNAL).name,
            text.rstrip() or "(it wrote nothing)",
        )
