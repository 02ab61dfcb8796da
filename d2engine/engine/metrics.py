"""The trainers' loss metrics: kept on the device between reads, read in one transfer, checked.

A :class:`~d2engine.engine.train_loop.SimpleTrainer` records the losses of every iteration in a
:class:`PendingLosses` buffer: references to the (detached) loss tensors, no read, no device
operation, no allocation on the device. Every ``gather_metric_period`` iterations, before every
checkpoint and at the end of training the trainer reads the whole buffer with :func:`write_losses`:
one transfer per device for all the pending iterations, one ``all_gather`` over the ranks in a
multi-process job, then a check that raises ``FloatingPointError`` naming the *first* iteration
whose total loss is not finite, and every iteration's values logged at its own iteration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from d2engine.utils import comm
from d2engine.utils.events import EventStorage, _to_floats

__all__ = ["MAX_PENDING_ITERATIONS", "PendingLosses", "scalar_loss_error", "write_losses"]

MAX_PENDING_ITERATIONS = 1000
"""The most iterations a trainer keeps unread, whatever its ``gather_metric_period``: the buffer
(and the loss tensors it keeps alive) stays bounded."""


class _Iteration(NamedTuple):
    """What one iteration (or one ``_write_metrics`` call) recorded."""

    iteration: int
    prefix: str
    keys: tuple[str, ...]
    values: tuple[Any, ...]  # len(keys) per micro-batch: tensors, or numbers
    data_time: float


class PendingLosses:
    """The losses of the iterations not read yet, in order.

    :meth:`add` costs a tuple and a list append: the tensors stay where they are (on the device)
    and nothing is read. The buffer holds at most a period's iterations (see
    :data:`MAX_PENDING_ITERATIONS`); :meth:`take` hands them over and empties it.
    """

    def __init__(self) -> None:
        # Plain tuples (a NamedTuple's constructor is Python code): made _Iteration by take().
        self._items: list[tuple[int, str, tuple[str, ...], tuple[Any, ...], float]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(
        self,
        iteration: int,
        keys: tuple[str, ...],
        values: tuple[Any, ...],
        data_time: float,
        prefix: str = "",
    ) -> int:
        """Record the losses of ``iteration``.

        Args:
            iteration: the iteration they belong to.
            keys: the loss names.
            values: ``len(keys)`` detached scalar tensors (or numbers) per micro-batch, micro-batch
                after micro-batch; the logged value of a key is its mean over the micro-batches.
            data_time: the seconds spent reading the iteration's data.
            prefix: prefix of the logged names.

        Returns:
            The number of iterations pending, this one included.
        """
        items = self._items
        items.append((iteration, prefix, keys, values, data_time))
        return len(items)

    def take(self) -> list[_Iteration]:
        """Return the pending iterations, oldest first, and empty the buffer."""
        items, self._items = self._items, []
        return [_Iteration._make(item) for item in items]


def write_losses(items: Sequence[_Iteration], storage: EventStorage, group: Any = None) -> None:
    """Read, check and log the losses of ``items`` (from :meth:`PendingLosses.take`).

    One read for all the values (one transfer per accelerator; CPU tensors are read directly); in
    a multi-process job one ``all_gather`` (a collective: call it on every rank with the same
    iterations). Each rank logs ``rank_data_time``; the main process logs ``data_time`` (the max
    over ranks), the mean over ranks of each loss and their sum as ``total_loss`` (the losses only
    when there are several), each at its iteration.

    Args:
        items: the iterations to write, oldest first.
        storage: the storage to log into.
        group: the process group of the ``all_gather`` (None: the default one).

    Raises:
        FloatingPointError: naming the first iteration whose total loss is infinite or NaN (on
            every rank); the iterations before it are logged.
    """
    if not items:
        return
    world_size = comm.get_world_size()
    if world_size == 1 and _write_columns(items, storage):
        return
    floats = _to_floats([v for item in items for v in item.values])
    # The losses of each item, in the order of its keys (the mean over its micro-batches).
    losses: list[list[float]] = []
    pos = 0
    for item in items:
        n, count = len(item.keys), len(item.values)
        values = floats[pos : pos + count]
        pos += count
        losses.append(
            values if count == n else [sum(values[i::n]) / (count // n) for i in range(n)]
        )
    data_times = [item.data_time for item in items]
    means, max_data_times = losses, data_times
    bad_ranks: list[list[int]] = [[] for _ in items]
    if world_size > 1:
        keyed = [dict(zip(item.keys, values)) for item, values in zip(items, losses)]
        gathered = comm.all_gather((keyed, data_times), group=group)
        means, max_data_times, bad_ranks = [], [], []
        for j, item in enumerate(items):
            per_rank = [ranks_losses[j] for ranks_losses, _ in gathered]
            means.append([sum(r[k] for r in per_rank) / world_size for k in item.keys])
            max_data_times.append(max(times[j] for _, times in gathered))
            bad_ranks.append([r for r, d in enumerate(per_rank) if not _finite(d.values())])
    totals = [sum(m) for m in means]
    good = _first_non_finite(totals)
    iterations = [item.iteration for item in items[:good]]
    storage.put_scalar_series("rank_data_time", data_times[:good], iterations)
    if comm.is_main_process() and good:
        storage.put_scalar_series("data_time", max_data_times[:good], iterations)
        first = items[0]
        if all(it.prefix == first.prefix and it.keys == first.keys for it in items[1:good]):
            columns = list(zip(*means[:good]))  # each loss's values, in the order of the keys
            _log_columns(storage, first.prefix, first.keys, columns, totals, iterations)
        else:  # different losses (or prefixes) in different calls: one at a time
            for item, mean, total, it in zip(items[:good], means, totals, iterations):
                _log_columns(storage, item.prefix, item.keys, [[m] for m in mean], [total], [it])
    if good < len(items):
        item = items[good]
        raise _non_finite(item.iteration, dict(zip(item.keys, means[good])), bad_ranks[good])


def _write_columns(items: Sequence[_Iteration], storage: EventStorage) -> bool:
    """:func:`write_losses` in one process when every item has the same prefix and keys and one
    value per key (no micro-batches): the same values logged, computed column by column.

    Returns:
        False, having done nothing, when the items differ.
    """
    first = items[0]
    keys, prefix, n = first.keys, first.prefix, len(first.keys)
    for item in items:
        if item.keys != keys or item.prefix != prefix or len(item.values) != n:
            return False
    floats = _to_floats([v for item in items for v in item.values])
    columns = [floats[i::n] for i in range(n)]
    totals = list(map(sum, zip(*columns)))  # each item's sum, in the order of its keys
    good = _first_non_finite(totals)
    iterations = [item.iteration for item in items[:good]]
    data_times = [item.data_time for item in items[:good]]
    storage.put_scalar_series("rank_data_time", data_times, iterations)
    if good:
        storage.put_scalar_series("data_time", data_times, iterations)
        _log_columns(storage, prefix, keys, columns, totals, iterations)
    if good < len(items):
        values = floats[good * n : (good + 1) * n]
        raise _non_finite(items[good].iteration, dict(zip(keys, values)), [])
    return True


def _first_non_finite(totals: Sequence[float]) -> int:
    """The index of the first infinite or NaN total (``len(totals)`` when all are finite)."""
    if math.isfinite(sum(totals)):  # one check for the common case: all finite
        return len(totals)
    return next((j for j, t in enumerate(totals) if not math.isfinite(t)), len(totals))


def _log_columns(
    storage: EventStorage,
    prefix: str,
    keys: tuple[str, ...],
    columns: Sequence[Sequence[float]],
    totals: Sequence[float],
    iterations: Sequence[int],
) -> None:
    """Log ``total_loss`` (and each loss, when there are several) at ``iterations``: the first
    ``len(iterations)`` of ``totals`` and of each key's column of values."""
    good = len(iterations)
    storage.put_scalar_series(f"{prefix}total_loss", totals[:good], iterations)
    if len(keys) > 1:
        for k, column in zip(keys, columns):
            storage.put_scalar_series(f"{prefix}{k}", column[:good], iterations)


def _finite(values: Any) -> bool:
    return math.isfinite(sum(values))


def _non_finite(iteration: int, mean: Mapping[str, float], ranks: list[int]) -> FloatingPointError:
    where = f"\nNot finite on rank(s) {ranks}." if ranks else ""
    return FloatingPointError(
        f"Loss became infinite or NaN at iteration={iteration}!\nloss_dict = {dict(mean)}{where}\n"
        "HINT: no checkpoint of this iteration or later was written. Lower SOLVER.BASE_LR (or "
        "lengthen the warm-up), clip gradients (SOLVER.CLIP_GRADIENTS), or check the data of "
        "this iteration."
    )


def scalar_loss_error(key: str, value: Any) -> TypeError:
    """The error for a loss that is not a scalar tensor (``key``: its name in the loss dict)."""
    if isinstance(value, torch.Tensor):
        what = f"a tensor of shape {tuple(value.shape)}"
    else:
        what = f"a {type(value).__name__} ({value!r:.40})"
    return TypeError(
        f"The model's loss '{key}' must be a scalar tensor (one element), got {what}. HINT: "
        "reduce it in the model (e.g. loss.mean() or loss.sum()) and return tensors, not numbers "
        "or strings, in the loss dict."
    )
