"""Samplers that shard a dataset's indices across the processes of a job.

The training samplers (:class:`TrainingSampler`, :class:`RepeatFactorTrainingSampler`,
:class:`RandomSubsetTrainingSampler`) produce infinite streams whose position can be saved and
restored in O(1): each is a :class:`GlobalStreamSampler`, whose pass ``e`` is computed from
``(seed, e)`` alone, so the index at any position is computable without replaying the ones
before it, and whose position counts global samples, whatever the number of processes.
:class:`InferenceSampler` gives every process a contiguous part of the dataset, so that every
index is visited exactly once across the job.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data.sampler import Sampler

from d2engine.utils import comm
from d2engine.utils.validation import check_positive_int

__all__ = [
    "GlobalStreamSampler",
    "InferenceSampler",
    "RandomSubsetTrainingSampler",
    "RepeatFactorTrainingSampler",
    "TrainingSampler",
]


def _check_size(size: Any, owner: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"{owner}(size=...) expects an int, got {type(size).__name__} {size!r}.")
    if size <= 0:
        raise ValueError(
            f"{owner}(size={size}) needs a dataset with at least one sample. HINT: check that the "
            f"dataset is not empty (e.g. the files of cfg.DATASETS were found)."
        )
    return int(size)


def _rank_and_world(rank: int | None, world_size: int | None, owner: str) -> tuple[int, int]:
    world_size = comm.get_world_size() if world_size is None else world_size
    rank = comm.get_rank() if rank is None else rank
    world_size = check_positive_int(world_size, "world_size", owner)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(
            f"{owner}: rank must be an int in [0, world_size={world_size}), got {rank!r}."
        )
    return rank, world_size


def _seeded_torch_generator(*entropy: int) -> torch.Generator:
    # SeedSequence mixes integers of any size into well-spread generator seeds.
    state = np.random.SeedSequence([abs(int(e)) for e in entropy]).generate_state(2, np.uint32)
    generator = torch.Generator()
    generator.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return generator


def _check_seed(seed: Any, owner: str, name: str = "seed") -> int:
    if seed is None:
        seed = comm.shared_random_seed()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{owner}({name}=...) expects an int or None, got {seed!r}.")
    return int(seed)


class GlobalStreamSampler(Sampler[int]):
    """An infinite stream of indices, the same on every process, sharded across the processes.

    The *global stream* is the concatenation of one list of indices per pass ("epoch"); the list
    of pass ``e`` is a function of the sampler's seed and ``e`` only (:meth:`epoch_indices`), so
    the index at any global position is computable without replaying the ones before it. Process
    ``rank`` of ``world_size`` takes the elements at global positions ``rank, rank + world_size,
    rank + 2 * world_size, ...``: processes never share an element, and all processes together
    consume the global stream in order.

    The *position* is the number of global-stream elements consumed by all processes together
    (``world_size`` times the number of indices this process has yielded). :meth:`state_dict`
    holds it with the seed; a sampler given that state by :meth:`load_state_dict` starts its next
    iterator with the very next index, in O(1) in the position (one pass is computed). Because the
    order depends only on the seed and the position is global, a run may resume with another
    number of processes.

    Every call of ``iter()`` starts a new iterator at the current start position (0, or what
    :meth:`load_state_dict` set); :meth:`state_dict` describes the most recent iterator.
    Subclasses define :meth:`epoch_indices`, and set ``_epoch_length`` when every pass has the
    same length (then a position is located by a division).
    """

    _epoch_length: int | None = None  # the length of every pass, when they are all equal

    def __init__(
        self, seed: int | None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        """Set the seed and the shard.

        Args:
            seed: the seed of the global order, the same on every process; None draws one shared
                by all processes (a collective: every process must build its sampler).
            rank: this process's rank (default: :func:`d2engine.utils.comm.get_rank`).
            world_size: the number of processes (default:
                :func:`d2engine.utils.comm.get_world_size`).
        """
        super().__init__()
        owner = type(self).__name__
        self._seed = _check_seed(seed, owner)
        self._rank, self._world_size = _rank_and_world(rank, world_size, owner)
        self._start = 0  # global position where the next iterator starts
        self._position = 0  # global position reached by the most recent iterator
        self._cached_epoch: int | None = None
        self._cached_indices: list[int] = []
        self._epoch_starts: dict[int, int] = {0: 0}  # known pass starts (variable-length passes)

    # ------------------------------------------------------------------- the global order
    def epoch_indices(self, epoch: int) -> list[int]:
        """The indices of pass ``epoch`` of the global stream, in order (before sharding)."""
        if epoch != self._cached_epoch:
            self._cached_indices = self._compute_epoch(epoch)
            self._cached_epoch = epoch
        return self._cached_indices

    def _compute_epoch(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def _locate(self, position: int) -> tuple[int, int]:
        """The pass holding global ``position`` and the offset within it."""
        if self._epoch_length is not None:
            return divmod(position, self._epoch_length)
        epoch = max(e for e, start in self._epoch_starts.items() if start <= position)
        start = self._epoch_starts[epoch]
        while True:
            length = len(self.epoch_indices(epoch))
            if position < start + length:
                return epoch, position - start
            epoch, start = epoch + 1, start + length
            self._epoch_starts[epoch] = start

    def index_at(self, position: int) -> int:
        """The index at global ``position`` of the stream (computes at most the passes from the
        last known pass start to it).

        Args:
            position: a global position (>= 0).

        Returns:
            The dataset index there.
        """
        epoch, offset = self._locate(int(position))
        return self.epoch_indices(epoch)[offset]

    def _indices(self, start: int) -> Iterator[int]:
        world, rank = self._world_size, self._rank
        base = start  # global position of the group of `world` elements this rank takes one of
        while True:
            epoch, offset = self._locate(base + rank)
            taken = self.epoch_indices(epoch)[offset::world]
            for k, index in enumerate(taken):
                # Counted before the yield: once handed out, the index is consumed.
                self._position = base + (k + 1) * world
                yield index
            base += len(taken) * world

    def __iter__(self) -> Iterator[int]:
        self._position = self._start
        return self._indices(self._start)

    # ------------------------------------------------------------------------- properties
    @property
    def seed(self) -> int:
        """The seed of the global order."""
        return self._seed

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of processes the stream is sharded over."""
        return self._world_size

    @property
    def start_position(self) -> int:
        """The global position where the next iterator starts (0, or set by ``load_state_dict``)."""
        return self._start

    @property
    def position(self) -> int:
        """The global position reached (elements consumed by all processes together)."""
        return self._position

    # ---------------------------------------------------------------------------- state
    def _identity(self) -> dict[str, Any]:
        """What must match between the saved and the resuming sampler (besides the seed)."""
        return {}

    def state_at(self, position: int) -> dict[str, Any]:
        """The state of this stream at global ``position`` (what :meth:`load_state_dict` takes).

        Args:
            position: a global position (elements consumed by all processes together).

        Returns:
            A dict of plain numbers and booleans.
        """
        state: dict[str, Any] = {"seed": self._seed, "position": int(position)}
        state.update(self._identity())
        if self._epoch_length is None:
            epoch, offset = self._locate(int(position))
            state.update(epoch=epoch, epoch_start=int(position) - offset)
        return state

    def state_dict(self) -> dict[str, Any]:
        """The seed and the global position reached, enough to continue the stream exactly."""
        return self.state_at(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state: the next iterator starts at the saved position.

        Args:
            state: a dict from :meth:`state_dict` (or :meth:`state_at`).

        Raises:
            KeyError: if ``state`` lacks "seed" or "position".
            ValueError: if the state belongs to another dataset or other settings, or has a
                negative position.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        missing = [k for k in ("seed", "position") if k not in state]
        if missing:
            raise KeyError(
                f"{owner}: the state lacks {missing}; got keys {sorted(state)}. HINT: pass a dict "
                f"made by {type(self).__name__}.state_dict()."
            )
        for key, value in self._identity().items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"{owner}: the state was saved with {key}={state[key]!r}, but this sampler has "
                    f"{key}={value!r}. Resuming with other data or settings cannot continue the "
                    f"same stream. HINT: resume with the dataset and settings of the original run, "
                    f"or drop the saved data position."
                )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"{owner}: negative position {position}.")
        self._seed = int(state["seed"])
        self._cached_epoch = None
        self._epoch_starts = {0: 0}
        if "epoch" in state and "epoch_start" in state:
            self._epoch_starts[int(state["epoch"])] = int(state["epoch_start"])
        self._start = self._position = position

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._identity().items())
        return (
            f"{type(self).__name__}(seed={self._seed}{extra}, rank={self._rank}, "
            f"world_size={self._world_size}, position={self._position})"
        )


