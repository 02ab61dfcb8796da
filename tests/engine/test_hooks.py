from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.engine import hooks
from d2engine.engine.train_loop import HookBase, SimpleTrainer
from d2engine.solver.lr_scheduler import LRMultiplier
from d2engine.solver.param_scheduler import ParamScheduler
from d2engine.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter


class _Model(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4, momentum=0.3) if bn else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.fc(x)
        if self.bn is not None:
            y = self.bn(y)
        return {"loss": (y * y).mean()}


def _batches(seed: int = 0) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(8, 3, generator=g) * 2 + 1


def _trainer(bn: bool = False, lr: float = 0.01) -> SimpleTrainer:
    model = _Model(bn)
    return SimpleTrainer(model, _batches(), torch.optim.SGD(model.parameters(), lr=lr))


# -- CallbackHook -----------------------------------------------------------------------------
def test_callback_hook() -> None:
    seen: list[tuple[str, int]] = []
    hook = hooks.CallbackHook(
        before_train=lambda t: seen.append(("bt", t.iter)),
        after_step=lambda t: seen.append(("as", t.iter)),
        after_train=lambda t: seen.append(("at", t.iter)),
    )
    trainer = _trainer()
    trainer.register_hooks([hook])
    assert trainer._stage_calls["before_step"] == []  # no callback: not dispatched
    assert trainer._stage_calls["after_backward"] == []
    trainer.train(0, 2)
    assert seen == [("bt", 0), ("as", 0), ("as", 1), ("at", 2)]
    with pytest.raises(TypeError, match="after_step.*callable"):
        hooks.CallbackHook(after_step=3)  # type: ignore[arg-type]


# -- IterationTimer ---------------------------------------------------------------------------
def test_iteration_timer(caplog: pytest.LogCaptureFixture) -> None:
    trainer = _trainer()
    trainer.register_hooks([hooks.IterationTimer(warmup_iter=3)])
    with caplog.at_level(logging.INFO, logger="d2engine.engine.hooks"):
        trainer.train(10, 16)
    times = trainer.storage.history("time").values()
    assert [it for _, it in times] == [12, 13, 14, 15]
    assert all(t > 0 for t, _ in times)
    assert "Overall training speed: 4 iterations in" in caplog.text
    assert "Total training time:" in caplog.text and "on hooks)" in caplog.text


# -- PeriodicWriter ---------------------------------------------------------------------------
class _CountingWriter(JSONWriter):
    closed = 0

    def close(self) -> None:
        type(self).closed += 1
        super().close()


def test_periodic_writer_json_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    json_writer = _CountingWriter(tmp_path / "metrics.json")
    trainer = _trainer()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.PeriodicWriter(
                [json_writer, TensorboardXWriter(tmp_path / "tb"), CommonMetricPrinter(50)],
                period=20,
            ),
        ]
    )
    trainer.train(0, 50)
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [19, 39, 49]
    assert {"total_loss", "time", "data_time", "rank_data_time"} <= set(lines[0])
    assert _CountingWriter.closed == 1
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("total_loss")] == [19, 39, 49]
    with pytest.raises(TypeError, match="EventWriter objects, got str"):
        hooks.PeriodicWriter(["x"])  # type: ignore[list-item]


def test_default_hooks_read_nothing_between_writer_periods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DefaultTrainer's per-iteration hooks only put between periods: the storage is read (and
    # the writers run) at the writer's period, after the last iteration and at the end only.
    from d2engine.utils.events import EventStorage

    reads: list[int] = []
    for name in ("latest", "latest_with_smoothing_hint", "histories", "history"):
        original = getattr(EventStorage, name)

        def reading(self: Any, *a: Any, _original: Any = original, **k: Any) -> Any:
            reads.append(self.iter)
            return _original(self, *a, **k)

        monkeypatch.setattr(EventStorage, name, reading)
    trainer = _trainer()
    trainer.gather_metric_period = 5
    writers = [
        JSONWriter(tmp_path / "m.json"),
        CommonMetricPrinter(12),
        TensorboardXWriter(tmp_path),
    ]
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=LRMultiplier(trainer.optimizer, lambda w: 1 - w, 12)),
            hooks.PeriodicWriter(writers, period=5),
        ]
    )
    trainer.train(0, 12)
    assert sorted(set(reads)) == [4, 9, 11, 12]  # 12: the final write in after_train


