"""Helpers for multi-process (``torch.distributed``) jobs.

Every function works without an initialised process group (then the job is one process: world size
1, rank 0), inside a job started by :func:`d2engine.engine.launch`, and under ``torchrun`` or Slurm,
where the local rank and size are read from the environment (:mod:`d2engine.utils.cluster`).

Object collectives (:func:`all_gather`, :func:`gather`) pickle their inputs and travel over a gloo
group, so they work for any picklable object whatever the main backend is.

The groups this module creates (and :func:`new_group`) have the default group's timeout, the one
given to ``init_process_group`` (``launch(timeout=...)``): torch would give them its own default
(30 minutes; 10 for NCCL), so a collective on them would wait that long for a rank that hangs.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from d2engine.utils.cluster import local_rank_from_env, local_world_size_from_env

__all__ = [
    "all_gather",
    "create_local_process_group",
    "create_local_process_group_by_machine",
    "destroy_process_groups",
    "gather",
    "get_local_process_group",
    "get_local_rank",
    "get_local_size",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "is_sharded_module",
    "new_group",
    "reduce_dict",
    "shared_random_seed",
    "synchronize",
]

_LOCAL_PROCESS_GROUP: dist.ProcessGroup | None = None
"""The process group of this machine's processes (see :func:`create_local_process_group`)."""

_GLOO_GROUP: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None
"""(default group, gloo group over the same ranks) when the default group is not gloo."""

_MISSING_LOCAL_GROUP = (
    "The local process group has not been created and the environment names no local rank "
    "(LOCAL_RANK / SLURM_LOCALID). HINT: start the job with d2engine.engine.launch(), or call "
    "d2engine.utils.comm.create_local_process_group(num_workers_per_machine) after "
    "torch.distributed.init_process_group()."
)


def _is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """The number of processes in the job (1 without an initialised process group)."""
    if not _is_initialized():
        return 1
    return dist.get_world_size()


def get_rank() -> int:
    """The global rank of this process (0 without an initialised process group)."""
    if not _is_initialized():
        return 0
    return dist.get_rank()


