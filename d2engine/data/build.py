"""Data loaders: an infinite, resumable train loader and a sharded test loader.

detectron2's call forms all work: ``build_detection_train_loader(cfg)``, ``(cfg, mapper)``,
``(dataset_list, mapper=..., total_batch_size=...)`` with the dataset first, keyword-only calls
from lazy configs, and ``build_detection_test_loader(cfg, name, mapper=...)`` or
``(dataset_list, mapper=...)``.

The train loader's position
---------------------------
:func:`build_train_loader` returns a :class:`TrainDataLoader`: one infinite stream of batches
whose ``state_dict()`` holds the *data position*, the number of batches it has handed to the
consumer. Batches prefetched by worker processes but not yet handed out do not count, so the
position is exact with any ``num_workers``. With a
:class:`~d2engine.data.samplers.GlobalStreamSampler` (``TrainingSampler``,
``RepeatFactorTrainingSampler``, ``RandomSubsetTrainingSampler``) ``load_state_dict()`` turns the
position into the start of the sampler's global stream (elements consumed by all processes), so a
resumed run gets the very next batch in O(1), without loading or even enumerating the skipped
samples.

Aspect-ratio grouping (``aspect_ratio_grouping=True``, detectron2's default) batches together the
samples whose dataset dicts are landscape (``width > height``), and those that are portrait; the
grouping reads the dicts' ``"width"`` and ``"height"`` before the mapper runs, and dicts without
them are batched in order, so data without sizes is unaffected. A batch is formed from indices
only (no sample is loaded to decide), and the few indices waiting in a group at a checkpoint are
part of the position, so grouped loaders resume exactly too. Each process of a job then has its
own position: :meth:`TrainDataLoader.gather_state` (called by the trainer on every rank before a
save) collects them all into the saved state, each process resumes its own, and a job resumed on
another number of processes shares out the indices read but not yet batched (none lost or
repeated; see :meth:`TrainDataLoader.load_state_dict`).

What is reproduced exactly on resume: which samples form each batch, in which order. With
``num_workers=0`` the mapper runs in the training process, whose RNG state the trainer's
checkpoint restores, so random augmentations repeat too. With ``num_workers > 0`` each worker
draws from its own generator seeded from (sampler seed, start position, rank, worker id): runs are
deterministic, but a resumed run's workers are seeded differently from the uninterrupted run's, so
random augmentations differ unless the mapper derives its randomness from the sample itself.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from d2engine.config.cfg_node import CfgNode
from d2engine.data.catalog import DatasetCatalog, MetadataCatalog
from d2engine.data.common import (
    DatasetFromList,
    MapDataset,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from d2engine.data.samplers import (
    GlobalStreamSampler,
    InferenceSampler,
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    _seeded_torch_generator,
)
from d2engine.utils import comm
from d2engine.utils.validation import check_non_negative_int, check_positive_int

__all__ = [
    "TrainDataLoader",
    "build_batch_data_loader",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "build_test_loader",
    "build_train_loader",
    "get_detection_dataset_dicts",
]

logger = logging.getLogger(__name__)

TRAIN_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


# --------------------------------------------------------------------------- dataset dicts
def get_detection_dataset_dicts(
    names: str | Sequence[str],
    filter_empty: bool = True,
    min_keypoints: int = 0,
    proposal_files: Sequence[str] | None = None,
    check_consistency: bool = True,
) -> list[dict[str, Any]]:
    """Load datasets registered in :data:`~d2engine.data.catalog.DatasetCatalog`; concatenate them.

    Args:
        names: one dataset name or several.
        filter_empty: drop the dicts whose ``"annotations"`` list holds no non-crowd annotation
            (dicts without an ``"annotations"`` key are always kept).
        min_keypoints: drop the dicts with ``"annotations"`` holding fewer visible keypoints
            than this (0: keep all).
        proposal_files: precomputed-proposal files of detectron2's detection models; not
            supported (they are pickles, which d2engine does not load): must be None.
        check_consistency: check that the datasets agree on ``thing_classes`` in their metadata.

    Returns:
        The samples of all datasets, in order.

    Raises:
        ValueError: if no name is given, a dataset is empty or nothing is left after filtering,
            or the datasets' ``thing_classes`` differ.
        KeyError: if a name is not registered.
        NotImplementedError: if ``proposal_files`` is given.
    """
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError(
            "No dataset names given (cfg.DATASETS.TRAIN / TEST is empty). HINT: register a dataset "
            "with DatasetCatalog.register(name, func) and list its name in the config, or pass "
            "the dataset to the loader."
        )
    if proposal_files is not None:
        raise NotImplementedError(
            "get_detection_dataset_dicts(proposal_files=...): precomputed proposals belong to "
            "detectron2's detection models and are not loaded by d2engine. HINT: add the proposals "
            "to your dataset dicts in the function you register."
        )
    dicts: list[dict[str, Any]] = []
    for name in names:
        samples = DatasetCatalog.get(name)
        if not samples:
            raise ValueError(f"Dataset {name!r} is empty: its registered function returned [].")
        dicts.extend(samples)
    before = len(dicts)
    if filter_empty:
        dicts = [d for d in dicts if not _without_instances(d)]
    if min_keypoints > 0:
        dicts = [d for d in dicts if _visible_keypoints(d) >= min_keypoints]
    if len(dicts) < before:
        removed = before - len(dicts)
        logger.info("Removed %d samples without usable annotations; %d left.", removed, len(dicts))
    if not dicts:
        raise ValueError(
            f"No samples left in {names} after filtering (filter_empty={filter_empty}, "
            f"min_keypoints={min_keypoints}). HINT: check the annotations, or set "
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS False."
        )
    if check_consistency and len(names) > 1:
        _check_thing_classes(names)
    return dicts


def _without_instances(d: Any) -> bool:
    if not isinstance(d, Mapping) or "annotations" not in d:
        return False
    return not any(ann.get("iscrowd", 0) == 0 for ann in d["annotations"])


def _visible_keypoints(d: Any) -> int:
    if not isinstance(d, Mapping) or "annotations" not in d:
        return 1 << 30  # not an annotated sample: never filtered
    return sum(
        sum(1 for v in ann["keypoints"][2::3] if v > 0)
        for ann in d["annotations"]
        if "keypoints" in ann
    )


def _check_thing_classes(names: list[str]) -> None:
    classes = {n: MetadataCatalog.get(n).get("thing_classes") for n in names}
    known = {n: c for n, c in classes.items() if c is not None}
    if len({tuple(c) for c in known.values()}) > 1:
        listing = "; ".join(f"{n}: {list(c)}" for n, c in known.items())
        raise ValueError(
            f"The datasets {names} have different thing_classes in their metadata ({listing}), so "
            "a label would mean different classes. HINT: give them the same classes, or train on "
            "them separately."
        )


# ------------------------------------------------------------------------- helpers
def _is_config(obj: Any) -> bool:
    return isinstance(obj, (CfgNode, DictConfig)) or hasattr(obj, "DATASETS")


def _cfg_value(cfg: Any, dotted: str, default: Any) -> Any:
    """``cfg.A.B`` or ``default`` when the config lacks the key (configs made before it existed)."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part] if isinstance(node, Mapping) else getattr(node, part)
        except (KeyError, AttributeError):
            return default
    return node


