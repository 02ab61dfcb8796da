"""The writers of the event storage: each reads the current
:class:`~d2engine.utils.events.EventStorage` and writes out what was logged.

:class:`EventWriter` is their base class (usually run by the
:class:`~d2engine.engine.hooks.PeriodicWriter` hook); :class:`JSONWriter` writes JSON lines,
:class:`TensorboardXWriter` TensorBoard event files and :class:`CommonMetricPrinter` one log line
(to the logger ``d2engine.utils.events``, detectron2's). The writers for experiment trackers are
in :mod:`d2engine.utils.trackers`. All of them are re-exported by :mod:`d2engine.utils.events`,
where detectron2's users import them from.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from bisect import bisect_left, insort
from collections import defaultdict, deque
from typing import Any

import torch

from d2engine.utils.events import (
    EventStorage,
    HistoryBuffer,
    _median_of_sorted,
    get_event_storage,
)

__all__ = ["CommonMetricPrinter", "EventWriter", "JSONWriter", "TensorboardXWriter"]


class EventWriter:
    """Base class of writers that read the current :class:`EventStorage`."""

    def write(self) -> None:
        """Write what the current storage holds (called periodically)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files and other resources; the default does nothing."""


class JSONWriter(EventWriter):
    """Write scalars to a JSON-lines file: one object per iteration, with key ``"iteration"``.

    Each :meth:`write` appends one line for every iteration that has values newer than the last
    line written (smoothed scalars as the median over ``window_size`` iterations), then flushes.
    The file is fsynced only at :meth:`close`. Read it with::

        [json.loads(line) for line in open("metrics.json")]

    Args:
        json_file: the file, opened for appending (parent directories are created).
        window_size: the smoothing window for scalars logged with ``smoothing_hint=True``.
    """

    def __init__(self, json_file: str | os.PathLike[str], window_size: int = 20) -> None:
        parent = os.path.dirname(os.fspath(json_file))
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._file_handle = open(json_file, "a")  # noqa: SIM115 (closed in close())
        self._window_size = window_size
        self._last_write = -1

    def write(self) -> None:
        storage = get_event_storage()
        storage.wait_pending()
        to_save: dict[int, dict[str, Any]] = defaultdict(dict)
        for k, (v, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_write:
                to_save[itr][k] = v
        for itr in sorted(to_save):
            line = dict(to_save[itr])
            line["iteration"] = itr
            self._file_handle.write(json.dumps(line, sort_keys=True) + "\n")
        if to_save:
            self._last_write = max(to_save)
            self._file_handle.flush()

    def close(self) -> None:
        if self._file_handle.closed:
            return
        self._file_handle.flush()
        try:
            os.fsync(self._file_handle.fileno())
        except OSError:
            pass
        self._file_handle.close()


class TensorboardXWriter(EventWriter):
    """Write scalars, images and histograms to TensorBoard event files.

    Uses ``torch.utils.tensorboard.SummaryWriter``, created at the first :meth:`write` (no file
    exists before) or when ``_writer`` is first used (detectron2's attribute, which scripts use
    to log more: ``writer._writer.add_scalar(...)``). Each write adds the scalars newer than the
    last write at their iteration, then the queued images and histograms, which it removes from
    the storage.

    The records are written to the event file by the thread that writes (the training thread,
    at the writer's period), not by tensorboard's background thread: that thread computes each
    record's checksum in Python and so took the GIL from the training loop between periods.
    Everything written is in the file when :meth:`write` returns.

    Args:
        log_dir: the directory of the event files.
        window_size: the smoothing window for scalars logged with ``smoothing_hint=True``.
        **kwargs: passed to ``SummaryWriter``.
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], window_size: int = 20, **kwargs: Any
    ) -> None:
        self._log_dir = os.fspath(log_dir)
        self._window_size = window_size
        self._writer_args = kwargs
        self._summary_writer: Any = None
        self._summary_cls: Any = None
        self._last_write = -1

    @property
    def _writer(self) -> Any:
        """The ``SummaryWriter``, created (with its event file) on first use."""
        return self._get_writer()

    def _get_writer(self) -> Any:
        if self._summary_writer is None:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter

            self._summary_cls = Summary  # imported here: tensorboard is slow to import
            self._summary_writer = SummaryWriter(self._log_dir, **self._writer_args)
            _write_in_caller_thread(self._summary_writer)
        return self._summary_writer

    def write(self) -> None:
        storage = get_event_storage()
        storage.wait_pending()
        writer = self._get_writer()
        Summary = self._summary_cls
        by_iter: dict[int, Any] = {}
        for k, (v, itr) in storage.latest_with_smoothing_hint(self._window_size).items():
            if itr > self._last_write:
                summary = by_iter.get(itr)
                if summary is None:
                    summary = by_iter[itr] = Summary()
                # value.add(): a third of the cost of building Summary.Value objects
                summary.value.add(tag=k, simple_value=float(v))
        # One event per iteration holding all its scalars: SummaryWriter.add_scalar costs ~80 us
        # per value (an event, a proto and a queue put each), which dominated the writer's cost.
        file_writer = writer._get_file_writer()
        for itr in sorted(by_iter):
            file_writer.add_summary(by_iter[itr], itr)
        if by_iter:
            self._last_write = max(self._last_write, max(by_iter))
        if storage._vis_data:
            for img_name, img, step_num in storage._vis_data:
                writer.add_image(img_name, img, step_num)
            storage.clear_images()
        if storage._histograms:
            for params in storage._histograms:
                writer.add_histogram_raw(**params)
            storage.clear_histograms()
        file_writer.flush()  # one system call for all the records

    def close(self) -> None:
        if self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None


