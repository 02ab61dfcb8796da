"""Tests for the checkpointing hooks: hooks.PeriodicCheckpointer and hooks.BestCheckpointer."""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer
from d2engine.checkpoint import PeriodicCheckpointer as PlainPeriodicCheckpointer
from d2engine.engine import hooks
from d2engine.engine.train_loop import HookBase, SimpleTrainer


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).pow(2).mean()


def _trainer(out: Path, **ckpt_kwargs: Any) -> tuple[SimpleTrainer, Checkpointer]:
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = SimpleTrainer(model, itertools.repeat(torch.ones(4, 2)), opt)
    return trainer, Checkpointer(model, str(out), trainer=trainer, **ckpt_kwargs)


class _Metric(HookBase):
    """Puts ``values[k]`` as "acc" on EvalHook's schedule (period 2), like an evaluation would."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.k = 0

    def _put(self) -> None:
        if self.k < len(self.values):
            self.trainer.storage.put_scalar("acc", self.values[self.k], smoothing_hint=False)
        self.k += 1

    def after_step(self) -> None:
        nxt = self.trainer.iter + 1
        if nxt % 2 == 0 and nxt != self.trainer.max_iter:
            self._put()

    def after_train(self) -> None:
        self._put()


def _saved_iteration(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["iteration"])


# ------------------------------------------------------------------ PeriodicCheckpointer
def test_periodic_hook_takes_max_iter_from_trainer(tmp_path: Path) -> None:
    trainer, ckpt = _trainer(tmp_path)
    hook = hooks.PeriodicCheckpointer(ckpt, period=4)
    assert isinstance(hook, PlainPeriodicCheckpointer) and isinstance(hook, HookBase)
    trainer.register_hooks([hook])
    trainer.train(0, 10)
    assert hook.max_iter == 10
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["model_0000003.pth", "model_0000007.pth", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert _saved_iteration(tmp_path / "model_final.pth") == 9
    # A later train() with another max_iter follows the trainer again ...
    trainer.train(10, 12)
    assert hook.max_iter == 12 and _saved_iteration(tmp_path / "model_final.pth") == 11


def test_periodic_hook_keeps_a_given_max_iter(tmp_path: Path) -> None:
    trainer, ckpt = _trainer(tmp_path)
    trainer.register_hooks([hooks.PeriodicCheckpointer(ckpt, period=100, max_iter=5)])
    trainer.train(0, 8)
    assert _saved_iteration(tmp_path / "model_final.pth") == 7  # iteration >= max_iter - 1: each


def test_periodic_hook_waits_for_async_saves_and_keeps_state(tmp_path: Path) -> None:
    trainer, ckpt = _trainer(tmp_path, async_save=True)
    trainer.register_hooks([hooks.PeriodicCheckpointer(ckpt, period=2, max_to_keep=2)])
    trainer.train(0, 6)
    # after_train waited: every file is complete and last_checkpoint names the final one.
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in tmp_path.glob("model_0*.pth")) == [
        "model_0000003.pth",
        "model_0000005.pth",
    ]
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)["trainer"]
    assert state["hooks"]["PeriodicCheckpointer"]["recent_checkpoints"] == [
        "model_0000003.pth",
        "model_0000005.pth",
    ]
    ckpt.close()


class _Gathers:
    """A CollectiveStateful checkpointable counting its gathers."""

    def __init__(self) -> None:
        self.gathered = 0

    def state_dict(self) -> dict[str, int]:
        return {"gathered": self.gathered}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        pass

    def gather_state(self) -> None:
        self.gathered += 1


@pytest.mark.parametrize("collective", [True, False])
def test_periodic_hook_gathers_before_every_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collective: bool
) -> None:
    from d2engine.engine.preemption import Preemption

    # False: what the trainer decides when the ranks' checkpoint hooks differ.
    monkeypatch.setattr(Preemption, "_hooks_agree", lambda self: collective)
    trainer, ckpt = _trainer(tmp_path)
    gathers = _Gathers()
    ckpt.add_checkpointable("ranks", gathers)
    trainer.register_hooks([hooks.PeriodicCheckpointer(ckpt, period=2)])
    trainer.train(0, 4)
    saved = {
        name: torch.load(tmp_path / f"{name}.pth", weights_only=True)["ranks"]["gathered"]
        for name in ("model_0000001", "model_0000003", "model_final")
    }
    if collective:  # gathered right before each of the three saves
        assert saved == {"model_0000001": 1, "model_0000003": 2, "model_final": 3}
    else:
        assert set(saved.values()) == {0}


def _mismatch_worker(out: str) -> None:
    from d2engine.utils import comm

    trainer, ckpt = _trainer(Path(out))
    ckpt.save_to_disk = comm.is_main_process()
    if comm.is_main_process():  # the checkpoint hook on rank 0 only
        trainer.register_hooks([hooks.PeriodicCheckpointer(ckpt, period=2)])
    trainer.train(0, 4)  # must not deadlock on the RNG gathering


def test_periodic_hook_on_one_rank_only_saves_without_gathering(tmp_path: Path) -> None:
    from d2engine.engine.launch import launch

    launch(_mismatch_worker, 2, args=(str(tmp_path),), timeout=datetime.timedelta(seconds=60))
    rng = torch.load(tmp_path / "model_final.pth", weights_only=True)["trainer"]["rng"]
    assert len(rng) == 2 and rng[0] is not None and rng[1] is None  # rank 0's own state only


def test_periodic_hook_save_for_preemption(tmp_path: Path) -> None:
    trainer, ckpt = _trainer(tmp_path)
    hook = hooks.PeriodicCheckpointer(ckpt, period=3, max_to_keep=1)
    paths: list[str] = []
    files: list[list[str]] = []

    class Stop(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter in (2, 4):
                paths.append(hook.save_for_preemption())
                files.append(sorted(p.name for p in tmp_path.glob("model_0*.pth")))

    trainer.register_hooks([hook, Stop()])
    trainer.train(0, 6)
    # At iteration 2 the periodic file was just written: not written twice.
    assert paths == [str(tmp_path / "model_0000002.pth"), str(tmp_path / "model_0000004.pth")]
    # The preemption file counts for max_to_keep=1: model_0000002 was rotated out by it.
    assert files == [["model_0000002.pth"], ["model_0000004.pth"]]


class _Killed(Exception):
    pass


class _DiesBeforeTheFinalSave(Checkpointer):
    """Fails like a job killed between the last periodic checkpoint and the final one."""

    def save(self, name: str, **extra: Any) -> None:
        if name.endswith("_final"):
            raise _Killed("killed before model_final.pth")
        super().save(name, **extra)


def _run_to(out: Path, max_iter: int, *, resume: bool, checkpointer_cls: type = Checkpointer):
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = SimpleTrainer(model, itertools.repeat(torch.ones(4, 2)), opt)
    ckpt = checkpointer_cls(model, str(out), trainer=trainer)
    evals: list[int] = []
    trainer.register_hooks(
        [
            hooks.PeriodicCheckpointer(ckpt, period=5),
            hooks.EvalHook(0, lambda: evals.append(trainer.iter) or {"acc": 1.0}),
        ]
    )
    if resume:
        ckpt.resume_or_load("", resume=True)
    trainer.train(trainer.start_iter, max_iter)
    return trainer, ckpt, evals


def test_resumed_complete_run_writes_the_missing_final_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The demo's layout (MAX_ITER a multiple of CHECKPOINT_PERIOD): the job dies after
    # model_0000009.pth was written, before model_final.pth.
    with pytest.raises(_Killed):
        _run_to(tmp_path, 10, resume=False, checkpointer_cls=_DiesBeforeTheFinalSave)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert not (tmp_path / "model_final.pth").exists()

    with caplog.at_level(logging.INFO, logger="d2engine"):
        trainer, ckpt, evals = _run_to(tmp_path, 10, resume=True)
    assert trainer.start_iter == 10 and trainer.completed
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    periodic = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    assert final["iteration"] == final["trainer"]["iteration"] == 9
    assert torch.equal(final["model"]["linear.weight"], periodic["model"]["linear.weight"])
    assert evals == [10]  # the final evaluation ran too
    assert "already complete" in caplog.text and "model_final.pth" in caplog.text

    # Resuming the finished run again changes nothing and trains nothing.
    mtime = (tmp_path / "model_final.pth").stat().st_mtime_ns
    trainer2, _, _ = _run_to(tmp_path, 10, resume=True)
    assert trainer2.start_iter == 10
    assert (tmp_path / "model_final.pth").stat().st_mtime_ns == mtime
    # ... and a resume from the final file continues at the next iteration when extended.
    trainer3, _, _ = _run_to(tmp_path, 12, resume=True)
    assert trainer3.start_iter == 10 and trainer3.iter == 12
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 11


def test_fresh_run_with_nothing_to_do_writes_no_final_checkpoint(tmp_path: Path) -> None:
    trainer, _, _ = _run_to(tmp_path, 0, resume=True)
    assert trainer.completed and not (tmp_path / "model_final.pth").exists()


# ------------------------------------------------------------------ BestCheckpointer
def _best_run(
    out: Path, values: list[float], max_iter: int, *, mode: str = "max", resume: bool = False
) -> tuple[SimpleTrainer, hooks.BestCheckpointer]:
    trainer, ckpt = _trainer(out)
    best = hooks.BestCheckpointer(2, ckpt, "acc", mode=mode)
    trainer.register_hooks([hooks.PeriodicCheckpointer(ckpt, 2), _Metric(values), best])
    if resume:
        ckpt.resume_or_load("", resume=True)
    trainer.train(trainer.start_iter, max_iter)
    return trainer, best


def test_best_checkpointer_strict_improvement_nan_and_last_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Evaluations after iterations 1, 3, 5, 7, 9 and after training (logged at 10).
    with caplog.at_level(logging.INFO, logger="d2engine.engine.hooks"):
        _, best = _best_run(tmp_path, [0.5, 0.7, 0.7, math.nan, math.inf, 0.6], 10)
    assert (best.best_metric, best.best_iter) == (0.7, 3)  # equal is not better; nan/inf never
    assert _saved_iteration(tmp_path / "model_best.pth") == 3
    assert json.loads((tmp_path / "model_best.json").read_text()) == {
        "metric": "acc",
        "value": 0.7,
        "iteration": 3,
    }
    assert "is not finite" in caplog.text
    # The best copy never moves last_checkpoint: a resume continues from the latest state.
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert best.state_dict() == {"best_metric": 0.7, "best_iter": 3}


def test_best_checkpointer_min_mode_and_errors(tmp_path: Path, caplog) -> None:
    _, best = _best_run(tmp_path, [3.0, 2.0, 2.5], 6, mode="min")
    assert (best.best_metric, best.best_iter) == (2.0, 3)
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'best'"):
        hooks.BestCheckpointer(2, Checkpointer(_Net(), ""), "acc", mode="best")
    trainer, ckpt = _trainer(tmp_path / "missing")
    trainer.register_hooks([hooks.BestCheckpointer(2, ckpt, "acc")])
    with caplog.at_level(logging.WARNING, logger="d2engine.engine.hooks"):
        trainer.train(0, 4)
    assert "the metric 'acc' is not in the event storage" in caplog.text
    assert not (tmp_path / "missing" / "model_best.pth").exists()


def test_best_checkpointer_resume_never_overwrites_a_better_model(tmp_path: Path) -> None:
    # First run: best 0.9 at iteration 3; interrupted after iteration 5 (checkpoint at 5).
    _best_run(tmp_path, [0.5, 0.9, 0.6], 6)
    (tmp_path / "last_checkpoint").write_text("model_0000005.pth")
    best_file = (tmp_path / "model_best.pth").read_bytes()
    # The resumed run evaluates 0.8 (better than a fresh start, worse than the saved best).
    trainer, best = _best_run(tmp_path, [0.8, 0.85], 10, resume=True)
    assert trainer.start_iter == 6
    assert (best.best_metric, best.best_iter) == (0.9, 3)
    assert (tmp_path / "model_best.pth").read_bytes() == best_file


def test_best_checkpointer_resume_sees_a_best_found_after_the_checkpoint(tmp_path: Path) -> None:
    # The run found its best (0.9, after training: logged at 6) after the checkpoint of
    # iteration 3 it is resumed from (which was written before that iteration's evaluation):
    # the state in that checkpoint does not know it, model_best.json does.
    _best_run(tmp_path, [0.5, 0.6, 0.9], 6)
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    state = torch.load(tmp_path / "model_0000003.pth", weights_only=True)["trainer"]
    assert state["hooks"]["BestCheckpointer"]["best_metric"] == 0.5
    trainer, best = _best_run(tmp_path, [0.7], 6, resume=True)
    assert trainer.start_iter == 4
    assert (best.best_metric, best.best_iter) == (0.9, 6)
    assert _saved_iteration(tmp_path / "model_best.pth") == 6


def test_best_checkpointer_not_after_a_crash_in_the_last_iteration(tmp_path: Path) -> None:
    trainer, ckpt = _trainer(tmp_path)
    best = hooks.BestCheckpointer(2, ckpt, "acc")

    class Crash(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == self.trainer.max_iter - 1:
                raise RuntimeError("crash")

    # 0.5 after iteration 1; _Metric puts 0.9 in after_train, as a final evaluation would.
    trainer.register_hooks([_Metric([0.5, 0.9]), Crash(), best])
    with pytest.raises(RuntimeError, match="crash"):
        trainer.train(0, 4)
    assert (best.best_metric, best.best_iter) == (0.5, 1)  # the crashed run is not the best
    assert json.loads((tmp_path / "model_best.json").read_text())["value"] == 0.5


# ------------------------------------------------------------ fvcore checkpointers (detectron2)
def test_hooks_take_an_fvcore_checkpointer_and_resume(tmp_path: Path) -> None:
    # detectron2's own tests pass fvcore's Checkpointer to the hooks; the trainer is one of
    # its checkpointables.
    from fvcore.common.checkpoint import Checkpointer as FvcoreCheckpointer

    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 3)
    trainer = SimpleTrainer(model, itertools.repeat(torch.ones(4, 2)), opt)
    checkpointer = FvcoreCheckpointer(model, str(tmp_path), opt=opt, trainer=trainer)
    periodic = hooks.PeriodicCheckpointer(checkpointer, 5, max_to_keep=1)
    trainer.register_hooks([hooks.LRScheduler(scheduler=scheduler), periodic])
    trainer.train(0, 12)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == [
        "model_0000009.pth",
        "model_final.pth",
    ]
    assert periodic.checkpointer.wrapped is checkpointer  # adapted, not copied
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = _Net()
    opt2 = torch.optim.SGD(model2.parameters(), lr=999.0)
    trainer2 = SimpleTrainer(model2, itertools.repeat(torch.ones(4, 2)), opt2)
    scheduler2 = torch.optim.lr_scheduler.StepLR(opt2, 3)
    trainer2.register_hooks([hooks.LRScheduler(scheduler=scheduler2)])
    FvcoreCheckpointer(model2, str(tmp_path), opt=opt2, trainer=trainer2).resume_or_load("none")
    assert trainer2.iter == 11 and scheduler2.last_epoch == 12
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**4)
    assert all(torch.equal(v, weights[k]) for k, v in model2.state_dict().items())


def test_best_checkpointer_with_fvcore_keeps_last_checkpoint_on_the_latest(
    tmp_path: Path,
) -> None:
    from fvcore.common.checkpoint import Checkpointer as FvcoreCheckpointer

    model = _Net()
    trainer = SimpleTrainer(
        model, itertools.repeat(torch.ones(4, 2)), torch.optim.SGD(model.parameters(), lr=0.01)
    )
    checkpointer = FvcoreCheckpointer(model, str(tmp_path), trainer=trainer)
    trainer.register_hooks(
        [
            _Metric([0.5, 0.9, 0.7]),
            hooks.BestCheckpointer(2, checkpointer, "acc"),
            hooks.PeriodicCheckpointer(checkpointer, 3),
        ]
    )
    trainer.train(0, 6)
    assert (tmp_path / "model_best.pth").is_file()
    # fvcore's save moved last_checkpoint to model_best; the hook put it back on the latest
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert json.loads((tmp_path / "model_best.json").read_text())["value"] == 0.9

    quiet = FvcoreCheckpointer(model, str(tmp_path / "quiet"), save_to_disk=False)
    assert hooks.BestCheckpointer(2, quiet, "acc").checkpointer.writes is False
    with pytest.raises(TypeError, match="fvcore's interface"):
        hooks.PeriodicCheckpointer(object(), 5)  # type: ignore[arg-type]
