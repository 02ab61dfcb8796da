"""Aspect-ratio grouped data across a resume, in a real 2-process gloo job (DDP, SimpleTrainer,
the PeriodicCheckpointer hook on both ranks): each rank continues exactly where it was, and a
resume on one process reads every sample once.

One job (``_job``) trains an uninterrupted reference run that checkpoints every ``PERIOD``
iterations, then resumes a new trainer on both ranks from the first checkpoint. The checkpoint falls
mid-group: the two ranks have read different numbers of indices and each has indices waiting in a
group (asserted). The 2 -> 1 resume runs in the test process itself.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.checkpoint import DetectionCheckpointer
from d2engine.data import TrainingSampler, build_train_loader
from d2engine.engine import hooks
from d2engine.engine.ddp import create_ddp_model
from d2engine.engine.launch import launch
from d2engine.engine.train_loop import SimpleTrainer
from d2engine.utils import comm

NUM_SAMPLES = 97  # one pass covers everything read here: an index appears once in it
SEED = 0  # with 3 samples per rank, the ranks are 46 and 44 samples in, both mid-group
TOTAL_BATCH = 6
PERIOD = 7  # checkpoints after iterations 6 and 13
MAX_ITER = 14


def _dataset() -> list[dict[str, Any]]:
    """Ids divisible by 3 are landscape, the others portrait."""
    return [
        {
            "id": i,
            "width": 20 if i % 3 == 0 else 10,
            "height": 10 if i % 3 == 0 else 20,
            "x": float(i % 7) / 7.0,
        }
        for i in range(NUM_SAMPLES)
    ]


class _IdModel(nn.Module):
    """A one-weight regressor that records the ids of every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def forward(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.seen.append([d["id"] for d in batch])
        x = torch.tensor([[d["x"]] for d in batch])
        return {"loss": ((self.linear(x) - 1.0) ** 2).mean()}


def _trainer(out: Path, total_batch: int) -> tuple[SimpleTrainer, DetectionCheckpointer, _IdModel]:
    model = _IdModel()
    wrapped = create_ddp_model(model)
    loader = build_train_loader(
        dataset=_dataset(),
        total_batch_size=total_batch,
        sampler=TrainingSampler(NUM_SAMPLES, seed=SEED),
        aspect_ratio_grouping=True,
        num_workers=0,
    )
    trainer = SimpleTrainer(wrapped, loader, torch.optim.SGD(wrapped.parameters(), lr=0.1))
    checkpointer = DetectionCheckpointer(model, str(out), trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, PERIOD)])
    return trainer, checkpointer, model


def _weights(model: nn.Module) -> list[float]:
    return [float(v) for t in model.state_dict().values() for v in t.flatten()]


def _job(out_dir: str) -> None:
    out = Path(out_dir)
    rank = comm.get_rank()
    trainer, checkpointer, model = _trainer(out / "run", TOTAL_BATCH)
    trainer.train(0, MAX_ITER)
    reference = {"seen": model.seen, "weights": _weights(model)}
    checkpointer.close()

    trainer, checkpointer, model = _trainer(out / "run", TOTAL_BATCH)
    checkpointer.load(str(out / "run" / f"model_{PERIOD - 1:07d}.pth"))
    trainer.train(trainer.start_iter, MAX_ITER)
    resumed = {"start": trainer.start_iter, "seen": model.seen, "weights": _weights(model)}
    checkpointer.close()
    report = {"reference": reference, "resumed": resumed}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("grouped_job")
    launch(_job, 2, args=(str(out),), timeout=datetime.timedelta(seconds=60))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _saved_data(out: Path) -> dict[str, Any]:
    path = out / "run" / f"model_{PERIOD - 1:07d}.pth"
    return torch.load(path, weights_only=True)["trainer"]["data"]


@pytest.mark.timeout(180)
def test_each_rank_resumes_its_own_grouped_position_bit_identically(
    job: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, reports = job
    for report in reports:
        reference, resumed = report["reference"], report["resumed"]
        assert resumed["start"] == PERIOD
        assert resumed["seen"] == reference["seen"][PERIOD:]
        assert resumed["weights"] == reference["weights"]  # bit-identical
    ranks = _saved_data(out)["ranks"]  # every rank's position, gathered by the hook on both
    assert [r["sampler"]["position"] for r in ranks] == [46, 44]  # different numbers read
    assert all(any(r["pending"]) for r in ranks)  # both mid-group


@pytest.mark.timeout(180)
def test_resume_on_one_process_reads_every_sample_once(
    job: tuple[Path, list[dict[str, Any]]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """2 -> 1: what the two ranks read before the checkpoint, what the one process reads after it
    and what is still waiting at the end are, together, the global stream without repetition."""
    out, reports = job
    trainer, checkpointer, model = _trainer(tmp_path, TOTAL_BATCH)
    with caplog.at_level(logging.INFO, logger="d2engine.data.train_loader"):
        checkpointer.load(str(out / "run" / f"model_{PERIOD - 1:07d}.pth"))
    trainer.train(trainer.start_iter, MAX_ITER)
    before = [i for r in reports for batch in r["reference"]["seen"][:PERIOD] for i in batch]
    after = [i for batch in model.seen for i in batch]
    assert len(model.seen) == MAX_ITER - PERIOD and all(len(b) == TOTAL_BATCH for b in model.seen)
    end = trainer.data_loader.state_dict()
    waiting = [*end.get("carry", []), *sum(end["pending"], [])]
    accounted = before + after + waiting
    assert len(accounted) == len(set(accounted))  # nothing read twice
    stream = TrainingSampler(NUM_SAMPLES, seed=SEED).epoch_indices(0)
    assert sorted(accounted) == sorted(stream[: end["sampler"]["position"]])  # nothing lost
    assert "read but not yet batched are shared among the processes" in caplog.text
    checkpointer.close()
