"""One process of a job that :func:`~d2engine.engine.launch.launch` runs: join, call, leave.

Each process of a multi-process job, whether :func:`~d2engine.engine.launch.launch` spawned it
(:func:`run_worker`) or torchrun / srun started it (:func:`run_external`), does the same three
things: it initialises the default process group and the per-machine group
(:func:`d2engine.utils.comm.create_local_process_group`) and waits at a barrier; it calls
``main_func(*args)`` and turns the way it ended into an exit code (:func:`call_main`: 0, or the
code of a stop for a signal); it waits at a barrier again (unless it failed or stopped at start-up,
when a peer may be elsewhere) and destroys its process groups.

A spawned worker also: exits when the launcher dies (no orphan), runs in a process group of its
own (a terminal's Ctrl-C reaches the launcher only, which passes it on), writes its Python stacks
on :data:`~d2engine.utils.watchdog.STACK_DUMP_SIGNAL` to a file the launcher reads after a hang,
uses ``available CPUs // processes per machine`` threads unless ``OMP_NUM_THREADS`` is set, and
sends the traceback of a failure (with its exit code) to the launcher through a pipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from d2engine.engine.preemption import (
    INTERRUPT_EXIT_CODE,
    PREEMPTION_EXIT_CODE,
    JobStopped,
    preempted_signal,
    preemption_guard,
    record_preemption,
    stop_exit_code,
)
from d2engine.utils import comm
from d2engine.utils.cluster import ClusterEnv
from d2engine.utils.watchdog import disable_stack_dumps, enable_stack_dumps

__all__ = ["STOP_CODES", "Job", "call_main", "run_external", "run_worker"]

STOP_CODES = (PREEMPTION_EXIT_CODE, INTERRUPT_EXIT_CODE)
"""The exit codes of a process that stopped for a signal (preempted, interrupted)."""

logger = logging.getLogger(__name__)


def _setup_process_group(
    backend: str,
    init_method: str,
    rank: int,
    world_size: int,
    local_rank: int,
    local_group: int | str,
    timeout: datetime.timedelta,
) -> None:
    """Initialise the default and per-machine process groups, then wait at a barrier.

    ``local_group``: the number of processes per machine (ranks laid out machine by machine), or
    this machine's id (any layout).
    """
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method, timeout=timeout, world_size=world_size, rank=rank)
    if isinstance(local_group, int):
        comm.create_local_process_group(local_group)
    else:
        comm.create_local_process_group_by_machine(local_group)
    comm.synchronize()


def _teardown_process_group(*, wait_for_others: bool) -> None:
    """Destroy the process groups of this process (after a barrier when ``wait_for_others``)."""
    try:
        if wait_for_others and dist.is_initialized():
            # No rank tears the store down while another still uses it.
            comm.synchronize()
    finally:
        comm.destroy_process_groups()


def _exit_when_launcher_dies(parent_alive: Connection) -> None:
    """Block until the launcher's end of ``parent_alive`` closes, then end this process."""
    try:
        parent_alive.recv()
    except (EOFError, OSError):
        pass
    os._exit(1)


@dataclasses.dataclass(frozen=True)
class Job:
    """What every worker of a job started by :func:`~d2engine.engine.launch.launch` needs to
    join it (picklable: it travels to the spawned workers)."""

    backend: str
    init_method: str
    world_size: int
    num_gpus_per_machine: int
    machine_rank: int
    timeout: datetime.timedelta
    stack_dir: str = ""
    """Where each worker writes its stacks on STACK_DUMP_SIGNAL (``worker<local rank>.txt``)."""

    def stack_file(self, local_rank: int) -> str:
        """The file worker ``local_rank`` writes its stacks to."""
        return os.path.join(self.stack_dir, f"worker{local_rank}.txt")

    def global_rank(self, local_rank: int) -> int:
        """The global rank of worker ``local_rank`` of this machine."""
        return self.machine_rank * self.num_gpus_per_machine + local_rank

    signals: tuple[int, ...] = ()
    """The signals the launcher passes on; outside training they end a worker with 75 (130)."""