class TrainingSampler(GlobalStreamSampler):
    """An infinite stream of indices in ``[0, size)``, reshuffled each pass, sharded over processes.

    Pass ``e`` is a permutation of ``range(size)`` drawn from a generator seeded with
    ``(seed, e)`` (``range(size)`` itself when ``shuffle=False``). See
    :class:`GlobalStreamSampler` for the sharding, the position and the O(1) resume.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """Create the sampler.

        Args:
            size: the number of samples in the dataset (> 0).
            shuffle: shuffle every pass; if False, each pass is ``0, 1, ..., size - 1``.
            seed: the shuffling seed, which must be the same on every process; when None, a seed
                shared by all processes is drawn with :func:`d2engine.utils.comm.shared_random_seed`
                (a collective: every process must then build its sampler).
            rank: this process's rank (default: :func:`d2engine.utils.comm.get_rank`).
            world_size: the number of processes (default:
                :func:`d2engine.utils.comm.get_world_size`).

        Raises:
            TypeError: if ``size`` or ``seed`` is not an int.
            ValueError: if ``size <= 0`` or ``rank``/``world_size`` are inconsistent.
        """
        self._size = _check_size(size, type(self).__name__)
        self._shuffle = bool(shuffle)
        self._epoch_length = self._size
        super().__init__(seed, rank=rank, world_size=world_size)

    @property
    def size(self) -> int:
        """The number of samples in one pass."""
        return self._size

    def permutation(self, epoch: int) -> list[int]:
        """The order of the indices in pass ``epoch`` of the global stream (before sharding).

        Computed directly from ``(seed, epoch)`` in O(size), independently of earlier passes.
        """
        return self.epoch_indices(epoch)

    def _compute_epoch(self, epoch: int) -> list[int]:
        if not self._shuffle:
            return list(range(self._size))
        generator = _seeded_torch_generator(self._seed, epoch)
        return torch.randperm(self._size, generator=generator).tolist()

    def _identity(self) -> dict[str, Any]:
        return {"size": self._size, "shuffle": self._shuffle}


class RandomSubsetTrainingSampler(TrainingSampler):
    """Train on a random subset of the dataset: a :class:`TrainingSampler` over a fixed subset.

    The subset (``int(size * subset_ratio)`` indices) is drawn once from ``seed_subset``; every
    pass is a permutation of it drawn from ``(seed_shuffle, pass)``. Resumable in O(1) like
    :class:`TrainingSampler`; useful to study how a model scales with the amount of data.
    """

    def __init__(
        self,
        size: int,
        subset_ratio: float,
        shuffle: bool = True,
        seed_shuffle: int | None = None,
        seed_subset: int | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """Create the sampler.

        Args:
            size: the number of samples in the dataset (> 0).
            subset_ratio: the fraction of the dataset to use, in ``(0, 1]``.
            shuffle: shuffle the subset every pass.
            seed_shuffle: the shuffling seed (the same on every process; None draws a shared one).
            seed_subset: the seed that picks the subset (likewise).
            rank: this process's rank (default: :func:`d2engine.utils.comm.get_rank`).
            world_size: the number of processes (default:
                :func:`d2engine.utils.comm.get_world_size`).

        Raises:
            ValueError: if ``subset_ratio`` is not in ``(0, 1]`` or selects no sample.
        """
        full = _check_size(size, type(self).__name__)
        ratio = float(subset_ratio)
        if not 0.0 < ratio <= 1.0 or int(full * ratio) == 0:
            raise ValueError(
                f"RandomSubsetTrainingSampler(subset_ratio={subset_ratio!r}) must be in (0, 1] and "
                f"select at least one of the {full} samples. HINT: set "
                "cfg.DATALOADER.RANDOM_SUBSET_RATIO accordingly."
            )
        self._full_size, self._ratio = full, ratio
        self._seed_subset = _check_seed(seed_subset, type(self).__name__, "seed_subset")
        generator = _seeded_torch_generator(self._seed_subset)
        chosen = torch.randperm(full, generator=generator)[: int(full * ratio)]
        self._subset = sorted(chosen.tolist())
        super().__init__(
            len(self._subset), shuffle=shuffle, seed=seed_shuffle, rank=rank, world_size=world_size
        )

    @property
    def subset(self) -> list[int]:
        """The dataset indices this sampler draws from, in increasing order."""
        return list(self._subset)

    def _compute_epoch(self, epoch: int) -> list[int]:
        return [self._subset[i] for i in super()._compute_epoch(epoch)]

    def _identity(self) -> dict[str, Any]:
        return {
            **super()._identity(),
            "dataset_size": self._full_size,
            "seed_subset": self._seed_subset,
        }


class RepeatFactorTrainingSampler(GlobalStreamSampler):
    """A stream in which sample ``i`` appears ``repeat_factors[i]`` times per pass on average.

    Each pass repeats sample ``i`` ``floor(r_i)`` times, plus once more with probability
    ``r_i - floor(r_i)`` (stochastic rounding), then shuffles; both draws come from a generator
    seeded with ``(seed, pass)``, so passes differ in length but any pass is computable directly.
    Resumable in O(1) like :class:`TrainingSampler` (the state names the pass of the position).
    Used for class-balanced training ("LVIS: a dataset for large vocabulary instance
    segmentation", Gupta et al.): see :meth:`repeat_factors_from_category_frequency`.
    """

    def __init__(
        self,
        repeat_factors: Sequence[float] | torch.Tensor,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """Create the sampler.

        Args:
            repeat_factors: one non-negative factor per dataset sample (not all 0).
            shuffle: shuffle every pass.
            seed: the seed (the same on every process; None draws a shared one).
            rank: this process's rank (default: :func:`d2engine.utils.comm.get_rank`).
            world_size: the number of processes (default:
                :func:`d2engine.utils.comm.get_world_size`).

        Raises:
            ValueError: if a factor is negative or not finite, or all are 0.
        """
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64).flatten()
        if factors.numel() == 0 or not bool(torch.isfinite(factors).all()):
            raise ValueError(
                f"RepeatFactorTrainingSampler needs one finite repeat factor per sample, got "
                f"{factors.numel()} factor(s)"
                f"{'' if factors.numel() == 0 else ' with non-finite values'}."
            )
        if bool((factors < 0).any()) or float(factors.sum()) <= 0:
            raise ValueError(
                "RepeatFactorTrainingSampler: repeat factors must be >= 0 and not all 0. HINT: a "
                "factor of 1 keeps a sample's frequency, 2 doubles it."
            )
        self._int_part = torch.trunc(factors)
        self._frac_part = factors - self._int_part
        self._shuffle = bool(shuffle)
        super().__init__(seed, rank=rank, world_size=world_size)

    @property
    def size(self) -> int:
        """The number of samples of the dataset (one factor each)."""
        return int(self._int_part.numel())

    def _compute_epoch(self, epoch: int) -> list[int]:
        generator = _seeded_torch_generator(self._seed, epoch)
        rands = torch.rand(self._frac_part.numel(), generator=generator, dtype=torch.float64)
        counts = (self._int_part + (rands < self._frac_part)).long()
        indices = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        if self._shuffle and indices.numel() > 1:
            indices = indices[torch.randperm(indices.numel(), generator=generator)]
        return indices.tolist()

    def _identity(self) -> dict[str, Any]:
        return {"size": self.size, "shuffle": self._shuffle}

    @staticmethod
    def repeat_factors_from_category_frequency(
        dataset_dicts: Sequence[Mapping[str, Any]], repeat_thresh: float, sqrt: bool = True
    ) -> torch.Tensor:
        """Per-sample repeat factors that oversample samples of rare categories.

        The categories of a sample are the ``category_id`` of its ``"annotations"`` (detectron2's
        format) or, for a sample without annotations, its ``"label"``. With ``f(c)`` the
        fraction of samples containing category ``c``, ``r(c) = max(1, thresh / f(c))``
        (its square root when ``sqrt``), and a sample's factor is the largest ``r(c)`` of its
        categories (1 for a sample without any).

        Args:
            dataset_dicts: the dataset dicts.
            repeat_thresh: the frequency below which a category is oversampled.
            sqrt: take the square root of ``thresh / f(c)``.

        Returns:
            A float tensor with one factor per sample.

        Raises:
            ValueError: if no sample names a category.
        """
        categories = [_categories(d) for d in dataset_dicts]
        counts: dict[Any, int] = defaultdict(int)
        for cats in categories:
            for c in cats:
                counts[c] += 1
        if not counts:
            raise ValueError(
                "repeat_factors_from_category_frequency: no sample has 'annotations' with "
                "'category_id' or a 'label'. HINT: compute one factor per sample yourself and pass "
                "RepeatFactorTrainingSampler(repeat_factors)."
            )
        num = len(dataset_dicts)
        category_rep = {}
        for c, n in counts.items():
            ratio = repeat_thresh / (n / num)
            category_rep[c] = max(1.0, math.sqrt(ratio) if sqrt else ratio)
        return torch.tensor(
            [max((category_rep[c] for c in cats), default=1.0) for cats in categories],
            dtype=torch.float32,
        )


def _categories(d: Mapping[str, Any]) -> set[Any]:
    if "annotations" in d:
        return {ann["category_id"] for ann in d["annotations"] if "category_id" in ann}
    if "label" in d:
        return {d["label"]}
    return set()


class InferenceSampler(Sampler[int]):
    """The indices of a contiguous shard of ``range(size)``: every index once across all processes.

    The first ``size % world_size`` processes get one index more than the others, so shard sizes
    differ by at most one (a process may get none when ``size < world_size``).
    """

    def __init__(
        self, size: int, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        """Create the sampler.

        Args:
            size: the number of samples in the dataset (> 0).
            rank: this process's rank (default: :func:`d2engine.utils.comm.get_rank`).
            world_size: the number of processes (default:
                :func:`d2engine.utils.comm.get_world_size`).

        Raises:
            TypeError: if ``size`` is not an int.
            ValueError: if ``size <= 0`` or ``rank``/``world_size`` are inconsistent.
        """
        super().__init__()
        self._size = _check_size(size, type(self).__name__)
        rank, world_size = _rank_and_world(rank, world_size, type(self).__name__)
        shard, extra = divmod(self._size, world_size)
        begin = rank * shard + min(rank, extra)
        end = begin + shard + (1 if rank < extra else 0)
        self._local_indices = range(begin, end)

    def __iter__(self) -> Iterator[int]:
        return iter(self._local_indices)

    def __len__(self) -> int:
        return len(self._local_indices)
