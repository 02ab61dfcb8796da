"""A single background worker that runs checkpoint writes in order, off the training thread.

Tasks run one at a time in submission order, so a checkpoint file is complete before the
``last_checkpoint`` update and the clean-up queued after it. A task that fails stops the queue:
the tasks queued after it are dropped (an old checkpoint is never deleted after its replacement
failed to write), and the error is raised by the next :meth:`AsyncSaver.submit` or
:meth:`AsyncSaver.wait`. Pending tasks are finished when the interpreter exits (``atexit``).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable

from d2engine.checkpoint.file_io import CheckpointError

__all__ = ["AsyncSaveError", "AsyncSaver"]

logger = logging.getLogger(__name__)

_LIVE_SAVERS: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()


class AsyncSaveError(CheckpointError):
    """A background checkpoint task failed; raised by the next ``save()`` or ``wait()``."""


class AsyncSaver:
    """Runs submitted tasks on one daemon thread, in order.

    Args:
        name: the worker thread's name.
    """

    def __init__(self, name: str = "d2engine-async-checkpoint") -> None:
        self._name = name
        self._queue: queue.Queue[tuple[Callable[[], None] | None, str]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: tuple[str, BaseException] | None = None
        self._pid = os.getpid()
        _LIVE_SAVERS.add(self)

    @property
    def pending(self) -> int:
        """The number of submitted tasks that have not finished."""
        return self._queue.unfinished_tasks

    def submit(self, task: Callable[[], None], description: str) -> None:
        """Queue ``task`` after the tasks already submitted; returns at once.

        Args:
            task: a function without arguments.
            description: what the task does, for error messages (e.g. "write /out/model.pth").

        Raises:
            AsyncSaveError: an earlier task failed.
        """
        self.raise_if_failed()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((task, description))

    def wait(self) -> None:
        """Block until every submitted task has finished.

        Raises:
            AsyncSaveError: a task failed.
        """
        self._queue.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Raise (once) the error of a failed task, if any.

        Raises:
            AsyncSaveError: a task failed; the original exception is its ``__cause__``.
        """
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            description, exc = error
            raise AsyncSaveError(
                f"Asynchronous checkpoint task failed: {description}: {type(exc).__name__}: "
                f"{str(exc).rstrip('.')}. "
                f"Tasks queued after it were dropped; no file was left half-written."
            ) from exc

    def close(self) -> None:
        """Finish the pending tasks and stop the worker thread.

        Raises:
            AsyncSaveError: a task failed.
        """
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put((None, ""))  # stops the worker
            thread.join()
        self.raise_if_failed()

    def _run(self) -> None:
        while True:
            task, description = self._queue.get()
            try:
                if task is None:
                    return
                if self._error is None:
                    task()
            except BaseException as exc:  # noqa: BLE001 - reported by raise_if_failed
                logger.error("Asynchronous checkpoint task failed: %s: %r", description, exc)
                with self._lock:
                    self._error = (description, exc)
            finally:
                self._queue.task_done()


def _finish_pending_saves() -> None:
    for saver in list(_LIVE_SAVERS):
        if saver._pid != os.getpid():
            continue  # a forked child does not own the parent's worker
        try:
            if saver.pending:
                logger.info(
                    "Waiting for %d pending checkpoint task(s) before exit ...", saver.pending
                )
            saver.close()
        except Exception as exc:  # noqa: BLE001 - nothing can be raised at exit
            logger.error("A checkpoint could not be written before exit: %s", exc)


atexit.register(_finish_pending_saves)
