"""Hang diagnostics: the HangWatchdog hook, DefaultTrainer's SOLVER.HANG_TIMEOUT, and how launch
ends a job whose rank hangs (a collective timeout; a deadlocked data loader)."""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dist_helpers
import pytest
import torch
import torch.distributed as dist
from test_defaults import ToyTrainer, _toy_cfg
from torch import nn

from d2engine.engine import HangWatchdog, SimpleTrainer, TrainerBase, WorkerError, launch
from d2engine.engine.hooks import EvalHook
from d2engine.evaluation import inference_on_dataset
from d2engine.utils import comm
from d2engine.utils.watchdog import HANG_EXIT_CODE


@pytest.fixture
def reports() -> Iterator[dist_helpers.ErrorRecords]:
    """The watchdog's reports in this process."""
    with dist_helpers.collect_errors("d2engine.utils.watchdog") as records:
        yield records


@pytest.fixture
def launcher_errors() -> Iterator[dist_helpers.ErrorRecords]:
    """The errors launch logs about its workers (from d2engine.engine.worker_failures)."""
    with dist_helpers.collect_errors("d2engine.engine.worker_failures") as records:
        yield records


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.fc(x).pow(2).mean()}


def _trainer(data: Any, watchdog: HangWatchdog) -> SimpleTrainer:
    model = _Linear()
    trainer = SimpleTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.register_hooks([watchdog])
    return trainer


def _watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "d2engine-hang-watchdog"]


# --------------------------------------------------------------------------- the hook
def test_the_hook_costs_nothing_per_iteration() -> None:
    hook = HangWatchdog(600)
    assert hook.implements("before_train") and hook.implements("after_train")
    for stage in ("before_step", "after_backward", "after_step"):
        assert not hook.implements(stage), stage  # the trainer never calls it per iteration


def test_timeout_zero_is_off_and_a_bad_timeout_is_refused() -> None:
    trainer = _trainer([torch.ones(1, 2)] * 3, HangWatchdog(0))
    trainer.train(0, 3)
    assert trainer._hooks[0].watchdog is None
    with pytest.raises(ValueError, match="HangWatchdog timeout must be a number of seconds >= 0"):
        HangWatchdog(-1)


def _stuck_at(iteration: int, release: threading.Event) -> Iterator[torch.Tensor]:
    for i in range(100):
        if i == iteration:
            release.wait(timeout=10)  # a deadlocked data loader, until the report
        yield torch.ones(1, 2)


@pytest.mark.timeout(30)
def test_a_stuck_iteration_is_reported_with_its_number(reports: dist_helpers.ErrorRecords) -> None:
    hook = HangWatchdog(0.3, end_process=False, poll=0.05)
    trainer = _trainer(_stuck_at(3, reports.fired), hook)
    trainer.train(0, 6)
    assert reports.fired.is_set()
    assert hook.watchdog is None and not _watchdog_threads()  # stopped at after_train
    (report,) = reports.messages
    first = report.splitlines()[0]
    assert "made no training progress for" in first
    assert "in iteration 3 (this run: iterations 0 to 5)" in first
    assert "in _stuck_at)." in first
    assert "HINT: if this rank is only slow" in first
    assert "in _stuck_at" in report.split("Python stacks", 1)[1]


@pytest.mark.timeout(30)
def test_a_slow_but_progressing_run_is_left_alone(reports: dist_helpers.ErrorRecords) -> None:
    # Iterations of 0.1 s, and an evaluation of 8 batches of 0.1 s, for a timeout of 0.5 s: the
    # whole run (~1.6 s) and the evaluation take longer than the timeout, no step does.
    def slow(n: int) -> Iterator[torch.Tensor]:
        for _ in range(n):
            time.sleep(0.1)
            yield torch.ones(1, 2)

    hook = HangWatchdog(0.5, end_process=False, poll=0.02)
    trainer = _trainer(slow(100), hook)
    evaluations: list[int] = []

    def evaluate() -> dict[str, float]:
        inference_on_dataset(lambda x: x, slow(8), None)
        evaluations.append(trainer.iter)
        return {}

    trainer.register_hooks([EvalHook(4, evaluate, eval_after_train=False)])
    start = time.monotonic()
    trainer.train(0, 8)
    assert time.monotonic() - start > 1.5
    assert evaluations == [3]
    assert reports.messages == []


