"""Tests for asynchronous saving: Checkpointer(async_save=True) and AsyncSaver."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from d2engine.checkpoint import (
    AsyncSaveError,
    AsyncSaver,
    Checkpointer,
    PeriodicCheckpointer,
    file_io,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make background checkpoint writes wait until the returned event is set."""
    release = threading.Event()
    real_save = file_io.atomic_save

    def gated(obj: object, path: str) -> None:
        assert release.wait(60), "the test never released the gated write"
        real_save(obj, path)

    monkeypatch.setattr(file_io, "atomic_save", gated)
    return release


def _model() -> nn.Module:
    model = nn.Linear(8, 8)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def test_snapshot_is_taken_before_save_returns(tmp_path: Path, gate: threading.Event) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    weight = model.weight.detach().clone()
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"].clone()
    ckpt = Checkpointer(model, str(tmp_path), async_save=True, optimizer=optimizer)
    ckpt.save("model_0000000", iteration=0)

    with torch.no_grad():  # training goes on while the write is pending
        model.weight.add_(5.0)
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    assert not (tmp_path / "last_checkpoint").exists()  # not before the file is complete
    assert not ckpt.has_checkpoint()

    gate.set()
    ckpt.wait()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    saved = torch.load(tmp_path / "model_0000000.pth", weights_only=True)
    assert torch.equal(saved["model"]["weight"], weight)
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert saved["iteration"] == 0
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
    ckpt.close()


def test_successive_async_saves_write_their_own_state(tmp_path: Path) -> None:
    model = _model()
    with Checkpointer(model, str(tmp_path), async_save=True) as ckpt:
        for it in range(4):
            with torch.no_grad():
                model.weight.fill_(float(it))
            ckpt.save(f"model_{it:07d}", iteration=it)
            with torch.no_grad():
                model.weight.fill_(-1.0)  # changed right after save() returned
    for it in range(4):
        saved = torch.load(tmp_path / f"model_{it:07d}.pth", weights_only=True)
        assert saved["iteration"] == it and bool((saved["model"]["weight"] == it).all())
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"


def test_load_waits_for_pending_saves(tmp_path: Path, gate: threading.Event) -> None:
    with Checkpointer(_model(), str(tmp_path), async_save=True) as ckpt:
        ckpt.save("a", iteration=3)
        assert not (tmp_path / "a.pth").exists()
        timer = threading.Timer(0.2, gate.set)
        timer.start()
        assert ckpt.load(str(tmp_path / "a.pth")) == {"iteration": 3}
        timer.join()


def test_background_error_is_raised_by_wait_and_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = file_io.atomic_save
    failures = {"left": 2}

    def flaky(obj: object, path: str) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(file_io, "atomic_save", flaky)
    ckpt = Checkpointer(_model(), str(tmp_path), async_save=True)
    ckpt.save("a")
    with pytest.raises(AsyncSaveError, match=r"a\.pth.*No space left on device") as info:
        ckpt.wait()
    assert isinstance(info.value.__cause__, OSError)
    ckpt.wait()  # raised once only

    ckpt.save("b")
    ckpt._saver._queue.join()  # the write has failed in the background
    with pytest.raises(AsyncSaveError, match=r"b\.pth"):
        ckpt.save("c")
    ckpt.save("c")
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["c.pth", "last_checkpoint"]


def test_failed_write_does_not_delete_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpointer(_model(), str(tmp_path), async_save=True)
    periodic = PeriodicCheckpointer(ckpt, period=1, max_to_keep=1)
    periodic.step(0)
    ckpt.wait()

    def broken(obj: object, path: str) -> None:
        raise OSError("quota exceeded")

    monkeypatch.setattr(file_io, "atomic_save", broken)
    periodic.step(1)  # the write fails, so the queued deletion of model_0000000 is dropped
    with pytest.raises(AsyncSaveError, match="quota exceeded"):
        ckpt.wait()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000000.pth")
    ckpt.close()


def test_periodic_async_deletes_after_the_new_file_is_complete(
    tmp_path: Path, gate: threading.Event
) -> None:
    ckpt = Checkpointer(_model(), str(tmp_path), async_save=True)
    periodic = PeriodicCheckpointer(ckpt, period=1, max_to_keep=1)
    gate.set()
    periodic.step(0)
    ckpt.wait()
    gate.clear()
    periodic.step(1)  # write of model_0000001 blocked; deletion of model_0000000 queued after it
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
    gate.set()
    ckpt.wait()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    ckpt.close()


def test_pending_save_completes_at_interpreter_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from d2engine.checkpoint import Checkpointer

        model = nn.Linear(2048, 2048)  # 16 MiB
        with torch.no_grad():
            model.weight.fill_(3.0)
        ckpt = Checkpointer(model, {str(tmp_path)!r}, async_save=True)
        ckpt.save("model_final", iteration=41)
        print("returned", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "returned" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 41 and bool((saved["model"]["weight"] == 3.0).all())


def test_async_saver_runs_tasks_in_order_and_restarts_after_close() -> None:
    saver = AsyncSaver()
    done: list[int] = []
    tasks: list[Callable[[], None]] = [lambda i=i: done.append(i) for i in range(5)]
    for i, task in enumerate(tasks):
        saver.submit(task, f"task {i}")
    saver.wait()
    assert done == [0, 1, 2, 3, 4] and saver.pending == 0
    saver.close()
    saver.submit(lambda: done.append(5), "after close")
    saver.close()
    assert done[-1] == 5
