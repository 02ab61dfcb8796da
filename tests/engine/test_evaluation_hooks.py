"""d2engine.engine.evaluation_hooks: LossEvalHook and EarlyStopping in one process (the 2-rank
cases are in test_features_distributed.py, exact resume in test_resume_features.py)."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer
from d2engine.engine import hooks
from d2engine.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer
from d2engine.modeling import ModelEMA
from d2engine.utils.events import EventStorage, get_event_storage


class _Net(nn.Module):
    """BN + dropout; returns two losses in training mode; counts training forwards in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 8)
        self.bn = nn.BatchNorm1d(8, momentum=0.5)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 1)
        self.register_buffer("forwards", torch.zeros((), dtype=torch.int64))

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        x, y = batch
        out = self.head(self.drop(torch.relu(self.bn(self.fc(x))))).squeeze(1)
        if not self.training:
            return out
        self.forwards += 1  # a custom buffer changed in training mode
        get_event_storage().put_scalar("model_internal", 1.0)  # detectron2-style logging
        return {"loss_mse": ((out - y) ** 2).mean(), "loss_l1": 0.1 * (out - y).abs().mean()}


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g), torch.randn(6, generator=g)) for _ in range(n)]


class _RandomLoader:
    """A validation loader that draws from torch, numpy and python's generators when iterated
    (as DataLoader does for its base seed, or a random augmentation)."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        torch.rand(1)
        np.random.rand()
        random.random()
        yield from self.batches


def _train_loader(seed: int = 0) -> Iterator[Any]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(6, 3, generator=g), torch.randn(6, generator=g)


def _trainer(seed: int = 0) -> SimpleTrainer:
    torch.manual_seed(seed)
    model = _Net()
    return SimpleTrainer(model, _train_loader(), torch.optim.SGD(model.parameters(), lr=0.05))


def _history(trainer: SimpleTrainer, name: str) -> dict[int, float]:
    if name not in trainer.storage.histories():
        return {}
    return {it: v for v, it in trainer.storage.history(name).values()}


# ------------------------------------------------------------------------------ LossEvalHook
def test_loss_eval_values_are_the_eval_mode_mean_over_batches() -> None:
    trainer = _trainer()
    val = _batches(3, seed=5)
    hook = hooks.LossEvalHook(0, trainer.model, val)
    trainer.register_hooks([hook])
    trainer.train(0, 2)
    logged = trainer.storage.latest()
    # By hand: BN with running statistics, no dropout, the model's loss branch.
    model = trainer.model
    model.bn.eval()
    model.drop.eval()
    with torch.no_grad(), EventStorage():
        per_batch = [model(b) for b in val]
    model.train()
    mse = sum(float(d["loss_mse"]) for d in per_batch) / 3
    l1 = sum(float(d["loss_l1"]) for d in per_batch) / 3
    assert logged["validation_loss_mse"] == (pytest.approx(mse, rel=1e-6), 2)
    assert logged["validation_loss_l1"] == (pytest.approx(l1, rel=1e-6), 2)
    assert logged["validation_loss"][0] == pytest.approx(mse + l1, rel=1e-6)
    # what the model logged during the evaluation stayed out: only the 2 training steps' values
    assert [it for _, it in trainer.storage.history("model_internal").values()] == [0, 1]
    assert not trainer.storage.smoothing_hints()["validation_loss"]


def test_loss_eval_schedule() -> None:
    trainer = _trainer()
    hook = hooks.LossEvalHook(3, trainer.model, _batches(2, seed=5))
    trainer.register_hooks([hook])
    trainer.train(0, 7)
    # after iterations 2 and 5, and after the last one (put at iteration 7 by after_train)
    assert sorted(_history(trainer, "validation_loss")) == [2, 5, 7]
    assert hook.last_eval_iter == 7 and hook.eval_period == 3

    # not after a failure, nor after a requested stop
    for stage in ("fail", "stop"):
        trainer = _trainer()
        hook = hooks.LossEvalHook(0, trainer.model, _batches(2, seed=5))

        def act(t: Any, stage: str = stage) -> None:
            if t.iter == 1:
                if stage == "fail":
                    raise RuntimeError("boom")
                t.request_stop("enough")

        trainer.register_hooks([hooks.CallbackHook(after_step=act), hook])
        if stage == "fail":
            with pytest.raises(RuntimeError, match="boom"):
                trainer.train(0, 5)
        else:
            trainer.train(0, 5)
        assert hook.last_eval_iter is None, stage


def test_loss_eval_leaves_bn_modes_buffers_and_rng_untouched() -> None:
    trainer = _trainer()
    model = trainer.model
    model.fc.eval()  # a submodule the user keeps in eval mode stays so
    hook = hooks.LossEvalHook(0, model, _RandomLoader(_batches(4, seed=5)))
    trainer.register_hooks([hook])
    trainer.train(0, 3)  # BN statistics have moved away from their initial values
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    torch_rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()

    losses = hook.compute_losses()

    assert math.isfinite(losses["validation_loss"])
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), f"buffer {k} changed"
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], np_rng[1])
    assert random.getstate() == py_rng


def test_training_with_loss_eval_is_bit_identical_to_training_without() -> None:
    def run(with_hook: bool) -> dict[str, torch.Tensor]:
        trainer = _trainer()
        if with_hook:
            val = _RandomLoader(_batches(3, seed=5))
            trainer.register_hooks([hooks.LossEvalHook(2, trainer.model, val)])
        trainer.train(0, 9)  # dropout draws from torch's generator at every step
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    plain, hooked = run(False), run(True)
    for k, v in plain.items():
        assert torch.equal(v, hooked[k]), f"{k} differs"
    assert int(plain["forwards"]) == 9  # and the buffer counted training forwards only


def test_loss_eval_errors_and_bare_tensor_losses() -> None:
    with pytest.raises(ValueError, match="eval_period must be an integer >= 0, got -1"):
        hooks.LossEvalHook(-1, nn.Linear(1, 1), [])
    with pytest.raises(ValueError, match="yielded no batch"):
        hooks.LossEvalHook(0, _Net(), []).compute_losses()

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w * x.mean()

    losses = hooks.LossEvalHook(0, Bare(), [torch.ones(2), 3 * torch.ones(2)]).compute_losses()
    assert losses == {"validation_loss": pytest.approx(4.0)}

    model = _Net().eval()  # eval mode: the model returns predictions, not losses
    with pytest.raises(TypeError, match=r"returned a tensor of shape \(6,\), not scalar losses"):
        hooks.LossEvalHook(0, model, _batches(1, seed=0)).compute_losses()
    assert not model.training and not model.bn.training  # modes restored after the error


# ------------------------------------------------------------------------------ EarlyStopping
class _Scripted:
    """An evaluation function returning the next value of a script as ``{"metric": v}``."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> dict[str, float]:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"metric": value}