def _as_map_dataset(dataset: Any, mapper: Callable[[Any], Any] | None, what: str) -> Dataset:
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"{what}: an IterableDataset has no indices for the sampler to shard and resume. "
            f"HINT: pass a map-style dataset (with __len__ and __getitem__) or a list."
        )
    if isinstance(dataset, (list, tuple)):
        dataset = DatasetFromList(list(dataset), copy=False)
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


def _aspect_ratio_buckets(dataset: Any) -> list[int] | None:
    """Group of each sample from its dict's width and height: 0 landscape, 1 portrait, 2 unknown.

    Looks through a :class:`MapDataset` to the dicts it maps. None when there is nothing to group
    (not a list of dicts, or every sample in one group).
    """
    while isinstance(dataset, MapDataset):
        dataset = dataset._dataset
    if isinstance(dataset, DatasetFromList):
        items: Any = (dataset[i] for i in range(len(dataset)))
    elif isinstance(dataset, (list, tuple)):
        items = dataset
    else:
        return None
    buckets = []
    for d in items:
        if isinstance(d, Mapping) and "width" in d and "height" in d:
            buckets.append(0 if d["width"] > d["height"] else 1)
        else:
            buckets.append(2)
    return buckets if len(set(buckets)) > 1 else None


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


class _CarryThenStream(Sampler[int]):
    """The carried indices (read before an elastic resume, not yet batched), then the stream."""

    def __init__(self, carry: Sequence[int], sampler: Any) -> None:
        super().__init__()
        self._carry, self._sampler = list(carry), sampler

    def __iter__(self) -> Iterator[int]:
        yield from self._carry
        yield from self._sampler


