"""Data loaders built from a config: an infinite, resumable train loader and a sharded test loader.

The train loader's position
---------------------------
:func:`build_train_loader` returns a :class:`TrainDataLoader`: one infinite stream of batches
whose ``state_dict()`` holds the *data position*, the number of batches it has handed to the
consumer. Batches prefetched by worker processes but not yet handed out do not count, so the
position is exact with any ``num_workers``. ``load_state_dict()`` turns the position into the
start of the :class:`~d2engine.data.samplers.TrainingSampler` (``num_batches * batch_size *
world_size`` elements of its global stream, plus where it started), so a resumed run gets the very
next batch in O(1), without loading or even enumerating the skipped samples.

What is reproduced exactly on resume: which samples form each batch, in which order. With
``num_workers=0`` the mapper runs in the training process, whose RNG state the trainer's
checkpoint restores, so random augmentations repeat too. With ``num_workers > 0`` each worker
draws from its own generator seeded from (sampler seed, start position, rank, worker id): runs are
deterministic, but a resumed run's workers are seeded differently from the uninterrupted run's, so
random augmentations differ unless the mapper derives its randomness from the sample itself.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from d2engine.data.catalog import DatasetCatalog
from d2engine.data.common import (
    DatasetFromList,
    MapDataset,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from d2engine.data.samplers import InferenceSampler, TrainingSampler
from d2engine.utils import comm
from d2engine.utils.validation import check_non_negative_int, check_positive_int

__all__ = [
    "TrainDataLoader",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "build_test_loader",
    "build_train_loader",
    "get_detection_dataset_dicts",
]

logger = logging.getLogger(__name__)


def get_detection_dataset_dicts(names: str | Sequence[str]) -> list[dict[str, Any]]:
    """Load datasets registered in :data:`~d2engine.data.catalog.DatasetCatalog` and concatenate them.

    Args:
        names: one dataset name or several.

    Returns:
        The samples of all datasets, in order.

    Raises:
        ValueError: if no name is given or a dataset is empty.
        KeyError: if a name is not registered.
    """
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError(
            "No dataset names given (cfg.DATASETS.TRAIN / TEST is empty). HINT: register a dataset "
            "with DatasetCatalog.register(name, func) and list its name in the config, or pass "
            "dataset= to the loader."
        )
    dicts: list[dict[str, Any]] = []
    for name in names:
        samples = DatasetCatalog.get(name)
        if not samples:
            raise ValueError(f"Dataset {name!r} is empty: its registered function returned [].")
        dicts.extend(samples)
    return dicts


def _as_map_dataset(dataset: Any, mapper: Callable[[Any], Any] | None, what: str) -> Dataset:
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"{what}: an IterableDataset has no indices for the sampler to shard and resume. "
            f"HINT: pass a map-style dataset (with __len__ and __getitem__) or a list."
        )
    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=False)
    elif not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(
            f"{what}: dataset must be a list or a map-style torch Dataset (with __len__ and "
            f"__getitem__), got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"{what}: the dataset is empty; there is nothing to load.")
    if mapper is not None:
        dataset = MapDataset(dataset, mapper)
    return dataset


def _seeded_generator(*entropy: int) -> torch.Generator:
    """A generator seeded from integers, so that DataLoaders never draw from the global torch RNG."""
    state = np.random.SeedSequence([abs(int(e)) for e in entropy]).generate_state(2, np.uint32)
    generator = torch.Generator()
    generator.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return generator


class _SkippingCycleSampler(Sampler[int]):
    """Cycle over any sampler forever, skipping its first ``skip`` indices (resume by replay)."""

    def __init__(self, sampler: Any, skip: int) -> None:
        super().__init__()
        self._sampler = sampler
        self._skip = skip

    def _cycle(self) -> Iterator[int]:
        while True:
            empty = True
            for index in self._sampler:
                empty = False
                yield index
            if empty:
                raise ValueError(f"The sampler {self._sampler!r} produced no indices.")

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._cycle(), self._skip, None)


class TrainDataLoader:
    """An infinite stream of batches with a resumable position (see the module docstring).

    ``iter(loader)`` returns the loader itself: there is one stream per loader, and
    :meth:`state_dict` records how many batches of it were handed out. Batches are lists of samples
    (the mapper's outputs) unless another ``collate_fn`` is given.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: Any,
        batch_size: int,
        *,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        worker_init_fn: Callable[[int], None] | None = worker_init_reset_seed,
        pin_memory: bool = False,
    ) -> None:
        """Create the loader (no worker starts before the first batch is requested).

        Args:
            dataset: a map-style dataset whose items are already mapped.
            sampler: a :class:`TrainingSampler` (O(1) resume) or any sampler of indices (cycled
                forever; resume replays its indices, without loading the samples).
            batch_size: samples per batch on this process.
            num_workers: worker processes (0: load in this process).
            collate_fn: turns a list of samples into a batch (default: keep the list).
            worker_init_fn: called in each worker (default: seed numpy/random per worker).
            pin_memory: pin batches in page-locked memory (for CUDA training).

        Raises:
            ValueError: if ``batch_size`` or ``num_workers`` is out of range.
        """
        batch_size = check_positive_int(batch_size, "batch_size", "TrainDataLoader")
        num_workers = check_non_negative_int(num_workers, "num_workers", "TrainDataLoader")
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._collate_fn = collate_fn if collate_fn is not None else trivial_batch_collator
        self._worker_init_fn = worker_init_fn
        self._pin_memory = pin_memory
        self._iterator: Iterator[Any] | None = None
        self._num_batches = 0  # batches handed out, in total (including before a resume)
        self._stream_first_batch = 0  # value of _num_batches when the current stream started
        self._skip = 0  # indices to skip, for samplers without O(1) resume
        if isinstance(sampler, TrainingSampler):
            self._stream_start = sampler.start_position

    @property
    def num_batches(self) -> int:
        """The number of batches handed out so far (the data position)."""
        return self._num_batches

    def _make_iterator(self) -> Iterator[Any]:
        if isinstance(self.sampler, TrainingSampler):
            sampler: Any = self.sampler
            entropy = (self.sampler.seed, self._stream_start, self.sampler.rank)
        else:
            sampler = _SkippingCycleSampler(self.sampler, self._skip)
            entropy = (0, self._skip, comm.get_rank())
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=self._collate_fn,
            worker_init_fn=self._worker_init_fn,
            pin_memory=self._pin_memory,
            generator=_seeded_generator(*entropy),
        )
        return iter(loader)

    def __iter__(self) -> TrainDataLoader:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self._num_batches += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes, if any; the next batch restarts them at the same position."""
        self._rebase()

    def _rebase(self) -> None:
        """Drop the current stream; the next one starts at the current position."""
        if isinstance(self.sampler, TrainingSampler):
            state = self.state_dict()["sampler"]
            self.sampler.load_state_dict(state)
            self._stream_start = self.sampler.start_position
        else:
            self._skip = self._num_batches * self.batch_size
        self._stream_first_batch = self._num_batches
        self._iterator = None  # the DataLoader iterator shuts its workers down when collected

    def state_dict(self) -> dict[str, Any]:
        """The data position: batches handed out so far, and the sampler state matching it."""
        state: dict[str, Any] = {"num_batches": self._num_batches, "batch_size": self.batch_size}
        if isinstance(self.sampler, TrainingSampler):
            sampler_state = self.sampler.state_dict()
            consumed = self._num_batches - self._stream_first_batch
            sampler_state["position"] = (
                self._stream_start + consumed * self.batch_size * self.sampler.world_size
            )
            state["sampler"] = sampler_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next batch is the one after the last one handed out.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            KeyError: if ``state`` lacks "num_batches" (or "sampler" for a TrainingSampler).
        """
        if "num_batches" not in state:
            raise KeyError(
                f"TrainDataLoader.load_state_dict: the state lacks 'num_batches'; got keys "
                f"{sorted(state)}. HINT: pass a dict made by TrainDataLoader.state_dict()."
            )
        num_batches = int(state["num_batches"])
        self._iterator = None
        if isinstance(self.sampler, TrainingSampler):
            if "sampler" not in state:
                raise KeyError(
                    "TrainDataLoader.load_state_dict: the state lacks 'sampler', which a loader "
                    "with a TrainingSampler needs to resume. HINT: save it with state_dict()."
                )
            self.sampler.load_state_dict(state["sampler"])
            self._stream_start = self.sampler.start_position
        else:
            if num_batches > 0:
                logger.warning(
                    "The sampler %s has no O(1) resume; skipping %d batches of its indices.",
                    type(self.sampler).__name__,
                    num_batches,
                )
            self._skip = num_batches * self.batch_size
        self._num_batches = self._stream_first_batch = num_batches

    def __repr__(self) -> str:
        return (
            f"TrainDataLoader(batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"sampler={self.sampler!r}, num_batches={self._num_batches})"
        )