def test_default_trainer_registers_it_first_from_the_config(tmp_path: Path) -> None:
    log = logging.getLogger("d2engine")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    try:
        trainer = ToyTrainer(_toy_cfg(str(tmp_path)))
        first = trainer._hooks[0]
        assert isinstance(first, HangWatchdog) and first.timeout == 900.0
        off = ToyTrainer(_toy_cfg(str(tmp_path), **{"SOLVER.HANG_TIMEOUT": 0.0}))
        assert not any(isinstance(h, HangWatchdog) for h in off._hooks)
        with pytest.raises(ValueError, match=r"SOLVER.HANG_TIMEOUT must be .*HINT"):
            ToyTrainer(_toy_cfg(str(tmp_path), **{"SOLVER.HANG_TIMEOUT": -5.0}))
    finally:
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


# --------------------------------------------------------------------------- 2-process jobs
class _AllReduceTrainer(TrainerBase):
    """Each iteration: an all-reduce; rank 1 sleeps (hangs) before the one of iteration 2."""

    def run_step(self) -> None:
        if comm.get_rank() == 1 and self.iter == 2:
            _rank1_sleeps_before_its_all_reduce()
        dist.all_reduce(torch.ones(1))


def _rank1_sleeps_before_its_all_reduce() -> None:
    time.sleep(600)


def _all_reduce_job() -> None:
    _AllReduceTrainer().train(0, 5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_collective_timeout_ends_the_job_with_every_rank_s_stack(
    capfd: pytest.CaptureFixture[str], launcher_errors: dist_helpers.ErrorRecords
) -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        launch(_all_reduce_job, 2, timeout=datetime.timedelta(seconds=20))
    elapsed = time.monotonic() - start
    assert elapsed < 60
    message = str(info.value)
    # rank 0: its traceback, in the all-reduce that timed out, at iteration 2
    assert info.value.global_rank == 0
    assert "Timed out waiting 20000ms" in message and "dist.all_reduce" in message
    assert "HINT: a collective (or the rendezvous) timed out after 0:00:20" in message
    err = capfd.readouterr().err
    assert "Exception during training at iteration 2" in err
    # rank 1: its stack, dumped before it was killed, shows where it stopped
    (dumped,) = [m for m in launcher_errors.messages if "Python stacks of worker" in m]
    assert dumped.startswith("Python stacks of worker 1 (pid ")
    assert "in _rank1_sleeps_before_its_all_reduce" in dumped


class _BlocksOnRank1(torch.utils.data.Dataset):
    """A dataset whose ``__getitem__`` blocks forever on rank 1 at index 3 (iteration 3)."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> torch.Tensor:
        if comm.get_rank() == 1 and index == 3:
            threading.Event().wait()
        return torch.ones(2)


def _deadlocked_loader_job() -> None:
    model = nn.parallel.DistributedDataParallel(_Linear())
    loader = torch.utils.data.DataLoader(_BlocksOnRank1(), batch_size=1)
    trainer = SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.register_hooks([HangWatchdog(5)])
    trainer.train(0, 100)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_deadlocked_data_loader_is_caught_by_the_watchdogs(
    capfd: pytest.CaptureFixture[str],
) -> None:
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        # a collective timeout far longer than the watchdog's: the watchdog ends the job
        launch(_deadlocked_loader_job, 2, timeout=datetime.timedelta(seconds=300))
    assert time.monotonic() - start < 60
    assert info.value.exitcode == HANG_EXIT_CODE
    assert "Its hang watchdog ended it" in str(info.value)
    err = capfd.readouterr().err
    reports = {
        line.split(" of 2 ")[0].rsplit(" ", 1)[1]: line
        for line in err.splitlines()
        if line.startswith("Hang watchdog: Rank ")
    }
    assert set(reports) == {"0", "1"}, err  # each rank's watchdog reported
    for line in reports.values():
        assert "in iteration 3 (this run: iterations 0 to 99)" in line
    # rank 1 stopped in the dataset; rank 0 waits for it in the backward pass (DDP's all-reduce)
    assert "in __getitem__)" in reports["1"]
    assert "in _engine_run_backward (called from" in reports["0"]
    assert "Hang watchdog: ending rank 1 of 2 with exit code 124." in err


_TORCHRUN_SCRIPT = """
import test_hangs
from d2engine.engine.launch import launch

if __name__ == "__main__":
    launch(test_hangs._deadlocked_loader_job, 2)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_under_torchrun_each_rank_s_watchdog_reports_and_ends_it(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(_TORCHRUN_SCRIPT)
    here = str(Path(__file__).resolve().parent)
    env = dist_helpers.python_env()
    start = time.monotonic()
    proc = dist_helpers.run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env={"PYTHONPATH": os.pathsep.join([here, env["PYTHONPATH"]])},
        timeout=100,
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    err = proc.stderr
    for rank in (0, 1):  # no d2engine launcher: each rank's own watchdog reported
        assert f"Hang watchdog: Rank {rank} of 2 (pid " in err, err
    assert "in __getitem__)" in err
    assert "exitcode  : 124" in err  # torchrun's summary of the failed rank(s)
