"""Event storage: the scalars, images and histograms logged during training.

A training loop opens an :class:`EventStorage`; code anywhere in the loop logs into it through
:func:`get_event_storage`. Writers read what was logged and write it out: :class:`EventWriter`,
:class:`JSONWriter`, :class:`TensorboardXWriter` and :class:`CommonMetricPrinter` (defined in
:mod:`d2engine.utils.event_writers`), and for experiment trackers :class:`CSVWriter`,
:class:`MLflowWriter` and :class:`WandbWriter` (defined in :mod:`d2engine.utils.trackers`); this
module re-exports them all, at detectron2's import path.

Scalars may be logged as tensors, on any device. The storage keeps them as they are and converts
them to ``float`` only when they are read, so logging a CUDA tensor never forces a host-device
synchronisation by itself. Metrics computed in a background thread (asynchronous metric writing)
are tracked with :meth:`EventStorage.add_pending` so that writers see them complete.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from itertools import islice
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # at run time they come from __getattr__ below (both modules import this one)
    from d2engine.utils.event_writers import (
        CommonMetricPrinter,
        EventWriter,
        JSONWriter,
        TensorboardXWriter,
    )
    from d2engine.utils.trackers import CSVWriter, MLflowWriter, WandbWriter

__all__ = [
    "CSVWriter",
    "CommonMetricPrinter",
    "EventStorage",
    "EventWriter",
    "HistoryBuffer",
    "JSONWriter",
    "MLflowWriter",
    "TensorboardXWriter",
    "WandbWriter",
    "get_event_storage",
    "has_event_storage",
]

_EVENT_WRITERS = ("CommonMetricPrinter", "EventWriter", "JSONWriter", "TensorboardXWriter")
_TRACKER_WRITERS = ("CSVWriter", "MLflowWriter", "WandbWriter")


def __getattr__(name: str) -> Any:
    """The writers, imported on first use from :mod:`d2engine.utils.event_writers` and
    :mod:`d2engine.utils.trackers` (those modules read the storage defined here, so they cannot
    be imported at the top: a cycle)."""
    if name in _EVENT_WRITERS:
        from d2engine.utils import event_writers  # cycle: event_writers imports this module

        return getattr(event_writers, name)
    if name in _TRACKER_WRITERS:
        from d2engine.utils import trackers  # cycle: trackers imports this module

        return getattr(trackers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CURRENT_STORAGE_STACK: list[EventStorage] = []
"""Open storages, innermost last. Global (not thread-local) so that a background metric writer
started by the training thread logs into the training thread's storage."""

_DEFAULT_MAX_LENGTH = 1_000_000

_VALUE = itemgetter(0)  # of a (value, iteration) point


def get_event_storage() -> EventStorage:
    """Return the innermost open :class:`EventStorage`.

    Returns:
        The storage of the running training loop.

    Raises:
        RuntimeError: if no storage is open.
    """
    if not _CURRENT_STORAGE_STACK:
        raise RuntimeError(
            "get_event_storage() was called outside of an EventStorage. HINT: call it during "
            "training (TrainerBase.train opens one), or open one yourself with "
            "`with EventStorage(start_iter): ...`."
        )
    return _CURRENT_STORAGE_STACK[-1]


def has_event_storage() -> bool:
    """Whether an :class:`EventStorage` is open (so :func:`get_event_storage` would succeed)."""
    return bool(_CURRENT_STORAGE_STACK)


def _to_floats(values: Sequence[Any]) -> list[float]:
    """Convert numbers and one-element tensors to floats.

    CPU tensors are read directly (no transfer is involved); the tensors on one accelerator are
    stacked and read back together: one host-device transfer per device. Shared by the storage
    and the trainers' metrics.
    """
    out: list[Any] = list(values)
    on_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            out[i] = float(v)
        elif v.is_cpu:
            out[i] = float(v.item())
        else:
            on_device.setdefault(v.device, []).append(i)
    for idx in on_device.values():
        if len(idx) == 1:
            out[idx[0]] = float(values[idx[0]].item())
            continue
        with torch.no_grad():  # stack promotes mixed dtypes (fp16/bf16/fp32) to a common one
            stacked = torch.stack([values[i].reshape(()) for i in idx])
        for i, f in zip(idx, stacked.tolist()):
            out[i] = float(f)
    return out


def _median(values: list[float]) -> float:
    """The median of ``values`` (nan if there are none)."""
    return _median_of_sorted(sorted(values))


def _median_of_sorted(values: Sequence[float]) -> float:
    """The median of ``values``, sorted in ascending order (nan if there are none)."""
    n = len(values)
    if not n:
        return math.nan
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2.0