def create_local_process_group(num_workers_per_machine: int) -> None:
    """Create the process group of the processes that share this machine.

    Must be called by every process of the job, after ``init_process_group``, with ranks laid out
    machine by machine (global rank = machine_rank * num_workers_per_machine + local rank).

    Args:
        num_workers_per_machine: the number of processes on each machine.

    Raises:
        RuntimeError: if the group was already created, or the world size is not a multiple of
            ``num_workers_per_machine``.
    """
    global _LOCAL_PROCESS_GROUP
    if _LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("The local process group was already created.")
    world_size = get_world_size()
    if num_workers_per_machine <= 0 or world_size % num_workers_per_machine != 0:
        raise RuntimeError(
            f"World size {world_size} is not a multiple of num_workers_per_machine="
            f"{num_workers_per_machine}: every machine must run the same number of processes."
        )
    machine_rank = get_rank() // num_workers_per_machine
    for i in range(world_size // num_workers_per_machine):
        ranks = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        group = new_group(ranks)  # every rank must take part in creating every group
        if i == machine_rank:
            _LOCAL_PROCESS_GROUP = group


def create_local_process_group_by_machine(machine_id: str) -> None:
    """Create the process group of the processes that share this machine, from machine ids.

    For any rank layout: used under torchrun and Slurm, where ranks need not be laid out machine
    by machine and machines may run different numbers of processes. Must be called by every
    process of the job, after ``init_process_group`` (it gathers every rank's ``machine_id``).

    Args:
        machine_id: the same string on every process of one machine (e.g. the node id).

    Raises:
        RuntimeError: if the group was already created.
    """
    global _LOCAL_PROCESS_GROUP
    if _LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("The local process group was already created.")
    machine_ids = all_gather(machine_id)
    rank = get_rank()
    for machine in dict.fromkeys(machine_ids):  # in order of first appearance, the same everywhere
        ranks = [r for r, m in enumerate(machine_ids) if m == machine]
        group = new_group(ranks)
        if rank in ranks:
            _LOCAL_PROCESS_GROUP = group


def _default_group_timeout() -> datetime.timedelta | None:
    """The collective timeout of the default process group, or None if torch does not say."""
    world = dist.group.WORLD
    for device in ("cpu", "cuda"):  # the backend of either device has the group's timeout
        try:
            return world._get_backend(torch.device(device)).options._timeout  # type: ignore[union-attr]
        except (AttributeError, RuntimeError):
            continue
    return None


def new_group(ranks: Sequence[int] | None = None, backend: str | None = None) -> dist.ProcessGroup:
    """``torch.distributed.new_group`` with the timeout of the default process group.

    Every rank of the job must call it, in the same order (a collective).

    Args:
        ranks: the global ranks of the group; all ranks when None.
        backend: its backend (e.g. ``"gloo"``); the default group's when None.

    Returns:
        The group.
    """
    return dist.new_group(
        list(ranks) if ranks is not None else None,
        timeout=_default_group_timeout(),
        backend=backend,
    )


def get_local_process_group() -> dist.ProcessGroup:
    """The process group of this machine's processes (see :func:`create_local_process_group`)."""
    if _LOCAL_PROCESS_GROUP is None:
        raise RuntimeError(_MISSING_LOCAL_GROUP)
    return _LOCAL_PROCESS_GROUP


def destroy_process_groups() -> None:
    """Destroy this process's process groups: the default one and those this module created.

    Ends the job's groups in this process (what :func:`d2engine.engine.launch` does when
    ``main_func`` ends): the local group and the gloo group of the object collectives are
    forgotten and ``torch.distributed.destroy_process_group()`` destroys them with the default
    group. A later job in this process then starts afresh. Does nothing for groups that do not
    exist. Local to this process; call :func:`synchronize` first so that no rank tears the
    rendezvous down while another still uses it.
    """
    global _LOCAL_PROCESS_GROUP, _GLOO_GROUP
    _LOCAL_PROCESS_GROUP = None
    _GLOO_GROUP = None
    if _is_initialized():
        dist.destroy_process_group()


def get_local_rank() -> int:
    """The rank of this process among the processes on its machine.

    Read from the local process group when one was created, else from the environment
    (:func:`d2engine.utils.cluster.local_rank_from_env`: ``LOCAL_RANK`` as set by torchrun,
    ``SLURM_LOCALID`` under srun); 0 in a single-process job.

    Raises:
        RuntimeError: in a multi-process job with neither a local group nor such a variable.
    """
    if not _is_initialized():
        return 0
    if _LOCAL_PROCESS_GROUP is not None:
        return dist.get_rank(group=_LOCAL_PROCESS_GROUP)
    value = local_rank_from_env()
    if value is None:
        raise RuntimeError(_MISSING_LOCAL_GROUP)
    return value


def get_local_size() -> int:
    """The number of processes on this machine (see :func:`get_local_rank`).

    Raises:
        RuntimeError: in a multi-process job with neither a local group nor such a variable.
    """
    if not _is_initialized():
        return 1
    if _LOCAL_PROCESS_GROUP is not None:
        return dist.get_world_size(group=_LOCAL_PROCESS_GROUP)
    value = local_world_size_from_env()
    if value is None:
        raise RuntimeError(_MISSING_LOCAL_GROUP)
    return value


def is_main_process() -> bool:
    """Whether this process has global rank 0."""
    return get_rank() == 0


def is_sharded_module(module: nn.Module) -> bool:
    """Whether ``module`` has DTensor parameters (e.g. sharded by FSDP2's ``fully_shard``).

    Its forward pass is then a collective (the parameters are gathered from every rank), and so
    is saving it (:mod:`d2engine.checkpoint.sharded`): every rank must take part.

    Args:
        module: any module.

    Returns:
        True when a parameter is a ``torch.distributed.tensor.DTensor``.
    """
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is None:  # never imported: no tensor can be a DTensor (and no import cost)
        return False
    dtensor = dtensor_module.DTensor
    return any(isinstance(p, dtensor) for p in module.parameters())


def synchronize() -> None:
    """A barrier across all processes; a no-op in a single-process job."""
    if get_world_size() == 1:
        return
    if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
        # Name the device so that NCCL does not guess one (and warn) when ranks share a machine.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _get_global_gloo_group() -> dist.ProcessGroup:
    """A gloo group over all ranks, for collectives on pickled Python objects.

    The default group when it is gloo; otherwise a gloo group created once per default group
    (creating it is a collective: every rank reaches here in the same object collective).
    """
    global _GLOO_GROUP
    world = dist.group.WORLD
    assert world is not None  # callers checked that a process group is initialised
    if dist.get_backend() == "gloo":
        return world
    if _GLOO_GROUP is None or _GLOO_GROUP[0] is not world:
        _GLOO_GROUP = (world, new_group(backend="gloo"))
    return _GLOO_GROUP[1]


def all_gather(data: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Gather a picklable object from every rank onto every rank.

    Args:
        data: any picklable object.
        group: the group to gather over; by default a gloo group of all ranks.

    Returns:
        The objects of all ranks of the group, in rank order.
    """
    if get_world_size() == 1:
        return [data]
    if group is None:
        group = _get_global_gloo_group()
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return [data]
    output: list[Any] = [None] * world_size
    dist.all_gather_object(output, data, group=group)
    return output


def gather(data: Any, dst: int = 0, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Gather a picklable object from every rank onto rank ``dst``.

    Args:
        data: any picklable object.
        dst: the global rank that receives the objects.
        group: the group to gather over; by default a gloo group of all ranks.

    Returns:
        On ``dst``, the objects of all ranks in rank order; on every other rank, an empty list.
    """
    if get_world_size() == 1:
        return [data]
    if group is None:
        group = _get_global_gloo_group()
    world_size = dist.get_world_size(group=group)
    if world_size == 1:
        return [data]
    if dist.get_rank() == dst:
        output: list[Any] = [None] * world_size
        dist.gather_object(data, output, dst=dst, group=group)
        return output
    dist.gather_object(data, None, dst=dst, group=group)
    return []


def shared_random_seed() -> int:
    """A random integer in ``[0, 2**31)`` that is the same on every rank (rank 0's draw)."""
    ints = np.random.randint(2**31)
    return int(all_gather(ints)[0])


def reduce_dict(
    input_dict: dict[str, torch.Tensor], average: bool = True
) -> dict[str, torch.Tensor]:
    """Reduce the values of a dict of scalar tensors onto rank 0.

    Every rank must pass the same keys. Keys are sorted so that ranks agree on the order.

    Args:
        input_dict: scalar tensors to reduce.
        average: average (True) or sum (False) the values.

    Returns:
        A dict with the same keys. On rank 0 it holds the reduced values; on other ranks the values
        are unspecified (as with ``torch.distributed.reduce``).
    """
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k].detach().reshape(()) for k in names], dim=0)
        dist.reduce(values, dst=0)
        if dist.get_rank() == 0 and average:
            values /= world_size
        return dict(zip(names, values))
