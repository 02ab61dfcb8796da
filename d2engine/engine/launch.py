"""Start a multi-process (``torch.distributed``) job: :func:`launch`.

``launch`` is called on every machine of a job. It has three ways of running ``main_func``:

* **One process in total** (``num_machines * num_gpus_per_machine == 1``): ``main_func(*args)`` is
  called in this process, without a process group.
* **Worker processes**: ``num_gpus_per_machine`` processes are started on this machine with the
  ``spawn`` start method. Each one initialises ``torch.distributed`` (NCCL and one GPU per process
  when CUDA has enough devices, gloo on CPU otherwise, so ``--num-gpus 2`` works on a laptop),
  creates the per-machine process group (:func:`d2engine.utils.comm.create_local_process_group`),
  waits at a barrier, calls ``main_func(*args)``, waits at a barrier again and destroys its process
  groups.
  Unless ``OMP_NUM_THREADS`` is set, each worker uses ``available CPUs // num_gpus_per_machine``
  threads, so that the workers share the cores instead of oversubscribing them. The launcher
  watches the workers: when one raises or dies (a signal, ``os._exit``), it terminates the others
  and raises :class:`WorkerError` with the worker's traceback; workers exit by themselves if the
  launcher dies, so no orphan is left behind.
* **An external launcher**: under ``torchrun`` or a Slurm ``srun`` step of more than one task
  (:func:`d2engine.utils.cluster.detect_cluster_env` says which variables count), the processes
  exist already: ``launch`` starts none, initialises the process group from the environment,
  creates the per-machine group and calls ``main_func`` once in this process. The external
  launcher decides the number of processes; ``num_gpus_per_machine`` is then only checked.

Hangs (``docs/distributed.md`` tells the whole story): ``timeout`` applies to every process group
of the job (also those :mod:`d2engine.utils.comm` creates). When a worker's hang watchdog ended it
(:class:`~d2engine.engine.watchdog.HangWatchdog`, exit code
:data:`~d2engine.utils.watchdog.HANG_EXIT_CODE`), the launcher first gives the other workers'
watchdogs time to report; when a worker's collective (or the rendezvous) timed out, or after that
wait, it logs the Python stack of every worker still running (they write it on
:data:`~d2engine.utils.watchdog.STACK_DUMP_SIGNAL`) before ending them.

Signals (``docs/resume.md`` tells the whole story, with a table of exit codes): the signals in
``forward_signals`` (default SIGTERM and SIGINT) stop the job; ``launch`` ends with
``SystemExit(75)`` (``PREEMPTION_EXIT_CODE``; SIGINT: 130) once ``main_func`` has ended in every
process of this machine, whether training in it stopped with a checkpoint (a trainer recorded the
stop, see :func:`~d2engine.engine.preemption.preempted_signal`, or ``main_func`` raised
``SystemExit(75)``) or the signal came before training started (start-up: nothing to save yet;
:func:`~d2engine.engine.preemption.preemption_guard`). So a script calling ``launch`` behaves like
``d2engine-train``. A repeated signal does not change that outcome (a second SIGINT aborts at
once). Spawned workers run in a process group of their own and get the signals that the launching
process receives, while it waits for them; in one process, and under torchrun or srun (which
signal every process), each process handles them itself. Under torchrun or srun the exit code
reaches the scheduler as that launcher reports it (srun: its tasks' highest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from d2engine.engine.preemption import (
    INTERRUPT_EXIT_CODE,
    PREEMPTION_EXIT_CODE,
    JobStopped,
    ignore_until_exit,
    preempted_signal,
    preemption_guard,
    preemption_handlers,
    record_preemption,
    signal_name,
    stop_exit_code,
)
from d2engine.utils import comm
from d2engine.utils.cluster import ClusterEnv, detect_cluster_env
from d2engine.utils.validation import check_positive_int
from d2engine.utils.watchdog import (
    HANG_EXIT_CODE,
    STACK_DUMP_SIGNAL,
    disable_stack_dumps,
    enable_stack_dumps,
    is_timeout_error,
    request_stack_dumps,
)

__all__ = ["DEFAULT_TIMEOUT", "WorkerError", "launch"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
"""The default timeout of collectives and of the rendezvous, as in ``torch.distributed``."""

_TERMINATE_GRACE_S = 5.0
"""Seconds a worker gets to exit after SIGTERM before it is killed."""

_CAUSE_GRACE_S = 0.1
"""Seconds the launcher waits, after a worker's traceback, for a peer's death that caused it."""

_HANG_PEER_WAIT_S = 15.0
"""Seconds the launcher waits, after a worker's hang watchdog ended it, for the other workers'
watchdogs to report and end them (they stall too, and fire within a few seconds)."""

_STOP_GRACE_S = 30.0
"""Seconds the other workers get to end after one stopped for a signal: a stopped run's workers
end together (they saved the same checkpoint), but one blocked in a start-up rendezvous would wait
for its collective's timeout."""

