"""Building blocks for checkpointable state: the ``Stateful`` and ``CollectiveStateful``
protocols, RNG states, CPU snapshots.

Everything produced here is made of tensors, numbers, strings, ``None``, lists, tuples and dicts,
so a checkpoint holding it loads with ``torch.load(..., weights_only=True)``.

Exact resume needs the random generators the training step draws from: python's ``random``,
numpy's global generator, torch's CPU generator and one CUDA generator per visible device.
:func:`capture_rng_state` returns them as one dict and :func:`restore_rng_state` sets them back.
In a multi-process job every rank has its own generators: :class:`RankRNGStates` gathers them at a
save point (a collective) into one list with an entry per rank, and restores each rank's own entry.
numpy ``Generator`` objects created by user code (``np.random.default_rng``) are not global state
and are not captured.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from d2engine.utils import comm

__all__ = [
    "CollectiveStateful",
    "RNGState",
    "RankRNGStates",
    "Stateful",
    "capture_rng_state",
    "derive_rng_state",
    "gather_rng_states",
    "restore_rng_state",
    "snapshot_to_cpu",
]

logger = logging.getLogger(__name__)

_RNG_FORMAT = 1


@runtime_checkable
class Stateful(Protocol):
    """An object whose state can be saved into and restored from a checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        """Returns the state as a dict (of tensors, numbers, strings, lists, dicts)."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any:
        """Restores the state returned by :meth:`state_dict`."""
        ...


@runtime_checkable
class CollectiveStateful(Stateful, Protocol):
    """A checkpointable whose state spans the ranks of a job (e.g. every rank's RNG state).

    Only the writing process calls ``state_dict()`` when a checkpoint is saved, so the other ranks'
    parts must be collected first: :meth:`gather_state` is a collective that every rank calls at
    the save point, right before the save. :meth:`d2engine.checkpoint.Checkpointer.gather_states`
    calls it on each such checkpointable; the ``PeriodicCheckpointer`` hook does so on every rank
    before each of its saves. Without a gather, ``state_dict()`` holds what this process has.
    """

    def gather_state(self) -> None:
        """Collect the state of every rank for the next ``state_dict()`` (a collective)."""
        ...


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------
def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": int(version), "state": list(internal), "gauss_next": gauss_next}


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def capture_rng_state(*, cuda: bool | None = None) -> dict[str, Any]:
    """The states of python's, numpy's, torch's CPU and torch's CUDA random generators.

    Args:
        cuda: capture the CUDA generators of all visible devices. ``None`` (default): only when
            CUDA is already initialised in this process, so that a CPU job never starts CUDA.

    Returns:
        ``{"format", "python", "numpy", "torch", "cuda"}``, loadable with ``weights_only=True``;
        ``"cuda"`` is a list with one state per device (empty when not captured).
    """
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    elif cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "capture_rng_state(cuda=True) was called but CUDA is not available. "
            "HINT: pass cuda=None to capture CUDA states only when CUDA is in use."
        )
    return {
        "format": _RNG_FORMAT,
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": [state.clone() for state in torch.cuda.get_rng_state_all()] if cuda else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the random generators to a state returned by :func:`capture_rng_state`.

    CUDA states are restored for as many devices as both the state and this process have; a
    different device count is logged as a warning (draws on the extra devices will differ).

    Args:
        state: the dict returned by :func:`capture_rng_state` (possibly after a save and load).

    Raises:
        ValueError: ``state`` is not such a dict.
    """
    missing = {"python", "numpy", "torch"} - set(state)
    if missing or state.get("format") != _RNG_FORMAT:
        raise ValueError(
            f"restore_rng_state expected the dict returned by capture_rng_state() (format "
            f"{_RNG_FORMAT} with keys python, numpy, torch, cuda); got keys {sorted(state)} and "
            f"format {state.get('format')!r}."
        )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    keys = torch.as_tensor(npy["keys"]).numpy().astype(np.uint32)
    np.random.set_state(
        (npy["bit_generator"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    cuda_states = list(state.get("cuda", []))
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        logger.warning(
            "The RNG state holds %d CUDA generator state(s) but CUDA is not available; "
            "they are not restored.",
            len(cuda_states),
        )
        return
    count = torch.cuda.device_count()
    if count != len(cuda_states):
        logger.warning(
            "The RNG state holds %d CUDA generator state(s) but this process sees %d device(s); "
            "restoring the first %d.",
            len(cuda_states),
            count,
            min(count, len(cuda_states)),
        )
    for device, cuda_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8), device)


def derive_rng_state(states: Sequence[Any], rank: int) -> None:
    """Seed this process's generators for ``rank`` from saved RNG states that have no entry for it.

    For a job resumed on more processes than wrote the checkpoint: the new ranks get generators
    that depend only on the checkpoint and the rank (a hash of the first saved state's torch
    generator, mixed with ``rank``), so a resumed run is repeatable. Python's, numpy's, torch's
    CPU and (when CUDA is in use) every CUDA generator are seeded.

    Args:
        states: the saved states (one :func:`capture_rng_state` dict or None per saved rank).
        rank: the rank to derive generators for.

    Raises:
        ValueError: no saved state to derive from.
    """
    base = next((s for s in states if isinstance(s, Mapping) and "torch" in s), None)
    if base is None:
        raise ValueError(
            "derive_rng_state needs at least one saved RNG state (a capture_rng_state() dict); "
            f"got {len(states)} entries without one."
        )
    digest = hashlib.sha256(torch.as_tensor(base["torch"]).numpy().tobytes()).digest()
    entropy = [int.from_bytes(digest[:8], "little"), int(rank)]
    seeds = np.random.SeedSequence(entropy).generate_state(4, dtype=np.uint32)
    random.seed(int(seeds[0]))
    np.random.seed(seeds[1:3])
    torch_seed = (int(seeds[3]) << 32) | int(seeds[0])
    torch.manual_seed(torch_seed)  # also seeds every CUDA device
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(torch_seed)


def gather_rng_states(*, cuda: bool | None = None) -> list[dict[str, Any]]:
    """:func:`capture_rng_state` of every rank, in rank order (a collective: call on all ranks).

    Args:
        cuda: see :func:`capture_rng_state`.

    Returns:
        One state per rank on every rank; ``[capture_rng_state()]`` without a process group.
    """
    return list(comm.all_gather(capture_rng_state(cuda=cuda)))


class RNGState:
    """The global random generators of this process as a checkpointable object.

    ``state_dict()`` captures them (:func:`capture_rng_state`) and ``load_state_dict()`` restores
    them, so ``Checkpointer(model, dir, rng=RNGState())`` saves and resumes them. One process
    only: in a multi-process job use :func:`gather_rng_states` so that every rank's state is kept.

    Args:
        cuda: see :func:`capture_rng_state`.
    """

    def __init__(self, *, cuda: bool | None = None) -> None:
        self.cuda = cuda

    def state_dict(self) -> dict[str, Any]:
        """The current states of the generators."""
        return capture_rng_state(cuda=self.cuda)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set the generators to ``state_dict``."""
        restore_rng_state(state_dict)


class RankRNGStates:
    """The random generators of every rank, as a trainer checkpoint holds them (one entry per rank).

    A single process captures its own generators in :meth:`states`. In a multi-process job the
    writing process has only its own: at a save point every rank calls :meth:`gather` (a
    collective) with a label of that point (the iteration), then :meth:`states` with the same label
    returns every rank's state. Without a matching gather it returns this rank's state and ``None``
    for the others, with a warning (once). :meth:`restore` sets this rank's generators from its
    entry.

    Args:
        cuda: see :func:`capture_rng_state`.
    """

    def __init__(self, *, cuda: bool | None = None) -> None:
        self.cuda = cuda
        self._gathered: tuple[Hashable, list[Any]] | None = None
        self._warned = False

    def gather(self, point: Hashable) -> None:
        """Gather every rank's generators at save point ``point`` (a collective in a multi-process
        job; nothing to do in a single process).

        Args:
            point: a label of the save point (e.g. ``"iteration 99"``), given to :meth:`states`
                too.
        """
        if comm.get_world_size() > 1:
            self._gathered = (point, gather_rng_states(cuda=self.cuda))

    def states(self, point: Hashable) -> list[Any]:
        """The states of every rank at ``point``, in rank order (see the class docstring).

        Args:
            point: the label given to :meth:`gather`.

        Returns:
            One :func:`capture_rng_state` dict per rank (``None`` for ranks not gathered).
        """
        world_size = comm.get_world_size()
        if world_size == 1:
            return [capture_rng_state(cuda=self.cuda)]
        if self._gathered is not None and self._gathered[0] == point:
            return list(self._gathered[1])
        if not self._warned:
            self._warned = True
            logger.warning(
                "Saving a checkpoint at %s without the other ranks' RNG states (they were not "
                "gathered): a run resumed from it restores rank %d's generators only. HINT: "
                "register the PeriodicCheckpointer hook on every rank (it writes on the main "
                "process only).",
                point,
                comm.get_rank(),
            )
        states: list[Any] = [None] * world_size
        states[comm.get_rank()] = capture_rng_state(cuda=self.cuda)
        return states

    def restore(self, states: Sequence[Any]) -> None:
        """Set this rank's generators from its entry of ``states``.

        A job resumed on another number of processes than wrote the checkpoint ("elastic"
        resume): ranks that have an entry restore it, the others get generators derived from the
        checkpoint and their rank (:func:`derive_rng_state`: deterministic); the main process logs
        this once. A saved rank whose entry is missing (not gathered) is a warning.

        Args:
            states: the list returned by :meth:`states` (possibly after a save and load).
        """
        rank, world_size = comm.get_rank(), comm.get_world_size()
        states = list(states)
        saved = len(states)
        if saved != world_size and comm.is_main_process():
            derived = f"ranks {saved}-{world_size - 1}" if saved < world_size else "no rank"
            unused = f"ranks {world_size}-{saved - 1}" if saved > world_size else "none"
            logger.warning(
                "The checkpoint holds the RNG states of %d rank(s); this job has %d: ranks that "
                "have one restore it, %s get generators derived from the checkpoint and their rank "
                "(deterministic); the states of %s are not used.",
                saved,
                world_size,
                derived,
                unused,
            )
        state = states[rank] if rank < saved else None
        if state is not None:
            restore_rng_state(state)
        elif rank >= saved and saved > 0:
            derive_rng_state(states, rank)
        else:
            logger.warning("The checkpoint has no RNG state for rank %d; not restored.", rank)


# --------------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------------
_IMMUTABLE = (
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
)


def snapshot_to_cpu(obj: Any, *, buffers: dict[tuple[Any, ...], torch.Tensor] | None = None) -> Any:
    """A deep copy of ``obj`` with every tensor copied into CPU memory of its own.

    Later in-place changes of the original tensors (an optimizer step) do not change the copy.
    Tensors that are the same object stay one object in the copy (tied weights are written once).
    CUDA tensors are copied into pinned memory asynchronously with a single synchronisation at the
    end.

    Args:
        obj: nested dicts, lists and tuples of tensors and plain values (e.g. a ``state_dict()``).
        buffers: CPU tensors of an earlier snapshot, keyed by their position in ``obj``. A tensor
            whose buffer has the same shape and dtype is copied into it instead of into freshly
            allocated memory (which is several times slower: the new pages must be faulted in).
            The dict is updated to hold this snapshot's tensors. Pass the same dict to every call,
            and only once nothing reads the earlier snapshot any more.

    Returns:
        The copy.
    """
    memo: dict[int, torch.Tensor] = {}
    cuda_used = [False]
    new_buffers: dict[tuple[Any, ...], torch.Tensor] = {}
    old_buffers = buffers if buffers is not None else {}
    result = _snapshot(obj, (), memo, cuda_used, old_buffers, new_buffers)
    if cuda_used[0]:
        torch.cuda.synchronize()
    if buffers is not None:
        buffers.clear()
        buffers.update(new_buffers)
    return result


def _copy_tensor(
    tensor: torch.Tensor, buffer: torch.Tensor | None, cuda_used: list[bool]
) -> torch.Tensor:
    tensor = tensor.detach()
    from_cuda = tensor.device.type == "cuda"
    if tensor.layout != torch.strided or tensor.device.type not in ("cpu", "cuda"):
        return tensor.to("cpu", copy=True)
    if (
        buffer is not None
        and buffer.shape == tensor.shape
        and buffer.dtype == tensor.dtype
        and buffer.is_contiguous()
        and (not from_cuda or buffer.is_pinned())
    ):
        out = buffer  # reused
    else:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=from_cuda)
    if from_cuda:
        out.copy_(tensor, non_blocking=True)
        cuda_used[0] = True
    else:
        out.copy_(tensor)
    return out


def _snapshot(
    obj: Any,
    path: tuple[Any, ...],
    memo: dict[int, torch.Tensor],
    cuda_used: list[bool],
    old: dict[tuple[Any, ...], torch.Tensor],
    new: dict[tuple[Any, ...], torch.Tensor],
) -> Any:
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = _copy_tensor(obj, old.get(path), cuda_used)
            new[path] = memo[key]
        return memo[key]
    if isinstance(obj, _IMMUTABLE):
        return obj
    if isinstance(obj, dict):
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _snapshot(value, (*path, key), memo, cuda_used, old, new)
        metadata = getattr(obj, "_metadata", None)  # module versions in a model's state_dict
        if metadata is not None:
            out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [_snapshot(v, (*path, i), memo, cuda_used, old, new) for i, v in enumerate(obj)]
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)
