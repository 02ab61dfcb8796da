"""Preemption: a signal stops training after the current iteration with a checkpoint, the job
exits with PREEMPTION_EXIT_CODE, and the resumed run is bit-identical to an uninterrupted one."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from d2engine.engine.train_loop import PREEMPTION_EXIT_CODE, HookBase, SimpleTrainer

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import test_resume as job  # noqa: E402  (the training job shared with the resume tests)

REPO = HERE.parents[1]


class _SumLoss(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).sum()


class _Signal(HookBase):
    def __init__(self, at: int, sig: int = signal.SIGTERM) -> None:
        self.at, self.sig = at, sig

    def after_backward(self) -> None:  # in the middle of the step
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), self.sig)


def test_sigterm_exit_code_and_bit_identical_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = job.spawn(out, 8, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTION_EXIT_CODE, output
    assert output.count("Preempted by SIGTERM") == 1, output
    assert "stopped after iteration 8" in output and "resumes at iteration 9" in output
    # The checkpoint of the interrupted iteration is complete and tagged.
    assert (out / "last_checkpoint").read_text() == "model_0000008.pth"
    assert torch.load(out / "model_0000008.pth", weights_only=True)["iteration"] == 8
    assert not (out / "model_final.pth").exists()

    reference = job._weights(job.run(str(tmp_path / "reference"), resume=False))
    resumed = job.run(str(out), resume=True)
    assert resumed.start_iter == 9 and resumed.iter == job.MAX_ITER
    job.assert_bit_identical(job._weights(resumed), reference)


def test_in_process_preemption_api(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer, checkpointer = job.build(str(tmp_path))
    trainer.preemption_signals = (signal.SIGTERM, signal.SIGUSR1)
    seen: list[str] = []

    class AfterTrain(HookBase):
        def after_train(self) -> None:
            seen.append(f"after_train at {self.trainer.iter}")

    trainer.register_hooks([_Signal(6, signal.SIGUSR1), AfterTrain()])

    def custom(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGTERM, custom)
    try:
        with caplog.at_level(logging.WARNING, logger="d2engine.engine.train_loop"):
            trainer.train(0, job.MAX_ITER)
        # The handlers in place before train() are back.
        assert signal.getsignal(signal.SIGTERM) is custom
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert trainer.preempted and trainer.preemption_signal == signal.SIGUSR1
    assert not trainer.completed and trainer.stop_reason == "Preempted by SIGUSR1"
    assert trainer.iter == 6 and seen == ["after_train at 6"]
    assert caplog.text.count("Preempted by SIGUSR1") == 1
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000006.pth"
    # A new train() call clears the flag.
    trainer.train(7, 8)
    assert not trainer.preempted and trainer.preemption_signal is None


def test_signal_in_last_iteration_completes_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer, _ = job.build(str(tmp_path))
    trainer.register_hooks([_Signal(job.MAX_ITER - 1)])
    with caplog.at_level(logging.WARNING, logger="d2engine.engine.train_loop"):
        trainer.train(0, job.MAX_ITER)
    assert not trainer.preempted and trainer.iter == job.MAX_ITER
    assert f"Received signal {int(signal.SIGTERM)} too late" in caplog.text
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


def test_no_checkpoint_hook_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Linear(2, 1)
    trainer = SimpleTrainer(
        _SumLoss(model),
        itertools.repeat(torch.ones(1, 2)),
        torch.optim.SGD(model.parameters(), lr=0.1),
    )
    trainer.register_hooks([_Signal(1)])
    with caplog.at_level(logging.WARNING, logger="d2engine.engine.train_loop"):
        trainer.train(0, 5)
    assert trainer.preempted and trainer.iter == 1
    assert "no checkpoint written here" in caplog.text


def test_handlers_only_in_main_thread_and_when_enabled(tmp_path: Path) -> None:
    during: list[object] = []

    class Probe(HookBase):
        def before_train(self) -> None:
            during.append(signal.getsignal(signal.SIGTERM))

    def train(disable: bool) -> None:
        trainer, _ = job.build(str(tmp_path / str(disable)))
        if disable:
            trainer.preemption_signals = ()
        trainer.register_hooks([Probe()])
        trainer.train(0, 2)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=train, args=(False,))
    thread.start()
    thread.join(60)
    train(True)
    train(False)
    assert during[0] is before and during[1] is before  # a thread, disabled: untouched
    assert during[2] is not before  # main thread: a flag-setting handler
    assert signal.getsignal(signal.SIGTERM) is before


_WORKER = r"""
import json, os, signal, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import test_resume as job
from test_preemption import _Signal
from d2engine.engine.train_loop import PREEMPTION_EXIT_CODE