class _GroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices of one aspect-ratio group each, noting the progress after each batch.

    For every batch it yields, it appends ``(indices consumed from the stream, indices waiting in
    each group)`` to ``progress``, so that the consumer knows the exact state after each batch it
    hands out (batches are formed ahead of consumption when workers prefetch).
    """

    def __init__(
        self,
        indices: Any,
        buckets: Sequence[int],
        batch_size: int,
        pending: list[list[int]],
        progress: collections.deque[tuple[int, list[list[int]]]],
    ) -> None:
        super().__init__()
        self._indices, self._buckets, self._batch_size = indices, buckets, batch_size
        self._pending, self._progress = pending, progress

    def __iter__(self) -> Iterator[list[int]]:
        groups = [list(group) for group in self._pending]
        for consumed, index in enumerate(self._indices, start=1):
            group = groups[self._buckets[index]]
            group.append(index)
            if len(group) == self._batch_size:
                batch = group[:]
                group.clear()
                self._progress.append((consumed, [list(g) for g in groups]))
                yield batch


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
        aspect_ratio_buckets: Sequence[int] | None = None,
        seed: int | None = None,
        **loader_kwargs: Any,
    ) -> None:
        """Create the loader (no worker starts before the first batch is requested).

        Args:
            dataset: a map-style dataset whose items are already mapped.
            sampler: a :class:`~d2engine.data.samplers.GlobalStreamSampler` (O(1) resume) or any
                sampler of indices (cycled forever; resume replays its indices, without loading
                the samples).
            batch_size: samples per batch on this process.
            num_workers: worker processes (0: load in this process).
            collate_fn: turns a list of samples into a batch (default: keep the list).
            worker_init_fn: called in each worker (default: seed numpy/random per worker).
            pin_memory: pin batches in page-locked memory (for CUDA training).
            aspect_ratio_buckets: the group of each dataset index; a batch then holds samples of
                one group (see the module docstring). None: batches in stream order.
            seed: mixed into the seeds of the worker processes (default: none).
            **loader_kwargs: other ``torch.utils.data.DataLoader`` arguments, such as
                ``prefetch_factor``, ``persistent_workers`` or ``timeout``.

        Raises:
            ValueError: if ``batch_size`` or ``num_workers`` is out of range, or the groups do not
                match the dataset.
        """
        batch_size = check_positive_int(batch_size, "batch_size", "TrainDataLoader")
        num_workers = check_non_negative_int(num_workers, "num_workers", "TrainDataLoader")
        if aspect_ratio_buckets is not None and len(aspect_ratio_buckets) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(
                f"TrainDataLoader: {len(aspect_ratio_buckets)} aspect-ratio groups for a dataset "
                f"of {len(dataset)} samples; give one group per sample."  # type: ignore[arg-type]
            )
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._collate_fn = collate_fn if collate_fn is not None else trivial_batch_collator
        self._worker_init_fn = worker_init_fn
        self._pin_memory = pin_memory
        self._buckets = list(aspect_ratio_buckets) if aspect_ratio_buckets is not None else None
        self._seed = seed
        self._loader_kwargs = loader_kwargs
        self._iterator: Iterator[Any] | None = None
        self._num_batches = 0  # batches handed out, in total (including before a resume)
        self._stream_first_batch = 0  # value of _num_batches when the current stream started
        self._skip = 0  # local indices consumed before the current stream (replayed samplers)
        self._stream_start = sampler.start_position if self._resumable else 0
        num_groups = 3 if self._buckets is not None else 0
        self._pending: list[list[int]] = [[] for _ in range(num_groups)]  # at the stream start
        self._progress: collections.deque[tuple[int, list[list[int]]]] = collections.deque()
        self._handed: tuple[int, list[list[int]]] = (0, self._pending)  # after the last batch
        self._carry: list[int] = []  # indices read before the stream starts (elastic resume)
        self._gathered: tuple[int, list[Any]] | None = None  # (num_batches, every rank's state)
        self._warned_ungathered = False

    @property
    def _resumable(self) -> bool:
        return isinstance(self.sampler, GlobalStreamSampler)

    @property
    def num_batches(self) -> int:
        """The number of batches handed out so far (the data position)."""
        return self._num_batches

    def _make_iterator(self) -> Iterator[Any]:
        if self._resumable:
            indices: Any = (
                _CarryThenStream(self._carry, self.sampler) if self._carry else self.sampler
            )
            entropy = [self.sampler.seed, self._stream_start, self.sampler.rank]
        else:
            indices = _SkippingCycleSampler(self.sampler, self._skip)
            entropy = [0, self._skip, comm.get_rank()]
        if self._seed is not None:
            entropy.append(self._seed)
        common = dict(
            num_workers=self.num_workers,
            collate_fn=self._collate_fn,
            worker_init_fn=self._worker_init_fn,
            pin_memory=self._pin_memory,
            generator=_seeded_torch_generator(*entropy),
            **self._loader_kwargs,
        )
        self._progress.clear()
        self._handed = (0, self._pending)
        if self._buckets is not None:
            batches = _GroupedBatchSampler(
                indices, self._buckets, self.batch_size, self._pending, self._progress
            )
            return iter(DataLoader(self.dataset, batch_sampler=batches, **common))
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=indices, drop_last=True, **common
        )
        return iter(loader)

    def __iter__(self) -> TrainDataLoader:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self._num_batches += 1
        if self._buckets is not None:
            self._handed = self._progress.popleft()
        return batch

    def close(self) -> None:
        """Stop the worker processes, if any; the next batch restarts them at the same position."""
        self._rebase()

    def _consumed_and_pending(self) -> tuple[int, list[list[int]]]:
        """Local indices consumed since the stream start, and the indices waiting in each group."""
        if self._buckets is not None:
            consumed, pending = self._handed
            return consumed, [list(group) for group in pending]
        return (self._num_batches - self._stream_first_batch) * self.batch_size, []

    def _rebase(self) -> None:
        """Drop the current stream; the next one starts at the current position."""
        consumed, pending = self._consumed_and_pending()
        if self._resumable:
            self._carry, from_stream = self._split(consumed)
            self._stream_start += from_stream * self.sampler.world_size
            self.sampler.load_state_dict(self.sampler.state_at(self._stream_start))
        else:
            self._skip += consumed
        self._pending = pending if self._buckets is not None else self._pending
        self._stream_first_batch = self._num_batches
        self._iterator = None  # the DataLoader iterator shuts its workers down when collected
        self._handed = (0, self._pending)

    def _split(self, consumed: int) -> tuple[list[int], int]:
        """After ``consumed`` local indices of the current stream: the carried indices still to be
        read, and how many indices came from the sampler."""
        return self._carry[consumed:], max(0, consumed - len(self._carry))

    def _local_state(self) -> dict[str, Any]:
        """This process's position (see :meth:`state_dict`)."""
        consumed, pending = self._consumed_and_pending()
        state: dict[str, Any] = {
            "num_batches": self._num_batches,
            "batch_size": self.batch_size,
            "world_size": self._world_size,
        }
        if self._resumable:
            carry, from_stream = self._split(consumed)
            position = self._stream_start + from_stream * self.sampler.world_size
            state["sampler"] = self.sampler.state_at(position)
            if carry:
                state["carry"] = carry
        else:
            state["consumed"] = self._skip + consumed
        if self._buckets is not None:
            state["pending"] = pending
        return state

    def gather_state(self) -> None:
        """Collect every process's position for the next :meth:`state_dict` (a collective).

        With aspect-ratio grouping each process has read a different number of indices and has
        its own indices waiting in groups, so a checkpoint needs every process's position. Call it
        on every process at the save point, before the main process's :meth:`state_dict`; a
        trainer's ``gather_state()`` does (the ``PeriodicCheckpointer`` hook calls it on every
        rank before each save). Nothing to do without grouping (every process is at the same
        position) or in one process.
        """
        if self._buckets is None or comm.get_world_size() == 1:
            return
        self._gathered = (self._num_batches, list(comm.all_gather(self._local_state())))

    @property
    def _rank(self) -> int:
        return int(self.sampler.rank) if self._resumable else comm.get_rank()

    def _every_rank_state(self, own: dict[str, Any]) -> list[Any]:
        gathered = self._gathered
        if (
            gathered is not None
            and gathered[0] == self._num_batches
            and len(gathered[1]) == self._world_size
        ):
            return list(gathered[1])
        if not self._warned_ungathered:
            self._warned_ungathered = True
            logger.warning(
                "TrainDataLoader.state_dict() after %d batches without the other processes' "
                "positions (gather_state() was not called on every process at this point): with "
                "aspect-ratio grouping each process has its own position, so a run resumed from "
                "this state continues the other processes only approximately (samples may be "
                "repeated or skipped). HINT: register the PeriodicCheckpointer hook on every rank "
                "(only the main process writes), or call gather_state() on every rank first.",
                self._num_batches,
            )
        states: list[Any] = [None] * self._world_size
        states[self._rank] = own
        return states

    def state_dict(self) -> dict[str, Any]:
        """The data position: batches handed out so far, and the sampler state matching it, with
        the batch size and number of processes that made it.

        With aspect-ratio grouping: also ``"pending"``, the indices waiting in each group, and in
        a multi-process job ``"ranks"``, the position of every process (``None`` for a process
        whose position was not collected by :meth:`gather_state` at this point, with a warning).
        After an elastic resume ``"carry"`` holds the indices still to be read before the
        sampler's stream.
        """
        state = self._local_state()
        if self._buckets is not None and self._world_size > 1:
            state["ranks"] = self._every_rank_state(dict(state))
        return state

    @property
    def _world_size(self) -> int:
        return int(self.sampler.world_size) if self._resumable else comm.get_world_size()

    def _saved_entries(self, state: Mapping[str, Any]) -> list[Any]:
        """The saved position of every process that saved ``state`` (None where unknown)."""
        top = {k: v for k, v in state.items() if k != "ranks"}
        ranks = state.get("ranks")
        if ranks is not None:
            return [dict(e) if isinstance(e, Mapping) else None for e in ranks]
        saved_world = int(state.get("world_size", self._world_size))
        if "pending" in state and saved_world > 1:
            # Grouped, saved before every process's position was kept: the writer's only.
            return [top] + [None] * (saved_world - 1)
        return [top] * saved_world  # not grouped: every process was at the same position

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next batch is the one after the last one handed out.

        With a resumable sampler the position counts global samples, so a job resumed on another
        number of processes continues at the same sample: what its processes read next together is
        what the processes that saved the state would have read. A different global batch size
        (``batch_size`` times the number of processes) than the saved one is a warning.

        With aspect-ratio grouping each process restores its own saved position and the indices
        waiting in its groups (exact). On another number of processes, the indices the saved
        processes had read but not batched yet (waiting in a group, or behind the process that
        had read furthest) are pooled, in saved-rank order, and handed out round-robin to the new
        processes, which read them before the stream continues where the furthest process was:
        no sample is lost or read twice (see "Elastic resume" in ``docs/scale.md``). A state
        without some processes' positions is restored approximately, with a warning.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            KeyError: if ``state`` lacks "num_batches" (or "sampler" for a resumable sampler).
            ValueError: if its "ranks" holds no position (on another number of processes).
        """
        if "num_batches" not in state:
            raise KeyError(
                f"TrainDataLoader.load_state_dict: the state lacks 'num_batches'; got keys "
                f"{sorted(state)}. HINT: pass a dict made by TrainDataLoader.state_dict()."
            )
        num_batches = int(state["num_batches"])
        self._check_global_batch(state)
        self._iterator = None
        self._gathered = None
        entries = self._saved_entries(state)
        same_world = len(entries) == self._world_size
        own = entries[self._rank] if same_world else None
        if self._resumable:
            if any(e is not None and "sampler" not in e for e in entries):
                raise KeyError(
                    "TrainDataLoader.load_state_dict: the state lacks 'sampler', which a loader "
                    f"with a {type(self.sampler).__name__} needs to resume. HINT: save it with "
                    "state_dict()."
                )
            if own is not None:
                self.sampler.load_state_dict(own["sampler"])
                self._carry = [int(i) for i in own.get("carry", [])]
                pending = own.get("pending") or []
            elif same_world:
                self.sampler.load_state_dict(state["sampler"])
                self._carry, pending = [], []
                self._warn_unsaved_position(state)
            else:
                self._carry, pending = self._share_of_pool(entries), []
            self._stream_start = self.sampler.start_position
        else:
            if num_batches > 0:
                logger.warning(
                    "The sampler %s has no O(1) resume; skipping %d batches of its indices.",
                    type(self.sampler).__name__,
                    num_batches,
                )
            saved = own if own is not None else state
            self._skip = int(saved.get("consumed", num_batches * self.batch_size))
            pending = (own.get("pending") or []) if own is not None else []
            if own is None:
                self._warn_unsaved_position(state)
        if self._buckets is not None:
            self._pending = [list(map(int, g)) for g in pending] + [
                [] for _ in range(3 - len(pending))
            ]
        else:
            waiting = [int(i) for g in pending for i in g]
            if waiting and self._resumable:
                self._carry = waiting + self._carry  # grouping turned off: read them first
            elif waiting:
                logger.warning(
                    "Resuming without aspect-ratio grouping and a %s: the %d sample(s) that were "
                    "waiting in a group are skipped.",
                    type(self.sampler).__name__,
                    len(waiting),
                )
        self._num_batches = self._stream_first_batch = num_batches
        self._handed = (0, self._pending)

    def _warn_unsaved_position(self, state: Mapping[str, Any]) -> None:
        """A process continues without its own saved position (grouped data only)."""
        if "pending" not in state:
            return
        logger.warning(
            "The data position holds no entry for process %d of %d (it was saved %s): this "
            "process continues from the saved stream position without the samples it had waiting "
            "in aspect-ratio groups, so some samples may be repeated or skipped. HINT: save with "
            "the PeriodicCheckpointer hook registered on every rank.",
            self._rank,
            self._world_size,
            "without every process's position"
            if "ranks" in state
            else "by a version that kept the main process's only",
        )

    def _share_of_pool(self, entries: list[Any]) -> list[int]:
        """Elastic resume of a grouped stream: set the sampler where the furthest saved process
        was and return this process's share of the indices read but not batched before it."""
        saved_world = len(entries)
        known = [(r, e) for r, e in enumerate(entries) if e is not None]
        if not known:
            raise ValueError(
                "TrainDataLoader.load_state_dict: the state's 'ranks' holds no process's position "
                f"({entries!r}). HINT: pass a dict made by TrainDataLoader.state_dict()."
            )
        positions = {}
        for r, e in known:
            self.sampler.load_state_dict(e["sampler"])  # also checks the dataset and settings
            positions[r] = int(e["sampler"]["position"])
        furthest = max(positions.values())
        pool: list[int] = []
        for r, e in known:
            self.sampler.load_state_dict(e["sampler"])
            pool.extend(int(i) for g in e.get("pending") or [] for i in g)
            pool.extend(int(i) for i in e.get("carry", []))
            behind = range(positions[r] + r, furthest, saved_world)
            pool.extend(self.sampler.index_at(p) for p in behind)
        self.sampler.load_state_dict(self.sampler.state_at(furthest))
        unknown = [r for r, e in enumerate(entries) if e is None]
        if comm.is_main_process():
            if pool:
                logger.info(
                    "Resuming the grouped data stream of %d process(es) on %d: the %d sample(s) "
                    "read but not yet batched are shared among the processes and read first; "
                    "then the stream continues at global sample %d.",
                    saved_world,
                    self._world_size,
                    len(pool),
                    furthest,
                )
            if unknown:
                logger.warning(
                    "The data position holds no entry for the saved process(es) %s (saved %s): "
                    "the samples they had waiting in aspect-ratio groups are not restored and "
                    "their stream positions are taken as process %d's, so some samples may be "
                    "repeated or skipped. HINT: save with the PeriodicCheckpointer hook "
                    "registered on every rank.",
                    unknown,
                    "by a version that kept the main process's only"
                    if len(known) == 1 and known[0][0] == 0
                    else "without every process's position",
                    known[0][0],
                )
        return pool[self._rank :: self._world_size]

    def _check_global_batch(self, state: Mapping[str, Any]) -> None:
        if "world_size" not in state or "batch_size" not in state:
            return  # saved before the world size was recorded
        saved_world, saved_batch = int(state["world_size"]), int(state["batch_size"])
        world = self._world_size
        saved_total, total = saved_world * saved_batch, world * self.batch_size
        if saved_world != world and self._resumable:
            logger.info(
                "Resuming the data stream of %d process(es) on %d at the same global sample.",
                saved_world,
                world,
            )
        if saved_total != total:
            logger.warning(
                "The data position was saved with a global batch of %d samples (%d process(es) x "
                "%d); this loader makes batches of %d (%d x %d). Training continues at the same "
                "sample, but an iteration now covers %d samples, so an iteration-based schedule "
                "(MAX_ITER, STEPS, CHECKPOINT_PERIOD) no longer matches the data seen. HINT: to "
                "keep the run's schedule, set SOLVER.IMS_PER_BATCH to %d and "
                "SOLVER.REFERENCE_WORLD_SIZE to 0 (each process then loads IMS_PER_BATCH // "
                "number of processes).",
                saved_total,
                saved_world,
                saved_batch,
                total,
                world,
                self.batch_size,
                total,
                saved_total,
            )

    def __repr__(self) -> str:
        return (
            f"TrainDataLoader(batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"sampler={self.sampler!r}, num_batches={self._num_batches})"
        )


