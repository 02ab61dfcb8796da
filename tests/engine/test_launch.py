"""d2engine.engine.launch: spawned gloo workers, two machines, torchrun, Slurm, failures."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dist_helpers  # tests/ is on sys.path (see dist_helpers' docstring)
import pytest
import torch
import torch.distributed as dist

from d2engine.engine.launch import DEFAULT_TIMEOUT, WorkerError, launch
from d2engine.engine.preemption import PREEMPTION_EXIT_CODE, preempted_signal, record_preemption
from d2engine.utils import comm


def _record_call(out: list[tuple[int, ...]], *args: int) -> None:
    out.append((comm.get_world_size(), dist.is_initialized(), *args))


# --------------------------------------------------------------------------------------------
# In-process: argument checks, one process (environment detection: tests/utils/test_cluster.py)
# --------------------------------------------------------------------------------------------


def test_default_timeout_is_thirty_minutes() -> None:
    assert datetime.timedelta(minutes=30) == DEFAULT_TIMEOUT


def test_single_process_calls_main_in_place() -> None:
    calls: list[tuple[int, ...]] = []
    launch(_record_call, 1, args=(calls, 7, 8))
    assert calls == [(1, False, 7, 8)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"main_func": 3}, TypeError, r"pass the function itself, launch\(main"),
        ({"timeout": 30}, TypeError, "timeout must be a datetime.timedelta"),
        (
            {"num_gpus_per_machine": 0},
            ValueError,
            "num_gpus_per_machine must be a positive integer",
        ),
        ({"num_machines": 0}, ValueError, "num_machines must be a positive integer"),
        ({"num_machines": 2, "machine_rank": 2}, ValueError, r"machine_rank must be in \[0, num"),
        ({"num_machines": 2, "dist_url": "auto"}, ValueError, "cannot know.*tcp://"),
        ({"num_machines": 2}, ValueError, "cannot know.*tcp://"),
        ({"dist_url": "tcp://127.0.0.1"}, ValueError, "not of the form 'tcp://host:port'"),
        ({"dist_url": "udp://x:1"}, ValueError, "not supported: expected 'auto'"),
        ({"dist_url": "env://"}, ValueError, "needs MASTER_ADDR, MASTER_PORT"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    call = {"main_func": print, "num_gpus_per_machine": 2, **kwargs}
    with pytest.raises(error, match=match):
        launch(**call)


def test_unpicklable_main_func_names_the_fix() -> None:
    def nested() -> None:
        pass

    with pytest.raises(TypeError, match="must be picklable.*top level of a module"):
        launch(nested, 2)


def test_forward_signals_are_checked() -> None:
    with pytest.raises(
        TypeError, match=r"signal numbers, got <Signals.SIGTERM.*\(signal.SIGTERM,\)"
    ):
        launch(print, 2, forward_signals=signal.SIGTERM)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="signal numbers, got .*'TERM'"):
        launch(print, 2, forward_signals=("TERM",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SIGKILL cannot be caught.*HINT: forward SIGTERM"):
        launch(print, 2, forward_signals=(signal.SIGTERM, signal.SIGKILL))


@pytest.fixture
def clean_preemption_record() -> Iterator[None]:
    yield
    record_preemption(None)


@pytest.mark.parametrize("action", ["record", "exit"])
def test_single_process_preempted_main_ends_with_code_75(
    action: str, clean_preemption_record: None
) -> None:
    with pytest.raises(SystemExit) as info:
        launch(dist_helpers.preempt_then, 1, args=(action,))
    assert info.value.code == PREEMPTION_EXIT_CODE == 75


def test_single_process_ignores_an_earlier_preemption(clean_preemption_record: None) -> None:
    record_preemption(int(signal.SIGTERM))  # an earlier, preempted run in this process
    launch(dist_helpers.preempt_then, 1, args=("return",))  # returns: this run completed
    assert preempted_signal() is None


def test_torchrun_job_of_one_process_preempted(
    monkeypatch: pytest.MonkeyPatch, clean_preemption_record: None
) -> None:
    for name, value in [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")]:
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(dist_helpers.free_port()))
    with pytest.raises(SystemExit) as info:
        launch(dist_helpers.preempt_then, 1, args=("record",))
    assert info.value.code == PREEMPTION_EXIT_CODE


# --------------------------------------------------------------------------------------------
# Multi-process jobs (gloo on 127.0.0.1)
# --------------------------------------------------------------------------------------------


def _check_reports(reports: list[dict], local_size: int, timeout_s: float | None = None) -> None:
    world = len(reports)
    for rank, r in enumerate(reports):
        assert r["initialized"] and r["backend"] == "gloo"
        assert (r["rank"], r["world_size"]) == (rank, world)
        assert (r["local_rank"], r["local_size"]) == (rank % local_size, local_size)
        assert r["is_main"] == (rank == 0)
        assert r["all_gather"] == [{"rank": i, "sq": i * i} for i in range(world)]
        machine = rank // local_size
        assert r["all_gather_local"] == list(
            range(machine * local_size, (machine + 1) * local_size)
        )
        assert r["gather"] == ([f"r{i}" for i in range(world)] if rank == 0 else [])
        assert r["gather_dst1"] == ([i + 100 for i in range(world)] if rank == 1 else [])
        if timeout_s is not None:
            assert r["timeout_s"] == timeout_s
            assert r["group_timeouts_s"] == [timeout_s, timeout_s]
    # reduce_dict: the mean / sum on rank 0
    assert reports[0]["reduce_mean"] == {
        "a": sum(i + 1.0 for i in range(world)) / world,
        "b": sum(2.0 * i for i in range(world)) / world,
    }
    assert reports[0]["reduce_sum"] == {"a": sum(i + 1.0 for i in range(world))}
    # shared_random_seed: one value on every rank although ranks seeded numpy differently,
    # a fresh one on each call
    assert all(r["seeds"] == reports[0]["seeds"] for r in reports)
    assert reports[0]["seeds"][0] != reports[0]["seeds"][1]
    assert len({r["pid"] for r in reports}) == world


@pytest.mark.timeout(120)
def test_two_workers_auto_url(tmp_path: Path) -> None:
    timeout = datetime.timedelta(seconds=123)
    launch(dist_helpers.report_comm, 2, dist_url="auto", args=(str(tmp_path),), timeout=timeout)
    reports = dist_helpers.read_reports(tmp_path, 2)
    _check_reports(reports, local_size=2, timeout_s=123.0)
    assert len((tmp_path / "calls.txt").read_text().split()) == 2
    if not os.environ.get("OMP_NUM_THREADS"):  # the workers share the cores
        threads = max(1, len(os.sched_getaffinity(0)) // 2)
        assert [r["threads"] for r in reports] == [threads, threads]


_MACHINE_SCRIPT = """
import sys
import dist_helpers
from d2engine.engine.launch import launch
import datetime
launch(dist_helpers.report_comm, 2, num_machines=2, machine_rank=int(sys.argv[1]),
       dist_url=sys.argv[2], args=(sys.argv[3],), timeout=datetime.timedelta(seconds=90))