# -- LRScheduler ------------------------------------------------------------------------------
def test_lr_scheduler_torch_scheduler_and_state() -> None:
    trainer = _trainer(lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=2, gamma=0.5)
    hook = hooks.LRScheduler(scheduler=sched)  # optimizer from the trainer
    trainer.register_hooks([hook])
    trainer.train(0, 5)
    lrs = trainer.storage.history("lr").values()
    assert lrs == [(1.0, 0), (1.0, 1), (0.5, 2), (0.5, 3), (0.25, 4)]
    assert trainer.storage.smoothing_hints()["lr"] is False
    state = trainer.state_dict()["hooks"]["LRScheduler"]
    assert state["last_epoch"] == 5

    # resume: the state is loaded before the scheduler is known (taken from the trainer)
    other = _trainer(lr=1.0)
    other.scheduler = torch.optim.lr_scheduler.StepLR(other.optimizer, step_size=2, gamma=0.5)
    other_hook = hooks.LRScheduler()
    other.register_hooks([other_hook])
    with pytest.raises(KeyError, match="no 'optimizer'"):
        other.load_state_dict({"iteration": 4, "hooks": {"LRScheduler": state}})
    other.load_state_dict(trainer.state_dict())
    assert other_hook.state_dict() == state
    other.train(5, 6)
    assert other.scheduler.last_epoch == 6


def test_lr_scheduler_without_scheduler_names_the_fix() -> None:
    trainer = _trainer()
    trainer.register_hooks([hooks.LRScheduler()])
    with pytest.raises(AttributeError, match="no attribute 'scheduler'.*LRScheduler\\(scheduler="):
        trainer.train(0, 1)


def test_lr_scheduler_best_param_group() -> None:
    params = [nn.Parameter(torch.zeros(1)) for _ in range(6)]
    opt = torch.optim.SGD(
        [
            {"params": params[:1], "lr": 0.1},
            {"params": params[1:4], "lr": 0.2},
            {"params": params[4:], "lr": 0.3},
        ],
        lr=1.0,
    )
    assert hooks.LRScheduler.get_best_param_group_id(opt) == 1
    opt = torch.optim.SGD(
        [{"params": [p], "lr": lr} for p, lr in zip(params[:4], (0.1, 0.2, 0.2, 0.3))], lr=1.0
    )
    assert hooks.LRScheduler.get_best_param_group_id(opt) == 1  # tie: the most common lr


def test_lr_scheduler_wraps_param_scheduler() -> None:
    class Halves(ParamScheduler):
        def __call__(self, where: float) -> float:
            return 1.0 if where < 0.5 else 0.5

    trainer = _trainer(lr=2.0)
    hook = hooks.LRScheduler(trainer.optimizer, Halves())
    trainer.register_hooks([hook])
    trainer.train(0, 4)
    assert isinstance(hook.scheduler, LRMultiplier)
    assert [v for v, _ in trainer.storage.history("lr").values()] == [2.0, 2.0, 1.0, 1.0]
    assert hook.state_dict()["last_epoch"] == 4

    # resuming at iteration 3: wrapped with last_iter = 2
    other = _trainer(lr=2.0)
    other.optimizer.param_groups[0]["initial_lr"] = 2.0
    other_hook = hooks.LRScheduler(other.optimizer, Halves())
    other.register_hooks([other_hook])
    other.train(3, 4)
    assert other.storage.history("lr").values() == [(1.0, 3)]


# -- EvalHook ---------------------------------------------------------------------------------
def _eval_trainer(period: int, **kwargs: Any) -> tuple[SimpleTrainer, list[int]]:
    calls: list[int] = []
    trainer = _trainer()

    def evaluate() -> dict[str, Any]:
        calls.append(trainer.iter)
        return {"acc": {"top1": 0.5 + len(calls), "top5": torch.tensor(0.9)}, "n": 3}

    trainer.register_hooks([hooks.EvalHook(period, evaluate, **kwargs)])
    return trainer, calls