# --------------------------------------------------------------------------- builders
def build_batch_data_loader(
    dataset: Any,
    sampler: Any,
    total_batch_size: int | None,
    *,
    aspect_ratio_grouping: bool = False,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    drop_last: bool = True,
    single_gpu_batch_size: int | None = None,
    pin_memory: bool = False,
    seed: int | None = None,
    **kwargs: Any,
) -> TrainDataLoader:
    """Batch a (mapped) dataset with a sampler into an infinite, resumable train loader.

    detectron2's lower-level builder, which :func:`build_train_loader` calls.

    Args:
        dataset: a list or map-style dataset whose items are what the model takes.
        sampler: a sampler of dataset indices (a
            :class:`~d2engine.data.samplers.GlobalStreamSampler` resumes in O(1)); None: a
            :class:`~d2engine.data.samplers.TrainingSampler`.
        total_batch_size: samples per iteration over all processes; each process loads
            ``total_batch_size // world_size``.
        aspect_ratio_grouping: batch landscape and portrait samples separately, by the
            ``"width"``/``"height"`` of the dataset dicts (a list of dicts, or a ``MapDataset``
            over one).
        num_workers: worker processes per training process.
        collate_fn: turns a list of samples into a batch (default: keep the list).
        drop_last: kept for detectron2's signature: the stream is infinite, so every batch is
            full.
        single_gpu_batch_size: the batch size of each process, instead of ``total_batch_size``.
        pin_memory: pin batches in page-locked memory.
        seed: mixed into the seeds of the worker processes.
        **kwargs: other ``torch.utils.data.DataLoader`` arguments (``prefetch_factor``...).

    Returns:
        A :class:`TrainDataLoader`.

    Raises:
        ValueError: if both or neither batch size is given, or the total is not a positive
            multiple of the number of processes.
    """
    del drop_last  # infinite stream: no partial batch
    batch_size = _per_process_batch_size(total_batch_size, single_gpu_batch_size)
    buckets = _aspect_ratio_buckets(dataset) if aspect_ratio_grouping else None
    dataset = _as_map_dataset(dataset, None, "build_batch_data_loader")
    if sampler is None:
        sampler = TrainingSampler(len(dataset))
    return TrainDataLoader(
        dataset,
        sampler,
        batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        aspect_ratio_buckets=buckets,
        seed=seed,
        **kwargs,
    )