class _CallerThreadRecords:
    """In place of tensorboard's ``_AsyncWriter``: each record is written (checksum, append to
    the event file) by the thread that adds it, with the same ``write``/``flush``/``close``."""

    def __init__(self, record_writer: Any) -> None:
        self._record_writer = record_writer
        self._lock = threading.Lock()  # SummaryWriter may be used from several threads
        self._closed = False

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                raise OSError("Writer is closed")
            self._record_writer.write(data)

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._record_writer.flush()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._record_writer.flush()
                self._record_writer.close()


def _write_in_caller_thread(summary_writer: Any) -> bool:
    """Make ``summary_writer`` write its records in the calling thread (see
    :class:`TensorboardXWriter`): its event file writer's background thread is stopped.

    Returns:
        False (and nothing changed) when tensorboard's writer is not built as expected (another
        version): its background thread then keeps writing.
    """
    # tensorboard's private objects, duck-typed (None where this version lacks one)
    event_writer: Any = getattr(summary_writer._get_file_writer(), "event_writer", None)
    queued: Any = getattr(event_writer, "_async_writer", None)
    record_writer = getattr(queued, "_writer", None)
    worker: Any = getattr(queued, "_worker", None)
    if record_writer is None or not callable(getattr(worker, "stop", None)):
        return False
    queued.flush()  # what is queued (the file's header event) is written first
    worker.stop()
    _append_to_open_file(record_writer)
    event_writer._async_writer = _CallerThreadRecords(record_writer)
    return True


def _append_to_open_file(record_writer: Any) -> None:
    """Give ``record_writer`` a file kept open for appending when its event file is local.

    Without tensorflow, tensorboard's ``GFile`` opens and closes the file for every record it
    appends (five system calls). Only a local file that was already written to (the header
    event) is swapped; any other (a remote file system, another tensorboard) is left as it is.
    """
    gfile = getattr(record_writer, "_writer", None)
    filename = getattr(gfile, "filename", None)
    if (
        type(getattr(gfile, "fs", None)).__name__ != "LocalFileSystem"
        or not getattr(gfile, "write_started", False)
        or not isinstance(filename, bytes)
    ):
        return
    # a binary file has GFile's write/flush/close/closed
    record_writer._writer = open(os.fsdecode(filename), "ab")  # noqa: SIM115