class HistoryBuffer:
    """The bounded history of one scalar: (value, iteration) pairs with summary statistics.

    Values may be numbers or single-element tensors; tensors are converted to ``float`` when the
    history is read. Thread-safe.

    Args:
        max_length: the most points kept; older points are dropped (they still count in
            :meth:`global_avg`).
    """

    def __init__(self, max_length: int = _DEFAULT_MAX_LENGTH) -> None:
        if max_length <= 0:
            raise ValueError(f"HistoryBuffer needs max_length > 0, got {max_length}")
        self._max_length = max_length
        self._data: deque[tuple[float, int]] = deque(maxlen=max_length)
        self._pending: list[tuple[Any, int]] = []
        self._global_sum = 0.0
        self._count = 0
        self._lock = threading.Lock()
        # (values ever added, window) -> the median of the window: the writers of one period
        # (and the periods in which nothing new was logged) share it
        self._window_median: tuple[int, int, float] | None = None

    def update(self, value: float | torch.Tensor, iteration: int) -> None:
        """Add a point.

        Args:
            value: a number or a single-element tensor (kept unconverted until read).
            iteration: the iteration the value belongs to.
        """
        with self._lock:
            if self._pending or (type(value) is not float and isinstance(value, torch.Tensor)):
                self._pending.append((value, iteration))
                if len(self._pending) >= self._max_length:
                    self._materialize()
            else:
                if type(value) is not float:  # a float as it is: the timer's and lr's puts
                    value = float(value)
                self._data.append((value, iteration))
                self._global_sum += value
                self._count += 1

    def extend(self, values: Sequence[float], iterations: Sequence[int]) -> None:
        """Add points in bulk, oldest first (one lock for all of them).

        Args:
            values: numbers.
            iterations: the iteration of each value.
        """
        with self._lock:
            if self._pending:  # keep the order of the tensors still waiting to be read
                self._pending.extend(zip(values, iterations))
                return
            self._data.extend(zip(values, iterations))
            # sum() adds left to right from the start value, as update() does one by one: the
            # same total whatever the batching
            self._global_sum = sum(values, self._global_sum)
            self._count += len(values)

    def _materialize(self) -> None:
        # Called with the lock held.
        if not self._pending:
            return
        floats = _to_floats([v for v, _ in self._pending])
        for f, (_, it) in zip(floats, self._pending):
            self._data.append((f, it))
            self._global_sum += f
            self._count += 1
        self._pending.clear()

    def _snapshot(self, window: int | None = None) -> list[tuple[float, int]]:
        with self._lock:
            self._materialize()
            if window is None or window >= len(self._data):
                return list(self._data)
            if window <= 0:
                return []
            return list(islice(reversed(self._data), window))[::-1]

    def _recent_values(self, window: int) -> list[float]:
        """The last ``window`` values, newest first (C-level iteration: writers call it often)."""
        with self._lock:
            self._materialize()
            if window <= 0:
                return []
            return list(map(_VALUE, islice(reversed(self._data), window)))

    def _values_since(self, count: int) -> tuple[list[float], int]:
        """The values added after the first ``count`` ever added (oldest first, at most the kept
        ones), and the number added so far."""
        with self._lock:
            self._materialize()
            new = min(self._count - count, len(self._data))
            if new <= 0:
                return [], self._count
            return list(map(_VALUE, islice(reversed(self._data), new)))[::-1], self._count

    def count_recent(self, window_size: int) -> int:
        """The number of points logged within ``window_size`` iterations of the latest one."""
        with self._lock:
            return len(self._values_within(window_size))

    def _values_within(self, window_size: int) -> list[float]:
        """The values logged within ``window_size`` iterations of the latest one, newest first
        (called with the lock held)."""
        self._materialize()
        values: list[float] = []
        if self._data:
            first = self._data[-1][1] - window_size
            for v, it in reversed(self._data):
                if it <= first:
                    break
                values.append(v)
        return values

    def median_within(self, window_size: int) -> float:
        """The median of the values logged within ``window_size`` iterations of the latest one.

        The same as ``median(count_recent(window_size))``, computed once for the values logged
        so far: writers that report the same smoothed value at the same period share it.

        Args:
            window_size: the smoothing window in iterations.

        Returns:
            The median (nan if the history is empty).
        """
        with self._lock:
            self._materialize()
            cached = self._window_median
            if cached is not None and cached[0] == self._count and cached[1] == window_size:
                return cached[2]
            value = _median(self._values_within(window_size))
            self._window_median = (self._count, window_size, value)
        return value

    def latest(self) -> float:
        """The most recent value.

        Raises:
            IndexError: if the history is empty.
        """
        with self._lock:
            self._materialize()
            if not self._data:
                raise IndexError("latest() of an empty HistoryBuffer")
            return self._data[-1][0]

    def median(self, window_size: int) -> float:
        """The median of the last ``window_size`` values (nan if there are none)."""
        return _median(self._recent_values(window_size))

    def avg(self, window_size: int) -> float:
        """The mean of the last ``window_size`` values (nan if there are none)."""
        values = self._recent_values(window_size)
        return sum(values) / len(values) if values else math.nan

    def global_avg(self) -> float:
        """The mean of every value ever added, including those dropped from the buffer."""
        with self._lock:
            self._materialize()
            return self._global_sum / self._count if self._count else math.nan

    def values(self) -> list[tuple[float, int]]:
        """All kept points as (value, iteration) pairs, oldest first."""
        return self._snapshot()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data) + len(self._pending)


