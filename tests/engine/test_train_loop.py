from __future__ import annotations

import datetime
import gc
import json
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase
from d2engine.utils.events import EventStorage


class _Model(nn.Module):
    """A linear model returning two losses; loss is NaN at the iterations in ``nan_at``."""

    def __init__(self, nan_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.nan_at = set(nan_at)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.fc(x).mean()
        loss = out * out
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_a": loss, "loss_b": 0.5 * loss}


class _Counting:
    """An infinite data source that counts the batches it yielded."""

    def __init__(self) -> None:
        self.yielded = 0
        self.iters = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.iters += 1
        while True:
            self.yielded += 1
            yield torch.ones(4, 3)


def _trainer(**kwargs: Any) -> SimpleTrainer:
    model = _Model(nan_at=kwargs.pop("nan_at", ()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return SimpleTrainer(model, _Counting(), opt, **kwargs)


class _Recorder(HookBase):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def before_train(self) -> None:
        self.log.append(f"{self.name}.before_train")

    def after_train(self) -> None:
        self.log.append(f"{self.name}.after_train@{self.trainer.iter}/{self.trainer.storage.iter}")

    def before_step(self) -> None:
        self.log.append(f"{self.name}.before_step{self.trainer.iter}")

    def after_backward(self) -> None:
        self.log.append(f"{self.name}.after_backward{self.trainer.iter}")

    def after_step(self) -> None:
        self.log.append(f"{self.name}.after_step{self.trainer.iter}")


class _StepOnly(HookBase):
    def __init__(self) -> None:
        self.n = 0

    def after_step(self) -> None:
        self.n += 1

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n = state_dict["n"]


class _StopAt(HookBase):
    def __init__(self, at: int, reason: str) -> None:
        self.at, self.reason = at, reason

    def after_step(self) -> None:
        if self.trainer.iter == self.at:
            self.trainer.request_stop(self.reason)


def test_exact_hook_call_order() -> None:
    log: list[str] = []
    trainer = _trainer()
    trainer.register_hooks([_Recorder("a", log), None, _Recorder("b", log)])
    trainer.train(5, 7)
    assert log == [
        "a.before_train", "b.before_train",
        "a.before_step5", "b.before_step5", "a.after_backward5", "b.after_backward5",
        "a.after_step5", "b.after_step5",
        "a.before_step6", "b.before_step6", "a.after_backward6", "b.after_backward6",
        "a.after_step6", "b.after_step6",
        "a.after_train@7/7", "b.after_train@7/7",
    ]  # fmt: skip
    assert trainer.iter == 7 and trainer.start_iter == 5 and trainer.max_iter == 7
    assert trainer.storage.history("total_loss").values()[-1][1] == 6


def test_register_hooks_rejects_non_hooks() -> None:
    trainer = _trainer()
    with pytest.raises(TypeError, match="got function.*CallbackHook"):
        trainer.register_hooks([lambda: None])  # type: ignore[list-item]


def test_stages_dispatch_only_to_overriding_hooks() -> None:
    trainer = _trainer()
    step_only = _StepOnly()
    plain = HookBase()
    plain.before_step = lambda: None  # an instance override counts too
    trainer.register_hooks([step_only, plain, HookBase()])
    calls = trainer._stage_calls
    assert calls["before_train"] == [] and calls["after_backward"] == []
    assert calls["after_train"] == []
    assert calls["after_step"] == [step_only.after_step]
    assert calls["before_step"] == [plain.before_step]
    trainer.train(0, 3)
    assert step_only.n == 3


def test_implements_decides_the_dispatch() -> None:
    class Dynamic(HookBase):
        def __init__(self, enabled: bool) -> None:
            self.enabled = enabled

        def implements(self, stage: str) -> bool:
            return self.enabled and stage == "after_step"

        def after_step(self) -> None:
            raise AssertionError("dispatched although disabled")

    assert HookBase().implements("after_step") is False
    assert _StepOnly().implements("after_step") and not _StepOnly().implements("before_step")
    trainer = _trainer()
    off, on = Dynamic(False), Dynamic(True)
    trainer.register_hooks([off, on])
    assert trainer._stage_calls["after_step"] == [on.after_step]
    on.enabled = False  # asked again at the start of train()
    trainer.train(0, 2)


def test_request_stop_ends_after_the_current_iteration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    seen: list[tuple[bool, str | None]] = []

    class Stop(HookBase):
        def after_backward(self) -> None:
            if self.trainer.iter == 2:
                self.trainer.request_stop("enough")

        def after_step(self) -> None:
            if self.trainer.iter == 2:
                self.trainer.request_stop("a later request")  # the first one wins

        def after_train(self) -> None:
            seen.append((self.trainer.completed, self.trainer.stop_reason))

    trainer = _trainer()
    trainer.register_hooks([_Recorder("r", log), Stop()])
    with caplog.at_level(logging.INFO, logger="d2engine.engine.train_loop"):
        trainer.train(0, 10)
    assert log[-3:] == ["r.after_backward2", "r.after_step2", "r.after_train@2/2"]
    assert trainer.iter == 2 and not trainer.completed and trainer.stop_reason == "enough"
    assert seen == [(False, "enough")]
    stops = [r for r in caplog.records if "stopped after" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in stops] == [
        (logging.INFO, "enough: stopped after iteration 2.")
    ]
    # A new train() starts without the request; one in the last iteration changes nothing.
    trainer.train(3, 6)
    assert trainer.completed and trainer.iter == 6 and trainer.stop_reason is None
    trainer.register_hooks([_StopAt(8, "late")])
    trainer.train(6, 9)
    assert trainer.completed and trainer.iter == 9 and trainer.stop_reason is None
    assert seen == [(False, "enough"), (True, None), (True, None)]


def test_completed_only_when_max_iter_reached() -> None:
    trainer = _trainer()
    assert not trainer.completed
    trainer.train(0, 2)
    assert trainer.completed and trainer.iter == 2
    failing = _trainer(nan_at=(1,))
    with pytest.raises(FloatingPointError):
        failing.train(0, 5)
    assert not failing.completed and failing.stop_reason is None


def test_exception_logged_reraised_after_train_runs(caplog) -> None:
    log: list[str] = []

    class Boom(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == 2:
                raise KeyError("boom")

    trainer = _trainer()
    trainer.register_hooks([_Recorder("r", log), Boom()])
    with caplog.at_level(logging.ERROR), pytest.raises(KeyError, match="boom"):
        trainer.train(0, 10)
    assert trainer.iter == 2
    assert log[-1] == "r.after_train@2/2"
    assert any("Exception during training at iteration 2" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("async_write", [False, True])
def test_trainer_is_garbage_collectable(async_write: bool) -> None:
    trainer = _trainer(async_write_metrics=async_write)
    trainer.register_hooks([_Recorder("r", []), _StepOnly()])
    trainer.train(0, 3)
    ref = weakref.ref(trainer)
    model_ref = weakref.ref(trainer.model)
    gc.disable()
    try:
        del trainer
        assert ref() is None, "the trainer is part of a reference cycle"
        assert model_ref() is None
    finally:
        gc.enable()


def test_state_dict_round_trip(caplog) -> None:
    trainer = _trainer()
    h1, h2 = _StepOnly(), _StepOnly()
    trainer.register_hooks([h1, HookBase(), h2])
    trainer.train(0, 4)
    h2.n = 10
    state = trainer.state_dict()
    assert state["iteration"] == 4
    assert state["hooks"] == {"_StepOnly": {"n": 4}, "_StepOnly.1": {"n": 10}}
    assert "optimizer" in state and state["optimizer"]["param_groups"][0]["lr"] == 0.01

    other = _trainer()
    o1 = _StepOnly()
    other.register_hooks([o1])
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert other.iter == 4 and o1.n == 4
    assert "Cannot find the hook '_StepOnly.1'" in caplog.text
    with pytest.raises(KeyError, match="no 'iteration'"):
        other.load_state_dict({"hooks": {}, "optimizer": state["optimizer"]})
    with pytest.raises(KeyError, match="no 'optimizer'"):
        other.load_state_dict({"iteration": 3})


def test_data_iterator_survives_train_calls_and_reset() -> None:
    trainer = _trainer()
    data = trainer.data_loader
    trainer.train(0, 3)
    trainer.train(3, 5)
    assert data.iters == 1 and data.yielded == 5
    trainer.reset_data_loader(_Counting)
    trainer.train(5, 6)
    assert trainer.data_loader is not data and trainer.data_loader.yielded == 1


def test_data_time_and_bare_tensor_loss() -> None:
    class TensorModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.w * x).mean()

    model = TensorModel()
    trainer = SimpleTrainer(model, _Counting(), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.train(0, 2)
    hist = trainer.storage.histories()
    assert set(hist) == {"total_loss", "data_time", "rank_data_time"}  # no duplicate loss entry
    assert all(v >= 0 for v, _ in hist["data_time"].values())
    assert float(model.w.detach()) == pytest.approx(0.8)


def test_eval_mode_model_is_an_error() -> None:
    trainer = _trainer()
    trainer.model.eval()
    with pytest.raises(RuntimeError, match="eval mode at iteration 0.*model.train"):
        trainer.train(0, 1)


def test_invalid_period() -> None:
    with pytest.raises(ValueError, match="gather_metric_period must be a positive integer"):
        _trainer(gather_metric_period=0)


def test_zero_grad_before_forward() -> None:
    order: list[str] = []
    trainer = _trainer(zero_grad_before_forward=True)
    opt, model = trainer.optimizer, trainer.model
    zero = opt.zero_grad
    fwd = model.forward
    opt.zero_grad = lambda *a, **k: (order.append("zero"), zero(*a, **k))[1]  # type: ignore
    model.forward = lambda x: (order.append("fwd"), fwd(x))[1]  # type: ignore
    trainer.train(0, 1)
    assert order == ["zero", "fwd"]


def _zero_grad_ranges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the profiler ranges torch's ``Optimizer.zero_grad`` opens from now on."""
    names: list[str] = []
    real = torch.autograd.profiler.record_function

    class Recording(real):  # type: ignore[misc,valid-type]
        def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
            names.append(name)
            super().__init__(name, *args, **kwargs)

    monkeypatch.setattr(torch.autograd.profiler, "record_function", Recording)
    return names


@pytest.mark.parametrize("before_forward", [False, True])
def test_zero_grad_without_profiler_range(
    monkeypatch: pytest.MonkeyPatch, before_forward: bool
) -> None:
    ranges = _zero_grad_ranges(monkeypatch)
    trainer = _trainer(zero_grad_before_forward=before_forward)
    raw_model = _Model()
    raw_model.load_state_dict(trainer.model.state_dict())
    raw_opt = torch.optim.SGD(raw_model.parameters(), lr=0.01)
    for _ in range(4):  # what the trainer does, with torch's zero_grad
        losses = sum(raw_model(torch.ones(4, 3)).values())
        raw_opt.zero_grad()
        losses.backward()  # type: ignore[union-attr]
        raw_opt.step()
    ranges.clear()
    trainer.train(0, 4)
    assert not [name for name in ranges if "zero_grad" in name]  # no empty range per step
    for ours, raw in zip(trainer.model.parameters(), raw_model.parameters()):
        assert torch.equal(ours, raw)  # the gradients were cleared at every step
        assert torch.equal(ours.grad, raw.grad)  # type: ignore[arg-type]


def test_zero_grad_of_the_optimizer_class_is_called() -> None:
    calls: list[bool] = []

    class OwnZeroGrad(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    model = _Model()
    trainer = SimpleTrainer(model, _Counting(), OwnZeroGrad(model.parameters(), lr=0.01))
    trainer.train(0, 3)
    assert calls == [True, True, True]


def test_zero_grad_opens_its_range_while_profiling(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train(0, 2)
    names = [event.name for event in prof.events()]
    assert names.count("Optimizer.zero_grad#SGD.zero_grad") == 2


def test_zero_grad_opens_its_range_for_a_cupti_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    monitor = types.ModuleType("torch.profiler._cupti_monitor")
    monitor.get_monitor = lambda: object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.profiler._cupti_monitor", monitor)
    ranges = _zero_grad_ranges(monkeypatch)
    _trainer().train(0, 2)
    assert ranges.count("Optimizer.zero_grad#SGD.zero_grad") == 2


def test_write_metrics_nan_sync() -> None:
    trainer = _trainer(nan_at=(3,))
    with pytest.raises(FloatingPointError, match=r"iteration=3!\nloss_dict = .*loss_a.*nan"):
        trainer.train(0, 10)
    assert trainer.iter == 3
    # the NaN step did not update the weights
    assert torch.isfinite(trainer.model.fc.weight).all()


def test_write_metrics_static_with_prefix() -> None:
    with EventStorage(7) as s:
        SimpleTrainer.write_metrics(
            {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, 0.5, prefix="val_"
        )
        assert s.latest()["val_total_loss"] == (3.0, 7)
        assert s.latest()["val_a"] == (1.0, 7) and s.latest()["data_time"] == (0.5, 7)
        with pytest.raises(FloatingPointError, match="iteration=9"):
            SimpleTrainer.write_metrics({"a": torch.tensor(float("inf"))}, 0.1, cur_iter=9)


def test_async_nan_surfaces_at_next_step_and_train_again() -> None:
    trainer = _trainer(async_write_metrics=True, nan_at=(3,))
    with pytest.raises(FloatingPointError, match="iteration=3"):
        trainer.train(0, 10)
    assert trainer.iter == 4  # raised in the training thread at the next step
    # a second train() call works: the executor was not shut down
    trainer.model.nan_at = set()
    trainer.model.fc.reset_parameters()
    trainer.train(4, 8)
    assert trainer.iter == 8
    assert [it for _, it in trainer.storage.history("total_loss").values()] == [4, 5, 6, 7]
    trainer.close()


def test_async_nan_at_last_iteration_raises_at_end() -> None:
    log: list[str] = []
    trainer = _trainer(async_write_metrics=True, nan_at=(4,))
    trainer.register_hooks([_Recorder("r", log)])
    with pytest.raises(FloatingPointError, match="iteration=4"):
        trainer.train(0, 5)
    assert log[-1].startswith("r.after_train")
    trainer.close()


def _metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("d2engine-metrics")]


def test_metrics_thread_released_at_the_end_of_train() -> None:
    before = _metrics_threads()
    trainer = _trainer(async_write_metrics=True)
    trainer.train(0, 3)
    assert _metrics_threads() == before  # no close() needed
    trainer.train(3, 5)  # the thread restarts for a second train()
    assert [it for _, it in trainer.storage.history("total_loss").values()] == [3, 4]
    assert _metrics_threads() == before
    failing = _trainer(async_write_metrics=True, nan_at=(1,))
    with pytest.raises(FloatingPointError):
        failing.train(0, 5)
    assert _metrics_threads() == before


def test_async_metrics_complete_for_writers(tmp_path: Path) -> None:
    from d2engine.utils.events import JSONWriter

    class Writer(HookBase):
        def __init__(self) -> None:
            self.w = JSONWriter(tmp_path / "m.json")

        def after_step(self) -> None:
            if (self.trainer.iter + 1) % 2 == 0:
                self.w.write()

        def after_train(self) -> None:
            self.w.close()

    trainer = _trainer(async_write_metrics=True)
    trainer.register_hooks([Writer()])
    trainer.train(0, 6)
    trainer.close()
    lines = [json.loads(x) for x in (tmp_path / "m.json").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 3, 5]
    assert all("total_loss" in x and "loss_a" in x for x in lines)


def test_no_sync_between_metric_periods(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = {"n": 0}

    def counting(name: str) -> None:
        orig = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            counter["n"] += 1
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__float__", "__bool__", "numpy", "cpu"):
        counting(name)
    # As if the losses were on an accelerator (CPU tensors are read one by one: no transfer)
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))

    per_iter: dict[int, int] = {}

    class Probe(HookBase):
        def before_step(self) -> None:
            self.start = counter["n"]

        def after_step(self) -> None:
            per_iter[self.trainer.iter] = counter["n"] - self.start

    trainer = _trainer(gather_metric_period=5)
    trainer.register_hooks([Probe()])
    trainer.train(0, 10)
    monkeypatch.undo()
    # the metric iterations read the losses of the 5 iterations in one transfer
    assert per_iter[4] == 1 and per_iter[9] == 1
    assert {it: n for it, n in per_iter.items() if it not in (4, 9)} == dict.fromkeys(
        (0, 1, 2, 3, 5, 6, 7, 8), 0
    )
    # every iteration's value is logged, at its iteration
    assert [it for _, it in trainer.storage.history("total_loss").values()] == list(range(10))


def test_amp_bf16_cpu_learns_regression() -> None:
    torch.manual_seed(0)
    w_true = torch.tensor([[1.5, -2.0, 0.5]])
    xs = torch.randn(256, 3)
    ys = xs @ w_true.T + 0.3

    class Reg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            x, y = batch
            pred = self.fc(x)
            assert pred.dtype == torch.bfloat16  # autocast is active
            return {"loss_mse": ((pred.float() - y) ** 2).mean()}

    def data() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        while True:
            idx = torch.randint(0, 256, (32,), generator=g)
            yield xs[idx], ys[idx]

    model = Reg()
    trainer = AMPTrainer(
        model, data(), torch.optim.SGD(model.parameters(), lr=0.1), precision=torch.bfloat16
    )
    assert trainer.grad_scaler is None
    trainer.train(0, 200)
    assert trainer.storage.history("total_loss").latest() < 0.01
    assert torch.allclose(model.fc.weight, w_true, atol=0.05)
    assert "grad_scaler" not in trainer.state_dict()


def test_amp_precision_errors_and_scaler_state() -> None:
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="float16 for a model on the CPU.*bfloat16"):
        AMPTrainer(model, _Counting(), opt)
    with pytest.raises(ValueError, match="float16 or torch.bfloat16, got torch.float32"):
        AMPTrainer(model, _Counting(), opt, precision=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    trainer = AMPTrainer(
        model, _Counting(), opt, scaler, precision=torch.bfloat16, log_grad_scaler=True
    )
    trainer.train(0, 3)
    assert trainer.storage.latest()["[metric]grad_scaler"] == (256.0, 2)
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == 256.0
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    other = AMPTrainer(_Model(), _Counting(), opt, scaler2, precision=torch.bfloat16)
    other.load_state_dict(state)
    assert scaler2.get_scale() == 256.0


# -- multi-process: a NaN on one rank raises on every rank, sync and async -------------------
def _dist_nan_worker(out_dir: str) -> None:
    from d2engine.utils import comm

    rank = comm.get_rank()
    for async_write in (False, True):
        trainer = _trainer(async_write_metrics=async_write, nan_at=(2,) if rank == 1 else ())
        result: dict[str, Any] = {"rank": rank}
        try:
            trainer.train(0, 6)
            result["error"] = None
        except FloatingPointError as e:
            result["error"] = str(e).splitlines()[0]
        result["iter"] = trainer.iter
        result["has_total"] = "total_loss" in trainer.storage.histories()
        trainer.close()
        comm.synchronize()
        (Path(out_dir) / f"{async_write}_{rank}.json").write_text(json.dumps(result))


def test_distributed_nan_raises_on_every_rank(tmp_path: Path) -> None:
    from d2engine.engine.launch import launch

    launch(
        _dist_nan_worker,
        2,
        dist_url="auto",
        args=(str(tmp_path),),
        timeout=datetime.timedelta(seconds=60),
    )
    for async_write in (False, True):
        results = [json.loads((tmp_path / f"{async_write}_{r}.json").read_text()) for r in range(2)]
        for r in results:
            assert r["error"] == "Loss became infinite or NaN at iteration=2!"
            assert r["iter"] == (3 if async_write else 2)
        assert results[0]["has_total"] and not results[1]["has_total"]  # only rank 0 puts


def test_trainer_base_needs_run_step() -> None:
    trainer = TrainerBase()
    with pytest.raises(NotImplementedError):
        trainer.train(0, 1)
    assert trainer.iter == 0


def test_write_metrics_method_for_run_step_overrides() -> None:
    # The shape of the custom run_step found in many public detectron2 trainers: compute the
    # losses, then call self._write_metrics(loss_dict, data_time) (extras under a prefix).
    class MyTrainer(SimpleTrainer):
        def run_step(self) -> None:
            data = next(self._data_loader_iter)
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
            self.optimizer.zero_grad()
            losses.backward()
            self._write_metrics(loss_dict, 0.5)
            self._write_metrics({"loss_extra": losses.detach() * 2}, 0.5, prefix="val_")
            self.optimizer.step()

    model = _Model()
    trainer = MyTrainer(model, _Counting(), torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.gather_metric_period = 2
    trainer.train(0, 6)
    storage = trainer.storage
    iters = [it for _, it in storage.history("total_loss").values()]
    assert iters == list(range(6))  # read every gather period, each logged at its iteration
    assert storage.history("data_time").latest() == 0.5
    assert [it for _, it in storage.history("val_total_loss").values()] == list(range(6))
    a, b = storage.history("loss_a").latest(), storage.history("loss_b").latest()
    assert storage.history("total_loss").latest() == pytest.approx(a + b)
    # an explicit iteration writes there
    with EventStorage(0) as s:
        trainer.iter = 10
        trainer._write_metrics({"loss": torch.tensor(1.0)}, 0.1, iter=9)
        assert s.history("total_loss").values() == [(1.0, 9)]


# -- a non-finite loss never reaches a checkpoint (issue 11, point 1) ------------------------
def _saved_iterations(out: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in out.glob("model_0*.pth"))


@pytest.mark.parametrize(
    ("period", "async_write"), [(1, False), (1, True), (10, False), (10, True), (20, False)]
)
def test_nan_loss_is_never_checkpointed(tmp_path: Path, period: int, async_write: bool) -> None:
    from d2engine.checkpoint import Checkpointer
    from d2engine.engine import hooks

    # NaN at iteration 5; checkpoints due after iterations 2, 5 and 8.
    trainer = _trainer(nan_at=(5,), gather_metric_period=period, async_write_metrics=async_write)
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, 3)])
    with pytest.raises(FloatingPointError, match=r"^Loss became infinite or NaN at iteration=5!"):
        trainer.train(0, 12)
    trainer.close()
    assert _saved_iterations(tmp_path) == [2]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    state = torch.load(tmp_path / "model_0000002.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # the iterations before the bad one are logged, each at its iteration
    assert [it for _, it in trainer.storage.history("total_loss").values()] == [0, 1, 2, 3, 4]


def test_nan_loss_stops_a_preemption_save(tmp_path: Path) -> None:
    import os
    import signal

    from d2engine.checkpoint import Checkpointer
    from d2engine.engine import hooks

    class Term(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = _trainer(nan_at=(4,), gather_metric_period=20)
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, 100), Term()])
    with pytest.raises(FloatingPointError, match="iteration=4!"):
        trainer.train(0, 50)
    assert trainer.iter == 6 and not trainer.completed
    assert _saved_iterations(tmp_path) == [] and not (tmp_path / "last_checkpoint").exists()


def test_nan_loss_blocks_any_save_of_the_trainer_state() -> None:
    # A save that does not go through the checkpoint hooks reads the trainer's state_dict().
    trainer = _trainer(nan_at=(2,), gather_metric_period=10)

    class SaveAt(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == 3:
                self.trainer.state_dict()

    trainer.register_hooks([SaveAt()])
    with pytest.raises(FloatingPointError, match="iteration=2!"):
        trainer.train(0, 10)
    assert trainer.iter == 3


# -- losses must be scalar tensors (issue 11, point 11) --------------------------------------
class _Returns(nn.Module):
    def __init__(self, make: Any) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.make = make

    def forward(self, x: torch.Tensor) -> Any:
        return self.make(self.w * x)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda y: {"loss_box": y[:, :1] * 0 + y.sum()}, r"'loss_box'.*scalar.*shape \(4, 1\)"),
        (lambda y: {"loss": y.sum(), "note": "hello"}, r"'note'.*scalar.*a str \('hello'\)"),
        (lambda y: {"loss": 1.5}, r"'loss'.*scalar.*a float"),
        (lambda y: y, r"'total_loss'.*scalar.*shape \(4, 3\)"),
    ],
)
def test_a_loss_that_is_not_a_scalar_tensor_is_named(make: Any, match: str) -> None:
    model = _Returns(make)
    trainer = SimpleTrainer(model, _Counting(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=match) as info:
        trainer.train(0, 3)
    assert "HINT" in str(info.value) and trainer.iter == 0


def test_one_element_losses_are_accepted() -> None:
    model = _Returns(lambda y: {"a": y.sum().reshape(1), "b": y.mean().reshape(1, 1)})
    trainer = SimpleTrainer(model, _Counting(), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.train(0, 2)
    assert trainer.storage.history("total_loss").values()[0] == (pytest.approx(12.0 + 1.0), 0)


def test_any_mapping_of_losses_is_accepted_and_anything_else_is_named() -> None:
    # A dict is used as returned; another Mapping is copied into one; anything else (or an
    # empty dict) is a TypeError naming what arrived.
    from types import MappingProxyType

    model = _Returns(lambda y: MappingProxyType({"a": y.sum(), "b": y.mean()}))
    trainer = SimpleTrainer(model, _Counting(), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.train(0, 2)
    assert trainer.storage.history("total_loss").values()[0] == (pytest.approx(12.0 + 1.0), 0)
    for out, name in (("loss", "str"), ({}, "dict"), ([1.0], "list")):
        model = _Returns(lambda y, out=out: out)
        trainer = SimpleTrainer(model, _Counting(), torch.optim.SGD(model.parameters(), lr=0.1))
        with pytest.raises(TypeError, match=f"a loss tensor, got {name}. HINT"):
            trainer.train(0, 1)


# -- gradient accumulation (issue 12) --------------------------------------------------------
class _Regression(nn.Module):
    """A linear regression (no batch norm, no dropout) on (x, y) batches: one MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(5, 2)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        out = self.fc(x)
        return {"loss_mse": ((out - y) ** 2).mean(), "loss_l1": 0.1 * (out - y).abs().mean()}


def _samples(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 2, generator=g)


class _Batches:
    """Batches of ``size`` consecutive samples of a fixed stream; counts the batches it gave."""

    def __init__(self, size: int, n: int = 320, seed: int = 0) -> None:
        self.x, self.y = _samples(n, seed)
        self.size, self.given = size, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            i = (self.given * self.size) % len(self.x)
            self.given += 1
            yield self.x[i : i + self.size], self.y[i : i + self.size]


def _accumulating(trainer_cls: type = SimpleTrainer, **kwargs: Any) -> SimpleTrainer:
    model = _Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accum = kwargs.get("grad_accum_steps", 1)
    return trainer_cls(model, _Batches(32 // accum), opt, **kwargs)


def test_grad_accumulation_matches_one_big_batch() -> None:
    big = _accumulating()
    small = _accumulating(grad_accum_steps=4)
    big.train(0, 6)
    small.train(0, 6)
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(big.model.fc.weight, _Regression().fc.weight)  # it did train
    # the data position: 4 micro-batches per iteration
    assert small.data_loader.given == 24 and big.data_loader.given == 6
    # the logged losses are the means over the micro-batches: the big batch's, up to rounding
    for key in ("total_loss", "loss_mse", "loss_l1"):
        a, b = big.storage.history(key).values(), small.storage.history(key).values()
        assert [it for _, it in a] == [it for _, it in b] == list(range(6))
        assert [v for v, _ in a] == pytest.approx([v for v, _ in b], rel=1e-5)


def test_grad_accumulation_calls_and_no_reads_between_periods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    trainer = _accumulating(grad_accum_steps=3, gather_metric_period=4)
    opt = trainer.optimizer
    zero, step = opt.zero_grad, opt.step
    monkeypatch.setattr(opt, "zero_grad", lambda *a, **k: (calls.append("zero"), zero(*a, **k)))
    monkeypatch.setattr(opt, "step", lambda *a, **k: (calls.append("step"), step(*a, **k)))
    reads: dict[int, int] = {}

    def counting(name: str) -> None:
        orig = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            reads[trainer.iter] = reads.get(trainer.iter, 0) + 1
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    class Backward(HookBase):
        def after_backward(self) -> None:
            calls.append("after_backward")

    trainer.register_hooks([Backward()])
    for name in ("item", "tolist", "__float__", "__bool__", "numpy", "cpu"):
        counting(name)
    trainer.train(0, 8)
    monkeypatch.undo()
    assert calls == ["zero", "after_backward", "step"] * 8
    assert set(reads) == {3, 7}  # reads at each gather_metric_period, none in between
    assert trainer.data_loader.given == 24


def test_grad_accumulation_with_amp_scales_each_micro_batch_and_steps_once() -> None:
    def run(accum: int) -> tuple[AMPTrainer, dict[str, int]]:
        counts = {"scale": 0, "step": 0, "update": 0}
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for name in counts:
            orig = getattr(scaler, name)

            def counted(*a: Any, _name: str = name, _orig: Any = orig, **k: Any) -> Any:
                counts[_name] += 1
                return _orig(*a, **k)

            setattr(scaler, name, counted)
        trainer = _accumulating(
            AMPTrainer, grad_scaler=scaler, precision=torch.bfloat16, grad_accum_steps=accum
        )
        trainer.train(0, 5)
        return trainer, counts

    big, big_counts = run(1)
    small, small_counts = run(4)
    assert big_counts == {"scale": 5, "step": 5, "update": 5}
    assert small_counts == {"scale": 20, "step": 5, "update": 5}
    assert small.grad_scaler.get_scale() == 1024.0  # no overflow: the scale never dropped
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        assert torch.allclose(a, b, atol=2e-2)  # bf16 autocast rounds differently per split


def test_grad_accumulation_resumes_exactly(tmp_path: Path) -> None:
    from d2engine.checkpoint import Checkpointer
    from d2engine.data import TrainingSampler, build_train_loader
    from d2engine.engine import hooks

    x, y = _samples(40, seed=1)
    dataset = [(x[i], y[i]) for i in range(40)]

    def build() -> tuple[SimpleTrainer, Checkpointer]:
        model = _Regression()
        loader = build_train_loader(
            dataset=dataset,
            mapper=lambda d: d,
            sampler=TrainingSampler(len(dataset), seed=5),
            total_batch_size=4,
            num_workers=0,
            collate_fn=lambda b: (torch.stack([s[0] for s in b]), torch.stack([s[1] for s in b])),
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        trainer = SimpleTrainer(model, loader, opt, grad_accum_steps=3)
        checkpointer = Checkpointer(model, str(tmp_path), trainer=trainer)
        trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, 4)])
        return trainer, checkpointer

    straight, _ = build()
    straight.train(0, 10)
    # the data position after N iterations is N x 3 micro-batches
    saved = torch.load(tmp_path / "model_0000007.pth", weights_only=True)["trainer"]["data"]
    assert saved["num_batches"] == 8 * 3 and saved["sampler"]["position"] == 8 * 3 * 4
    assert straight.data_loader.state_dict()["num_batches"] == 10 * 3
    resumed, checkpointer = build()
    checkpointer.load(str(tmp_path / "model_0000007.pth"))
    assert resumed.start_iter == 8
    resumed.train(8, 10)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_grad_accum_steps_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="grad_accum_steps must be a positive integer"):
        _trainer(grad_accum_steps=0)
    with pytest.raises(ValueError, match="grad_accum_steps must be a positive integer"):
        _trainer(grad_accum_steps=2.0)


def test_grad_accumulation_needs_the_same_losses_in_every_micro_batch() -> None:
    class Varying(_Regression):
        calls = 0

        def forward(self, batch: Any) -> dict[str, torch.Tensor]:
            out = super().forward(batch)
            Varying.calls += 1
            return out if Varying.calls % 2 else {"loss_mse": out["loss_mse"]}

    model = Varying()
    trainer = SimpleTrainer(
        model, _Batches(8), torch.optim.SGD(model.parameters(), lr=0.1), grad_accum_steps=2
    )
    with pytest.raises(ValueError, match=r"\['loss_mse'\] for micro-batch 1 of iteration 0"):
        trainer.train(0, 2)


def _dist_accum_worker(out_dir: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from d2engine.utils import comm

    rank = comm.get_rank()
    result: dict[str, Any] = {}
    for accum in (1, 4):
        model = nn.parallel.DistributedDataParallel(_Regression())
        allreduces = [0]

        def counting_hook(state, bucket, counter=allreduces):  # type: ignore[no-untyped-def]
            # (no annotations: DDP checks that a hook's are GradBucket and Future)
            counter[0] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        # 16 samples per rank and iteration; the ranks read different data
        trainer = SimpleTrainer(
            model, _Batches(16 // accum, seed=rank), opt, grad_accum_steps=accum
        )
        trainer.train(0, 3)
        result[str(accum)] = {
            "allreduces": allreduces[0],
            "weights": [p.detach().tolist() for p in model.module.parameters()],
            "batches": trainer.data_loader.given,
        }
    from d2engine.engine.ddp import create_fsdp_model

    for accum in (1, 4):  # FSDP2: gradients reduced in the last micro-batch only
        model = create_fsdp_model(_Regression())
        syncs: list[bool] = []
        set_sync = model.set_requires_gradient_sync

        def recording(flag: bool, *a: Any, _set: Any = set_sync, _seen: Any = syncs) -> Any:
            _seen.append(flag)
            return _set(flag, *a)

        model.set_requires_gradient_sync = recording  # type: ignore[method-assign]
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = SimpleTrainer(
            model, _Batches(16 // accum, seed=rank), opt, grad_accum_steps=accum
        )
        trainer.train(0, 3)
        result[f"fsdp{accum}"] = {
            "syncs": syncs,
            "weights": [p.full_tensor().tolist() for p in model.parameters()],
        }
    (Path(out_dir) / f"accum{rank}.json").write_text(json.dumps(result))


def test_grad_accumulation_under_ddp_and_fsdp_reduces_once_per_iteration(tmp_path: Path) -> None:
    from d2engine.engine.launch import launch

    launch(
        _dist_accum_worker,
        2,
        args=(str(tmp_path),),
        timeout=datetime.timedelta(seconds=60),
    )
    results = [json.loads((tmp_path / f"accum{r}.json").read_text()) for r in range(2)]
    for r in results:
        # one bucket (a small model): one all-reduce per iteration, with or without accumulation
        assert r["1"]["allreduces"] == r["4"]["allreduces"] == 3
        assert r["1"]["batches"] == 3 and r["4"]["batches"] == 12
        for a, b in zip(r["1"]["weights"], r["4"]["weights"]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)
    assert results[0]["4"]["weights"] == results[1]["4"]["weights"]  # DDP kept them in sync
    for r in results:
        assert r["fsdp1"]["syncs"] == [] and r["fsdp4"]["syncs"] == [False, False, False, True] * 3
        for a, b, c in zip(r["fsdp1"]["weights"], r["fsdp4"]["weights"], r["1"]["weights"]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)
            assert torch.allclose(torch.tensor(a), torch.tensor(c), atol=1e-6)  # FSDP2 == DDP


def test_pending_losses_stay_bounded_whatever_the_period(monkeypatch: pytest.MonkeyPatch) -> None:
    import d2engine.engine.train_loop as train_loop

    monkeypatch.setattr(train_loop, "MAX_PENDING_ITERATIONS", 4)
    trainer = _trainer(gather_metric_period=10**9)
    sizes: list[int] = []

    class Size(HookBase):
        def after_step(self) -> None:
            sizes.append(len(self.trainer._losses))

    trainer.register_hooks([Size()])
    trainer.train(0, 10)
    assert max(sizes) < 4 and sizes == [1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    assert [it for _, it in trainer.storage.history("total_loss").values()] == list(range(10))


def test_a_nan_found_after_a_requested_stop_is_a_failure(tmp_path: Path) -> None:
    from d2engine.checkpoint import Checkpointer
    from d2engine.engine import hooks

    # NaN at iteration 3, a stop requested after iteration 5: the last read finds the NaN.
    trainer = _trainer(nan_at=(3,), gather_metric_period=20)
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, 100), _StopAt(5, "enough")])
    with pytest.raises(FloatingPointError, match="iteration=3!"):
        trainer.train(0, 50)
    assert trainer.stop_reason is None and not trainer.completed
    assert not list(tmp_path.glob("*.pth"))  # no final checkpoint of the NaN weights
