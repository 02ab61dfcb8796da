"""d2engine.engine.ema_hook: EMAHook with SimpleTrainer (DDP in test_features_distributed.py, exact
resume in test_resume_features.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer
from d2engine.engine import hooks
from d2engine.engine.train_loop import HookBase, SimpleTrainer
from d2engine.modeling import ModelEMA


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.bn(self.fc(x)).pow(2).mean() + self.fc.weight.sum()}


def _loader() -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(8, 3, generator=g)


class _Record(HookBase):
    """Records the model's state after each step (registered after the EMAHook)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def after_step(self) -> None:
        self.states.append({k: v.clone() for k, v in self.trainer.model.state_dict().items()})


def _trainer() -> SimpleTrainer:
    torch.manual_seed(0)
    model = _Net()
    return SimpleTrainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.1))


def test_updates_after_each_step_as_computed_by_hand() -> None:
    trainer = _trainer()
    ema = ModelEMA(trainer.model, decay=0.6)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    record = _Record()
    trainer.register_hooks([hooks.EMAHook(ema), record])
    trainer.train(0, 4)
    expected = start
    for state in record.states:
        expected = {
            k: 0.6 * expected[k] + 0.4 * v if v.is_floating_point() else v for k, v in state.items()
        }
    assert ema.updates == 4
    for k, v in expected.items():
        torch.testing.assert_close(ema.weights()[k], v, rtol=1e-6, atol=1e-7)


def test_a_new_run_starts_the_average_at_the_loaded_weights() -> None:
    trainer = _trainer()
    ema = ModelEMA(trainer.model, decay=1.0)  # decay 1: the average stays where it starts
    with torch.no_grad():  # e.g. MODEL.WEIGHTS loaded after the EMA was built
        trainer.model.fc.weight.fill_(0.25)
    trainer.register_hooks([hooks.EMAHook(ema)])
    trainer.train(0, 2)
    assert torch.equal(ema.weights()["fc.weight"], torch.full((4, 3), 0.25))


def test_a_resumed_run_without_the_average_warns(caplog: pytest.LogCaptureFixture) -> None:
    trainer = _trainer()
    ema = ModelEMA(trainer.model, decay=0.9)
    trainer.register_hooks([hooks.EMAHook(ema)])
    with caplog.at_level(logging.WARNING, logger="d2engine"):
        trainer.train(5, 6)
    assert "training resumes at iteration 5 but the EMA has no updates" in caplog.text
    assert ema.updates == 1


def test_ema_is_saved_by_the_checkpointer_and_restored(tmp_path: Path) -> None:
    trainer = _trainer()
    ema = ModelEMA(trainer.model, decay=0.9)
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer, ema=ema)
    trainer.register_hooks([hooks.EMAHook(ema), hooks.PeriodicCheckpointer(checkpointer, 3)])
    trainer.train(0, 3)
    saved = torch.load(tmp_path / "model_0000002.pth", weights_only=True)
    assert saved["ema"]["updates"] == 3  # the average of the checkpoint's own iteration
    for k, v in ema.weights().items():
        assert torch.equal(saved["ema"]["weights"][k], v)
    assert "EMAHook" not in saved["trainer"]["hooks"]  # saved once, as the "ema" entry

    fresh = _trainer()
    fresh_ema = ModelEMA(fresh.model, decay=0.9)
    Checkpointer(fresh.model, str(tmp_path), trainer=fresh, ema=fresh_ema).resume_or_load("")
    assert fresh_ema.updates == 3
    assert all(torch.equal(fresh_ema.weights()[k], v) for k, v in ema.weights().items())


def test_eval_hook_can_evaluate_the_average() -> None:
    trainer = _trainer()
    ema = ModelEMA(trainer.model, decay=0.5)
    seen: list[Any] = []

    def evaluate() -> dict[str, float]:
        with ema.swap(trainer.model):
            seen.append(trainer.model.fc.weight.detach().clone())
        return {"w": float(trainer.model.fc.weight.detach().sum())}

    trainer.register_hooks([hooks.EMAHook(ema), hooks.EvalHook(2, evaluate)])
    trainer.train(0, 4)
    assert len(seen) == 2 and torch.equal(seen[-1], ema.weights()["fc.weight"])
    assert not torch.equal(trainer.model.fc.weight, ema.weights()["fc.weight"])  # restored


def test_warns_when_registered_after_the_checkpointer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = _trainer()
    ema = ModelEMA(trainer.model)
    checkpointer = Checkpointer(trainer.model, str(tmp_path), trainer=trainer, ema=ema)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, 100), hooks.EMAHook(ema)])
    with caplog.at_level(logging.WARNING, logger="d2engine"):
        trainer.train(0, 1)
    assert "EMAHook is registered after the PeriodicCheckpointer hook" in caplog.text


def test_needs_a_model_ema() -> None:
    with pytest.raises(TypeError, match="EMAHook takes a d2engine.modeling.ModelEMA, got dict"):
        hooks.EMAHook({})  # type: ignore[arg-type]