out, mode = sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
trainer, checkpointer = job.build(out, ddp=True)
checkpointer.save_to_disk = rank == 0
torch.manual_seed(100 + rank)  # the ranks' generators (dropout masks) differ
trainer.preemption_check_period = 4
if mode == "preempt" and rank == 1:
    trainer.register_hooks([_Signal(5)])  # SIGTERM to rank 1 only, in iteration 5
if mode == "resume":
    checkpointer.resume_or_load("", resume=True)
trainer.train(trainer.start_iter, job.MAX_ITER)
checkpointer.close()
with open(os.path.join(out, f"{mode}{rank}.json"), "w") as f:
    result = {"start": trainer.start_iter, "iter": trainer.iter, "preempted": trainer.preempted}
    json.dump(result, f)
torch.save(trainer.model.module.state_dict(), os.path.join(out, f"{mode}{rank}.weights"))
# as launch() ends a job: both ranks done before either tears its group down (a rank tearing
# down while its peer still works closed the peer's connections: it aborted, exit -6)
dist.barrier()
dist.destroy_process_group()
sys.exit(PREEMPTION_EXIT_CODE if trainer.preempted else 0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_job(out: Path, mode: str) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(HERE), str(out), mode],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen]) -> tuple[list[int | None], list[str]]:
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [p.returncode for p in procs], outputs


def test_two_ranks_stop_at_the_same_iteration_save_and_resume_exactly(tmp_path: Path) -> None:
    out, ref = tmp_path / "ddp", tmp_path / "reference"
    out.mkdir()
    ref.mkdir()
    preempt_job, reference_job = _start_job(out, "preempt"), _start_job(ref, "reference")
    codes, outputs = _finish(preempt_job)
    assert codes == [PREEMPTION_EXIT_CODE] * 2, outputs
    # The flag is combined every 4 iterations: the signal of iteration 5 stops both after 7.
    results = [json.loads((out / f"preempt{r}.json").read_text()) for r in range(2)]
    assert results == [{"start": 0, "iter": 7, "preempted": True}] * 2
    assert "Preempted by SIGTERM" in outputs[0] and "Preempted by SIGTERM" in outputs[1]
    assert (out / "last_checkpoint").read_text() == "model_0000007.pth"
    state = torch.load(out / "model_0000007.pth", weights_only=True)["trainer"]
    assert state["iteration"] == 7
    # Both ranks' generators were gathered into the checkpoint.
    assert len(state["rng"]) == 2 and all(s is not None for s in state["rng"])
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    codes, outputs = _finish(_start_job(out, "resume"))
    assert codes == [0, 0], outputs
    codes, outputs = _finish(reference_job)
    assert codes == [0, 0], outputs
    # DDP averages the ranks' gradients: the weights match only if every rank restored its own
    # generators and data shard position.
    for rank in range(2):
        assert json.loads((out / f"resume{rank}.json").read_text())["start"] == 8
        resumed = torch.load(out / f"resume{rank}.weights", weights_only=True)
        reference = torch.load(ref / f"reference{rank}.weights", weights_only=True)
        job.assert_bit_identical(resumed, reference)


def test_preemption_object_and_the_trainer_attributes_that_read_it() -> None:
    from d2engine.engine.preemption import Preemption

    trainer, _ = job.build("")
    assert isinstance(trainer.preemption, Preemption)
    assert trainer.preemption_signals == (signal.SIGTERM, signal.SIGINT)
    assert trainer.preemption_check_period == 10
    trainer.preemption_signals = [signal.SIGUSR1]
    trainer.preemption_check_period = 3
    assert trainer.preemption.signals == (signal.SIGUSR1,) and trainer.preemption.check_period == 3
    assert not trainer.preempted and trainer.preemption_signal is None
    with pytest.raises(ValueError, match="check_period must be a positive integer"):
        trainer.preemption_check_period = 0
    with pytest.raises(RuntimeError, match="no signal was agreed on.*should_stop"):
        Preemption().stop(3)
    # The loop's question: a single process stops on its own flag, never in the last iteration.
    preemption = Preemption(signals=(signal.SIGUSR1,))
    with preemption.watch([]):
        assert not preemption.should_stop(0, 10)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert not preemption.should_stop(9, 10)
        assert preemption.should_stop(3, 10) and preemption.preempted
        reason, note = preemption.stop(3)
    assert reason == "Preempted by SIGUSR1"
    assert note == (
        "no checkpoint written here (no PeriodicCheckpointer hook on this process). Exit with "
        "code 75 to have the job requeued; it resumes at iteration 4."
    )


