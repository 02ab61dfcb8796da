"""Sharded (DCP) checkpoints through the Checkpointer API, in one process.

A one-rank gloo group and ``fully_shard`` make a model with DTensor parameters, which is all the
format needs; the 2-process cases (resharding, FSDP training, preemption) are in
``tests/engine/test_fsdp.py``. The kill-during-save cases run in subprocesses that SIGKILL
themselves at a chosen point of a save.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_helpers import TESTS_DIR, free_port, python_env
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from d2engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    DetectionCheckpointer,
    PeriodicCheckpointer,
    UnsafeCheckpointError,
)
from d2engine.checkpoint import sharded as sharded_module
from d2engine.checkpoint.integrity import NonFiniteCheckpointError
from d2engine.checkpoint.sharded_reader import consolidate_checkpoint
from d2engine.utils import comm

MARKER_ENV = "D2ENGINE_TEST_PWNED"


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A process group of one rank (gloo), destroyed afterwards."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def _sharded_net(seed: int = 0) -> nn.Module:
    net = _net(seed)
    fully_shard(net[0])
    fully_shard(net)
    return net


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 1) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _full(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: _full(v).detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(_full(a[key]), _full(b[key])), key


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [
        {k: _full(v).clone() for k, v in optimizer.state[p].items()}
        for g in optimizer.param_groups
        for p in g["params"]
    ]


@pytest.mark.usefixtures("one_rank")
def test_round_trip_into_sharded_and_unsharded_models(tmp_path: Path) -> None:
    model = _sharded_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _step(model, optimizer)
    assert comm.is_sharded_module(model) and not comm.is_sharded_module(_net())
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer)
    assert checkpointer.checkpoint_path("model_0000001") == str(tmp_path / "model_0000001")
    extra = {"nested": [1, "two", torch.tensor([3.0])], "steps": {"a": 4}}
    checkpointer.save("model_0000001", iteration=1, extra=extra)

    directory = tmp_path / "model_0000001"
    assert sorted(os.listdir(directory)) == [".metadata", "__0_0.distcp", "state.pt"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001"]  # no temp dir
    assert checkpointer.get_all_checkpoint_files() == [str(directory)]
    saved, saved_optimizer = _full_state(model), _optimizer_state(optimizer)

    # Into a fresh sharded model: DTensors again, optimizer state included.
    model2 = _sharded_net(seed=5)
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    rest = Checkpointer(model2, str(tmp_path), optimizer=optimizer2).resume_or_load("")
    assert rest["iteration"] == 1 and rest["extra"]["nested"][:2] == [1, "two"]
    assert torch.equal(rest["extra"]["nested"][2], torch.tensor([3.0]))
    _assert_same(_full_state(model2), saved)
    assert all(
        isinstance(v, DTensor) for v in optimizer2.state[model2[0].weight].values() if v.dim()
    )
    for a, b in zip(_optimizer_state(optimizer2), saved_optimizer):
        _assert_same(a, b)
    _step(model2, optimizer2)  # the loaded state trains

    # Into an unsharded model (one process, no collective): full tensors.
    plain = _net(seed=6)
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=0.1)
    Checkpointer(plain, "", optimizer=plain_optimizer).load(str(directory))
    _assert_same(_full_state(plain), saved)
    for a, b in zip(_optimizer_state(plain_optimizer), saved_optimizer):
        _assert_same(a, b)
    assert not any(isinstance(v, DTensor) for v in plain_optimizer.state[plain[0].weight].values())
    _step(plain, plain_optimizer)
    detection = _net(seed=7)
    DetectionCheckpointer(detection).load(str(directory))
    _assert_same(_full_state(detection), saved)


@pytest.mark.usefixtures("one_rank")
def test_async_save_copies_the_state_before_returning(tmp_path: Path) -> None:
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    hooks_before = len(_global_optimizer_pre_hooks)
    model = _sharded_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, optimizer)
    with Checkpointer(model, str(tmp_path), async_save=True, optimizer=optimizer) as checkpointer:
        for it in range(3):  # the staging buffers are reused from save to save
            checkpointer.save(f"model_{it:07d}", iteration=it)
            saved = _full_state(model)
            _step(model, optimizer, seed=it + 2)  # changes the parameters in place meanwhile
            checkpointer.wait()
            assert (tmp_path / "last_checkpoint").read_text() == f"model_{it:07d}"
            loaded = _net(seed=9)
            Checkpointer(loaded, "").load(str(tmp_path / f"model_{it:07d}"))
            _assert_same(_full_state(loaded), saved)
            assert not torch.equal(_full_state(model)["0.weight"], saved["0.weight"])
        # The optimizer steps wait for the copy of the shards while an asynchronous save runs.
        assert len(_global_optimizer_pre_hooks) == hooks_before + 1
    assert len(_global_optimizer_pre_hooks) == hooks_before  # removed by close()


@pytest.mark.usefixtures("one_rank")
def test_pth_checkpoint_loads_into_a_sharded_model(tmp_path: Path) -> None:
    plain = _net()
    optimizer = torch.optim.Adam(plain.parameters(), lr=0.1)
    _step(plain, optimizer)
    Checkpointer(plain, str(tmp_path), optimizer=optimizer).save("model_0000004", iteration=4)
    assert (tmp_path / "model_0000004.pth").is_file()

    model = _sharded_net(seed=3)
    sharded_optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    Checkpointer(model, str(tmp_path), optimizer=sharded_optimizer).resume_or_load("")
    _assert_same(_full_state(model), _full_state(plain))
    state = sharded_optimizer.state[model[0].weight]
    assert isinstance(state["exp_avg"], DTensor)  # laid out like the parameter
    for a, b in zip(_optimizer_state(sharded_optimizer), _optimizer_state(optimizer)):
        _assert_same(a, b)
    _step(model, sharded_optimizer)
    _step(plain, optimizer)
    for key, value in _full_state(model).items():
        torch.testing.assert_close(value, _full_state(plain)[key])


@pytest.mark.usefixtures("one_rank")
def test_stale_directories_removed_and_same_name_replaced(tmp_path: Path) -> None:
    for stale in (".model_0000002.dcp-tmp", ".model_0000001.dcp-old"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "__0_0.distcp").write_bytes(b"partial")
    model = _sharded_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer)
    checkpointer.save("model_0000001", iteration=1)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001"]
    _step(model, optimizer)
    checkpointer.save("model_0000001", iteration=1)  # the same name again: replaced
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001"]
    loaded = _net(seed=4)
    Checkpointer(loaded, "").load(str(tmp_path / "model_0000001"))
    _assert_same(_full_state(loaded), _full_state(model))


@pytest.mark.usefixtures("one_rank")
def test_periodic_saves_keep_the_newest_and_resume_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _sharded_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer)
    periodic = PeriodicCheckpointer(checkpointer, period=1, max_iter=4, max_to_keep=2)
    weights = {}
    for it in range(4):
        _step(model, optimizer, seed=it)
        periodic.step(it)
        weights[it] = _full_state(model)
    names = sorted(os.listdir(tmp_path))
    assert names == ["last_checkpoint", "model_0000002", "model_0000003", "model_final"]
    assert periodic.recent_checkpoints == ["model_0000002", "model_0000003"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final"

    (tmp_path / "model_final" / "__0_0.distcp").unlink()  # a lost shard file
    restored = _net(seed=8)
    with caplog.at_level("WARNING"):
        rest = Checkpointer(restored, str(tmp_path)).resume_or_load("")
    assert "model_final" in caplog.text and "falling back" in caplog.text
    assert rest["iteration"] == 3  # model_0000003: the newest that loads
    _assert_same(_full_state(restored), weights[3])


def _pwned() -> None:
    os.environ[MARKER_ENV] = "1"


@pytest.mark.usefixtures("one_rank")
def test_corrupt_shard_non_finite_weights_and_failed_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = _sharded_net()
    checkpointer = Checkpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    checkpointer.save("model_0000002", iteration=2)
    shard = tmp_path / "model_0000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in a tensor's bytes
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        rest = Checkpointer(_net(), str(tmp_path)).resume_or_load("")
    assert "does not match its CRC-32" in caplog.text and rest["iteration"] == 1

    with torch.no_grad():
        model[2].weight.to_local()[0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=r"NaN or infinite values \(2.weight\)"):
        checkpointer.save("model_0000003", iteration=3)
    checkpointer.save_untagged("model_debug", iteration=3)  # a copy for debugging is written
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002"
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("model_0000003")) == []

    with torch.no_grad():
        model[2].weight.to_local()[0, 0] = 0.0

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded_module.FileSystemWriter, "write_data", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*unchanged"):
        checkpointer.save("model_0000004", iteration=4)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002"


class _Pwn:
    """Sets an environment variable when unpickled: proof that unpickling ran code."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_pwned, ())


