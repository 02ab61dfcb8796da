"""Hang diagnostics: a progress watchdog that ends a stuck process with a report, and stack dumps.

In a multi-process job one rank that stops (a deadlocked data loader, a lost device, a collective
that only some ranks call) leaves the others waiting in a collective; by default nothing is said
until the collective's timeout (30 minutes), and then only by a waiting rank. Two tools:

* :class:`ProgressWatchdog`, a daemon thread that samples a progress value (the trainer's
  iteration) every ``poll`` seconds. When the value has not changed, and :func:`keep_alive` was not
  called, for ``timeout`` seconds, it logs and writes to stderr a report (the rank, what it was
  doing, where its watched thread is) with the Python stack of every thread, then ends the process
  with :data:`HANG_EXIT_CODE`. The watched code pays nothing per step: the thread reads a value the
  code writes anyway (``trainer.iter``, see :class:`d2engine.engine.watchdog.HangWatchdog`).
* :data:`STACK_DUMP_SIGNAL` (SIGUSR2): after :func:`enable_stack_dumps` the process writes the
  stack of each of its threads when it receives it (``faulthandler``, from C: it works while the
  main thread is blocked in a collective or holds the GIL). :func:`request_stack_dumps` sends it and
  collects what the processes wrote; :func:`d2engine.engine.launch.launch` does so for the workers
  still running when one of them hangs. By hand: ``kill -USR2 <pid>``.

``docs/distributed.md`` ("Hangs") tells how a hung job ends.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import re
import signal
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import IO, Any

import torch

from d2engine.utils import comm

__all__ = [
    "HANG_EXIT_CODE",
    "STACK_DUMP_SIGNAL",
    "ProgressWatchdog",
    "check_hang_timeout",
    "disable_stack_dumps",
    "enable_stack_dumps",
    "format_stacks",
    "is_timeout_error",
    "keep_alive",
    "request_stack_dumps",
]

HANG_EXIT_CODE = 124
"""The exit code of a process ended by its :class:`ProgressWatchdog` (as GNU ``timeout``'s)."""

STACK_DUMP_SIGNAL = signal.SIGUSR2
"""The signal on which a process prepared by :func:`enable_stack_dumps` writes its threads'
stacks. Do not use it as a preemption signal (SIGTERM and SIGUSR1 are the usual ones)."""

logger = logging.getLogger(__name__)

_ACTIVE: tuple[ProgressWatchdog, ...] = ()
"""The watchdogs running in this process (read by :func:`keep_alive`)."""

_lock = threading.Lock()
_dump_file: IO[str] | None = None

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_path("stdlib")) + os.sep
_SITE_DIRS = tuple(
    os.path.abspath(sysconfig.get_path(name)) + os.sep for name in ("purelib", "platlib")
)

_TIMEOUT_MESSAGE = re.compile(r"\btime(d\s*)?[\s-]?out", re.IGNORECASE)


def keep_alive() -> None:
    """Tell the running watchdogs that this process is making progress without finishing a step.

    For long work inside one step, such as an evaluation (``inference_on_dataset`` calls it after
    each batch). Costs an attribute write per running watchdog; nothing when none runs.
    """
    for watchdog in _ACTIVE:
        watchdog._alive = True


def check_hang_timeout(value: Any, what: str) -> float:
    """``value`` as a number of seconds ``>= 0`` (0 turns the watchdog off).

    Args:
        value: the timeout to check.
        what: its name for the error message (e.g. ``"SOLVER.HANG_TIMEOUT"``).

    Returns:
        The timeout as a float.

    Raises:
        ValueError: for a negative, infinite or NaN value, or one that is not a number.
    """
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(
            f"{what} must be a number of seconds >= 0 (0 turns the hang watchdog off), got "
            f"{value!r}. HINT: e.g. {what} = 600 ends a job whose training makes no progress for "
            "10 minutes."
        )
    return seconds