def test_eval_hook_periods_and_results() -> None:
    trainer, calls = _eval_trainer(3)
    trainer.train(0, 7)
    assert calls == [2, 5, 7]  # after iterations 2 and 5, then after training
    latest = trainer.storage.latest()
    assert latest["acc/top1"] == (3.5, 7) and latest["acc/top5"][0] == pytest.approx(0.9)
    assert trainer.storage.smoothing_hints()["acc/top1"] is False

    trainer, calls = _eval_trainer(5)
    trainer.train(0, 10)
    assert calls == [4, 10]  # not twice at the end

    trainer, calls = _eval_trainer(0)
    trainer.train(0, 4)
    assert calls == [4]

    trainer, calls = _eval_trainer(2, eval_after_train=False)
    trainer.train(0, 4)
    assert calls == [1]


def test_eval_hook_no_final_eval_after_failure() -> None:
    trainer, calls = _eval_trainer(2)

    class Fail(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == 4:
                raise RuntimeError("fail")

    trainer.register_hooks([Fail()])
    with pytest.raises(RuntimeError, match="fail"):
        trainer.train(0, 10)
    assert calls == [1, 3]


def test_eval_hook_no_final_eval_after_a_crash_in_the_last_iteration() -> None:
    trainer, calls = _eval_trainer(2)

    class Fail(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == self.trainer.max_iter - 1:
                raise RuntimeError("fail")

    trainer.register_hooks([Fail()])
    with pytest.raises(RuntimeError, match="fail"):
        trainer.train(0, 4)
    assert calls == [1]  # a crashed run is not evaluated as if it had finished
    assert not trainer.completed


def test_eval_hook_no_final_eval_after_an_early_stop() -> None:
    trainer, calls = _eval_trainer(2)
    trainer.register_hooks(
        [hooks.CallbackHook(after_step=lambda t: t.request_stop("done") if t.iter == 4 else None)]
    )
    trainer.train(0, 10)
    assert calls == [1, 3] and trainer.iter == 4


def test_eval_hook_non_number_names_key() -> None:
    trainer = _trainer()
    trainer.register_hooks([hooks.EvalHook(0, lambda: {"a": {"b": "oops"}})])
    with pytest.raises(ValueError, match="'a/b: 'oops''"):
        trainer.train(0, 1)


# -- PreciseBN --------------------------------------------------------------------------------
def test_precise_bn_true_average() -> None:
    trainer = _trainer(bn=True)
    model = trainer.model
    num_iter = 5
    hook = hooks.PreciseBN(0, model, _batches(seed=7), num_iter)
    trainer.register_hooks([hook])
    trainer.train(0, 3)

    # direct computation over the same batches with the final weights
    loader = _batches(seed=7)
    with torch.no_grad():
        feats = [model.fc(next(loader)) for _ in range(num_iter)]
    mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(model.bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(model.bn.running_var, var, atol=1e-6)
    assert model.bn.momentum == 0.3
    assert int(model.bn.num_batches_tracked) == 3  # the training steps only


def test_precise_bn_periods() -> None:
    trainer = _trainer(bn=True)
    hook = hooks.PreciseBN(2, trainer.model, _batches(1), 2)
    runs: list[int] = []
    hook.update_stats = lambda: runs.append(trainer.iter)  # type: ignore[method-assign]
    trainer.register_hooks([hook])
    trainer.train(0, 5)
    assert runs == [1, 3, 4]


def test_precise_bn_disabled_without_training_bn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="d2engine.engine.hooks"):
        hook = hooks.PreciseBN(1, _Model(bn=False), _batches(), 2)
    assert "PreciseBN is disabled" in caplog.text
    eval_bn = _Model(bn=True).eval()
    eval_hook = hooks.PreciseBN(1, eval_bn, _batches(), 2)
    trainer = _trainer()
    trainer.register_hooks([hook, eval_hook])
    assert trainer._stage_calls["after_step"] == []  # no per-step cost
    before = eval_bn.bn.running_mean.clone()
    eval_hook.update_stats()
    assert torch.equal(eval_bn.bn.running_mean, before)


def test_precise_bn_short_loader_leaves_stats() -> None:
    model = _Model(bn=True)
    before = model.bn.running_var.clone()
    hook = hooks.PreciseBN(0, model, [torch.randn(8, 3)], 3)
    with pytest.raises(RuntimeError, match="yielded only 1"):
        hook.update_stats()
    assert torch.equal(model.bn.running_var, before) and model.bn.momentum == 0.3


# -- profilers --------------------------------------------------------------------------------
def test_torch_profiler_chrome_trace(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.register_hooks(
        [hooks.TorchProfiler(lambda t: t.iter == 1, tmp_path, save_tensorboard=False)]
    )
    trainer.train(0, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profiler-trace-iter1.json"]
    trace = json.loads((tmp_path / "profiler-trace-iter1.json").read_text())
    assert trace["traceEvents"]


def test_torch_profiler_tensorboard(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.register_hooks([hooks.TorchProfiler(lambda t: t.iter == 0, tmp_path)])
    trainer.train(0, 2)
    files = list((tmp_path / "log" / "profiler-tensorboard-iter0").iterdir())
    assert len(files) == 1 and files[0].name.startswith("worker0")


def test_autograd_profiler_on_cpu(tmp_path: Path) -> None:
    trainer = _trainer()
    trainer.register_hooks([hooks.AutogradProfiler(lambda t: t.iter in (0, 2), tmp_path)])
    trainer.train(0, 3)  # use_cuda=True by default: must not crash without CUDA
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["profiler-trace-iter0.json", "profiler-trace-iter2.json"]
    assert json.loads((tmp_path / names[0]).read_text())["traceEvents"]


def test_profiler_closed_after_failed_iteration(tmp_path: Path) -> None:
    trainer = _trainer()
    prof = hooks.TorchProfiler(lambda t: True, tmp_path, save_tensorboard=False)

    class Fail(HookBase):
        def before_step(self) -> None:
            if self.trainer.iter == 1:
                raise RuntimeError("fail")

    trainer.register_hooks([prof, Fail()])
    with pytest.raises(RuntimeError):
        trainer.train(0, 3)
    assert prof._profiler is None
    assert torch.autograd.profiler._is_profiler_enabled is False


# -- TorchMemoryStats -------------------------------------------------------------------------
def test_torch_memory_stats_cpu_noop(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    trainer = _trainer()
    trainer.register_hooks([hooks.TorchMemoryStats(period=1)])
    assert trainer._stage_calls["after_step"] == []
    with caplog.at_level(logging.INFO, logger="d2engine.engine.profiling"):
        trainer.train(0, 3)
    assert caplog.text.count("CUDA is not available") == 1


def test_torch_memory_stats_logs_max_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    resets: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("max_memory_reserved", "memory_reserved", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda: 3 * 1024 * 1024)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 2 * 1024 * 1024)
    monkeypatch.setattr(torch.cuda, "memory_summary", lambda: "SUMMARY")
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    trainer = _trainer()
    trainer.register_hooks([hooks.TorchMemoryStats(period=2, max_runs=3)])
    with caplog.at_level(logging.INFO, logger="d2engine.engine.profiling"):
        trainer.train(0, 20)
    lines = [r.getMessage() for r in caplog.records if "max_reserved_mem" in r.getMessage()]
    assert len(lines) == 3  # exactly max_runs (the reference logs one more)
    assert (
        lines[0].startswith("iter: 1  max_reserved_mem: 3MB") and "allocated_mem: 2MB" in lines[0]
    )
    assert caplog.text.count("SUMMARY") == 1
    assert len(resets) == 3


def test_trainer_with_all_hooks_is_garbage_collectable(tmp_path: Path) -> None:
    import gc
    import weakref

    trainer = _trainer(bn=True)
    sched = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=2)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=sched),
            hooks.EvalHook(2, lambda: {"a": 1.0}),
            hooks.PreciseBN(2, trainer.model, _batches(), 2),
            hooks.CallbackHook(after_step=lambda t: None),
            hooks.TorchMemoryStats(),
            hooks.AutogradProfiler(lambda t: t.iter == 1, tmp_path),
            hooks.PeriodicWriter([JSONWriter(tmp_path / "m.json")], period=2),
        ]
    )
    trainer.train(0, 4)
    ref = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert ref() is None
    finally:
        gc.enable()


def test_eval_hook_does_not_change_the_training_random_numbers() -> None:
    """Evaluation restores the generators: a resumed run need not replay it to stay exact."""
    import random

    import numpy as np

    def draws(with_eval: bool) -> list[float]:
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        seen: list[float] = []

        def evaluate() -> dict[str, float]:
            return {"x": float(torch.rand(1)) + np.random.rand() + random.random()}

        trainer = _trainer()
        record = hooks.CallbackHook(
            after_step=lambda t: seen.append(
                float(torch.rand(1)) + np.random.rand() + random.random()
            )
        )
        trainer.register_hooks([hooks.EvalHook(1, evaluate) if with_eval else None, record])
        trainer.train(0, 3)
        return seen

    assert draws(with_eval=True) == draws(with_eval=False)


def test_precise_bn_saves_its_data_position() -> None:
    from d2engine.data import TrainingSampler, build_train_loader

    data = [torch.randn(4, 3) * (i + 1) for i in range(8)]

    def make() -> hooks.PreciseBN:
        torch.manual_seed(0)
        loader = build_train_loader(
            dataset=data,
            total_batch_size=1,
            num_workers=0,
            sampler=TrainingSampler(8, seed=1),
            collate_fn=lambda b: b[0],
        )
        return hooks.PreciseBN(0, _Model(bn=True), loader, num_iter=3)

    def mean(h: hooks.PreciseBN) -> torch.Tensor:
        return h._model.bn.running_mean.clone()  # type: ignore[union-attr]

    hook = make()
    assert hook.state_dict() == {}  # not used yet
    hook.update_stats()
    state = hook.state_dict()
    assert state["data"]["num_batches"] == 3
    hook.update_stats()  # batches 3..5
    resumed, fresh = make(), make()
    resumed.load_state_dict(state)
    resumed.update_stats()
    fresh.update_stats()
    assert torch.equal(mean(resumed), mean(hook))  # the same batches as the continued hook
    assert not torch.equal(mean(fresh), mean(hook))


def test_precise_bn_saves_a_resumed_position_again_before_reading() -> None:
    # Resumed, then checkpointed before its next update: the restored position must be saved
    # again (it used to be dropped, so a second resume started the loader from scratch).
    from d2engine.data import TrainingSampler, build_train_loader

    def make() -> hooks.PreciseBN:
        loader = build_train_loader(
            dataset=[torch.randn(4, 3) for _ in range(8)],
            total_batch_size=1,
            num_workers=0,
            sampler=TrainingSampler(8, seed=1),
            collate_fn=lambda b: b[0],
        )
        return hooks.PreciseBN(0, _Model(bn=True), loader, num_iter=3)

    hook = make()
    hook.update_stats()
    state = hook.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict()["data"]["num_batches"] == 3


class _GatheringLoader:
    """A loader whose position spans the ranks: counts the collective gathers it is asked for."""

    def __init__(self) -> None:
        self.gathers = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return _batches()

    def gather_state(self) -> None:
        self.gathers += 1

    def state_dict(self) -> dict[str, Any]:
        return {"gathers": self.gathers}


def test_trainer_gather_state_reaches_precise_bn_loader() -> None:
    # The checkpoint hook gathers through the trainer on every rank before a save; PreciseBN's
    # loader (grouped by aspect ratio in DefaultTrainer) keeps a position per rank, so it must be
    # gathered too, once it has been read.
    trainer = _trainer(bn=True)
    loader = _GatheringLoader()
    hook = hooks.PreciseBN(0, trainer.model, loader, 2)
    trainer.register_hooks([hook])
    trainer.gather_state()
    assert loader.gathers == 0  # never read: nothing to gather, nothing saved
    hook.update_stats()
    trainer.gather_state()
    assert loader.gathers == 1
    assert hook.state_dict() == {"data": {"gathers": 1}}