class EventStorage:
    """The store of everything logged during training, opened as a context manager.

    ``with EventStorage(start_iter) as storage:`` makes it the current storage, returned by
    :func:`get_event_storage`. Scalars go into bounded :class:`HistoryBuffer` objects; images and
    histograms are queued until a writer (e.g. :class:`TensorboardXWriter`) consumes them.

    Args:
        start_iter: the iteration that logged values belong to until :meth:`step` is called.
        max_history: the most points kept per scalar.
    """

    def __init__(self, start_iter: int = 0, max_history: int = _DEFAULT_MAX_LENGTH) -> None:
        self._history: dict[str, HistoryBuffer] = {}
        self._smoothing_hints: dict[str, bool] = {}
        self._latest_scalars: dict[str, tuple[Any, int]] = {}
        # (window, name -> (values logged, (smoothed value, iteration))): see
        # latest_with_smoothing_hint
        self._smoothed_cache: tuple[int, dict[str, tuple[int, tuple[float, int]]]] | None = None
        self._iter = start_iter
        self._current_prefix = ""
        self._vis_data: list[tuple[str, torch.Tensor, int]] = []
        self._histograms: list[dict[str, Any]] = []
        self._max_history = max_history
        self._lock = threading.RLock()
        self._pending: list[Future[Any]] = []

    # -- scalars -----------------------------------------------------------------------------
    def put_scalar(
        self,
        name: str,
        value: float | torch.Tensor,
        smoothing_hint: bool = True,
        cur_iter: int | None = None,
    ) -> None:
        """Log a scalar.

        Args:
            name: the scalar's name (prefixed by the current :meth:`name_scope`).
            value: a number or a single-element tensor on any device; a tensor is detached and
                converted to float only when read.
            smoothing_hint: whether writers should smooth this scalar (median over a window) or
                report its latest value. A name must keep the same hint.
            cur_iter: the iteration the value belongs to; default the storage's current one.

        Raises:
            ValueError: if ``name`` was logged before with a different smoothing hint, or a
                tensor value has more than one element.
        """
        if self._current_prefix:
            name = self._current_prefix + name
        cur_iter = self._iter if cur_iter is None else int(cur_iter)
        if type(value) is float:  # the common case (IterationTimer, LRScheduler): nothing to do
            pass
        elif isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"put_scalar('{name}') needs a number or a single-element tensor, got a "
                    f"tensor of shape {tuple(value.shape)}. HINT: reduce it first (e.g. .mean())."
                )
            value = value.detach()
        else:
            value = float(value)
        # A name seen before with the same hint: no lock needed (dict reads and the assignment
        # below are atomic; the buffer has its own lock).
        buf = self._history.get(name)
        if buf is None or self._smoothing_hints[name] != smoothing_hint:
            buf = self._new_history(name, smoothing_hint)
        buf.update(value, cur_iter)
        self._latest_scalars[name] = (value, cur_iter)

    def _new_history(self, name: str, smoothing_hint: bool) -> HistoryBuffer:
        """The history of ``name``, created on first use; a changed hint is an error."""
        with self._lock:
            existing = self._smoothing_hints.get(name)
            if existing is None:
                self._smoothing_hints[name] = smoothing_hint
                self._history[name] = HistoryBuffer(self._max_history)
            elif existing != smoothing_hint:
                raise ValueError(
                    f"Scalar '{name}' was put with smoothing_hint={existing} before and now with "
                    f"smoothing_hint={smoothing_hint}. HINT: use one hint per name."
                )
            return self._history[name]

    def put_scalar_series(
        self,
        name: str,
        values: Sequence[float],
        iterations: Sequence[int],
        smoothing_hint: bool = True,
    ) -> None:
        """Log the values of one scalar at several iterations at once, oldest first.

        The same as one :meth:`put_scalar` per value, at a fraction of the cost: a trainer that
        reads its losses every ``gather_metric_period`` iterations logs them with it.

        Args:
            name: the scalar's name (prefixed by the current :meth:`name_scope`).
            values: numbers.
            iterations: the iteration of each value (as many as ``values``).
            smoothing_hint: see :meth:`put_scalar`.

        Raises:
            ValueError: if the lengths differ, or ``name`` was logged with another hint.
        """
        if len(values) != len(iterations):
            raise ValueError(
                f"put_scalar_series('{name}') got {len(values)} values for {len(iterations)} "
                "iterations. HINT: pass one iteration per value."
            )
        if len(values) <= 1:
            if values:
                self.put_scalar(name, float(values[0]), smoothing_hint, iterations[0])
            return
        if self._current_prefix:
            name = self._current_prefix + name
        buf = self._history.get(name)
        if buf is None or self._smoothing_hints[name] != smoothing_hint:
            buf = self._new_history(name, smoothing_hint)
        floats, its = list(map(float, values)), list(map(int, iterations))
        buf.extend(floats, its)
        self._latest_scalars[name] = (floats[-1], its[-1])

    def put_scalars(
        self, *, smoothing_hint: bool = True, cur_iter: int | None = None, **kwargs: Any
    ) -> None:
        """Log several scalars with the same hint: ``put_scalars(loss=1.0, acc=0.5)``.

        Args:
            smoothing_hint: see :meth:`put_scalar`.
            cur_iter: see :meth:`put_scalar`.
            **kwargs: name=value pairs.
        """
        for k, v in kwargs.items():
            self.put_scalar(k, v, smoothing_hint=smoothing_hint, cur_iter=cur_iter)

    def history(self, name: str) -> HistoryBuffer:
        """The history of scalar ``name``.

        Raises:
            KeyError: if no scalar of that name was logged.
        """
        with self._lock:
            buf = self._history.get(name)
        if buf is None:
            raise KeyError(f"No history metric available for '{name}'.")
        return buf

    def histories(self) -> dict[str, HistoryBuffer]:
        """A copy of the mapping name -> :class:`HistoryBuffer`."""
        with self._lock:
            return dict(self._history)

    def latest(self) -> dict[str, tuple[float, int]]:
        """The latest value of every scalar: name -> (value, iteration it was logged at)."""
        with self._lock:
            items = list(self._latest_scalars.items())
        floats = _to_floats([v for _, (v, _) in items])
        return {k: (f, it) for (k, (_, it)), f in zip(items, floats)}

    def latest_with_smoothing_hint(self, window_size: int = 20) -> dict[str, tuple[float, int]]:
        """Like :meth:`latest`, but smoothed scalars give the median of their recent values.

        Args:
            window_size: smoothed scalars use the values logged within the last
                ``window_size`` iterations (up to the iteration of the latest value).

        Returns:
            name -> (value, iteration of the latest value).
        """
        with self._lock:
            # Each scalar's entry is kept with the number of values logged when it was computed
            # (every put adds one to its history): the writers of one period share them, and a
            # scalar put in between (the printer's eta_seconds) is the only one computed again.
            cached = self._smoothed_cache
            entries = cached[1] if cached is not None and cached[0] == window_size else {}
            stale = []
            for k, buf in self._history.items():
                logged = buf._count + len(buf._pending)
                entry = entries.get(k)
                if entry is None or entry[0] != logged:
                    stale.append((k, buf, logged, self._smoothing_hints[k]))
            if not stale:
                return {k: entries[k][1] for k in self._latest_scalars}
            entries = dict(entries)
            latest = [self._latest_scalars[k] for k, *_ in stale]
        floats = _to_floats([v for v, _ in latest])
        for (k, buf, logged, hint), f, (_, itr) in zip(stale, floats, latest):
            entries[k] = (logged, (buf.median_within(window_size) if hint else f, itr))
        with self._lock:
            self._smoothed_cache = (window_size, entries)
            return {k: entries[k][1] for k in self._latest_scalars}

    def count_samples(self, name: str, window_size: int = 20) -> int:
        """The number of values of ``name`` logged within the last ``window_size`` iterations.

        Counted back from the iteration of its latest value.
        """
        return self.history(name).count_recent(window_size)

    def smoothing_hints(self) -> dict[str, bool]:
        """name -> the smoothing hint the scalar was logged with."""
        with self._lock:
            return dict(self._smoothing_hints)

    # -- images and histograms ---------------------------------------------------------------
    def put_image(self, img_name: str, img_tensor: torch.Tensor) -> None:
        """Queue an image for :class:`TensorboardXWriter`.

        Args:
            img_name: the image's tag (prefixed by the current :meth:`name_scope`).
            img_tensor: a CHW tensor, float in [0, 1] or uint8 in [0, 255] (3 channels, RGB).
        """
        with self._lock:
            self._vis_data.append((self._current_prefix + img_name, img_tensor, self._iter))

    def clear_images(self) -> None:
        """Drop the queued images (writers call this after writing them)."""
        with self._lock:
            self._vis_data = []

    def put_histogram(self, hist_name: str, hist_tensor: torch.Tensor, bins: int = 1000) -> None:
        """Queue a histogram of the values of a tensor of any shape.

        The histogram is computed now (this synchronises with the tensor's device).

        Args:
            hist_name: the histogram's tag (prefixed by the current :meth:`name_scope`).
            hist_tensor: the values; any shape and numeric dtype.
            bins: the number of buckets.

        Raises:
            ValueError: if the tensor is empty or ``bins`` is not positive.
        """
        if bins <= 0:
            raise ValueError(f"put_histogram('{hist_name}') needs bins > 0, got {bins}")
        values = hist_tensor.detach().reshape(-1).double()
        if values.numel() == 0:
            raise ValueError(f"put_histogram('{hist_name}') got an empty tensor")
        ht_min, ht_max = values.min().item(), values.max().item()
        if ht_min == ht_max:
            # a single value: one bucket holding everything, edge at that value
            limits = [ht_max]
            counts = [float(values.numel())]
        else:
            counts = torch.histc(values, bins=bins, min=ht_min, max=ht_max).tolist()
            limits = torch.linspace(ht_min, ht_max, bins + 1, dtype=torch.float64)[1:].tolist()
        params = {
            "tag": self._current_prefix + hist_name,
            "min": ht_min,
            "max": ht_max,
            "num": int(values.numel()),
            "sum": float(values.sum().item()),
            "sum_squares": float((values * values).sum().item()),
            "bucket_limits": limits,
            "bucket_counts": counts,
            "global_step": self._iter,
        }
        with self._lock:
            self._histograms.append(params)

    def clear_histograms(self) -> None:
        """Drop the queued histograms (writers call this after writing them)."""
        with self._lock:
            self._histograms = []

    # -- iteration and scope -----------------------------------------------------------------
    def step(self) -> None:
        """Advance the current iteration by one."""
        self._iter += 1

    @property
    def iter(self) -> int:
        """The current iteration: values are logged at it unless ``cur_iter`` says otherwise."""
        return self._iter

    @iter.setter
    def iter(self, val: int) -> None:
        self._iter = int(val)

    @property
    def iteration(self) -> int:
        """Alias of :attr:`iter`."""
        return self._iter

    @contextmanager
    def name_scope(self, name: str) -> Iterator[None]:
        """Prefix the names logged inside the block with ``name + "/"`` (scopes nest)."""
        old_prefix = self._current_prefix
        self._current_prefix = old_prefix + name.rstrip("/") + "/"
        try:
            yield
        finally:
            self._current_prefix = old_prefix

    # -- background writes -------------------------------------------------------------------
    def add_pending(self, future: Future[Any]) -> None:
        """Track a background computation that will log into this storage.

        Writers call :meth:`wait_pending` before reading so that they see its values.
        """
        with self._lock:
            self._pending.append(future)

    def discard_pending(self, future: Future[Any]) -> None:
        """Stop tracking ``future`` (its owner collected its result)."""
        with self._lock:
            if future in self._pending:
                self._pending.remove(future)

    def wait_pending(self) -> None:
        """Wait for the tracked background computations.

        Successful ones are forgotten; failed ones stay tracked so that their owner (or
        :meth:`raise_pending`) still raises their error.
        """
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            if fut.exception() is None:
                self.discard_pending(fut)

    def raise_pending(self) -> None:
        """Wait for the tracked background computations, forget them, and raise the first error.

        Raises:
            Exception: the first error raised by a tracked computation.
        """
        with self._lock:
            pending, self._pending = self._pending, []
        error = None
        for fut in pending:
            exc = fut.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> EventStorage:
        _CURRENT_STORAGE_STACK.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if not _CURRENT_STORAGE_STACK or _CURRENT_STORAGE_STACK[-1] is not self:
            raise RuntimeError("EventStorage contexts were not closed in the order they opened.")
        _CURRENT_STORAGE_STACK.pop()