class _SlidingMedian:
    """The median of the last ``size`` values of a history, kept in step with it.

    Each call adds the values logged since the previous call to a sorted window (and drops the
    oldest): the same value as ``HistoryBuffer.median(size)`` without sorting ``size`` values at
    every write.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._buf: HistoryBuffer | None = None
        self._seen = 0
        self._window: deque[float] = deque()
        self._sorted: list[float] = []

    def __call__(self, buf: HistoryBuffer) -> float:
        new, self._seen = buf._values_since(self._seen if buf is self._buf else 0)
        added = sum(new)  # NaN when a new value is NaN (or when inf and -inf meet: also safe)
        if buf is not self._buf or len(new) >= self._size or added != added:
            values = buf._recent_values(self._size)[::-1]  # a new history, or NaN: start over
            self._buf = None if any(v != v for v in values) else buf
            self._window, self._sorted = deque(values), sorted(values)
        else:
            for v in new:
                insort(self._sorted, v)
                self._window.append(v)
            while len(self._window) > self._size:
                del self._sorted[bisect_left(self._sorted, self._window.popleft())]
        return _median_of_sorted(self._sorted)


def _format_eta(seconds: float) -> str:
    """``h:mm:ss`` (with days); beyond what ``timedelta`` holds (~2.7 million years), a bound."""
    if not seconds < _MAX_ETA_SECONDS:  # also NaN
        return f">{datetime.timedelta.max.days} days"
    return str(datetime.timedelta(seconds=int(seconds)))


_MAX_ETA_SECONDS = datetime.timedelta.max.total_seconds()


class CommonMetricPrinter(EventWriter):
    """Log the common metrics as one line to the logger ``d2engine.utils.events``.

    ``eta: 0:01:23  iter: 199  total_loss: 0.512  loss_cls: 0.3  time: 0.1234  last_time: 0.1201
    data_time: 0.0012  last_data_time: 0.0010  lr: 0.01  max_mem: 812M``. Losses (names containing
    "loss") and ``[metric]`` names are smoothed over ``window_size`` iterations. Nothing is printed
    at ``iter == max_iter`` (the final write after training). The ETA is the median of the last
    1000 ``time`` values times the remaining iterations (also put as ``eta_seconds``), or the
    wall time between writes when ``time`` is not logged.

    Args:
        max_iter: the number of training iterations; without it no ETA is printed.
        window_size: the smoothing window of losses and data_time.
    """

    def __init__(self, max_iter: int | None = None, window_size: int = 20) -> None:
        # detectron2's logger name (the console lines show it): kept from before the split
        self.logger = logging.getLogger("d2engine.utils.events")
        self._max_iter = max_iter
        self._window_size = window_size
        self._last_write: tuple[int, float] | None = None
        self._time_median = _SlidingMedian(1000)

    def _get_eta(self, storage: EventStorage) -> str | None:
        if self._max_iter is None:
            return None
        iteration = storage.iter
        try:
            eta_seconds = self._time_median(storage.history("time")) * (
                self._max_iter - iteration - 1
            )
            storage.put_scalar("eta_seconds", eta_seconds, smoothing_hint=False)
            return _format_eta(eta_seconds)
        except KeyError:
            eta_string = None
            now = time.perf_counter()
            if self._last_write is not None and iteration > self._last_write[0]:
                per_iter = (now - self._last_write[1]) / (iteration - self._last_write[0])
                eta_string = _format_eta(per_iter * (self._max_iter - iteration - 1))
            self._last_write = (iteration, now)
            return eta_string

    def write(self) -> None:
        storage = get_event_storage()
        storage.wait_pending()
        iteration = storage.iter
        if iteration == self._max_iter:
            return
        histories = storage.histories()
        parts = []
        eta = self._get_eta(storage)
        if eta:
            parts.append(f"eta: {eta}")
        parts.append(f"iter: {iteration}")
        smoothed = storage.latest_with_smoothing_hint(self._window_size)
        hints = storage.smoothing_hints()
        for k, buf in histories.items():
            if "loss" in k or k.startswith("[metric]"):
                # the median over the window: what the other writers computed for smoothed ones
                value = (
                    smoothed[k][0]
                    if hints.get(k) and k in smoothed
                    else buf.median(storage.count_samples(k, self._window_size))
                )
                parts.append(f"{k}: {value:.4g}")
        if "time" in histories:
            parts.append(f"time: {histories['time'].global_avg():.4f}")
            parts.append(f"last_time: {histories['time'].latest():.4f}")
        if "data_time" in histories:
            n = storage.count_samples("data_time", self._window_size)
            parts.append(f"data_time: {histories['data_time'].avg(n):.4f}")
            parts.append(f"last_data_time: {histories['data_time'].latest():.4f}")
        lr = f"{histories['lr'].latest():.5g}" if "lr" in histories else "N/A"
        parts.append(f"lr: {lr}")
        if torch.cuda.is_available():
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated() / 1024.0 / 1024.0:.0f}M")
        self.logger.info("  ".join(parts))