def _stopping(
    values: list[float], patience: int, mode: str = "max", min_delta: float = 0.0, **kw: Any
) -> tuple[SimpleTrainer, Any]:
    trainer = _trainer()
    stop = hooks.EarlyStopping("metric", mode, patience, min_delta)
    trainer.register_hooks([hooks.EvalHook(kw.get("period", 1), _Scripted(values)), stop])
    return trainer, stop


def test_stops_after_patience_evaluations_without_improvement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trainer, stop = _stopping([1.0, 2.0, 2.0, 1.5, 9.0], patience=2)
    with caplog.at_level(logging.INFO, logger="d2engine"):
        trainer.train(0, 20)
    assert trainer.iter == 3 and not trainer.completed
    reason = "Early stopping: metric did not improve for 2 evaluations (best 2 at iteration 1)"
    assert trainer.stop_reason == reason
    assert caplog.text.count(f"{reason}: stopped after iteration 3") == 1  # logged once
    assert (stop.best, stop.best_iter, stop.num_bad_evals) == (2.0, 1, 2)


@pytest.mark.parametrize(
    ("values", "mode", "min_delta", "patience", "stop_iter"),
    [
        ([1.0, 1.05, 1.2], "max", 0.1, 1, 1),  # 1.05 is not better by more than 0.1
        ([1.0, 1.15, 1.2, 1.2], "max", 0.1, 2, 3),
        ([3.0, 2.0, 2.5, 1.0, 1.0, 1.0], "min", 0.0, 2, 5),  # an improvement resets the count
        ([float("nan"), float("nan")], "max", 0.0, 2, 1),  # NaN first: never the best
        ([1.0, float("nan"), float("inf"), 0.5], "max", 0.0, 3, 3),  # NaN/inf after: no gain
        ([float("-inf"), 1.0, float("nan"), 2.0], "min", 0.0, 2, 3),
    ],
)
def test_improvement_rules(
    values: list[float], mode: str, min_delta: float, patience: int, stop_iter: int
) -> None:
    trainer, stop = _stopping(values, patience, mode, min_delta)
    trainer.train(0, 20)
    assert trainer.iter == stop_iter and trainer.stop_reason is not None
    assert stop.best is None or math.isfinite(stop.best)