_STOP_CODES = (PREEMPTION_EXIT_CODE, INTERRUPT_EXIT_CODE)

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A worker process started by :func:`launch` raised an exception or died.

    Attributes:
        global_rank: the global rank of the failed worker.
        local_rank: its rank on this machine.
        exitcode: its exit code (negative: the number of the signal that killed it; ``n`` for
            a worker that ended with ``SystemExit(n)``, also when its traceback arrived before it
            exited; never ``PREEMPTION_EXIT_CODE``, which is not a failure), or ``None`` when it
            reported an exception before exiting.
        worker_traceback: the formatted traceback of the worker's exception ("" if it died without
            one).
    """

    def __init__(
        self,
        message: str,
        *,
        global_rank: int,
        local_rank: int,
        exitcode: int | None,
        worker_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.global_rank = global_rank
        self.local_rank = local_rank
        self.exitcode = exitcode
        self.worker_traceback = worker_traceback


def _choose_backend(num_gpus_per_machine: int) -> tuple[str, str]:
    """The backend for processes of this machine, and why."""
    if not torch.cuda.is_available():
        return "gloo", "CUDA is not available: the workers run on CPU"
    count = torch.cuda.device_count()
    if count < num_gpus_per_machine:
        return "gloo", (
            f"{num_gpus_per_machine} processes per machine but only {count} CUDA device(s): "
            "the workers run on CPU"
        )
    return "nccl", f"{count} CUDA device(s): one per process"


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
class _Job:
    """What every worker of a job started by :func:`launch` needs to join it."""

    backend: str
    init_method: str
    world_size: int
    num_gpus_per_machine: int
    machine_rank: int
    timeout: datetime.timedelta
    stack_dir: str = ""
    """Where each worker writes its stacks on STACK_DUMP_SIGNAL (``worker<local rank>.txt``)."""

    def stack_file(self, local_rank: int) -> str:
        return os.path.join(self.stack_dir, f"worker{local_rank}.txt")

    signals: tuple[int, ...] = ()
    """The signals the launcher passes on; outside training they end a worker with 75 (130)."""


def _call_main(main_func: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """Call ``main_func(*args)`` here; return the exit code of a stop for a signal, or 0.

    Stopped: ``main_func`` raised ``SystemExit`` with 75 or 130, or returned after a trainer
    recorded a stop in this process (:func:`~d2engine.engine.preemption.stop_exit_code` of its
    signal). A :class:`~d2engine.engine.preemption.JobStopped` (a signal outside training)
    propagates.
    """
    try:
        main_func(*args)
    except JobStopped:
        raise
    except SystemExit as e:
        if e.code not in _STOP_CODES:
            raise
        return int(e.code)  # type: ignore[arg-type]
    signum = preempted_signal()
    return 0 if signum is None else stop_exit_code(signum)


def _distributed_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    args: tuple[Any, ...],
    job: _Job,
    error_conn: Connection,
    parent_alive: Connection,
) -> None:
    """Body of a worker process started by :func:`launch`."""
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
                job.machine_rank * job.num_gpus_per_machine + local_rank,
                job.world_size,
                local_rank,
                job.num_gpus_per_machine,
                job.timeout,
            )
            exit_code = _call_main(main_func, args)
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
            _teardown_process_group(wait_for_others=started and exit_code in (0, *_STOP_CODES))
    error_conn.close()
    sys.exit(exit_code)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _resolve_dist_url(dist_url: str | None, num_machines: int) -> str:
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise ValueError(
                f"dist_url={dist_url!r} picks a free port on this machine, which the other "
                f"{num_machines - 1} machine(s) cannot know. HINT: pass the same "
                "dist_url='tcp://<address of machine 0>:<port>' on every machine."
            )
        return f"tcp://127.0.0.1:{_find_free_port()}"
    if dist_url.startswith("tcp://"):
        if not re.fullmatch(r"tcp://(\[[^\]]+\]|[^:/]+):\d+/?", dist_url):
            raise ValueError(
                f"dist_url {dist_url!r} is not of the form 'tcp://host:port'. "
                "HINT: e.g. dist_url='tcp://10.0.0.1:29500'."
            )
        return dist_url
    if dist_url.startswith("file://"):
        if num_machines > 1:
            logger.warning(
                "dist_url %s: every machine must see this file (a shared file system).", dist_url
            )
        return dist_url
    if dist_url.startswith("env://"):
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise ValueError(
                f"dist_url='env://' needs {', '.join(missing)} in the environment. "
                "HINT: export them, or pass dist_url='auto' / 'tcp://host:port'."
            )
        return dist_url
    raise ValueError(
        f"dist_url {dist_url!r} is not supported: expected 'auto', 'tcp://host:port', "
        "'file:///path' or 'env://'."
    )


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def _terminate(processes: Sequence[Any]) -> None:
    """SIGTERM every live worker, then SIGKILL those still alive after a grace period."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    for proc in processes:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            proc.join()