def test_preemption_module_api() -> None:
    import d2engine.engine
    from d2engine.engine import preemption

    assert d2engine.engine.PREEMPTION_EXIT_CODE == preemption.PREEMPTION_EXIT_CODE == 75
    assert PREEMPTION_EXIT_CODE is preemption.PREEMPTION_EXIT_CODE  # re-exported by train_loop
    assert preemption.signal_name(int(signal.SIGTERM)) == "SIGTERM"
    assert preemption.signal_name(1000) == "signal 1000"
    # a single process stops on its own flag after any iteration
    assert preemption.preemption_signal_to_stop_on(None, 3, 10) is None
    assert preemption.preemption_signal_to_stop_on(int(signal.SIGUSR1), 3, 10) == signal.SIGUSR1
    assert preemption.saves_for_preemption(HookBase()) is False

    received: list[int] = []
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.preemption_handlers([signal.SIGUSR1], received.append):
        os.kill(os.getpid(), signal.SIGUSR1)
    assert received == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) is before


# -- repeated signals, start-up, Ctrl-C (issue 11, points 6-8) -------------------------------
class _SignalDuringSave(HookBase):
    """Sends ``first`` in iteration ``at``, then ``again`` while the preemption save runs."""

    def __init__(self, at: int, first: int, again: int) -> None:
        self.at, self.first, self.again = at, first, again

    def before_train(self) -> None:
        for hook in self.trainer._hooks:
            if hasattr(hook, "save_for_preemption"):
                save, sig = hook.save_for_preemption, self.again

                def signalling_save(save=save, sig=sig) -> str:  # type: ignore[no-untyped-def]
                    os.kill(os.getpid(), sig)
                    return save()

                hook.save_for_preemption = signalling_save

    def after_step(self) -> None:
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), self.first)


def test_a_repeated_sigterm_during_the_save_changes_nothing(tmp_path: Path) -> None:
    trainer, _ = job.build(str(tmp_path))
    trainer.register_hooks([_SignalDuringSave(5, signal.SIGTERM, signal.SIGTERM)])
    trainer.train(0, job.MAX_ITER)
    assert trainer.preempted and trainer.iter == 5 and trainer.preemption.exit_code == 75
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000005.pth"


def test_first_ctrl_c_stops_with_a_checkpoint_and_code_130(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer, _ = job.build(str(tmp_path))
    trainer.register_hooks([_Signal(6, signal.SIGINT)])
    with caplog.at_level(logging.WARNING, logger="d2engine.engine.train_loop"):
        trainer.train(0, job.MAX_ITER)
    assert trainer.preempted and trainer.preemption_signal == signal.SIGINT
    assert trainer.stop_reason == "Interrupted by SIGINT" and trainer.preemption.exit_code == 130
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000006.pth"
    assert "Exit with code 130; run again with --resume to continue at iteration 7" in caplog.text


def test_a_second_ctrl_c_aborts_at_once(tmp_path: Path) -> None:
    trainer, _ = job.build(str(tmp_path))
    trainer.register_hooks([_SignalDuringSave(6, signal.SIGINT, signal.SIGINT)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train(0, job.MAX_ITER)
    assert not (tmp_path / "model_0000006.pth").exists()  # aborted before saving
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"  # intact
    assert not trainer.completed


def test_ctrl_c_is_left_to_python_when_not_a_preemption_signal(tmp_path: Path) -> None:
    trainer, _ = job.build(str(tmp_path))
    trainer.preemption.signals = (signal.SIGTERM,)  # the documented way back to Python's default
    trainer.register_hooks([_Signal(3, signal.SIGINT)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train(0, job.MAX_ITER)
    assert trainer.iter == 3 and not trainer.preempted


def test_preemption_guard_ends_a_start_up_and_then_ignores_signals() -> None:
    from d2engine.engine.preemption import (
        JobStopped,
        preempted_signal,
        preemption_guard,
        record_preemption,
        stop_exit_code,
    )

    assert stop_exit_code(signal.SIGTERM) == 75 and stop_exit_code(signal.SIGINT) == 130
    record_preemption(None)
    try:
        with pytest.raises(JobStopped) as info, preemption_guard([signal.SIGTERM, signal.SIGINT]):
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # left alone
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler raises between two instructions
                pass
        assert info.value.code == 75 and info.value.signum == signal.SIGTERM
        assert preempted_signal() == signal.SIGTERM
        with preemption_guard([signal.SIGTERM]):
            os.kill(os.getpid(), signal.SIGTERM)  # stopping already: ignored
            for _ in range(1000):
                pass
    finally:
        record_preemption(None)
