"""The engine in real 2-process gloo jobs: DDP training, metrics, hooks, data sharding, NaN losses.

Spawning costs seconds, so one job (``_train_worker``) serves most assertions: it trains with
SimpleTrainer + DDP on d2engine's sharded train loader with EvalHook on every rank and the writers
and checkpoints on the main process only, then runs AMPTrainer (bf16) and asynchronous metric
writing briefly.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.checkpoint import DetectionCheckpointer, PeriodicCheckpointer
from d2engine.data import TrainingSampler, build_train_loader
from d2engine.engine.ddp import create_ddp_model
from d2engine.engine.hooks import CallbackHook, EvalHook, PeriodicWriter
from d2engine.engine.launch import WorkerError, launch
from d2engine.engine.train_loop import AMPTrainer, SimpleTrainer
from d2engine.utils import comm
from d2engine.utils.events import JSONWriter

NUM_SAMPLES = 40
TOTAL_BATCH = 8  # 4 per rank
MAX_ITER = 50
EVAL_PERIOD = 20
SAMPLER_SEED = 3
LR = 0.05


def _dataset() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(NUM_SAMPLES, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(NUM_SAMPLES, generator=g)
    return [{"id": i, "x": x[i], "y": y[i]} for i in range(NUM_SAMPLES)]


class _Regressor(nn.Module):
    """Two losses on a list of samples; records what it saw (ids and local losses)."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.seen_ids: list[list[int]] = []
        self.local_losses: list[float] = []
        self.nan_at = nan_at

    def forward(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.seen_ids.append([s["id"] for s in batch])
        x = torch.stack([s["x"] for s in batch])
        y = torch.stack([s["y"] for s in batch])
        err = self.linear(x).squeeze(1) - y
        losses = {"loss_mse": (err**2).mean(), "loss_l1": 0.1 * err.abs().mean()}
        if self.nan_at is not None and len(self.seen_ids) - 1 == self.nan_at:
            losses["loss_l1"] = losses["loss_l1"] * float("nan")
        self.local_losses.append(float(sum(losses.values()).detach()))
        return losses


def _history(storage: Any, name: str) -> dict[int, float]:
    if name not in storage.histories():
        return {}
    return {int(it): float(v) for v, it in storage.history(name).values()}


def _train_worker(out_dir: str) -> None:
    out = Path(out_dir)
    rank = comm.get_rank()
    report: dict[str, Any] = {}

    # --- SimpleTrainer + DDP on the sharded train loader ---------------------------------
    model = _Regressor()
    loader = build_train_loader(
        dataset=_dataset(),
        total_batch_size=TOTAL_BATCH,
        sampler=TrainingSampler(NUM_SAMPLES, seed=SAMPLER_SEED),
        num_workers=0,
    )
    ddp = create_ddp_model(model)
    trainer = SimpleTrainer(ddp, loader, torch.optim.SGD(ddp.parameters(), lr=LR))
    eval_calls: list[int] = []

    def evaluate() -> dict[str, float]:
        eval_calls.append(trainer.iter)
        # a collective: it would hang unless EvalHook runs on every rank at the same iteration
        gathered = comm.all_gather(float(model.linear.weight.sum()))
        return {"eval": {"weight_sum": sum(gathered) / len(gathered)}}

    # DetectionCheckpointer saves on the main process only; a directory per rank shows who wrote.
    checkpointer = DetectionCheckpointer(model, str(out / f"ckpt{rank}"))
    periodic = PeriodicCheckpointer(checkpointer, period=25, max_iter=MAX_ITER)
    hooks: list[Any] = [
        EvalHook(EVAL_PERIOD, evaluate),
        CallbackHook(after_step=lambda t: periodic.step(t.iter)),
    ]
    if comm.is_main_process():  # as DefaultTrainer does
        hooks.append(PeriodicWriter([JSONWriter(str(out / "metrics.json"))], period=10))
    trainer.register_hooks(hooks)
    trainer.train(0, MAX_ITER)

    report["params"] = {k: v.flatten().tolist() for k, v in model.state_dict().items()}
    report["seen_ids"] = model.seen_ids
    report["local_losses"] = model.local_losses
    report["eval_calls"] = eval_calls
    report["loader_position"] = loader.state_dict()["num_batches"]
    storage = trainer.storage
    for name in ("total_loss", "loss_mse", "loss_l1", "data_time", "rank_data_time"):
        report[name] = _history(storage, name)

    # --- AMPTrainer (bf16 on CPU) and asynchronous metrics: averaged across ranks too -----
    for kind in ("amp", "async"):
        model = _Regressor()
        ddp = create_ddp_model(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
        batches = [_dataset()[8 * i + 4 * rank : 8 * i + 4 * rank + 4] for i in range(4)]
        if kind == "amp":
            trainer = AMPTrainer(ddp, batches, optimizer, precision=torch.bfloat16)
        else:
            trainer = SimpleTrainer(ddp, batches, optimizer, async_write_metrics=True)
        trainer.train(0, 4)
        if kind == "async":
            trainer.close()
            metrics_group = trainer._metrics_group._get_backend(torch.device("cpu"))
            report["metrics_group_timeout_s"] = metrics_group.options._timeout.total_seconds()
        report[f"{kind}_local_losses"] = model.local_losses
        report[f"{kind}_total_loss"] = _history(trainer.storage, "total_loss")

    # --- request_stop on every rank in the same iteration: all stop there, no collective ----
    ddp = create_ddp_model(_Regressor())
    batches = [_dataset()[4 * rank : 4 * rank + 4]] * 10
    trainer = SimpleTrainer(ddp, batches, torch.optim.SGD(ddp.parameters(), lr=LR))
    final_evals: list[int] = []
    trainer.register_hooks(
        [
            CallbackHook(after_step=lambda t: t.request_stop("done") if t.iter == 2 else None),
            EvalHook(0, lambda: final_evals.append(1)),  # a collective if it ran
        ]
    )
    trainer.train(0, 10)
    comm.synchronize()
    report["stopped"] = [trainer.iter, trainer.completed, trainer.stop_reason, len(final_evals)]

    (out / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def train_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp_job")
    launch(_train_worker, 2, args=(str(out),), timeout=datetime.timedelta(seconds=90))
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, reports


def _jsonify(d: dict[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in d.items()}


@pytest.mark.timeout(180)
def test_ddp_parameters_match_one_process_on_concatenated_batches(train_job: tuple) -> None:
    _, reports = train_job
    assert reports[0]["params"] == reports[1]["params"]  # identical across ranks, bit for bit

    # One process, same initial weights, each step on rank 0's batch + rank 1's batch.
    samples = _dataset()
    batches = [
        [samples[i] for i in ids0 + ids1]
        for ids0, ids1 in zip(reports[0]["seen_ids"], reports[1]["seen_ids"])
    ]
    assert len(batches) == MAX_ITER
    model = _Regressor()
    trainer = SimpleTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=LR))
    trainer.train(0, MAX_ITER)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            torch.tensor(reports[0]["params"][name]), value.flatten(), rtol=1e-5, atol=1e-6
        )
    # and training did something
    assert reports[0]["params"]["linear.weight"] != _Regressor().linear.weight.flatten().tolist()


@pytest.mark.timeout(180)
def test_train_loader_shards_the_global_stream(train_job: tuple) -> None:
    _, reports = train_job
    ids0, ids1 = reports[0]["seen_ids"], reports[1]["seen_ids"]
    assert all(len(b) == TOTAL_BATCH // 2 for b in ids0 + ids1)
    # each pass over the data (5 iterations of 8 samples) visits every sample exactly once
    for start in range(0, MAX_ITER, NUM_SAMPLES // TOTAL_BATCH):
        stop = start + NUM_SAMPLES // TOTAL_BATCH
        visited = [i for it in range(start, stop) for i in ids0[it] + ids1[it]]
        assert sorted(visited) == list(range(NUM_SAMPLES))
    # rank r takes the elements r, r + 2, r + 4 ... of the one-process stream of the same seed
    flat0 = [i for b in ids0 for i in b]
    flat1 = [i for b in ids1 for i in b]
    interleaved = [i for pair in zip(flat0, flat1) for i in pair]
    stream = iter(TrainingSampler(NUM_SAMPLES, seed=SAMPLER_SEED, rank=0, world_size=1))
    assert interleaved == [next(stream) for _ in range(len(interleaved))]
    assert reports[0]["loader_position"] == reports[1]["loader_position"] == MAX_ITER


@pytest.mark.timeout(180)
def test_metrics_are_averaged_and_written_once_by_rank_0(train_job: tuple) -> None:
    out, reports = train_job
    r0, r1 = reports
    for it in range(MAX_ITER):
        mean = (r0["local_losses"][it] + r1["local_losses"][it]) / 2
        assert math.isclose(r0["total_loss"][str(it)], mean, rel_tol=1e-6)
        # data_time is the slowest rank's
        slowest = max(r0["rank_data_time"][str(it)], r1["rank_data_time"][str(it)])
        assert r0["data_time"][str(it)] == slowest
    assert set(r0["loss_mse"]) == set(r0["loss_l1"]) == {str(i) for i in range(MAX_ITER)}
    # only the main process puts the reduced metrics; every rank its own data time
    assert r1["total_loss"] == {} and r1["data_time"] == {}
    assert len(r1["rank_data_time"]) == MAX_ITER

    assert sorted(p.name for p in out.iterdir() if p.name.startswith("metrics")) == ["metrics.json"]
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    iterations = [line["iteration"] for line in lines]
    assert iterations == sorted(set(iterations))  # each iteration once: a single writer
    assert {9, 19, 29, 39, 49} <= set(iterations)
    assert all("total_loss" in line for line in lines if line["iteration"] % 10 == 9)
    for it in (19, 39, MAX_ITER):  # the last evaluation is logged at max_iter
        line = next(line for line in lines if line["iteration"] == it and "eval/weight_sum" in line)
        assert math.isfinite(line["eval/weight_sum"])


@pytest.mark.timeout(180)
def test_checkpoints_are_saved_by_rank_0_only(train_job: tuple) -> None:
    out, reports = train_job
    assert not (out / "ckpt1").exists() or not any((out / "ckpt1").iterdir())
    saved = {p.name for p in (out / "ckpt0").iterdir()}
    assert {"model_0000024.pth", "model_final.pth"} <= saved
    model = _Regressor()
    DetectionCheckpointer(model).load(str(out / "ckpt0" / "model_final.pth"))
    assert {k: v.flatten().tolist() for k, v in model.state_dict().items()} == reports[0]["params"]


@pytest.mark.timeout(180)
def test_eval_hook_runs_on_every_rank(train_job: tuple) -> None:
    _, reports = train_job
    # every EVAL_PERIOD iterations and after the last one, on both ranks
    assert reports[0]["eval_calls"] == reports[1]["eval_calls"] == [19, 39, MAX_ITER]


@pytest.mark.timeout(180)
def test_amp_and_async_metrics_are_averaged_across_ranks(train_job: tuple) -> None:
    _, (r0, r1) = train_job
    for kind in ("amp", "async"):
        logged = r0[f"{kind}_total_loss"]
        assert sorted(logged) == ["0", "1", "2", "3"], kind
        for it in range(4):
            mean = (r0[f"{kind}_local_losses"][it] + r1[f"{kind}_local_losses"][it]) / 2
            assert math.isclose(logged[str(it)], mean, rel_tol=1e-6), (kind, it)
        assert r1[f"{kind}_total_loss"] == {}
    # the background metrics' gloo group has the job's timeout (launch's), not torch's default
    assert r0["metrics_group_timeout_s"] == r1["metrics_group_timeout_s"] == 90.0


@pytest.mark.timeout(180)
def test_request_stop_on_every_rank_stops_them_together(train_job: tuple) -> None:
    _, reports = train_job
    assert reports[0]["stopped"] == reports[1]["stopped"] == [2, False, "done", 0]


def _nan_worker(out_dir: str) -> None:
    rank = comm.get_rank()
    model = _Regressor(nan_at=5 if rank == 1 else None)
    ddp = create_ddp_model(model)
    batches = [_dataset()[4 * rank : 4 * rank + 4]] * 20
    trainer = SimpleTrainer(ddp, batches, torch.optim.SGD(ddp.parameters(), lr=LR))
    try:
        trainer.train(0, 20)
    except FloatingPointError as e:
        (Path(out_dir) / f"fpe{rank}.txt").write_text(str(e))
        comm.synchronize()  # reached only if every rank stopped: none is left in a collective
        raise


@pytest.mark.timeout(180)
def test_nan_loss_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    with pytest.raises(WorkerError, match="FloatingPointError: Loss became infinite or NaN"):
        # a rank left waiting in a collective would fail with a timeout after 60 s instead
        launch(_nan_worker, 2, args=(str(tmp_path),), timeout=datetime.timedelta(seconds=60))
    for rank in range(2):
        assert "iteration=5" in (tmp_path / f"fpe{rank}.txt").read_text()