def _worker_error(job: _Job, local_rank: int, exitcode: int | None, tb: str) -> WorkerError:
    rank = job.machine_rank * job.num_gpus_per_machine + local_rank
    what = "raised an exception" if tb else _describe_exit(exitcode or 0)
    message = f"Worker {rank} (local rank {local_rank}) of the job {what}."
    if tb:
        message += f" Its traceback:\n\n{tb}"
        if is_timeout_error(tb):
            message += (
                f"\nHINT: a collective (or the rendezvous) timed out after {job.timeout} (launch's "
                "timeout): another rank did not take part. The Python stacks of the workers "
                "still running were logged above; the one that is not waiting for the others "
                "is the one that stopped."
            )
    elif exitcode == HANG_EXIT_CODE:
        message += (
            " Its hang watchdog ended it: it made no training progress for the hang timeout. "
            "The watchdogs' reports above name the rank(s), the iteration and where each one "
            "was, with their Python stacks."
        )
    elif exitcode is not None and exitcode > 0:
        message += " Its output above may say why."
    elif exitcode == -signal.SIGKILL:
        message += " HINT: the kernel's out-of-memory killer sends SIGKILL."
    return WorkerError(
        message, global_rank=rank, local_rank=local_rank, exitcode=exitcode, worker_traceback=tb
    )


def _pending_traceback(readers: dict[Connection, int], local_rank: int) -> str:
    """The traceback that worker ``local_rank`` sent before it exited, or ""."""
    for reader, i in list(readers.items()):
        if i == local_rank and reader.poll():
            try:
                return str(reader.recv()[0])
            except EOFError:  # it died without reporting (a signal, os._exit)
                pass
    return ""


