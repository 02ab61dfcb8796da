"""Samplers that shard a dataset's indices across the processes of a job.

:class:`TrainingSampler` produces an infinite, reshuffled-every-pass stream of indices whose
position can be saved and restored in O(1): the permutation of pass ``e`` is drawn from a generator
seeded by ``(seed, e)``, so the index at any position is computable without replaying the ones
before it. :class:`InferenceSampler` gives every process a contiguous part of the dataset, so that
every index is visited exactly once across the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data.sampler import Sampler

from d2engine.utils import comm
from d2engine.utils.validation import check_positive_int

__all__ = ["InferenceSampler", "TrainingSampler"]


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


class TrainingSampler(Sampler[int]):
    """An infinite stream of indices in ``[0, size)``, sharded across the processes of a job.

    The global stream is the concatenation of one permutation of ``range(size)`` per pass ("epoch")
    (``range(size)`` itself when ``shuffle=False``); the permutation of pass ``e`` comes from a
    generator seeded with ``(seed, e)``. Process ``rank`` of ``world_size`` takes the elements at
    global positions ``rank, rank + world_size, rank + 2 * world_size, ...``, so processes never
    share an index within a pass, and all processes together consume the global stream in order.

    The *position* is the number of global-stream elements consumed by all processes together
    (``world_size`` times the number of indices this process has yielded). :meth:`state_dict` holds
    it with the seed; a sampler given that state by :meth:`load_state_dict` starts its next
    iterator with the very next index, in O(1) whatever the position. Because the position is
    global, a run may even resume with a different number of processes.

    Every call of ``iter()`` starts a new iterator at the current start position (0, or what
    :meth:`load_state_dict` set); :meth:`state_dict` describes the most recent iterator.
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
            world_size: the number of processes (default: :func:`d2engine.utils.comm.get_world_size`).

        Raises:
            TypeError: if ``size`` or ``seed`` is not an int.
            ValueError: if ``size <= 0`` or ``rank``/``world_size`` are inconsistent.
        """
        super().__init__()
        self._size = _check_size(size, type(self).__name__)
        self._shuffle = bool(shuffle)
        if seed is None:
            seed = comm.shared_random_seed()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"TrainingSampler(seed=...) expects an int or None, got {seed!r}.")
        self._seed = int(seed)
        self._rank, self._world_size = _rank_and_world(rank, world_size, type(self).__name__)
        self._start = 0  # global position where the next iterator starts
        self._position = 0  # global position reached by the most recent iterator
        self._cached_epoch: int | None = None
        self._cached_perm: list[int] = []

    @property
    def size(self) -> int:
        """The number of samples in one pass."""
        return self._size

    @property
    def seed(self) -> int:
        """The shuffling seed."""
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

    def permutation(self, epoch: int) -> list[int]:
        """The order of the indices in pass ``epoch`` of the global stream (before sharding).

        Computed directly from ``(seed, epoch)`` in O(size), independently of earlier passes.
        """
        if not self._shuffle:
            return list(range(self._size))
        if epoch != self._cached_epoch:
            # SeedSequence mixes (seed, epoch) of any size into well-spread generator seeds.
            state = np.random.SeedSequence([self._seed, epoch]).generate_state(2, dtype=np.uint32)
            generator = torch.Generator()
            generator.manual_seed((int(state[0]) << 31) ^ int(state[1]))
            self._cached_perm = torch.randperm(self._size, generator=generator).tolist()
            self._cached_epoch = epoch
        return self._cached_perm

    def _indices(self, start: int) -> Iterator[int]:
        size, world, rank = self._size, self._world_size, self._rank
        base = start  # global position of the group of `world` elements this rank takes one of
        while True:
            epoch, offset = divmod(base + rank, size)
            perm = self.permutation(epoch)
            taken = perm[offset::world]
            for k, index in enumerate(taken):
                # Counted before the yield: once handed out, the index is consumed.
                self._position = base + (k + 1) * world
                yield index
            base += len(taken) * world

    def __iter__(self) -> Iterator[int]:
        self._position = self._start
        return self._indices(self._start)

    def state_dict(self) -> dict[str, Any]:
        """The seed and the global position reached, enough to continue the stream exactly."""
        return {
            "seed": self._seed,
            "position": self._position,
            "size": self._size,
            "shuffle": self._shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state: the next iterator starts at the saved position.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            KeyError: if ``state`` lacks "seed" or "position".
            ValueError: if the state belongs to a dataset of another size, another ``shuffle``
                setting, or has a negative position.
        """
        missing = [k for k in ("seed", "position") if k not in state]
        if missing:
            raise KeyError(
                f"TrainingSampler.load_state_dict: the state lacks {missing}; got keys "
                f"{sorted(state)}. HINT: pass a dict made by TrainingSampler.state_dict()."
            )
        if state.get("size", self._size) != self._size:
            raise ValueError(
                f"TrainingSampler.load_state_dict: the state was saved for a dataset of "
                f"{state['size']} samples, but this sampler has size {self._size}. Resuming on a "
                f"different dataset cannot continue the same stream. HINT: resume with the dataset "
                f"of the original run, or drop the saved data position."
            )
        if state.get("shuffle", self._shuffle) != self._shuffle:
            raise ValueError(
                f"TrainingSampler.load_state_dict: the state was saved with shuffle="
                f"{state['shuffle']}, but this sampler has shuffle={self._shuffle}."
            )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"TrainingSampler.load_state_dict: negative position {position}.")
        self._seed = int(state["seed"])
        self._cached_epoch = None
        self._start = self._position = position

    def __repr__(self) -> str:
        return (
            f"TrainingSampler(size={self._size}, shuffle={self._shuffle}, seed={self._seed}, "
            f"rank={self._rank}, world_size={self._world_size}, position={self._position})"
        )


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
            world_size: the number of processes (default: :func:`d2engine.utils.comm.get_world_size`).

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