def test_nan_is_never_the_best() -> None:
    trainer, stop = _stopping([float("nan")] * 3, patience=3)
    trainer.train(0, 20)
    assert trainer.iter == 2 and stop.best is None
    assert "no finite value" in str(trainer.stop_reason)
    trainer, stop = _stopping([1.0, float("nan"), 5.0, float("nan")], patience=2)
    trainer.train(0, 5)  # judged after iterations 0-3 (the last one's evaluation comes after)
    assert trainer.completed and (stop.best, stop.best_iter, stop.num_bad_evals) == (5.0, 2, 1)


def test_missing_metric_lists_the_metrics_that_exist() -> None:
    trainer = _trainer()
    trainer.register_hooks(
        [hooks.EvalHook(1, lambda: {"acc": {"top1": 1.0}}), hooks.EarlyStopping("accuracy")]
    )
    with pytest.raises(KeyError, match=r"'accuracy' is not in the event storage.*'acc/top1'"):
        trainer.train(0, 5)
    assert trainer.iter == 0


def test_waits_for_the_hook_that_computes_the_metric() -> None:
    """EvalHook every iteration, LossEvalHook every 3: validation_loss is judged after the loss
    evaluations only, and is not reported missing before the first one."""
    trainer = _trainer()
    stop = hooks.EarlyStopping("validation_loss", "min", patience=100, min_delta=1e9)
    trainer.register_hooks(
        [
            hooks.EvalHook(1, lambda: {"other": 1.0}),
            hooks.LossEvalHook(3, trainer.model, _batches(2, seed=5)),
            stop,
        ]
    )
    trainer.train(0, 10)
    assert trainer.completed
    assert stop.best_iter == 2 and stop.num_bad_evals == 2  # iterations 2 (best), 5, 8


def test_needs_an_evaluation_hook_before_it() -> None:
    trainer = _trainer()
    stop = hooks.EarlyStopping("metric")
    trainer.register_hooks([stop, hooks.EvalHook(1, _Scripted([1.0]))])
    with pytest.raises(ValueError, match="found no evaluation hook registered before it"):
        trainer.train(0, 3)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="needs the name of a metric"):
        hooks.EarlyStopping("")
    with pytest.raises(ValueError, match="mode must be 'max' or 'min', got 'up'"):
        hooks.EarlyStopping("m", mode="up")
    with pytest.raises(ValueError, match="patience"):
        hooks.EarlyStopping("m", patience=0)
    with pytest.raises(ValueError, match="min_delta must be a number >= 0"):
        hooks.EarlyStopping("m", min_delta=-0.1)