def _spawn_and_watch(main_func: Callable[..., Any], args: tuple[Any, ...], job: _Job) -> int:
    """Start the workers of this machine and wait for all of them; fail fast on the first error.

    The signals in ``job.signals`` that this process receives meanwhile are passed on to the
    running workers (a second SIGINT then aborts: ``KeyboardInterrupt``). Once it got one, the
    job ends with that signal's exit code: a worker ended by it before it could catch it (start-up)
    or failing afterwards counts as stopped, and the other workers are terminated.

    Returns:
        The exit code of a stop (75, 130) when a worker stopped for a signal (and none failed
        before), else 0.
    """
    ctx = mp.get_context("spawn")
    processes: list[Any] = []
    running: dict[Any, tuple[int, Any]] = {}  # sentinel -> (local rank, process) until reaped
    readers: dict[Connection, int] = {}
    keep_alive: list[Connection] = []
    failure: WorkerError | None = None
    stopped = 0  # the exit code of a stop
    received: list[int] = []  # the signals this process received

    def pass_on(signum: int) -> None:
        second_interrupt = signum == signal.SIGINT and bool(received)
        received.append(signum)
        for _, proc in list(running.values()):  # running, not yet reaped: the pid is theirs
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)
        if second_interrupt:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once (the finally ends workers)

    deadline: float | None = None  # once a worker stopped: when the others are terminated
    job = dataclasses.replace(job, stack_dir=tempfile.mkdtemp(prefix="d2engine-stacks-"))
    try:
        with preemption_handlers(job.signals, pass_on, "launch()"):
            for local_rank in range(job.num_gpus_per_machine):
                if received:  # stopped while starting: the started ones cannot rendezvous
                    break
                reader, writer = ctx.Pipe(duplex=False)
                alive_reader, alive_writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_distributed_worker,
                    args=(local_rank, main_func, args, job, writer, alive_reader),
                    daemon=False,
                    name=f"d2engine-worker-{local_rank}",
                )
                try:
                    proc.start()
                except (pickle.PicklingError, AttributeError, TypeError) as e:
                    raise TypeError(
                        f"Cannot start worker {local_rank}: {type(e).__name__}: {e}. HINT: "
                        "main_func and args must be picklable, so define main_func at the top "
                        "level of a module (not a lambda or a nested function)."
                    ) from e
                finally:
                    writer.close()
                    alive_reader.close()
                processes.append(proc)
                running[proc.sentinel] = (local_rank, proc)
                readers[reader] = local_rank
                keep_alive.append(alive_writer)
            if received:  # during the start: every worker is starting, none trains
                stopped, deadline = stop_exit_code(received[0]), time.monotonic()

            while running and failure is None:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready_list = wait([*running, *readers], timeout=timeout)
                if not ready_list:
                    break  # the others did not end in time: the finally terminates them
                for ready in ready_list:
                    if isinstance(ready, Connection):
                        local_rank = readers.pop(ready)
                        try:
                            tb, code = ready.recv()
                        except EOFError:  # the worker closed its end: it is exiting
                            ready.close()
                            continue
                        failure = _worker_error(job, local_rank, code, tb)
                        # A peer's death can show a moment after the error it causes here (a
                        # broken collective, measured: < 1 ms): blame a peer that died silently.
                        peers = [s for s, (i, _) in running.items() if i != local_rank]
                        for sentinel in wait(peers, timeout=_CAUSE_GRACE_S):
                            i, peer = running.pop(sentinel)
                            peer.join()
                            if peer.exitcode not in (0, *_STOP_CODES) and not (
                                _pending_traceback(readers, i)
                            ):
                                failure = _worker_error(job, i, peer.exitcode, "")
                        break
                    if ready not in running:
                        continue
                    local_rank, proc = running.pop(ready)
                    proc.join()
                    code = proc.exitcode
                    if code in _STOP_CODES:  # the others stop after the same iteration
                        stopped = stopped or code
                        if deadline is None:
                            deadline = time.monotonic() + _STOP_GRACE_S
                    elif received and code is not None and code < 0 and -code in job.signals:
                        # Ended by a signal passed on before it could catch it: it was starting,
                        # so none of the others is training either.
                        stopped = stopped or stop_exit_code(-code)
                        deadline = time.monotonic()
                    elif code != 0:
                        tb = _pending_traceback(readers, local_rank)
                        failure = _worker_error(job, local_rank, code, tb)
                        break
        if failure is not None:
            _end_hung_workers(failure, running, job)
    finally:
        _terminate(processes)
        for conn in [*readers, *keep_alive]:
            conn.close()
        shutil.rmtree(job.stack_dir, ignore_errors=True)
    if failure is not None and received:
        # Told to stop, the job stops: a worker failing meanwhile (e.g. a peer it waited for
        # stopped at start-up) does not make it a failure.
        logger.warning(
            "Worker failure after this job was told to stop (%s); the job ends as stopped:\n%s",
            ", ".join(signal_name(s) for s in received),
            failure,
        )
        failure, stopped = None, stopped or stop_exit_code(received[0])
    if failure is not None:
        raise failure
    return stopped