def build_train_loader(
    cfg: Any = None,
    mapper: Callable[[Any], Any] | None = None,
    dataset: Any = None,
    sampler: Any = None,
    *,
    total_batch_size: int | None = None,
    num_workers: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
) -> TrainDataLoader:
    """Build the infinite, resumable training loader.

    Args:
        cfg: a config; provides ``DATASETS.TRAIN`` (when ``dataset`` is None),
            ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.NUM_WORKERS`` and ``SEED`` (the sampler's seed
            when >= 0). May be None when ``dataset`` and ``total_batch_size`` are given.
        mapper: called on each sample (e.g. to read and augment an image); None keeps the
            samples as they are. Returning None skips a sample.
        dataset: a list or a map-style torch Dataset to use instead of ``cfg.DATASETS.TRAIN``.
        sampler: defaults to a :class:`TrainingSampler` over the dataset.
        total_batch_size: samples per iteration over all processes (default
            ``cfg.SOLVER.IMS_PER_BATCH``); each process loads ``total_batch_size // world_size``.
        num_workers: worker processes per process (default ``cfg.DATALOADER.NUM_WORKERS``).
        collate_fn: turns a list of samples into a batch (default: keep the list).
        pin_memory: pin batches in page-locked memory.

    Returns:
        A :class:`TrainDataLoader` (infinite; its ``state_dict()`` holds the data position).

    Raises:
        ValueError: if the batch size is not a positive multiple of the world size, or the
            dataset is empty.
        TypeError: if the dataset is not a list or map-style dataset.
    """
    if cfg is None and (dataset is None or total_batch_size is None):
        raise ValueError(
            "build_train_loader: without a cfg, pass both dataset= and total_batch_size=."
        )
    if dataset is None:
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)
    dataset = _as_map_dataset(dataset, mapper, "build_train_loader")
    if total_batch_size is None:
        total_batch_size = cfg.SOLVER.IMS_PER_BATCH
    if num_workers is None:
        num_workers = cfg.DATALOADER.NUM_WORKERS if cfg is not None else 0
    world_size = comm.get_world_size()
    if (
        isinstance(total_batch_size, bool)
        or not isinstance(total_batch_size, int)
        or total_batch_size <= 0
        or total_batch_size % world_size != 0
    ):
        raise ValueError(
            f"The total batch size (SOLVER.IMS_PER_BATCH) is {total_batch_size!r}, but it must be "
            f"a positive multiple of the number of processes ({world_size}), each of which loads "
            f"an equal share. HINT: set SOLVER.IMS_PER_BATCH to a multiple of {world_size}."
        )
    if sampler is None:
        seed = cfg.SEED if cfg is not None and cfg.SEED >= 0 else None
        sampler = TrainingSampler(len(dataset), seed=seed)
    return TrainDataLoader(
        dataset,
        sampler,
        total_batch_size // world_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
    )


