"""Helpers for multi-process tests: free ports, child Python scripts, worker bodies, error logs.

Test modules import this as ``import dist_helpers``: ``tests/`` is on ``sys.path`` because pytest
(in its default "prepend" import mode) puts the directory of ``tests/conftest.py`` there. Workers
started by ``launch`` with the spawn method inherit ``sys.path``, so the functions below can be
their ``main_func``; child scripts get ``tests/`` on their path from :func:`run_python`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from d2engine.engine.preemption import PREEMPTION_EXIT_CODE, record_preemption
from d2engine.utils import comm
from d2engine.utils.watchdog import STACK_DUMP_SIGNAL

__all__ = [
    "ErrorRecords",
    "TESTS_DIR",
    "collect_errors",
    "free_port",
    "pid_gone",
    "preempt_then",
    "python_env",
    "read_reports",
    "record_pid_then",
    "report_comm",
    "run_python",
    "wait_until",
]

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent

_ENV_DROP = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child Python: no torchrun/Slurm variables, tests/ importable."""
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO_DIR), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run_python(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` to completion (killed after ``timeout`` seconds)."""
    return subprocess.run(
        [sys.executable, *args],
        env=python_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate()`` every 0.1 s; fail the test if it stays false for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def pid_gone(pid: int) -> bool:
    """Whether process ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def read_reports(out_dir: Path, world_size: int) -> list[dict[str, Any]]:
    """The JSON reports written by :func:`report_comm`, in rank order."""
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


def _timeout_s(group: Any) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def report_comm(out_dir: str, tag: str = "") -> None:
    """A ``main_func``: exercise d2engine.utils.comm and write what it saw to rank{N}.json.

    It also asks itself for a stack dump (``STACK_DUMP_SIGNAL``): launch prepared every process of
    a multi-process job for it, so the process lives on (the signal's default would end it).
    """
    rank = comm.get_rank()
    np.random.seed(1000 + rank)  # ranks draw different numbers; shared_random_seed must agree
    pg = dist.group.WORLD
    timeout = pg._get_backend(torch.device("cpu")).options._timeout
    os.kill(os.getpid(), STACK_DUMP_SIGNAL)
    with open(Path(out_dir) / "calls.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
    report = {
        "tag": tag,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "initialized": dist.is_initialized(),
        "backend": dist.get_backend(),
        "timeout_s": timeout.total_seconds(),
        # the groups d2engine creates have the job's timeout too (not torch's 30 minutes)
        "group_timeouts_s": [
            _timeout_s(comm.get_local_process_group()),
            _timeout_s(comm.new_group(backend="gloo")),
        ],
        "rank": rank,
        "world_size": comm.get_world_size(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
        "is_main": comm.is_main_process(),
        "all_gather": comm.all_gather({"rank": rank, "sq": rank * rank}),
        "all_gather_local": comm.all_gather(rank, group=comm.get_local_process_group()),
        "gather": comm.gather(f"r{rank}", dst=0),
        "gather_dst1": comm.gather(rank + 100, dst=1),
        "reduce_mean": {
            k: float(v)
            for k, v in comm.reduce_dict(
                {"b": torch.tensor(2.0 * rank), "a": torch.tensor(rank + 1.0)}
            ).items()
        },
        "reduce_sum": {
            k: float(v)
            for k, v in comm.reduce_dict({"a": torch.tensor(rank + 1.0)}, average=False).items()
        },
        "seeds": [comm.shared_random_seed(), comm.shared_random_seed()],
    }
    comm.synchronize()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


def record_pid_then(out_dir: str, action: str, fail_rank: int) -> None:
    """A ``main_func``: write this worker's pid, then fail on ``fail_rank`` as ``action`` says.

    The other ranks then wait in a barrier that the failing rank never joins, so without the
    launcher ending them they would hang. ``action="sleep"``: every rank sleeps for 10 minutes.
    """
    rank = comm.get_rank()
    (Path(out_dir) / f"pid{rank}").write_text(str(os.getpid()))
    dist.barrier()  # every pid file is written before anything fails
    if rank == fail_rank:
        if action == "raise":
            raise ValueError(f"boom on rank {rank}")
        if action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "exit":
            sys.exit(3)
    if action == "sleep":
        time.sleep(600)
    dist.barrier()


def preempt_then(actions: str) -> None:
    """A ``main_func`` ending as ``actions.split(",")[rank]`` says, as a trainer would.

    ``"record"``: training was preempted (``record_preemption``) and main returns; ``"exit"``:
    main raises ``SystemExit(PREEMPTION_EXIT_CODE)``; ``"raise"``: main raises ValueError;
    ``"return"``: main returns (training completed).
    """
    rank = comm.get_rank()
    action = actions.split(",")[rank]
    comm.synchronize()
    if action == "record":
        record_preemption(int(signal.SIGTERM))
    elif action == "exit":
        raise SystemExit(PREEMPTION_EXIT_CODE)
    elif action == "raise":
        raise ValueError(f"boom on rank {rank}")
    elif action != "return":
        raise ValueError(f"unknown action {action!r}")


class ErrorRecords(logging.Handler):
    """Collects a logger's ERROR records (e.g. a hang watchdog's report); ``fired`` is set at the
    first one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []
        self.fired = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.fired.set()


@contextlib.contextmanager
def collect_errors(name: str) -> Iterator[ErrorRecords]:
    """The ERROR records of the logger ``name`` while the block runs."""
    handler = ErrorRecords()
    log = logging.getLogger(name)
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