def _per_process_batch_size(total: int | None, single_gpu: int | None) -> int:
    world_size = comm.get_world_size()
    if single_gpu:
        if total:
            raise ValueError(
                "Give total_batch_size or single_gpu_batch_size, not both (got "
                f"{total} and {single_gpu})."
            )
        return check_positive_int(single_gpu, "single_gpu_batch_size", "the train loader")
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0 or total % world_size:
        raise ValueError(
            f"The total batch size (SOLVER.IMS_PER_BATCH) is {total!r}, but it must be a positive "
            f"multiple of the number of processes ({world_size}), each of which loads an equal "
            f"share. HINT: set SOLVER.IMS_PER_BATCH to a multiple of {world_size}."
        )
    return total // world_size


def _sampler_from_config(cfg: Any, dataset_dicts: Any, size: int) -> GlobalStreamSampler:
    name = _cfg_value(cfg, "DATALOADER.SAMPLER_TRAIN", "TrainingSampler")
    seed = cfg.SEED if _cfg_value(cfg, "SEED", -1) >= 0 else None
    if name == "TrainingSampler":
        return TrainingSampler(size, seed=seed)
    if name == "RepeatFactorTrainingSampler":
        if not isinstance(dataset_dicts, (list, tuple)):
            raise TypeError(
                "DATALOADER.SAMPLER_TRAIN RepeatFactorTrainingSampler computes repeat factors from "
                f"the dataset dicts, but the dataset is a {type(dataset_dicts).__name__}. HINT: "
                "pass sampler=RepeatFactorTrainingSampler(your_factors) to the loader."
            )
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts,
            _cfg_value(cfg, "DATALOADER.REPEAT_THRESHOLD", 0.0),
            sqrt=_cfg_value(cfg, "DATALOADER.REPEAT_SQRT", True),
        )
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        ratio = _cfg_value(cfg, "DATALOADER.RANDOM_SUBSET_RATIO", 1.0)
        return RandomSubsetTrainingSampler(size, ratio, seed_shuffle=seed, seed_subset=seed)
    raise ValueError(
        f"Unknown cfg.DATALOADER.SAMPLER_TRAIN {name!r}; expected one of {list(TRAIN_SAMPLERS)}. "
        "HINT: for another sampler, pass sampler= to build_detection_train_loader."
    )