"""


@pytest.mark.timeout(150)
def test_two_machines_on_one_tcp_url(tmp_path: Path) -> None:
    url = f"tcp://127.0.0.1:{dist_helpers.free_port()}"
    machine1 = subprocess.Popen(
        [sys.executable, "-c", _MACHINE_SCRIPT, "1", url, str(tmp_path)],
        env=dist_helpers.python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        launch(
            dist_helpers.report_comm,
            2,
            num_machines=2,
            machine_rank=0,
            dist_url=url,
            args=(str(tmp_path),),
            timeout=datetime.timedelta(seconds=90),  # a rendezvous that never completes fails
        )
        output, _ = machine1.communicate(timeout=120)
    finally:
        machine1.kill()
        machine1.wait()
    assert machine1.returncode == 0, output
    # global rank = machine_rank * num_gpus_per_machine + local rank
    _check_reports(dist_helpers.read_reports(tmp_path, 4), local_size=2, timeout_s=90.0)


_TORCHRUN_SCRIPT = """
import os
import sys
import dist_helpers
from d2engine.engine.launch import launch

if __name__ == "__main__":
    with open(os.path.join(sys.argv[1], "started.txt"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    launch(dist_helpers.report_comm, 2, args=(sys.argv[1], "torchrun"))
"""


@pytest.mark.timeout(150)
def test_under_torchrun_main_runs_once_per_process(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(_TORCHRUN_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    proc = dist_helpers.run_python(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            # each worker's stderr in a file of its own: two stack dumps written at the same
            # time to one shared stderr interleave byte by byte
            "--log-dir",
            str(tmp_path / "logs"),
            "--redirects",
            "2",
            str(script),
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started = sorted((out / "started.txt").read_text().split())
    called = sorted((out / "calls.txt").read_text().split())
    assert len(started) == 2
    assert called == started  # main ran once in each torchrun process, no process was spawned
    reports = dist_helpers.read_reports(out, 2)
    assert {r["tag"] for r in reports} == {"torchrun"}
    _check_reports(reports, local_size=2)
    # the stack each process dumped on its STACK_DUMP_SIGNAL went to its stderr
    stderrs = [p.read_text() for p in sorted((tmp_path / "logs").rglob("stderr.log"))]
    assert len(stderrs) == 2, stderrs
    assert [text.count("in report_comm") for text in stderrs] == [1, 1], stderrs


_SLURM_SCRIPT = """
import dist_helpers
import sys
from d2engine.engine.launch import launch
launch(dist_helpers.report_comm, 4, args=(sys.argv[1], "slurm"))
"""


@pytest.mark.timeout(150)
def test_under_slurm_two_nodes_of_one_task(tmp_path: Path) -> None:
    port = str(dist_helpers.free_port())
    procs = []
    for rank in range(2):
        env = {
            "SLURM_JOB_ID": "42",
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(rank),
            "SLURM_TASKS_PER_NODE": "1(x2)",
            "SLURM_JOB_NODELIST": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SLURM_SCRIPT, str(tmp_path)],
                env=dist_helpers.python_env(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "The slurm job decides: main_func runs once in each of its processes" in outputs[0]
    reports = dist_helpers.read_reports(tmp_path, 2)
    assert len((tmp_path / "calls.txt").read_text().split()) == 2
    _check_reports(reports, local_size=1)


def _assert_workers_gone(out: Path, world_size: int) -> None:
    for rank in range(world_size):
        pid = int((out / f"pid{rank}").read_text())
        assert dist_helpers.pid_gone(pid), f"worker {rank} (pid {pid}) is still running"


@pytest.mark.timeout(120)
def test_worker_exception_ends_the_job_with_its_traceback(tmp_path: Path) -> None:
    url = (tmp_path / "rendezvous").as_uri()  # file:// URLs work too
    with pytest.raises(WorkerError, match=r"Worker 1 \(local rank 1\).*raised") as info:
        launch(dist_helpers.record_pid_then, 2, dist_url=url, args=(str(tmp_path), "raise", 1))
    err = info.value
    assert (err.global_rank, err.local_rank, err.exitcode) == (1, 1, None)
    assert "ValueError: boom on rank 1" in str(err)
    assert (
        'in record_pid_then\n    raise ValueError(f"boom on rank {rank}")' in err.worker_traceback
    )
    # rank 0 waited in a barrier rank 1 never joined: it was terminated, not left behind
    _assert_workers_gone(tmp_path, 2)


@pytest.mark.timeout(120)
def test_worker_killed_by_sigkill_ends_the_job(tmp_path: Path) -> None:
    with pytest.raises(
        WorkerError, match=r"Worker 0 .* killed by SIGKILL \(exit code -9\)"
    ) as info:
        launch(dist_helpers.record_pid_then, 2, args=(str(tmp_path), "sigkill", 0))
    assert info.value.exitcode == -signal.SIGKILL
    assert info.value.worker_traceback == ""
    _assert_workers_gone(tmp_path, 2)


@pytest.mark.timeout(120)
def test_worker_sys_exit_code_is_reported(tmp_path: Path) -> None:
    # The traceback is sent before the worker exits, so the launcher usually reads it first: the
    # exit code must be reported in that case too, not only once the process has ended.
    with pytest.raises(WorkerError, match=r"(?s)Worker 1 .*SystemExit: 3") as info:
        launch(dist_helpers.record_pid_then, 2, args=(str(tmp_path), "exit", 1))
    assert (info.value.global_rank, info.value.exitcode) == (1, 3)
    assert info.value.worker_traceback.rstrip().endswith("SystemExit: 3")
    _assert_workers_gone(tmp_path, 2)


_ORPHAN_SCRIPT = """
import sys
import dist_helpers
from d2engine.engine.launch import launch
launch(dist_helpers.record_pid_then, 2, args=(sys.argv[1], "sleep", -1))
"""


@pytest.mark.timeout(120)
def test_workers_exit_when_the_launcher_is_killed(tmp_path: Path) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path)],
        env=dist_helpers.python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        dist_helpers.wait_until(
            lambda: all((tmp_path / f"pid{r}").exists() for r in range(2)), 90, "workers to start"
        )
        launcher.kill()
        launcher.wait()
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
        dist_helpers.wait_until(
            lambda: all(dist_helpers.pid_gone(p) for p in pids), 30, "orphaned workers to exit"
        )
    finally:
        launcher.kill()
        launcher.wait()
        for r in range(2):  # leave nothing behind if the test failed
            pid_file = tmp_path / f"pid{r}"
            if pid_file.exists() and not dist_helpers.pid_gone(int(pid_file.read_text())):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Preemption: launch ends a preempted job with PREEMPTION_EXIT_CODE
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("actions", ["record,record", "exit,exit", "return,record"])
def test_preempted_workers_end_the_launch_with_code_75(actions: str) -> None:
    # A worker whose main returned after a preemption, or raised SystemExit(75), exits with 75;
    # the launcher waits for the others (not a failure) and exits with 75 too.
    with pytest.raises(SystemExit) as info:
        launch(dist_helpers.preempt_then, 2, args=(actions,))
    assert info.value.code == PREEMPTION_EXIT_CODE


@pytest.mark.timeout(120)
def test_a_failure_wins_over_a_preemption() -> None:
    with pytest.raises(WorkerError, match=r"(?s)Worker 1 .*ValueError: boom on rank 1") as info:
        launch(dist_helpers.preempt_then, 2, args=("record,raise",))
    assert info.value.exitcode is None


_SLURM_PREEMPTED_SCRIPT = """
import dist_helpers
from d2engine.engine.launch import launch
launch(dist_helpers.preempt_then, 1, num_machines=2, args=("record,exit",))
"""


@pytest.mark.timeout(150)
def test_under_slurm_each_preempted_task_exits_with_75() -> None:
    port = str(dist_helpers.free_port())
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SLURM_PREEMPTED_SCRIPT],
            env=dist_helpers.python_env(
                {**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": "0", "SLURM_NODEID": str(r)}
                | {"MASTER_PORT": port}
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [PREEMPTION_EXIT_CODE] * 2, outputs


# A user script, not the CLI: launch(main, 2) where main trains a SimpleTrainer (DDP, gloo) with
# the PeriodicCheckpointer hook and reports how training ended.
_USER_SCRIPT = """
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from d2engine.checkpoint import DetectionCheckpointer
from d2engine.engine import SimpleTrainer, create_ddp_model, hooks, launch
from d2engine.utils import comm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x):
        return {"loss": self.linear(x).pow(2).mean()}


def batches():
    g = torch.Generator().manual_seed(comm.get_rank())
    while True:
        yield torch.randn(8, 4, generator=g)


def main(out, max_iter, mode):
    (Path(out) / f"pid{comm.get_rank()}").write_text(str(os.getpid()))
    if mode == "startup":  # a slow start-up (building the model, loading data)
        time.sleep(120)
        raise AssertionError("the start-up went on after the signal")
    torch.manual_seed(0)
    model = create_ddp_model(Net())
    trainer = SimpleTrainer(model, batches(), torch.optim.SGD(model.parameters(), lr=0.01))
    checkpointer = DetectionCheckpointer(model, out, trainer=trainer)

    def running(trainer):
        if trainer.iter == trainer.start_iter + 20 and comm.is_main_process():
            (Path(out) / "running").write_text("")

    trainer.register_hooks(
        [hooks.PeriodicCheckpointer(checkpointer, 10**6), hooks.CallbackHook(after_step=running)]
    )
    checkpointer.resume_or_load("", resume=mode == "resume")
    trainer.train(trainer.start_iter, max_iter)
    report = {"start": trainer.start_iter, "iter": trainer.iter, "preempted": trainer.preempted}
    (Path(out) / f"rank{comm.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    (Path(sys.argv[1]) / "launching").write_text("")
    launch(main, 2, args=(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def _user_script(tmp_path: Path, out: Path, max_iter: int, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(_USER_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(max_iter), mode],
        env=dist_helpers.python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _reports(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(240)
def test_user_script_sigterm_to_the_launcher_saves_exits_75_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    launcher = _user_script(tmp_path, out, 10**7, "fresh")
    try:
        dist_helpers.wait_until(
            lambda: (out / "running").exists() or launcher.poll() is not None, 90, "training"
        )
        launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=90)[0]
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode == PREEMPTION_EXIT_CODE, output
    # Both workers stopped after the same iteration and saved its checkpoint.
    first, second = _reports(out)
    assert first == second and first["preempted"] and first["start"] == 0
    stop = first["iter"]
    assert stop >= 20 and (stop + 1) % 10 == 0  # the ranks agree every 10 iterations
    name = f"model_{stop:07d}.pth"
    assert (out / "last_checkpoint").read_text() == name
    assert torch.load(out / name, weights_only=True)["iteration"] == stop

    resumed = _user_script(tmp_path, out, stop + 31, "resume")
    try:
        output = resumed.communicate(timeout=120)[0]
    finally:
        resumed.kill()
        resumed.wait()
    assert resumed.returncode == 0, output
    expected = {"start": stop + 1, "iter": stop + 31, "preempted": False}
    assert _reports(out) == [expected, expected]
    assert (out / "model_final.pth").is_file()


@pytest.mark.timeout(120)
def test_without_forwarding_sigterm_ends_the_launcher(tmp_path: Path) -> None:
    script = (
        "import sys, dist_helpers\n"
        "from d2engine.engine.launch import launch\n"
        "launch(dist_helpers.record_pid_then, 2, args=(sys.argv[1], 'sleep', -1), "
        "forward_signals=())\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        env=dist_helpers.python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        dist_helpers.wait_until(
            lambda: (
                all((tmp_path / f"pid{r}").exists() for r in range(2))
                or launcher.poll() is not None
            ),
            90,
            "workers to start",
        )
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == -signal.SIGTERM
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
        dist_helpers.wait_until(
            lambda: all(dist_helpers.pid_gone(p) for p in pids), 30, "orphaned workers to exit"
        )
    finally:
        launcher.kill()
        launcher.wait()
        for r in range(2):  # leave nothing behind if the test failed
            pid_file = tmp_path / f"pid{r}"
            if pid_file.exists() and not dist_helpers.pid_gone(int(pid_file.read_text())):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Signals at any time (issue 11, points 6-8): 75 for SIGTERM, 130 for Ctrl-C, whatever happens
# --------------------------------------------------------------------------------------------


def _workers_gone(out: Path) -> None:
    pids = [int(p.read_text()) for p in out.glob("pid*")]
    dist_helpers.wait_until(
        lambda: all(dist_helpers.pid_gone(p) for p in pids), 30, "the workers to exit"
    )


def _kill_workers(out: Path) -> None:  # leave nothing behind if a test failed
    for pid_file in out.glob("pid*"):
        pid = int(pid_file.read_text())
        if not dist_helpers.pid_gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("when", ["launching", "building"])
def test_sigterm_during_the_start_up_of_two_workers_exits_75(tmp_path: Path, when: str) -> None:
    import time

    out = tmp_path / "out"
    out.mkdir()
    launcher = _user_script(tmp_path, out, 100, "startup")
    try:
        if when == "launching":  # the workers are being started or import torch
            ready = lambda: (out / "launching").exists()  # noqa: E731
        else:  # both workers run main: their start-up (sleeping 120 s here)
            ready = lambda: (out / "pid0").exists() and (out / "pid1").exists()  # noqa: E731
        dist_helpers.wait_until(lambda: ready() or launcher.poll() is not None, 90, when)
        start = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=90)[0]
        seconds = time.monotonic() - start
        _workers_gone(out)
    finally:
        launcher.kill()
        launcher.wait()
        _kill_workers(out)
    assert launcher.returncode == PREEMPTION_EXIT_CODE, output
    assert "start-up went on" not in output and "WorkerError" not in output
    assert seconds < 60  # not the 120 s start-up
    assert not list(out.glob("*.pth"))


@pytest.mark.timeout(120)
def test_sigterm_while_launch_sets_up_the_job_exits_75_without_starting_workers(
    tmp_path: Path,
) -> None:
    # The signal arrives while launch() picks the rendezvous port and the backend (patched to
    # send it at that moment), before any worker exists: no race with the test's timing. It
    # used to kill the launcher (-15) because the handlers were installed only afterwards.
    script = (
        "import importlib, os, signal, sys, dist_helpers\n"
        "L = importlib.import_module('d2engine.engine.launch')\n"
        "choose = L._choose_backend\n"
        "def choose_then_sigterm(n):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return choose(n)\n"
        "L._choose_backend = choose_then_sigterm\n"
        "L.launch(dist_helpers.record_pid_then, 2, args=(sys.argv[1], 'sleep', -1))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=dist_helpers.python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=90,
    )
    assert done.returncode == PREEMPTION_EXIT_CODE, done.stdout
    assert "preempted" in done.stdout
    assert not list(tmp_path.glob("pid*"))  # no worker was started


@pytest.mark.timeout(240)
def test_repeated_sigterm_to_the_launcher_still_saves_and_exits_75(tmp_path: Path) -> None:
    import time

    out = tmp_path / "out"
    out.mkdir()
    launcher = _user_script(tmp_path, out, 10**7, "fresh")
    try:
        dist_helpers.wait_until(
            lambda: (out / "running").exists() or launcher.poll() is not None, 90, "training"
        )
        while launcher.poll() is None:  # a SIGTERM every 0.2 s until the job has ended
            launcher.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        output = launcher.communicate(timeout=90)[0]
        _workers_gone(out)
    finally:
        launcher.kill()
        launcher.wait()
        _kill_workers(out)
    assert launcher.returncode == PREEMPTION_EXIT_CODE, output
    first, second = _reports(out)
    assert first == second and first["preempted"]
    name = f"model_{first['iter']:07d}.pth"
    assert (out / "last_checkpoint").read_text() == name
    assert torch.load(out / name, weights_only=True)["iteration"] == first["iter"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_to_the_launcher(tmp_path: Path, presses: int) -> None:
    import time

    out = tmp_path / "out"
    out.mkdir()
    launcher = _user_script(tmp_path, out, 10**7, "fresh")
    try:
        dist_helpers.wait_until(
            lambda: (out / "running").exists() or launcher.poll() is not None, 90, "training"
        )
        start = time.monotonic()
        for _ in range(presses):
            launcher.send_signal(signal.SIGINT)
            time.sleep(0.05)
        output = launcher.communicate(timeout=90)[0]
        seconds = time.monotonic() - start
        _workers_gone(out)
    finally:
        launcher.kill()
        launcher.wait()
        _kill_workers(out)
    assert launcher.returncode == 130, output
    if presses == 1:  # stopped after the same iteration on both ranks, with a checkpoint
        first, second = _reports(out)
        assert first == second and first["preempted"]
        assert (out / "last_checkpoint").read_text() == f"model_{first['iter']:07d}.pth"
        assert "Interrupted by SIGINT" in output
    else:  # aborted at once (a checkpoint may have been saved in the 50 ms between the two)
        assert "aborted at once" in output and seconds < 30
