"""d2engine.evaluation.evaluator: evaluators and inference_on_dataset."""

from __future__ import annotations

import io
import logging
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.evaluation import (
    DatasetEvaluator,
    DatasetEvaluators,
    inference_context,
    inference_on_dataset,
)
from d2engine.evaluation import evaluator as evaluator_module


class _Recorder(DatasetEvaluator):
    def __init__(self, key: str = "rec", result: Any = "count") -> None:
        self.key, self.result = key, result
        self.calls: list[str] = []
        self.seen: list[Any] = []

    def reset(self) -> None:
        self.calls.append("reset")
        self.seen = []

    def process(self, inputs: Any, outputs: Any) -> None:
        self.calls.append("process")
        self.seen.extend(zip(inputs, outputs))

    def evaluate(self) -> Any:
        self.calls.append("evaluate")
        if self.result == "count":
            return {self.key: {"n": len(self.seen)}}
        return self.result


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.bn = nn.BatchNorm1d(1)
        self.grad_enabled: list[bool] = []
        self.training_seen: list[bool] = []

    def forward(self, batch: list[float]) -> list[float]:
        self.grad_enabled.append(torch.is_grad_enabled())
        self.training_seen.append(self.training)
        return [2 * x for x in batch]


def test_runs_model_in_eval_and_no_grad_then_restores_modes() -> None:
    model = _Model()
    model.bn.eval()  # e.g. a frozen BN inside a training model keeps its own mode
    rec = _Recorder()
    results = inference_on_dataset(model, [[1.0, 2.0], [3.0]], rec)
    assert results == {"rec": {"n": 3}}
    assert rec.seen == [(1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]
    assert rec.calls == ["reset", "process", "process", "evaluate"]
    assert model.grad_enabled == [False, False] and model.training_seen == [False, False]
    assert model.training and model.linear.training and not model.bn.training
    assert torch.is_grad_enabled()


def test_training_mode_restored_on_exception() -> None:
    model = _Model()

    def broken(batch: Any) -> Any:
        raise RuntimeError("boom")

    model.forward = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        inference_on_dataset(model, [[1.0]], None)
    assert model.training and model.bn.training
    with pytest.raises(ValueError, match="inside"), inference_context(model):
        assert not model.training
        raise ValueError("inside")
    assert model.training


def test_evaluator_none_list_and_none_results() -> None:
    assert inference_on_dataset(lambda b: b, [[1], [2]], None) == {}
    assert inference_on_dataset(lambda b: b, [[1]], _Recorder(result=None)) == {}
    merged = inference_on_dataset(lambda b: b, [[1]], [_Recorder("a"), _Recorder("b")])
    assert merged == {"a": {"n": 1}, "b": {"n": 1}}


def test_duplicate_result_keys_are_an_error() -> None:
    evaluators = DatasetEvaluators([_Recorder("acc"), _Recorder("acc")])
    assert len(evaluators) == 2
    with pytest.raises(ValueError, match=r"same key 'acc'.*_Recorder"):
        inference_on_dataset(lambda b: b, [[1]], evaluators)


def test_base_evaluator_is_a_no_op() -> None:
    base = DatasetEvaluator()
    base.reset()
    base.process([1], [2])
    assert base.evaluate() is None


def test_callbacks_called_in_order() -> None:
    events: list[str] = []
    callbacks = {
        name: (lambda name=name: events.append(name))
        for name in ("on_start", "before_inference", "after_inference", "on_end")
    }
    inference_on_dataset(lambda b: b, [[1], [2]], None, callbacks=callbacks)
    assert events == [
        "on_start",
        "before_inference",
        "after_inference",
        "before_inference",
        "after_inference",
        "on_end",
    ]
    with pytest.raises(ValueError, match=r"unknown callback names \['after'\]"):
        inference_on_dataset(lambda b: b, [[1]], None, callbacks={"after": lambda: None})
    with pytest.raises(TypeError, match="callback 'on_end' is not callable"):
        inference_on_dataset(lambda b: b, [[1]], None, callbacks={"on_end": 3})


def test_progress_log_with_eta(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(evaluator_module, "_LOG_PERIOD_S", 0.0)
    caplog.set_level(logging.INFO, logger="d2engine.evaluation.evaluator")
    inference_on_dataset(lambda b: b, [[i] for i in range(12)], None)
    progress = [r.getMessage() for r in caplog.records if "Inference done" in r.getMessage()]
    # Warm-up is min(5, 12 - 1) = 5 batches; progress starts after twice that.
    assert [m.split()[2] for m in progress] == ["11/12.", "12/12."]
    assert all("ETA=" in m for m in progress)
    assert "Start inference on 12 batches" in caplog.text
    assert "Total inference time" in caplog.text and "on 1 devices" in caplog.text


def test_loader_without_len(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="d2engine.evaluation.evaluator")
    rec = _Recorder()
    assert inference_on_dataset(lambda b: b, iter([[1], [2], [3]]), rec) == {"rec": {"n": 3}}
    assert "an unknown number of batches" in caplog.text


def test_timing_skips_warmup(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    monkeypatch.setattr(evaluator_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = [0]

    def slow_start(batch: Any) -> Any:
        calls[0] += 1
        clock[0] += 100.0 if calls[0] <= 5 else 1.0  # the 5 warm-up batches are slow
        return batch

    caplog.set_level(logging.INFO, logger="d2engine.evaluation.evaluator")
    inference_on_dataset(slow_start, [[i] for i in range(12)], None)
    # 7 timed batches of 1 s each; the 500 s of warm-up are left out.
    assert "Total inference time: 0:00:07 (1.000000 s / iter per device" in caplog.text
    assert "pure compute time: 0:00:07 (1.000000 s / iter per device" in caplog.text


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv("D2ENGINE_PROGRESS", raising=False)
    bars = []

    def unthrottled(total: int | None) -> Any:  # redraw at every update, to see each count
        bar = make_bar(total)
        bar.mininterval, bar.miniters = 0, 1
        bars.append(bar)
        return bar

    make_bar = evaluator_module._eval_bar
    monkeypatch.setattr(evaluator_module, "_eval_bar", unthrottled)
    rec = _Recorder()
    assert inference_on_dataset(lambda b: b, [[i] for i in range(7)], rec) == {"rec": {"n": 7}}
    out = tty.getvalue()
    assert "eval: 100%" in out and "7/7" in out
    assert out.endswith(" \r") and bars[0].disable  # erased and closed at the end
    tty.seek(0)
    tty.truncate()
    inference_on_dataset(lambda b: b, [[1], [2]], None, progress_bar=False)
    assert tty.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar
    inference_on_dataset(lambda b: b, [[1], [2]], None)
    assert sys.stderr.getvalue() == ""
