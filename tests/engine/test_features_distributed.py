"""EMA, the validation loss and early stopping in a real 2-process gloo job (DDP).

One job (``_worker``) serves the assertions: SimpleTrainer on a DDP model with EMAHook,
EvalHook (a metric that differs per rank), LossEvalHook (a different number of validation batches
per rank), EarlyStopping and a PeriodicCheckpointer writing on rank 0.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.checkpoint import DetectionCheckpointer
from d2engine.engine import hooks
from d2engine.engine.ddp import create_ddp_model, create_fsdp_model
from d2engine.engine.launch import launch
from d2engine.engine.train_loop import HookBase, SimpleTrainer
from d2engine.modeling import ModelEMA
from d2engine.utils import comm

DECAY = 0.7
# The metric the main process sees: best 3.0 after iteration 2, then 2 evaluations without gain.
RANK0_METRIC = [1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
RANK1_METRIC = [float(10 * i) for i in range(1, 9)]  # always improving: rank 1 alone never stops
STOP_ITER = 4
# Validation batches: 3 on rank 0, 1 on rank 1; the mean is over the 4 batches (not the ranks).
VAL = {0: [1.0, 2.0, 3.0], 1: [10.0]}


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        if isinstance(batch, dict):  # a validation batch: known losses
            zero = 0.0 * self.linear.weight.sum()
            return {"loss_a": zero + batch["a"], "loss_b": zero + 0.5}
        x, y = batch
        return {"loss_mse": ((self.linear(x).squeeze(1) - y) ** 2).mean()}


class _Record(HookBase):
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.states: list[dict[str, list[float]]] = []

    def after_step(self) -> None:
        self.states.append({k: v.flatten().tolist() for k, v in self.model.state_dict().items()})


def _worker(out_dir: str) -> None:
    out = Path(out_dir)
    rank = comm.get_rank()
    model = _Regressor()
    ddp = create_ddp_model(model)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    batches = [(torch.randn(4, 4, generator=g), torch.randn(4, generator=g)) for _ in range(20)]
    trainer = SimpleTrainer(ddp, batches, torch.optim.SGD(ddp.parameters(), lr=0.1))
    ema = ModelEMA(ddp, decay=DECAY)
    start = {k: v.flatten().tolist() for k, v in model.state_dict().items()}
    script = iter(RANK0_METRIC if rank == 0 else RANK1_METRIC)
    checkpointer = DetectionCheckpointer(model, str(out / "ckpt"), trainer=trainer, ema=ema)
    record = _Record(model)
    trainer.register_hooks(
        [
            hooks.EMAHook(ema),
            record,
            hooks.EvalHook(1, lambda: {"metric": next(script)}),
            hooks.LossEvalHook(2, ddp, [{"a": torch.tensor(a)} for a in VAL[rank]]),
            hooks.EarlyStopping("metric", "max", patience=2),
            hooks.PeriodicCheckpointer(checkpointer, period=100),
        ]
    )
    trainer.train(0, 20)
    comm.synchronize()
    report = {
        "iter": trainer.iter,
        "completed": trainer.completed,
        "stop_reason": trainer.stop_reason,
        "start": start,
        "states": record.states,
        "ema": {k: v.flatten().tolist() for k, v in ema.weights().items()},
        "ema_updates": ema.updates,
        "validation": {
            name: {it: v for v, it in trainer.storage.history(name).values()}
            for name in ("validation_loss", "validation_loss_a", "validation_loss_b")
        },
    }
    report["fsdp"] = _fsdp_ema(out)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def _full(t: torch.Tensor) -> list[float]:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective for a DTensor
    return full.detach().flatten().tolist()


def _fsdp_ema(out: Path) -> dict[str, Any]:
    """ModelEMA of an FSDP2 model (DTensor parameters): update, swap, sharded save and load."""
    model = create_fsdp_model(_Regressor())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ModelEMA(model, decay=DECAY)
    states = [{k: _full(v) for k, v in model.state_dict().items()}]
    g = torch.Generator().manual_seed(comm.get_rank())
    for _ in range(3):
        batch = (torch.randn(4, 4, generator=g), torch.randn(4, generator=g))
        loss = model(batch)["loss_mse"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        states.append({k: _full(v) for k, v in model.state_dict().items()})
    # the forward of a sharded model is a collective: rank 1 (1 batch) keeps in step with rank 0 (3)
    val = [{"a": torch.tensor(a)} for a in VAL[comm.get_rank()]]
    validation = hooks.LossEvalHook(0, model, val).compute_losses()
    with ema.swap(model):
        swapped = {k: _full(v) for k, v in model.state_dict().items()}
    restored = {k: _full(v) for k, v in model.state_dict().items()}
    DetectionCheckpointer(model, str(out / "fsdp"), ema=ema).save("sharded")
    comm.synchronize()
    other = create_fsdp_model(_Regressor())
    loaded = ModelEMA(other, decay=DECAY)
    DetectionCheckpointer(other, str(out / "fsdp"), ema=loaded).load(str(out / "fsdp" / "sharded"))
    return {
        "states": states,
        "ema": {k: _full(v) for k, v in ema.weights().items()},
        "swapped": swapped,
        "restored": restored,
        "loaded": {k: _full(v) for k, v in loaded.weights().items()},
        "loaded_updates": loaded.updates,
        "validation": validation,
    }


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("features_job")
    launch(_worker, 2, args=(str(out),), timeout=datetime.timedelta(seconds=90))
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(180)
def test_every_rank_stops_early_at_the_same_iteration(job: tuple) -> None:
    out, reports = job
    for r in reports:
        assert r["iter"] == STOP_ITER and not r["completed"]
        assert r["stop_reason"] == (
            "Early stopping: metric did not improve for 2 evaluations (best 3 at iteration 2)"
        )
    # the final checkpoint, written by rank 0 after the stop (every rank gathered its RNG state)
    saved = torch.load(out / "ckpt" / "model_final.pth", weights_only=True)
    assert saved["iteration"] == STOP_ITER and len(saved["trainer"]["rng"]) == 2
    assert saved["trainer"]["hooks"]["EarlyStopping"] == {
        "best": 3.0,
        "best_iter": 2,
        "num_bad_evals": 2,
    }
    assert saved["ema"]["updates"] == STOP_ITER + 1


@pytest.mark.timeout(180)
def test_ema_of_a_ddp_model_is_the_same_on_every_rank_and_as_computed(job: tuple) -> None:
    _, (r0, r1) = job
    assert r0["ema"] == r1["ema"] and r0["ema_updates"] == STOP_ITER + 1
    expected = {k: torch.tensor(v) for k, v in r0["start"].items()}
    for state in r0["states"]:
        expected = {
            k: DECAY * expected[k] + (1 - DECAY) * torch.tensor(v) for k, v in state.items()
        }
    for k, v in expected.items():  # names of the plain module: no "module." prefix
        torch.testing.assert_close(torch.tensor(r0["ema"][k]), v, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(180)
def test_validation_loss_is_the_mean_over_all_ranks_batches(job: tuple) -> None:
    _, reports = job
    for r in reports:  # evaluations after iterations 1 and 3 (stopped after 4)
        assert r["validation"]["validation_loss_a"] == {"1": 4.0, "3": 4.0}  # (1+2+3+10)/4
        assert r["validation"]["validation_loss_b"] == {"1": 0.5, "3": 0.5}
        assert r["validation"]["validation_loss"] == {"1": 4.5, "3": 4.5}


@pytest.mark.timeout(180)
def test_ema_of_an_fsdp_model(job: tuple) -> None:
    """FSDP2 parameters are DTensors: the average is sharded like them, swaps in and out, and goes
    through a sharded checkpoint and back; LossEvalHook keeps the ranks' forward passes in step."""
    _, (r0, r1) = job
    f0, f1 = r0["fsdp"], r1["fsdp"]
    assert f0["ema"] == f1["ema"]  # the full tensors agree on both ranks
    expected = {k: torch.tensor(v) for k, v in f0["states"][0].items()}
    for state in f0["states"][1:]:
        expected = {
            k: DECAY * expected[k] + (1 - DECAY) * torch.tensor(v) for k, v in state.items()
        }
    for k, v in expected.items():
        torch.testing.assert_close(torch.tensor(f0["ema"][k]), v, rtol=1e-5, atol=1e-6)
    assert f0["swapped"] == f0["ema"] and f0["restored"] == f0["states"][-1]
    assert f0["loaded"] == f0["ema"] and f0["loaded_updates"] == 3
    for f in (f0, f1):  # LossEvalHook on the sharded model: the mean over the 4 batches
        expected_losses = {
            "validation_loss": 4.5,
            "validation_loss_a": 4.0,
            "validation_loss_b": 0.5,
        }
        assert f["validation"] == expected_losses