def _end_hung_workers(failure: WorkerError, running: dict[Any, tuple[int, Any]], job: _Job) -> None:
    """After a hang, log the Python stacks of the other workers still running and kill them.

    A hang: ``failure`` is a watchdog's exit (then the other workers' watchdogs first get
    ``_HANG_PEER_WAIT_S`` to report and exit) or a timeout error. Those still running then are
    stuck (a SIGTERM would wait in vain), so they are killed after their dump. ``running`` (the
    workers not yet reaped) is updated.
    """
    if failure.exitcode == HANG_EXIT_CODE:
        deadline = time.monotonic() + _HANG_PEER_WAIT_S
        while running and time.monotonic() < deadline:
            for sentinel in wait(list(running), timeout=max(0.0, deadline - time.monotonic())):
                running.pop(sentinel)[1].join()
    elif not is_timeout_error(failure.worker_traceback):
        return
    stuck = sorted(
        (i, proc) for i, proc in running.values() if i != failure.local_rank and proc.is_alive()
    )
    stacks = request_stack_dumps([(proc.pid, job.stack_file(i)) for i, proc in stuck])
    for (i, proc), text in zip(stuck, stacks):
        proc.kill()
        logger.error(
            "Python stacks of worker %d (pid %d), still running when worker %d failed "
            "(dumped on %s, then killed):\n%s",
            job.machine_rank * job.num_gpus_per_machine + i,
            proc.pid,
            failure.global_rank,
            signal.Signals(STACK_DUMP_SIGNAL).name,
            text.rstrip() or "(it wrote nothing)",
        )