class ProgressWatchdog:
    """A daemon thread that ends this process, with a report, when ``progress()`` stops changing.

    Every ``poll`` seconds the thread calls ``progress()``; when its value has not changed and
    :func:`keep_alive` was not called for ``timeout`` seconds, it fires: it logs (``ERROR``) and
    writes to stderr a report naming the rank, ``describe()``, where the watched thread (the one
    that called :meth:`start`, e.g. the training thread) is — its innermost frame and, when that
    frame is in torch or the standard library, the innermost frame of other code — and the stack
    of every thread, then, after ``grace`` seconds (so that the other ranks' watchdogs, which
    usually fire at the same time, report too), ends the process with :data:`HANG_EXIT_CODE`
    (``os._exit``: a blocked thread cannot be interrupted). With ``end_process=False`` it only
    reports, once per stall. A hang is noticed between ``timeout`` and ``timeout + poll`` seconds
    after the last progress.

    Args:
        timeout: seconds without progress before firing (> 0).
        progress: returns a value that changes while the process makes progress (e.g. the
            iteration); called from the watchdog thread, so it must be cheap and thread-safe (a
            read). An exception from it stops the watchdog.
        describe: returns what the process is doing, for the report (e.g. "in iteration 12").
        what: the kind of progress, for the report ("training").
        hint: appended to the report (how to raise the timeout).
        end_process: end the process after reporting (default), or only report.
        poll: seconds between samples; default ``timeout / 20`` within [0.05, 5].
        grace: seconds between the report and the end; default ``2 * poll`` within [0.5, 10].

    Raises:
        ValueError: if ``timeout`` is not a positive number.
    """

    def __init__(
        self,
        timeout: float,
        progress: Callable[[], object],
        *,
        describe: Callable[[], str] | None = None,
        what: str = "training",
        hint: str = "",
        end_process: bool = True,
        poll: float | None = None,
        grace: float | None = None,
    ) -> None:
        self.timeout = check_hang_timeout(timeout, "ProgressWatchdog timeout")
        if self.timeout == 0:
            raise ValueError(
                "ProgressWatchdog timeout must be > 0. HINT: to turn the watchdog off, do not "
                "create (or start) one."
            )
        self.poll = poll if poll is not None else min(max(self.timeout / 20, 0.05), 5.0)
        self.grace = grace if grace is not None else min(max(2 * self.poll, 0.5), 10.0)
        self.end_process = end_process
        self.fired = 0
        """How many times it fired (reported a stall)."""
        self._progress = progress
        self._describe = describe
        self._what = what
        self._hint = hint
        self._alive = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watched = threading.main_thread()

    def start(self) -> None:
        """Start watching the calling thread (``timeout`` seconds without progress fire it)."""
        global _ACTIVE
        if self._thread is not None:
            return
        self._watched = threading.current_thread()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(self._progress(),), name="d2engine-hang-watchdog", daemon=True
        )
        with _lock:
            _ACTIVE = (*_ACTIVE, self)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and wait for the thread (at most one ``poll``)."""
        global _ACTIVE
        with _lock:
            _ACTIVE = tuple(w for w in _ACTIVE if w is not self)
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            if thread is not threading.current_thread():
                thread.join()

    def _run(self, last: object) -> None:
        since = time.monotonic()
        reported = False
        while not self._stop.wait(self.poll):
            try:
                value = self._progress()
            except Exception:  # e.g. the trainer is gone: nothing left to watch
                return
            now = time.monotonic()
            if value != last or self._alive:
                last, since, reported, self._alive = value, now, False, False
                continue
            if not reported and now - since >= self.timeout:
                reported = True
                self._fire(now - since)

    def _fire(self, stalled: float) -> None:
        self.fired += 1
        world, rank = comm.get_world_size(), comm.get_rank()
        who = f"Rank {rank} of {world}" if world > 1 else "This process"
        doing = f" {self._describe()}" if self._describe is not None else ""
        report = (
            f"Hang watchdog: {who} (pid {os.getpid()}) made no {self._what} progress for "
            f"{stalled:.1f} s (hang timeout {self.timeout:g} s){doing}. Its thread "
            f'"{self._watched.name}" is {_location(self._watched)}.'
        )
        if world > 1:
            report += (
                " The rank that stopped is the one whose training thread is not waiting for the "
                "others (in a collective, or in a backward pass that reduces gradients)."
            )
        if self._hint:
            report += f" {self._hint}"
        stacks = format_stacks(first=self._watched.ident)
        text = f"{report}\nPython stacks of rank {rank} (most recent call last):\n{stacks}"
        logger.error("%s", text)
        if not _logs_to_console(logger):
            _write_stderr(text)
        if not self.end_process:
            return
        time.sleep(self.grace)  # the other ranks' watchdogs report in the meantime
        logger.error("Hang watchdog: ending %s with exit code %d.", who.lower(), HANG_EXIT_CODE)
        _flush_logs()
        os._exit(HANG_EXIT_CODE)


def _logs_to_console(log: logging.Logger) -> bool:
    """Whether an ERROR record of ``log`` reaches stdout or stderr (a handler, or logging's last
    resort when there is no handler at all)."""
    if not log.hasHandlers():
        return logging.lastResort is not None
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    node: logging.Logger | None = log
    while node is not None:
        for handler in node.handlers:
            console = isinstance(handler, logging.StreamHandler) and handler.stream in consoles
            if console and handler.level <= logging.ERROR:
                return True
        node = node.parent if node.propagate else None
    return False


def _write_stderr(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # closed or replaced by something else
        pass


def _flush_logs() -> None:
    for ref in list(getattr(logging, "_handlerList", ())):  # every handler that was created
        handler = ref()
        if handler is not None:
            try:
                handler.flush()
            except Exception:  # a broken handler must not keep the process alive
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def format_stacks(*, first: int | None = None, skip_current: bool = True) -> str:
    """The Python stack of every thread of this process.

    Args:
        first: the id of the thread to put first (default: the main thread).
        skip_current: leave out the calling thread (e.g. the watchdog's own).

    Returns:
        The stacks, each headed by the thread's name, most recent call last.
    """
    names = {t.ident: t.name for t in threading.enumerate()}
    first = threading.main_thread().ident if first is None else first
    current = threading.get_ident()
    frames = sys._current_frames()
    parts = []
    for ident in sorted(frames, key=lambda i: (i != first, i)):
        if skip_current and ident == current:
            continue
        header = f'Thread "{names.get(ident, "?")}" (0x{ident:x}):'
        parts.append(header + "\n" + "".join(traceback.format_stack(frames[ident])))
    return "\n".join(parts)


def _location(thread: threading.Thread) -> str:
    """Where ``thread`` is: its innermost frame and, when that is in torch or the standard
    library, the innermost frame of other code (the caller that matters)."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "gone (it ended)"
    stack = traceback.extract_stack(frame)
    inner = stack[-1]
    where = f"at {inner.filename}:{inner.lineno} in {inner.name}"
    if _is_library(inner.filename):
        for summary in reversed(stack):
            if not _is_library(summary.filename):
                where += f" (called from {summary.filename}:{summary.lineno} in {summary.name})"
                break
    return where


def _is_library(filename: str) -> bool:
    """Whether ``filename`` is part of torch or of Python's standard library."""
    path = os.path.abspath(filename)
    if path.startswith(_TORCH_DIR):
        return True
    return path.startswith(_STDLIB_DIR) and not any(path.startswith(p) for p in _SITE_DIRS)


def enable_stack_dumps(file: IO[str] | None = None) -> None:
    """Make this process write every thread's stack to ``file`` on :data:`STACK_DUMP_SIGNAL`.

    Uses ``faulthandler``, which writes from the signal handler in C: the dump works while the main
    thread is blocked (a collective, a lock) or never releases the GIL. The signal then no longer
    ends the process. A preemption handler installed later for the same signal replaces this one.

    Args:
        file: an open file with a file descriptor, kept open until :func:`disable_stack_dumps`;
            default stderr.
    """
    global _dump_file
    target = file if file is not None else sys.stderr
    try:
        target.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. stderr replaced by an in-memory stream
        target = sys.__stderr__
    if target is None:
        return
    faulthandler.register(STACK_DUMP_SIGNAL, file=target, all_threads=True, chain=False)
    _dump_file = target  # faulthandler writes to its descriptor: keep the file open


def disable_stack_dumps() -> None:
    """Undo :func:`enable_stack_dumps`: the signal has its default effect again."""
    global _dump_file
    faulthandler.unregister(STACK_DUMP_SIGNAL)
    _dump_file = None


def request_stack_dumps(
    targets: Sequence[tuple[int, str]], timeout: float = 3.0, settle: float = 0.1
) -> list[str]:
    """Send :data:`STACK_DUMP_SIGNAL` to processes and read the stacks they write to their files.

    Each process must have called :func:`enable_stack_dumps` with the file given here. A dump is
    complete when its file stopped growing for ``settle`` seconds.

    Args:
        targets: ``(pid, path of the file it dumps to)`` per process.
        timeout: seconds to wait for all of them at most.
        settle: seconds a file must stay the same size to count as written.

    Returns:
        What each process wrote, in the order of ``targets`` ("" if nothing came, e.g. it exited).
    """
    start_sizes = [_size(path) for _, path in targets]
    for pid, _ in targets:
        try:
            os.kill(pid, STACK_DUMP_SIGNAL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    sizes = list(start_sizes)
    stable_since = [time.monotonic()] * len(targets)
    while time.monotonic() < deadline:
        time.sleep(min(settle / 2, 0.05))
        now = time.monotonic()
        done = True
        for i, (_, path) in enumerate(targets):
            size = _size(path)
            if size != sizes[i]:
                sizes[i], stable_since[i] = size, now
            if size == start_sizes[i] or now - stable_since[i] < settle:
                done = False
        if done:
            break
    texts = []
    for (_, path), start in zip(targets, start_sizes):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(start)
                texts.append(f.read())
        except OSError:
            texts.append("")
    return texts


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def is_timeout_error(traceback_text: str) -> bool:
    """Whether a formatted traceback ends with a timeout error (of a collective or a rendezvous).

    gloo: "Timed out waiting 20000ms for recv operation"; NCCL: "... collective operation
    timeout ..."; the store: "Timed out after 91 seconds waiting for clients".

    Args:
        traceback_text: ``traceback.format_exc()`` of the error.

    Returns:
        True when its last line (the exception) speaks of a timeout.
    """
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    return bool(lines) and bool(_TIMEOUT_MESSAGE.search(lines[-1]))
