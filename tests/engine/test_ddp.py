"""d2engine.engine.ddp.create_ddp_model in one process and in a 2-process gloo job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from d2engine.engine.ddp import create_ddp_model
from d2engine.engine.launch import launch
from d2engine.utils import comm

# The input of each rank; the gradient of sum(w @ x) with respect to w is x.
_INPUTS = torch.tensor([[1 / 3, 0.1, 1.0001], [0.7, -1 / 7, 2.0]])


def test_one_process_returns_the_model_itself() -> None:
    model = nn.Linear(2, 2)
    assert create_ddp_model(model) is model
    assert create_ddp_model(model, fp16_compression=True, broadcast_buffers=False) is model


def test_rejects_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got function"):
        create_ddp_model(lambda x: x)  # type: ignore[arg-type]


def _ddp_worker(out_dir: str) -> None:
    rank = comm.get_rank()
    report: dict[str, object] = {}
    for fp16 in (False, True):
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = nn.Linear(3, 1, bias=False)
        ddp = create_ddp_model(model, fp16_compression=fp16, find_unused_parameters=False)
        assert isinstance(ddp, DistributedDataParallel) and ddp.module is model
        ddp(_INPUTS[rank][None]).sum().backward()
        report[f"grad_fp16={fp16}"] = model.weight.grad.flatten().tolist()
        report["device_ids"] = ddp.device_ids
        report["weight"] = model.weight.detach().flatten().tolist()
    again = create_ddp_model(ddp)  # already wrapped: returned as it is
    report["wrapped_again"] = again is ddp
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.timeout(120)
def test_two_processes_wrap_in_ddp_with_optional_fp16_compression(tmp_path: Path) -> None:
    launch(_ddp_worker, 2, args=(str(tmp_path),))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    torch.manual_seed(0)
    rank0_weight = nn.Linear(3, 1, bias=False).weight.flatten().tolist()
    exact_mean = _INPUTS.mean(dim=0)
    # fp16_compress_hook: each rank's gradient cast to fp16 and divided by the world size, the
    # halves summed in fp16, the result cast back.
    fp16_mean = (_INPUTS[0].half() / 2 + _INPUTS[1].half() / 2).float()
    assert not torch.equal(fp16_mean, exact_mean)  # the inputs tell the two apart
    for report in reports:
        assert report["device_ids"] is None  # CPU modules get no device_ids
        assert report["weight"] == rank0_weight  # parameters broadcast from rank 0
        torch.testing.assert_close(torch.tensor(report["grad_fp16=False"]), exact_mean)
        assert torch.equal(torch.tensor(report["grad_fp16=True"]), fp16_mean)
        assert report["wrapped_again"]


def test_create_fsdp_model_in_one_process_and_its_errors() -> None:
    from d2engine.engine.ddp import create_fsdp_model

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

    model = nn.Sequential(Block(), Block())
    assert create_fsdp_model(model, shard_modules=[Block]) is model  # one process: unchanged
    assert create_fsdp_model(model, shard_modules=["Block"], activation_checkpointing=True) is model
    assert not comm.is_sharded_module(model)
    with pytest.raises(ValueError, match=r"of the class\(es\) \['Blok'\].*classes are \['Block'"):
        create_fsdp_model(model, shard_modules=["Blok"])
    with pytest.raises(TypeError, match="takes nn.Module classes or class names, got 3"):
        create_fsdp_model(model, shard_modules=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="none were given. HINT: list the model's blocks"):
        create_fsdp_model(model, activation_checkpointing=True)
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got function"):
        create_fsdp_model(lambda x: x)  # type: ignore[arg-type]