@pytest.mark.usefixtures("one_rank")
def test_loading_never_runs_pickled_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MARKER_ENV, raising=False)
    model = _sharded_net()
    Checkpointer(model, str(tmp_path)).save("model_0000001", iteration=1)
    directory = tmp_path / "model_0000001"
    target = _net()

    # 1. An object in the state file (where the non-tensor entries live).
    state_file = directory / "state.pt"
    original = state_file.read_bytes()
    state = torch.load(state_file, weights_only=True)
    state["iteration"] = _Pwn()
    torch.save(state, state_file)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        Checkpointer(target, "").load(str(directory))
    assert MARKER_ENV not in os.environ
    state_file.write_bytes(original)

    # 2. An object in DCP's .metadata (plain-pickled by DCP): only metadata records are built.
    metadata_file = directory / ".metadata"
    original = metadata_file.read_bytes()
    metadata = pickle.loads(original)
    metadata.planner_data = _Pwn()
    metadata_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="not DCP metadata records"):
        Checkpointer(target, "").load(str(directory))
    assert MARKER_ENV not in os.environ
    metadata_file.write_bytes(original)

    # 3. An entry that the metadata declares as pickled data (DCP would torch.load it unsafely).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model/0.weight": _Pwn()}, checkpoint_id=str(tmp_path / "evil"), no_dist=True)
    (tmp_path / "evil" / "state.pt").write_bytes(state_file.read_bytes())
    with pytest.raises(CheckpointError, match="lists as non-tensor data"):
        Checkpointer(target, "").load(str(tmp_path / "evil"))
    assert MARKER_ENV not in os.environ

    Checkpointer(target, "").load(str(directory))  # the untouched checkpoint loads
    _assert_same(_full_state(target), _full_state(model))


