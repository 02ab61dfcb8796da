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
of the job (also those :mod:`d2engine.utils.comm` creates). After a worker's hang watchdog ended
it, or a collective timed out, the launcher logs the Python stacks of the workers still running
before ending them (:mod:`d2engine.engine.worker_failures`).

What each process does (join the process groups, call ``main_func``, leave) is in
:mod:`d2engine.engine.launch_worker`; this module checks the arguments, chooses how to run, and
spawns and watches the workers.

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
import tempfile
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from d2engine.engine.launch_worker import STOP_CODES, Job, call_main, run_external, run_worker
from d2engine.engine.preemption import (
    INTERRUPT_EXIT_CODE,
    PREEMPTION_EXIT_CODE,
    JobStopped,
    ignore_until_exit,
    preemption_guard,
    preemption_handlers,
    record_preemption,
    signal_name,
    stop_exit_code,
)
from d2engine.engine.worker_failures import (
    WorkerError,
    end_hung_workers,
    pending_traceback,
    terminate,
    worker_error,
)
from d2engine.utils.cluster import detect_cluster_env
from d2engine.utils.validation import check_positive_int

__all__ = ["DEFAULT_TIMEOUT", "WorkerError", "launch"]

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
"""The default timeout of collectives and of the rendezvous, as in ``torch.distributed``."""

_CAUSE_GRACE_S = 0.1
"""Seconds the launcher waits, after a worker's traceback, for a peer's death that caused it."""

_STOP_GRACE_S = 30.0
"""Seconds the other workers get to end after one stopped for a signal: a stopped run's workers
end together (they saved the same checkpoint), but one blocked in a start-up rendezvous would wait
for its collective's timeout."""

logger = logging.getLogger(__name__)


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


def _spawn_and_watch(
    main_func: Callable[..., Any],
    args: tuple[Any, ...],
    signals: tuple[int, ...],
    describe_job: Callable[[], Job],
) -> int:
    """Start the workers of this machine and wait for all of them; fail fast on the first error.

    The handlers of ``signals`` are installed first, before ``describe_job()`` (the rendezvous
    address, the backend): a signal that arrives while the job is being set up stops it before
    any worker starts, with the signal's exit code, instead of killing this process. The signals
    that this process receives later are passed on to the running workers (a second SIGINT then
    aborts: ``KeyboardInterrupt``). Once it got one, the job ends with that signal's exit code:
    a worker ended by it before it could catch it (start-up) or failing afterwards counts as
    stopped, and the other workers are terminated.

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
    stack_dir = ""
    try:
        with preemption_handlers(signals, pass_on, "launch()"):
            stack_dir = tempfile.mkdtemp(prefix="d2engine-stacks-")
            job = dataclasses.replace(describe_job(), stack_dir=stack_dir)
            for local_rank in range(job.num_gpus_per_machine):
                if received:  # stopped while starting: the started ones cannot rendezvous
                    break
                reader, writer = ctx.Pipe(duplex=False)
                alive_reader, alive_writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=run_worker,
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
                        failure = worker_error(job, local_rank, code, tb)
                        # A peer's death can show a moment after the error it causes here (a
                        # broken collective, measured: < 1 ms): blame a peer that died silently.
                        peers = [s for s, (i, _) in running.items() if i != local_rank]
                        for sentinel in wait(peers, timeout=_CAUSE_GRACE_S):
                            i, peer = running.pop(sentinel)
                            peer.join()
                            if peer.exitcode not in (0, *STOP_CODES) and not (
                                pending_traceback(readers, i)
                            ):
                                failure = worker_error(job, i, peer.exitcode, "")
                        break
                    if ready not in running:
                        continue
                    local_rank, proc = running.pop(ready)
                    proc.join()
                    code = proc.exitcode
                    if code in STOP_CODES:  # the others stop after the same iteration
                        stopped = stopped or code
                        if deadline is None:
                            deadline = time.monotonic() + _STOP_GRACE_S
                    elif received and code is not None and code < 0 and -code in job.signals:
                        # Ended by a signal passed on before it could catch it: it was starting,
                        # so none of the others is training either.
                        stopped = stopped or stop_exit_code(-code)
                        deadline = time.monotonic()
                    elif code != 0:
                        tb = pending_traceback(readers, local_rank)
                        failure = worker_error(job, local_rank, code, tb)
                        break
        if failure is not None:
            end_hung_workers(failure, running, job)
    finally:
        terminate(processes)
        for conn in [*readers, *keep_alive]:
            conn.close()
        if stack_dir:
            shutil.rmtree(stack_dir, ignore_errors=True)
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
                        code = run_external(
                            external, main_func, args, num_gpus_per_machine, num_machines, timeout
                        )
                    else:
                        code = call_main(main_func, args)
            except JobStopped as e:
                code = int(e.code)  # type: ignore[arg-type]
        else:

            def describe_job() -> Job:
                init_method = _resolve_dist_url(dist_url, num_machines)
                backend, why = _choose_backend(num_gpus_per_machine)
                logger.info(
                    "Starting %d worker process(es) on machine %d of %d (world size %d) with "
                    "backend %s: %s; rendezvous at %s.",
                    num_gpus_per_machine,
                    machine_rank,
                    num_machines,
                    world_size,
                    backend,
                    why,
                    init_method,
                )
                return Job(
                    backend,
                    init_method,
                    world_size,
                    num_gpus_per_machine,
                    machine_rank,
                    timeout,
                    signals=signals,
                )

            code = _spawn_and_watch(main_func, args, signals, describe_job)
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one: abort at once
        logger.warning(
            "Interrupted (Ctrl-C): aborted at once, exiting with code %d; nothing was saved since "
            "the last checkpoint.",
            INTERRUPT_EXIT_CODE,
        )
        raise SystemExit(INTERRUPT_EXIT_CODE) from None
    if code in STOP_CODES:
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