def _run_external(
    env: ClusterEnv,
    main_func: Callable[..., Any],
    args: tuple[Any, ...],
    num_gpus_per_machine: int,
    num_machines: int,
    timeout: datetime.timedelta,
) -> int:
    """Run ``main_func`` in this process of a torchrun / srun job; return as :func:`_call_main`.

    Call it inside :func:`~d2engine.engine.preemption.preemption_guard`.
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
        return _call_main(main_func, args)
    if env.world_size == 1:
        return _call_main(main_func, args)
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
        code = _call_main(main_func, args)
    finally:
        disable_stack_dumps()
        # No barrier after a failure or a stop at start-up (JobStopped): a peer may be elsewhere.
        _teardown_process_group(wait_for_others=code is not None)
    return code


def _check_signals(forward_signals: Iterable[int]) -> tuple[int, ...]:
    try:
        signals = tuple(signal.Signals(sig) for sig in forward_signals)
    except (TypeError, ValueError) as e:
        raise type(e)(
            f"forward_signals must be signal numbers, got {forward_signals!r}. "
            "HINT: e.g. forward_signals=(signal.SIGTERM,), or () to forward none."
        ) from None
    uncatchable = [sig.name for sig in signals if sig in (signal.SIGKILL, signal.SIGSTOP)]
    if uncatchable:
        raise ValueError(
            f"forward_signals: {', '.join(uncatchable)} cannot be caught, so cannot be forwarded. "
            "HINT: forward SIGTERM (or SIGUSR1), which the trainer catches."
        )
    return tuple(int(sig) for sig in signals)


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple[Any, ...] = (),
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    forward_signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Run ``main_func(*args)`` in every process of a (possibly) multi-process job.

    Call it on every machine. See the module docstring for the three ways it runs: directly for
    one process, in ``num_gpus_per_machine`` spawned workers, or once under torchrun / srun, and
    for how it ends a preempted job.
    Global rank = ``machine_rank * num_gpus_per_machine + local rank``.

    Args:
        main_func: a picklable (top-level) function, called as ``main_func(*args)``.
        num_gpus_per_machine: processes per machine; one GPU each when CUDA has that many devices,
            CPU processes on gloo otherwise.
        num_machines: the number of machines.
        machine_rank: the rank of this machine, in ``[0, num_machines)``.
        dist_url: the rendezvous: ``"auto"`` (or ``None``) for a free port on this machine (one
            machine only), ``"tcp://host:port"`` (machine 0's address), ``"file:///path"`` (a file
            that does not exist yet, on a file system every machine sees) or ``"env://"``.
        args: arguments of ``main_func``; picklable.
        timeout: timeout of the rendezvous and of collectives, on every process group of the job
            (gloo groups included). A collective that times out raises in its worker; the
            launcher then logs the stacks of the workers still running (see "Hangs" above).
        forward_signals: the signals that stop the job: passed on to the workers this process
            started, while they run (it keeps waiting for them); outside ``train()`` (start-up)
            they end ``main_func`` at once (SIGINT: ``KeyboardInterrupt``); the trainers should
            stop on them (``trainer.preemption.signals``, default SIGTERM and SIGINT). Empty: none
            is handled, and a signal has its usual effect on this process.

    Raises:
        TypeError: if ``main_func`` is not callable, ``timeout`` is not a ``timedelta`` or
            ``forward_signals`` is not a sequence of signals.
        ValueError: for inconsistent sizes or ranks, an unusable ``dist_url``, a
            ``forward_signals`` entry that is not a catchable signal, or an incomplete torchrun /
            Slurm environment.
        WorkerError: if a worker raised an exception or died; the other workers are terminated.
        SystemExit: with ``PREEMPTION_EXIT_CODE`` (75) when the job was preempted (after saving
            a checkpoint if training had started), with 130 when it was interrupted (SIGINT); see
            the module docstring. The preemption signals (SIGINT excepted) are then ignored for
            the rest of this process, which is exiting.
    """
    if not callable(main_func):
        raise TypeError(
            f"main_func must be callable, got {type(main_func).__name__}. HINT: pass the function "
            "itself, launch(main, ...), not its result, launch(main(), ...)."
        )
    if not isinstance(timeout, datetime.timedelta):
        raise TypeError(
            f"timeout must be a datetime.timedelta, got {type(timeout).__name__}. "
            "HINT: timeout=datetime.timedelta(minutes=30)."
        )
    num_gpus_per_machine = check_positive_int(
        num_gpus_per_machine, "num_gpus_per_machine", "launch"
    )
    num_machines = check_positive_int(num_machines, "num_machines", "launch")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(
            f"machine_rank must be in [0, num_machines={num_machines}), got {machine_rank}."
        )
    args = tuple(args)
    signals = _check_signals(forward_signals)

    external = detect_cluster_env()
    world_size = num_machines * num_gpus_per_machine
    record_preemption(None)  # a record left by an earlier run in this process does not count
    try:
        if external is not None or world_size == 1:
            try:
                with preemption_guard(signals):  # main_func runs here: a signal at start-up ends it
                    if external is not None:
                        code = _run_external(
                            external, main_func, args, num_gpus_per_machine, num_machines, timeout
                        )
                    else:
                        code = _call_main(main_func, args)
            except JobStopped as e:
                code = int(e.code)  # type: ignore[arg-type]
        else:
            init_method = _resolve_dist_url(dist_url, num_machines)
            backend, why = _choose_backend(num_gpus_per_machine)
            logger.info(
                "Starting %d worker process(es) on machine %d of %d (world size %d) with backend "
                "%s: %s; rendezvous at %s.",
                num_gpus_per_machine,
                machine_rank,
                num_machines,
                world_size,
                backend,
                why,
                init_method,
            )
            job = _Job(
                backend,
                init_method,
                world_size,
                num_gpus_per_machine,
                machine_rank,
                timeout,
                signals=signals,
            )
            code = _spawn_and_watch(main_func, args, job)
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one: abort at once
        logger.warning(
            "Interrupted (Ctrl-C): aborted at once, exiting with code %d; nothing was saved since "
            "the last checkpoint.",
            INTERRUPT_EXIT_CODE,
        )
        raise SystemExit(INTERRUPT_EXIT_CODE) from None
    if code in _STOP_CODES:
        ignore_until_exit(signals)  # a repeated signal while exiting does not change the code
        if code == PREEMPTION_EXIT_CODE:
            logger.warning(
                "The job was preempted (after saving a checkpoint if training had started): "
                "exiting with code %d; requeue it on that code and resume.",
                code,
            )
        else:
            logger.warning(
                "The job was interrupted (Ctrl-C; after saving a checkpoint if training had "
                "started): exiting with code %d; run it again with --resume to continue.",
                code,
            )
        raise SystemExit(code)
