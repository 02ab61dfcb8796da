"""Where this process sits in a job started by an external launcher, read from its environment.

Two launchers are recognised; d2engine reads the variables they set only here:

* **torchrun** (``python -m torch.distributed.run``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (the machine), ``MASTER_ADDR`` and ``MASTER_PORT``. The
  rendezvous is ``env://``. It wins over a Slurm job it runs in.
* **A Slurm step of more than one task** (``srun``): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` /
  ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID`` and the tasks per node
  (``SLURM_NTASKS_PER_NODE``, else ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` such
  as ``"2(x3),1"``). The rendezvous host is ``MASTER_ADDR`` when set, else the first host of
  ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST`` (``node1``,
  ``node[01-04,7]``, ``gpu-[1-2],cpu3``); the port is ``MASTER_PORT`` when set, else
  ``15000 + SLURM_JOB_ID % 20000`` (the same on every task of the job). A Slurm job of a single
  task (``sbatch`` running ``python train.py --num-gpus 4``) is not a Slurm launch: the script
  starts its own workers.

:func:`detect_cluster_env` describes the job as a :class:`ClusterEnv`;
:func:`local_rank_from_env` and :func:`local_world_size_from_env` answer the two questions
:mod:`d2engine.utils.comm` asks when a process group exists without a local group.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ClusterEnv",
    "detect_cluster_env",
    "local_rank_from_env",
    "local_world_size_from_env",
    "parse_slurm_nodelist",
]

_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@dataclass(frozen=True)
class ClusterEnv:
    """A process of a job whose processes were started by torchrun or srun.

    Attributes:
        launcher: ``"torchrun"`` or ``"slurm"``.
        rank: the global rank of this process.
        world_size: the number of processes in the job.
        local_rank: the rank of this process on its machine.
        local_world_size: the number of processes on this machine, or None when the environment
            does not say.
        machine_id: the same string on every process of one machine (``GROUP_RANK`` or the host
            name; ``SLURM_NODEID``).
        init_method: the ``init_method`` of ``torch.distributed.init_process_group``.
    """

    launcher: Literal["torchrun", "slurm"]
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    machine_id: str
    init_method: str


def _get_int(environ: Mapping[str, str], *names: str) -> int | None:
    """The first of ``names`` set (non-empty) in ``environ``, as an int; None if none is."""
    for name in names:
        value = environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(
                    f"The environment variable {name} must be an integer, got {value!r}. "
                    f"HINT: unset {name} or let the launcher set it."
                ) from None
    return None


def _require_int(environ: Mapping[str, str], name: str) -> int:
    value = _get_int(environ, name)
    if value is None:
        raise ValueError(
            f"The environment variable {name} is empty. HINT: unset it or let the launcher set it."
        )
    return value


def _missing(environ: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not environ.get(name)]


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as ``"gpu[01-03,7],cpu1"`` into host names.

    Handles one bracket range per host name (the forms Slurm prints for ordinary clusters); each
    element keeps its own zero padding (``"gpu[01,7]"`` is ``gpu01`` and ``gpu7``).

    Args:
        nodelist: the value of ``SLURM_JOB_NODELIST`` or a similar variable.

    Returns:
        The host names, in order.

    Raises:
        ValueError: if the list has a form this parser does not understand, or names no host.
    """
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[\]]+)(?:\[([^\]]*)\])?([^,\[\]]*)", nodelist):
        prefix, ranges, suffix = match.groups()
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(
                    f"Cannot parse the range {part!r} of Slurm node list {nodelist!r}."
                )
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    if not hosts:
        raise ValueError(f"Slurm node list {nodelist!r} names no host.")
    return hosts


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """This node's task count: SLURM_NTASKS_PER_NODE, else the node's entry of the per-node list.

    The list (SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE) reads like ``"2(x3),1"`` (three
    nodes of 2 tasks, then one of 1) and is indexed by SLURM_NODEID.
    """
    count = _get_int(environ, "SLURM_NTASKS_PER_NODE")
    if count is not None:
        return count
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node = _get_int(environ, "SLURM_NODEID")
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if node < len(counts) else None