def build_test_loader(
    cfg: Any = None,
    dataset_name: str | Sequence[str] | None = None,
    mapper: Callable[[Any], Any] | None = None,
    *,
    dataset: Any = None,
    sampler: Any = None,
    batch_size: int = 1,
    num_workers: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """Build a loader that visits this process's shard of a test set once, in order.

    Args:
        cfg: a config; provides ``DATALOADER.NUM_WORKERS``. May be None.
        dataset_name: the registered dataset(s) to load, when ``dataset`` is None.
        mapper: called on each sample; None keeps the samples as they are.
        dataset: a list or map-style torch Dataset to use instead of ``dataset_name``.
        sampler: defaults to an :class:`InferenceSampler` over the dataset.
        batch_size: samples per batch on this process.
        num_workers: worker processes (default ``cfg.DATALOADER.NUM_WORKERS``, or 0 without cfg).
        collate_fn: turns a list of samples into a batch (default: keep the list).

    Returns:
        A torch DataLoader; ``len()`` is the number of batches on this process.

    Raises:
        ValueError: if neither a dataset nor a dataset name is given, or ``batch_size <= 0``.
    """
    if dataset is None:
        if dataset_name is None:
            raise ValueError(
                "build_test_loader: pass dataset_name (a registered dataset) or dataset=."
            )
        dataset = get_detection_dataset_dicts(dataset_name)
    dataset = _as_map_dataset(dataset, mapper, "build_test_loader")
    batch_size = check_positive_int(batch_size, "batch_size", "build_test_loader")
    if num_workers is None:
        num_workers = cfg.DATALOADER.NUM_WORKERS if cfg is not None else 0
    if sampler is None:
        sampler = InferenceSampler(len(dataset))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=collate_fn if collate_fn is not None else trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
        generator=_seeded_generator(0, comm.get_rank()),  # leaves the global torch RNG untouched
    )


build_detection_train_loader = build_train_loader
"""detectron2's name for :func:`build_train_loader`."""

build_detection_test_loader = build_test_loader
"""detectron2's name for :func:`build_test_loader`."""
