"""d2engine.evaluation.classification.ClassificationEvaluator."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from d2engine.evaluation import ClassificationEvaluator, DatasetEvaluators, inference_on_dataset


def _scores(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_topk_on_hand_made_case() -> None:
    ev = ClassificationEvaluator("toy", topk=(2, 1))
    ev.reset()
    inputs = [{"label": 0}, {"label": 1}, {"label": 2}, {"label": torch.tensor(2)}]
    outputs = [
        {"scores": _scores(0.9, 0.05, 0.05), "pred_class": 0},  # top-1 hit
        {"scores": _scores(0.6, 0.3, 0.1)},  # label 1 is 2nd: top-2 hit only
        _scores(0.5, 0.4, 0.1),  # a bare tensor = scores; label 2 is 3rd: miss
        {"scores": _scores(1.0, 2.0, 3.0)},  # top-1 hit
    ]
    ev.process(inputs[:2], outputs[:2])
    ev.process(inputs[2:], outputs[2:])
    assert ev.evaluate() == {"accuracy": {"top1": 50.0, "top2": 75.0}}
    ev.reset()
    ev.process([{"label": 1}], [{"scores": _scores(0.0, 1.0)}])
    assert ev.evaluate() == {"accuracy": {"top1": 100.0, "top2": 100.0}}


def test_pred_class_only_and_k_above_class_count() -> None:
    ev = ClassificationEvaluator(distributed=False)
    ev.process(
        [{"label": 3}, {"label": 1}, {"label": 1}],
        [{"pred_class": 3}, {"pred_class": torch.tensor(0)}, {"pred_class": 1}],
    )
    assert ev.evaluate() == {"accuracy": {"top1": pytest.approx(200 / 3)}}
    ev5 = ClassificationEvaluator(topk=(1, 5))
    ev5.process([{"label": 2}], [{"scores": _scores(3.0, 2.0, 1.0)}])  # only 3 classes
    assert ev5.evaluate() == {"accuracy": {"top1": 0.0, "top5": 100.0}}


def test_through_inference_on_dataset() -> None:
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    loader = [
        [{"x": torch.tensor([1.0, 0.0]), "label": 0}],
        [{"x": torch.tensor([1.0, 0.0]), "label": 1}],
    ]

    def classify(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"scores": model(d["x"])} for d in batch]

    assert inference_on_dataset(classify, loader, ClassificationEvaluator()) == {
        "accuracy": {"top1": 50.0}
    }


def test_no_predictions_warns(caplog: pytest.LogCaptureFixture) -> None:
    ev = ClassificationEvaluator("digits_test")
    with caplog.at_level(logging.WARNING):
        assert ev.evaluate() == {}
    assert "on 'digits_test' received no predictions" in caplog.text


def test_bad_inputs() -> None:
    with pytest.raises(
        ValueError, match=r"topk must be a non-empty sequence of positive ints, got \(0,\)"
    ):
        ClassificationEvaluator(topk=(0,))
    with pytest.raises(ValueError, match="got \\[\\]"):
        ClassificationEvaluator(topk=[])
    ev = ClassificationEvaluator(topk=(1, 2))
    with pytest.raises(ValueError, match="got 2 inputs but 1 outputs"):
        ev.process([{"label": 0}, {"label": 1}], [{"scores": _scores(1.0)}])
    with pytest.raises(KeyError, match=r"input 0 has no 'label' \(keys: \['image'\]\)"):
        ev.process([{"image": 0}], [{"scores": _scores(1.0)}])
    with pytest.raises(TypeError, match="output 0 is a list without 'scores' or 'pred_class'"):
        ev.process([{"label": 0}], [[0.1, 0.9]])
    with pytest.raises(
        ValueError, match=r"must be a 1-D tensor of class scores, got shape \(1, 2\)"
    ):
        ev.process([{"label": 0}], [{"scores": torch.zeros(1, 2)}])
    with pytest.raises(ValueError, match="label 5 of input 0 is out of range for 2 class scores"):
        ev.process([{"label": 5}], [{"scores": torch.zeros(2)}])
    with pytest.raises(
        ValueError, match=r"topk=\[1, 2\] needs 'scores', but output 0 has only 'pred_class'"
    ):
        ev.process([{"label": 0}], [{"pred_class": 0}])
    with pytest.raises(
        TypeError, match="'label' of input 0 must be an integer class index, got 'cat'"
    ):
        ev.process([{"label": "cat"}], [{"scores": torch.zeros(2)}])
    with pytest.raises(
        ValueError, match=r"must be a single class index, got a tensor of shape \(2,\)"
    ):
        ev.process([{"label": torch.tensor([0, 1])}], [{"scores": torch.zeros(2)}])
    assert ev.evaluate() == {}  # nothing was recorded by the failed calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, port: int, queue: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ev = ClassificationEvaluator()
        # rank 0: 2 of 2 correct; rank 1: 1 of 2 correct -> 75 % over the job
        labels = [[0, 1], [0, 1]][rank]
        preds = [[0, 1], [0, 0]][rank]
        ev.process([{"label": y} for y in labels], [{"pred_class": p} for p in preds])
        queue.put((rank, DatasetEvaluators([ev]).evaluate()))
        dist.barrier()  # both ranks done before either tears down, as launch() does
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_results_gathered_across_two_processes() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(
        _gather_worker, args=(_free_port(), queue), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    try:
        while not procs.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError("the 2-process evaluation did not finish within 120 s")
    finally:
        for proc in procs.processes:
            if proc.is_alive():
                proc.kill()
    results = dict(queue.get() for _ in range(2))
    assert results[0] == {"accuracy": {"top1": 75.0}}
    assert results[1] == {}  # only the main process returns results
