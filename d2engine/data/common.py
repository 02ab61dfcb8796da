"""Dataset wrappers used by the data loaders: a list as a dataset, and a per-sample mapping."""

from __future__ import annotations

import copy
import logging
import pickle
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DatasetFromList", "MapDataset", "trivial_batch_collator", "worker_init_reset_seed"]

logger = logging.getLogger(__name__)


class DatasetFromList(Dataset):
    """A map-style dataset over a list.

    With ``serialize=True`` (the default) the items are pickled into one numpy byte buffer. Worker
    processes then share the buffer's memory pages instead of touching (and so copying, through
    reference counting) millions of small Python objects; each ``__getitem__`` unpickles a fresh
    copy. With ``serialize=False`` and ``copy=True``, items are deep-copied on access so that a
    mapper that modifies its input cannot change the dataset.
    """

    def __init__(self, lst: Sequence[Any], copy: bool = True, serialize: bool = True) -> None:
        """Wrap a list.

        Args:
            lst: the items (usually dicts).
            copy: return a copy of the item on access (implied by ``serialize``).
            serialize: keep the items pickled in one buffer (they must be picklable).
        """
        self._copy = copy
        self._serialize = serialize
        if serialize:
            blobs = [np.frombuffer(pickle.dumps(x, protocol=-1), dtype=np.uint8) for x in lst]
            self._addr = np.cumsum(np.asarray([len(b) for b in blobs], dtype=np.int64))
            self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)
            self._len = len(blobs)
        else:
            self._list = list(lst)
            self._len = len(self._list)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int) -> Any:
        if not -self._len <= idx < self._len:
            raise IndexError(f"index {idx} out of range for a dataset of {self._len} items")
        idx = idx % self._len
        if self._serialize:
            start = 0 if idx == 0 else int(self._addr[idx - 1])
            end = int(self._addr[idx])
            return pickle.loads(self._buffer[start:end].data)
        if self._copy:
            return copy.deepcopy(self._list[idx])
        return self._list[idx]


class MapDataset(Dataset):
    """Apply ``map_func`` to every item of a map-style dataset.

    When ``map_func`` returns None (a sample it rejects), another index is tried; the replacement is
    a deterministic function of the rejected index, so a resumed run sees the same samples.
    """

    def __init__(self, dataset: Any, map_func: Callable[[Any], Any]) -> None:
        """Wrap a dataset.

        Args:
            dataset: a map-style dataset (``__len__`` and ``__getitem__``).
            map_func: called on each item; returning None rejects the item.
        """
        self._dataset = dataset
        self._map_func = map_func

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, idx: int) -> Any:
        cur_idx = int(idx)
        for attempt in range(1, 1001):
            data = self._map_func(self._dataset[cur_idx])
            if data is not None:
                return data
            if attempt == 3:
                logger.warning("The mapper rejected index %d %d times in a row.", idx, attempt)
            cur_idx = random.Random(idx * 1000 + attempt).randrange(len(self._dataset))
        raise RuntimeError(
            f"The mapper returned None for 1000 samples in a row (starting at index {idx}). HINT: "
            f"the mapper should return None only to skip an occasional bad sample."
        )


def trivial_batch_collator(batch: list[Any]) -> list[Any]:
    """The collate function of d2engine's loaders: a batch is the list of its samples."""
    return batch


def worker_init_reset_seed(worker_id: int) -> None:
    """Seed numpy and ``random`` in a data-loader worker from the worker's torch seed.

    PyTorch gives each worker its own torch seed (the loader's base seed plus the worker id), but
    leaves numpy and ``random`` as forked copies of the parent's state, so all workers would draw
    the same "random" augmentations. This derives both from the torch seed.
    """
    seed = torch.initial_seed() % 2**31
    np.random.seed(seed)
    random.seed(seed)
