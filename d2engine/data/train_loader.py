"""The train loader: one infinite, resumable stream of batches and its data position.

:func:`~d2engine.data.build.build_train_loader` builds the :class:`TrainDataLoader` defined here;
both are importable from :mod:`d2engine.data` (and ``TrainDataLoader`` from
:mod:`d2engine.data.build`, as before).

The data position
-----------------
A :class:`TrainDataLoader` is one infinite stream of batches whose ``state_dict()`` holds the
*data position*, the number of batches it has handed to the consumer. Batches prefetched by worker
processes but not yet handed out do not count, so the position is exact with any ``num_workers``.
With a :class:`~d2engine.data.samplers.GlobalStreamSampler` (``TrainingSampler``,
``RepeatFactorTrainingSampler``, ``RandomSubsetTrainingSampler``) ``load_state_dict()`` turns the
position into the start of the sampler's global stream (elements consumed by all processes), so a
resumed run gets the very next batch in O(1), without loading or even enumerating the skipped
samples. Any other sampler is cycled forever, and a resume replays (skips) its indices without
loading the samples.

Aspect-ratio grouping (``aspect_ratio_grouping=True``, detectron2's default) batches together the
samples whose dataset dicts are landscape (``width > height``), and those that are portrait; the
grouping reads the dicts' ``"width"`` and ``"height"`` before the mapper runs, and dicts without
them are batched in order, so data without sizes is unaffected. A batch is formed from indices
only (no sample is loaded to decide), and the few indices waiting in a group at a checkpoint are
part of the position, so grouped loaders resume exactly too.

Per-process positions and elastic resume
----------------------------------------
With grouping each process of a job has its own position: :meth:`TrainDataLoader.gather_state`
(called by the trainer on every rank before a save) collects them all into the saved state, and
each process resumes its own. A job resumed on another number of processes (an *elastic* resume)
shares out the indices read but not yet batched (waiting in a group, or behind the process that
had read furthest) round-robin among the new processes, which read them before the stream
continues where the furthest process was: none is lost or repeated (see
:meth:`TrainDataLoader.load_state_dict` and "Elastic resume" in ``docs/scale.md``). The functions
at the end of this module read a saved state on the new number of processes.

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

from torch.utils.data import DataLoader, Dataset, Sampler

from d2engine.data.common import (
    DatasetFromList,
    MapDataset,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from d2engine.data.samplers import GlobalStreamSampler, _seeded_torch_generator
from d2engine.utils import comm
from d2engine.utils.validation import check_non_negative_int, check_positive_int

__all__ = ["TrainDataLoader"]

logger = logging.getLogger(__name__)


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
        _check_global_batch(state, self._world_size, self.batch_size, self._resumable)
        self._iterator = None
        self._gathered = None
        entries = _saved_entries(state, self._world_size)
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
                _warn_unsaved_position(state, self._rank, self._world_size)
            else:
                self._carry = _share_of_pool(self.sampler, entries, self._rank, self._world_size)
                pending = []
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
                _warn_unsaved_position(state, self._rank, self._world_size)
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

    def __repr__(self) -> str:
        return (
            f"TrainDataLoader(batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"sampler={self.sampler!r}, num_batches={self._num_batches})"
        )


# ----------------------------------------------------------------- elastic resume
# A saved position read on the new number of processes (see the module docstring).
def _check_global_batch(
    state: Mapping[str, Any], world_size: int, batch_size: int, resumable: bool
) -> None:
    """Log a change of the number of processes, and warn of a change of the global batch."""
    if "world_size" not in state or "batch_size" not in state:
        return  # saved before the world size was recorded
    saved_world, saved_batch = int(state["world_size"]), int(state["batch_size"])
    saved_total, total = saved_world * saved_batch, world_size * batch_size
    if saved_world != world_size and resumable:
        logger.info(
            "Resuming the data stream of %d process(es) on %d at the same global sample.",
            saved_world,
            world_size,
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
            world_size,
            batch_size,
            total,
            saved_total,
        )


def _saved_entries(state: Mapping[str, Any], world_size: int) -> list[Any]:
    """The saved position of every process that saved ``state`` (None where unknown); a state
    without ``"world_size"`` was saved by ``world_size`` processes."""
    top = {k: v for k, v in state.items() if k != "ranks"}
    ranks = state.get("ranks")
    if ranks is not None:
        return [dict(e) if isinstance(e, Mapping) else None for e in ranks]
    saved_world = int(state.get("world_size", world_size))
    if "pending" in state and saved_world > 1:
        # Grouped, saved before every process's position was kept: the writer's only.
        return [top] + [None] * (saved_world - 1)
    return [top] * saved_world  # not grouped: every process was at the same position


def _warn_unsaved_position(state: Mapping[str, Any], rank: int, world_size: int) -> None:
    """Warn that process ``rank`` continues without its own saved position (grouped data only)."""
    if "pending" not in state:
        return
    logger.warning(
        "The data position holds no entry for process %d of %d (it was saved %s): this "
        "process continues from the saved stream position without the samples it had waiting "
        "in aspect-ratio groups, so some samples may be repeated or skipped. HINT: save with "
        "the PeriodicCheckpointer hook registered on every rank.",
        rank,
        world_size,
        "without every process's position"
        if "ranks" in state
        else "by a version that kept the main process's only",
    )


def _share_of_pool(
    sampler: GlobalStreamSampler, entries: list[Any], rank: int, world_size: int
) -> list[int]:
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
        sampler.load_state_dict(e["sampler"])  # also checks the dataset and settings
        positions[r] = int(e["sampler"]["position"])
    furthest = max(positions.values())
    pool: list[int] = []
    for r, e in known:
        sampler.load_state_dict(e["sampler"])
        pool.extend(int(i) for g in e.get("pending") or [] for i in g)
        pool.extend(int(i) for i in e.get("carry", []))
        behind = range(positions[r] + r, furthest, saved_world)
        pool.extend(sampler.index_at(p) for p in behind)
    sampler.load_state_dict(sampler.state_at(furthest))
    unknown = [r for r, e in enumerate(entries) if e is None]
    if comm.is_main_process():
        if pool:
            logger.info(
                "Resuming the grouped data stream of %d process(es) on %d: the %d sample(s) "
                "read but not yet batched are shared among the processes and read first; "
                "then the stream continues at global sample %d.",
                saved_world,
                world_size,
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
    return pool[rank::world_size]