def call_main(main_func: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """Call ``main_func(*args)`` here; return the exit code of a stop for a signal, or 0.

    Stopped: ``main_func`` raised ``SystemExit`` with 75 or 130, or returned after a trainer
    recorded a stop in this process (:func:`~d2engine.engine.preemption.stop_exit_code` of its
    signal).

    Args:
        main_func: the function to call.
        args: its arguments.

    Returns:
        ``PREEMPTION_EXIT_CODE`` (75) or ``INTERRUPT_EXIT_CODE`` (130) for a stop, else 0.

    Raises:
        JobStopped: a signal outside training (propagated).
        SystemExit: ``main_func`` exited with another code (propagated), as does any exception
            of ``main_func``.
    """
    try:
        main_func(*args)
    except JobStopped:
        raise
    except SystemExit as e:
        if e.code not in STOP_CODES:
            raise
        return int(e.code)
    signum = preempted_signal()
    return 0 if signum is None else stop_exit_code(signum)


def run_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    args: tuple[Any, ...],
    job: Job,
    error_conn: Connection,
    parent_alive: Connection,
) -> None:
    """The body of worker ``local_rank``, a process :func:`~d2engine.engine.launch.launch`
    spawned: join the job, call ``main_func(*args)``, leave; ends the process with
    ``sys.exit(code)``.

    Args:
        local_rank: its rank on this machine.
        main_func: the function to call.
        args: its arguments.
        job: the job it joins.
        error_conn: where it sends ``(traceback, exit code or None)`` when ``main_func`` fails.
        parent_alive: closes when the launcher dies; the worker then exits.
    """
    threading.Thread(
        target=_exit_when_launcher_dies, args=(parent_alive,), daemon=True, name="launcher-watch"
    ).start()
    # A process group of its own: a terminal's Ctrl-C reaches the launcher only, which passes it
    # on, so that every worker gets it once.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if job.stack_dir:  # the launcher reads the stacks when a worker hangs
        enable_stack_dumps(open(job.stack_file(local_rank), "a", encoding="utf-8"))  # noqa: SIM115
    if not os.environ.get("OMP_NUM_THREADS"):
        # Share the CPU cores instead of every worker using all of them (oversubscription).
        torch.set_num_threads(max(1, _available_cpus() // job.num_gpus_per_machine))
    record_preemption(None)
    exit_code, started = 0, True
    with preemption_guard(job.signals):
        try:
            _setup_process_group(
                job.backend,
                job.init_method,
                job.global_rank(local_rank),
                job.world_size,
                local_rank,
                job.num_gpus_per_machine,
                job.timeout,
            )
            exit_code = call_main(main_func, args)
        except JobStopped as e:  # a signal before (or after) training: nothing to save
            exit_code, started = int(e.code), False  # type: ignore[arg-type]
        except SystemExit as e:  # sys.exit(0) in main_func is a success
            if e.code not in (None, 0):
                exit_code = e.code if isinstance(e.code, int) else 1
                # The code travels with the traceback: the launcher may read it before this exits.
                error_conn.send((traceback.format_exc(), exit_code))
        except BaseException:
            error_conn.send((traceback.format_exc(), None))
            exit_code = 1
        finally:
            # A peer stopped at start-up may be in another collective: no barrier then.
            _teardown_process_group(wait_for_others=started and exit_code in (0, *STOP_CODES))
    error_conn.close()
    sys.exit(exit_code)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_external(
    env: ClusterEnv,
    main_func: Callable[..., Any],
    args: tuple[Any, ...],
    num_gpus_per_machine: int,
    num_machines: int,
    timeout: datetime.timedelta,
) -> int:
    """Run ``main_func`` in this process of a torchrun / srun job (no process spawned).

    Call it inside :func:`~d2engine.engine.preemption.preemption_guard`. The external launcher
    decides the number of processes: a mismatch with the requested one is only logged.

    Args:
        env: this process's place in the job.
        main_func: the function to call.
        args: its arguments.
        num_gpus_per_machine: the processes per machine ``launch`` was asked for.
        num_machines: the machines ``launch`` was asked for.
        timeout: the timeout of the process groups.

    Returns:
        As :func:`call_main`.
    """
    if env.world_size != num_gpus_per_machine * num_machines:
        logger.warning(
            "%s started %d process(es) in total; launch(num_gpus_per_machine=%d, num_machines=%d) "
            "asked for %d. The %s job decides: main_func runs once in each of its processes.",
            env.launcher,
            env.world_size,
            num_gpus_per_machine,
            num_machines,
            num_gpus_per_machine * num_machines,
            env.launcher,
        )
    if dist.is_initialized():
        logger.info("The process group is initialised already: calling main_func in place.")
        return call_main(main_func, args)
    if env.world_size == 1:
        return call_main(main_func, args)
    cuda_ok = torch.cuda.is_available() and env.local_rank < torch.cuda.device_count()
    backend = "nccl" if cuda_ok else "gloo"
    if env.rank == 0:
        logger.info(
            "Started by %s: %d processes, backend %s (%s).",
            env.launcher,
            env.world_size,
            backend,
            "one CUDA device per process" if cuda_ok else "no CUDA device for every process",
        )
    code: int | None = None
    enable_stack_dumps()  # no launcher of ours collects them: `kill -USR2 <pid>` prints them
    try:
        _setup_process_group(
            backend,
            env.init_method,
            env.rank,
            env.world_size,
            env.local_rank,
            env.machine_id,
            timeout,
        )
        code = call_main(main_func, args)
    finally:
        disable_stack_dumps()
        # No barrier after a failure or a stop at start-up (JobStopped): a peer may be elsewhere.
        _teardown_process_group(wait_for_others=code is not None)
    return code