@pytest.mark.usefixtures("one_rank")
def test_consolidate_to_one_file(tmp_path: Path) -> None:
    model = _sharded_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, optimizer)
    Checkpointer(model, str(tmp_path), optimizer=optimizer).save("model_final", iteration=0)
    for name in ("export/model_final.pth", "export/model_final.safetensors"):
        out = consolidate_checkpoint(str(tmp_path / "model_final"), str(tmp_path / name))
        assert out == str(tmp_path / name)
        loaded = _net(seed=3)
        DetectionCheckpointer(loaded).load(out)
        _assert_same(_full_state(loaded), _full_state(model))
    assert set(torch.load(tmp_path / "export/model_final.pth", weights_only=True)) == {"model"}
    with pytest.raises(ValueError, match="must end in .pth, .pt or .safetensors"):
        consolidate_checkpoint(str(tmp_path / "model_final"), str(tmp_path / "x.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no .metadata"):
        consolidate_checkpoint(str(tmp_path / "empty"), str(tmp_path / "x.pth"))
    with pytest.raises(FileNotFoundError):
        consolidate_checkpoint(str(tmp_path / "missing"), str(tmp_path / "x.pth"))


@pytest.mark.usefixtures("one_rank")
def test_remote_directories_are_refused() -> None:
    checkpointer = Checkpointer(_sharded_net(), "memory://run")
    with pytest.raises(CheckpointError, match="local file system only"):
        checkpointer.save("model_0000001")


# ------------------------------------------------------------------ killed while saving
_KILL_SCRIPT = r"""
import os, signal, sys
import torch, torch.distributed as dist
from dist_helpers import free_port
import test_sharded as t
from d2engine.checkpoint import Checkpointer
from d2engine.checkpoint import sharded

out, point = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
model = t._sharded_net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
checkpointer = Checkpointer(model, out, optimizer=optimizer)
checkpointer.save("model_0000001", iteration=1)
torch.save(t._full_state(model), os.path.join(out, "weights1.pt"))
t._step(model, optimizer)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "shards-written":  # every shard and .metadata written, not yet committed
    sharded.file_io.atomic_save = die
elif point == "renamed":  # the directory is in place, last_checkpoint not yet updated
    sharded.file_io.atomic_write_text = die
    import d2engine.checkpoint.checkpointer as c
    c.file_io.atomic_write_text = die
elif point == "replacing":  # saving model_0000001 again, between the two renames
    real_replace = os.replace
    def replace(src, dst):
        if os.path.basename(src) == ".model_0000001.dcp-tmp":  # the old one was moved aside
            die()
        real_replace(src, dst)
    os.replace = replace
name = "model_0000001" if point == "replacing" else "model_0000002"
checkpointer.save(name, iteration=2)
print("not killed")
"""


@pytest.mark.parametrize("point", ["shards-written", "renamed", "replacing"])
def test_killed_while_saving_leaves_a_loadable_checkpoint(
    tmp_path: Path, point: str, caplog: pytest.LogCaptureFixture
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), point],
        env=python_env(
            {
                "PYTHONPATH": os.pathsep.join(
                    [str(TESTS_DIR / "checkpoint"), python_env()["PYTHONPATH"]]
                )
            }
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    weights1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    restored = _net(seed=5)
    with caplog.at_level("WARNING"):
        rest = Checkpointer(restored, str(tmp_path)).resume_or_load("")
    if point == "renamed":  # the new checkpoint is complete; last_checkpoint names the old one
        assert (tmp_path / "last_checkpoint").read_text() == "model_0000001"
        assert sharded_module.is_sharded_checkpoint(str(tmp_path / "model_0000002"))
    if point == "replacing":  # killed between moving the old directory aside and the new in
        assert "which an interrupted save was replacing" in caplog.text
        assert (tmp_path / "model_0000001").is_dir()
    assert rest["iteration"] == 1
    _assert_same(_full_state(restored), weights1)
    left = [n for n in os.listdir(tmp_path) if n.startswith(".")]  # what the killed save left
    expected = {"renamed": [], "replacing": [".model_0000001.dcp-tmp"]}
    assert left == expected.get(point, [".model_0000002.dcp-tmp"])

    # The next save removes it.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        Checkpointer(_sharded_net(), str(tmp_path)).save("model_0000003", iteration=3)
    finally:
        dist.destroy_process_group()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert (tmp_path / "model_0000001").is_dir()