def local_rank_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's rank on its machine, as the environment says.

    ``LOCAL_RANK`` (set by torchrun), else ``SLURM_LOCALID`` (srun).

    Args:
        environ: the environment (``os.environ`` when None).

    Returns:
        The local rank, or None when neither variable is set.

    Raises:
        ValueError: if the variable is not an integer.
    """
    return _get_int(os.environ if environ is None else environ, "LOCAL_RANK", "SLURM_LOCALID")


def local_world_size_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The number of processes on this machine, as the environment says.

    ``LOCAL_WORLD_SIZE`` (set by torchrun), else Slurm's tasks on this node (see the module
    docstring).

    Args:
        environ: the environment (``os.environ`` when None).

    Returns:
        The local world size, or None when the environment does not say.

    Raises:
        ValueError: if a variable that should be an integer is not.
    """
    environ = os.environ if environ is None else environ
    size = _get_int(environ, "LOCAL_WORLD_SIZE")
    return size if size is not None else _slurm_tasks_on_this_node(environ)


def _tcp_url(host: str, port: str) -> str:
    if ":" in host and not host.startswith("["):  # IPv6 literal
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def _slurm_init_method(environ: Mapping[str, str]) -> str:
    host = environ.get("MASTER_ADDR")
    if not host:
        nodelist = next((environ[k] for k in _NODELIST_VARS if environ.get(k)), None)
        if nodelist is None:
            raise ValueError(
                "Cannot find the rendezvous host of this Slurm job: neither MASTER_ADDR nor "
                f"{' / '.join(_NODELIST_VARS)} is set. "
                "HINT: export MASTER_ADDR=<first node> before srun."
            )
        try:
            host = parse_slurm_nodelist(nodelist)[0]
        except ValueError as e:
            raise ValueError(f"{e} HINT: export MASTER_ADDR=<first node> before srun.") from e
    port = environ.get("MASTER_PORT")
    if not port:
        job_id = environ.get("SLURM_JOB_ID", "0")
        port = str(15000 + int(job_id) % 20000) if job_id.isdigit() else "29500"
    return _tcp_url(host, port)


def detect_cluster_env(environ: Mapping[str, str] | None = None) -> ClusterEnv | None:
    """Describe the torchrun or Slurm job this process belongs to (see the module docstring).

    Args:
        environ: the environment (``os.environ`` when None).

    Returns:
        The job, or None when the processes were not started by torchrun or a multi-task srun.

    Raises:
        ValueError: if the environment names a torchrun or Slurm job but lacks what is needed to
            join it, or a variable that should be an integer is not.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        missing = _missing(environ, ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
        if missing:
            raise ValueError(
                f"RANK and WORLD_SIZE are set, as by torchrun, but {', '.join(missing)} is not. "
                "HINT: start the job with `torchrun` (or `python -m torch.distributed.run`), which "
                "sets them all, or unset RANK and WORLD_SIZE to let launch() start workers."
            )
        return ClusterEnv(
            launcher="torchrun",
            rank=_require_int(environ, "RANK"),
            world_size=_require_int(environ, "WORLD_SIZE"),
            local_rank=_require_int(environ, "LOCAL_RANK"),
            local_world_size=_get_int(environ, "LOCAL_WORLD_SIZE"),
            machine_id=environ.get("GROUP_RANK") or socket.gethostname(),
            init_method="env://",
        )
    ntasks = _get_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if "SLURM_PROCID" not in environ or ntasks is None or ntasks <= 1:
        return None
    missing = _missing(environ, ("SLURM_LOCALID", "SLURM_NODEID"))
    if missing:
        raise ValueError(
            f"This looks like a Slurm step of {ntasks} tasks (SLURM_PROCID, SLURM_NTASKS), but "
            f"{', '.join(missing)} is not set. HINT: start the tasks with `srun`."
        )
    return ClusterEnv(
        launcher="slurm",
        rank=_require_int(environ, "SLURM_PROCID"),
        world_size=ntasks,
        local_rank=_require_int(environ, "SLURM_LOCALID"),
        local_world_size=_slurm_tasks_on_this_node(environ),
        machine_id=environ["SLURM_NODEID"],
        init_method=_slurm_init_method(environ),
    )