def build_train_loader(
    cfg: Any = None,
    mapper: Callable[[Any], Any] | None = None,
    dataset: Any = None,
    sampler: Any = None,
    *,
    total_batch_size: int | None = None,
    aspect_ratio_grouping: bool | None = None,
    num_workers: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
    **kwargs: Any,
) -> TrainDataLoader:
    """Build the infinite, resumable training loader.

    Call forms (detectron2's): ``build_train_loader(cfg)``, ``(cfg, mapper)``,
    ``(dataset, mapper=..., total_batch_size=...)`` with a list or map-style dataset first, and
    keyword-only calls (``dataset=...``) from lazy configs.

    Args:
        cfg: a config, providing ``DATASETS.TRAIN`` (when no dataset is given),
            ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.NUM_WORKERS``, ``DATALOADER.SAMPLER_TRAIN`` (and
            its options), ``DATALOADER.ASPECT_RATIO_GROUPING``,
            ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` and ``SEED`` (the sampler's seed when >= 0).
            A list or dataset in this place is taken as ``dataset``. May be None when ``dataset``
            and ``total_batch_size`` are given.
        mapper: called on each sample (e.g. to read and augment an image); None keeps the
            samples as they are. Returning None skips a sample.
        dataset: a list or a map-style torch Dataset to use instead of ``cfg.DATASETS.TRAIN``.
        sampler: defaults to the config's ``DATALOADER.SAMPLER_TRAIN`` (without a config, a
            :class:`~d2engine.data.samplers.TrainingSampler`) over the dataset.
        total_batch_size: samples per iteration over all processes (default
            ``cfg.SOLVER.IMS_PER_BATCH``); each process loads ``total_batch_size // world_size``.
        aspect_ratio_grouping: batch landscape and portrait samples separately (default
            ``cfg.DATALOADER.ASPECT_RATIO_GROUPING``, or True as in detectron2); only dicts with
            ``"width"`` and ``"height"`` are grouped.
        num_workers: worker processes per process (default ``cfg.DATALOADER.NUM_WORKERS``, or 0).
        collate_fn: turns a list of samples into a batch (default: keep the list).
        pin_memory: pin batches in page-locked memory.
        **kwargs: as in :func:`build_batch_data_loader`: ``single_gpu_batch_size``, ``seed``,
            and ``torch.utils.data.DataLoader`` arguments (``prefetch_factor``...).

    Returns:
        A :class:`TrainDataLoader` (infinite; its ``state_dict()`` holds the data position).

    Raises:
        ValueError: if the batch size is not a positive multiple of the world size, or the
            dataset is empty.
        TypeError: if the dataset is not a list or map-style dataset.
    """
    if cfg is not None and not _is_config(cfg):
        if dataset is not None:
            raise TypeError(
                f"build_train_loader got a {type(cfg).__name__} as its first argument and also "
                "dataset=. HINT: pass either a config or the dataset first, not both."
            )
        cfg, dataset = None, cfg
    if cfg is None and (
        dataset is None or (total_batch_size is None and not kwargs.get("single_gpu_batch_size"))
    ):
        raise ValueError(
            "build_train_loader: without a cfg, pass the dataset and total_batch_size=, e.g. "
            "build_detection_train_loader(dicts, mapper=mapper, total_batch_size=16)."
        )
    if dataset is None:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=_cfg_value(cfg, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", True),
        )
    raw = dataset
    if aspect_ratio_grouping is None:
        aspect_ratio_grouping = (
            _cfg_value(cfg, "DATALOADER.ASPECT_RATIO_GROUPING", True) if cfg is not None else True
        )
    buckets = _aspect_ratio_buckets(raw) if aspect_ratio_grouping else None
    dataset = _as_map_dataset(dataset, mapper, "build_train_loader")
    if total_batch_size is None and cfg is not None and not kwargs.get("single_gpu_batch_size"):
        total_batch_size = cfg.SOLVER.IMS_PER_BATCH
    if num_workers is None:
        num_workers = cfg.DATALOADER.NUM_WORKERS if cfg is not None else 0
    if sampler is None:
        if cfg is not None:
            sampler = _sampler_from_config(cfg, raw, len(dataset))
        else:
            sampler = TrainingSampler(len(dataset))
    single_gpu_batch_size = kwargs.pop("single_gpu_batch_size", None)
    kwargs.pop("drop_last", None)  # infinite stream: no partial batch
    return TrainDataLoader(
        dataset,
        sampler,
        _per_process_batch_size(total_batch_size, single_gpu_batch_size),
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        aspect_ratio_buckets=buckets,
        **kwargs,
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

    Call forms (detectron2's): ``build_test_loader(cfg, "name")``, ``(cfg, "name", mapper)``,
    ``(dataset, mapper=...)`` with a list or map-style dataset first, and ``dataset=...``.

    Args:
        cfg: a config; provides ``DATALOADER.NUM_WORKERS``. A list or dataset in this place is
            taken as ``dataset``. May be None.
        dataset_name: the registered dataset(s) to load (unfiltered), when no dataset is given.
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
    if cfg is not None and not _is_config(cfg):
        if dataset is not None:
            raise TypeError(
                f"build_test_loader got a {type(cfg).__name__} as its first argument and also "
                "dataset=. HINT: pass either a config or the dataset first, not both."
            )
        cfg, dataset = None, cfg
    if dataset is None:
        if dataset_name is None:
            raise ValueError(
                "build_test_loader: pass dataset_name (a registered dataset) or dataset=."
            )
        dataset = get_detection_dataset_dicts(dataset_name, filter_empty=False)
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
        generator=_seeded_torch_generator(0, comm.get_rank()),  # leaves the global RNG untouched
    )


build_detection_train_loader = build_train_loader
"""detectron2's name for :func:`build_train_loader`."""

build_detection_test_loader = build_test_loader
"""detectron2's name for :func:`build_test_loader`."""