def test_state_is_restored_and_a_resumed_run_keeps_counting() -> None:
    values = [1.0, 3.0, 2.0, 2.5, 2.0, 2.9, 1.0, 1.0]
    reference, _ = _stopping(values, patience=3, period=2)
    reference.train(0, 30)
    assert reference.iter == 9  # evaluations after 1, 3 (best), 5, 7, 9 (third without gain)

    first, stop = _stopping(values, patience=3, period=2)
    first.train(0, 7)  # evaluations after 1, 3, 5
    state = first.state_dict()["hooks"]["EarlyStopping"]
    assert state == {"best": 3.0, "best_iter": 3, "num_bad_evals": 1}
    script = _Scripted(values[3:])  # the evaluations still to come
    resumed = _trainer()
    resumed_stop = hooks.EarlyStopping("metric", patience=3)
    resumed.register_hooks([hooks.EvalHook(2, script), resumed_stop])
    resumed_stop.load_state_dict(state)
    resumed.train(7, 30)
    assert resumed.iter == reference.iter and resumed.stop_reason == reference.stop_reason


def test_early_stop_writes_the_final_checkpoint(tmp_path: Path) -> None:
    trainer, stop = _stopping([1.0, 0.5, 0.5], patience=2, period=1)
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, period=100)])
    trainer.train(0, 20)
    assert trainer.iter == 2 and sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_final.pth",
    ]
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 2 and saved["trainer"]["iteration"] == 2
    assert saved["trainer"]["hooks"]["EarlyStopping"]["num_bad_evals"] == 2
    assert torch.equal(saved["model"]["fc.weight"], trainer.model.fc.weight)


class _Signal(HookBase):
    def __init__(self, at: int) -> None:
        self.at = at

    def after_backward(self) -> None:
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_no_final_checkpoint_after_a_failure_or_a_preemption(tmp_path: Path) -> None:
    for case in ("fail", "preempt"):
        out = tmp_path / case
        trainer = _trainer()
        checkpointer = Checkpointer(trainer.model, str(out), trainer=trainer)
        extra: HookBase
        if case == "fail":
            extra = hooks.CallbackHook(after_step=lambda t: 1 / 0 if t.iter == 2 else None)
        else:
            extra = _Signal(2)
        trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, period=100), extra])
        if case == "fail":
            with pytest.raises(ZeroDivisionError):
                trainer.train(0, 20)
            assert not out.exists() or "model_final.pth" not in os.listdir(out)
        else:
            trainer.train(0, 20)
            assert trainer.preempted
            assert sorted(os.listdir(out)) == ["last_checkpoint", "model_0000002.pth"]


def test_warns_when_registered_after_the_checkpointer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = _trainer()
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer)
    trainer.register_hooks(
        [
            hooks.PeriodicCheckpointer(checkpointer, period=100),
            hooks.EvalHook(1, _Scripted([1.0])),
            hooks.EarlyStopping("metric", patience=100),
        ]
    )
    with caplog.at_level(logging.WARNING, logger="d2engine"):
        trainer.train(0, 2)
    assert "EarlyStopping is registered after the PeriodicCheckpointer hook" in caplog.text


def test_features_work_with_amp_trainer() -> None:
    """AMPTrainer (bf16 on CPU) with EMAHook, LossEvalHook and EarlyStopping."""
    torch.manual_seed(0)
    model = _Net()
    trainer = AMPTrainer(
        model,
        _train_loader(),
        torch.optim.SGD(model.parameters(), lr=0.05),
        precision=torch.bfloat16,
    )
    ema = ModelEMA(model, decay=0.5)
    stop = hooks.EarlyStopping("validation_loss", "min", patience=1, min_delta=1e9)
    trainer.register_hooks(
        [hooks.EMAHook(ema), hooks.LossEvalHook(2, model, _batches(2, seed=5)), stop]
    )
    trainer.train(0, 10)
    assert trainer.iter == 3 and trainer.stop_reason is not None  # judged after 1 and 3
    assert ema.updates == 4 and sorted(_history(trainer, "validation_loss")) == [1, 3]
