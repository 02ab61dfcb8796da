"""d2engine.utils.comm in one process (multi-process cases: tests/engine/test_launch.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from d2engine.utils import comm


def test_single_process_defaults() -> None:
    assert comm.get_world_size() == 1
    assert comm.get_rank() == 0
    assert comm.get_local_rank() == 0
    assert comm.get_local_size() == 1
    assert comm.is_main_process()
    comm.synchronize()  # a no-op, must not raise


def test_collectives_return_own_data() -> None:
    assert comm.all_gather({"a": 1}) == [{"a": 1}]
    assert comm.gather([1, 2], dst=0) == [[1, 2]]
    losses = {"b": torch.tensor(2.0), "a": torch.tensor(1.0)}
    assert comm.reduce_dict(losses) is losses


def test_shared_random_seed_in_range() -> None:
    seeds = {comm.shared_random_seed() for _ in range(5)}
    assert all(0 <= s < 2**31 for s in seeds)
    assert len(seeds) > 1  # a fresh draw each call


def test_local_group_requires_init() -> None:
    with pytest.raises(RuntimeError, match="not a multiple"):
        comm.create_local_process_group(0)


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[None]:
    """An initialised gloo process group of one process, without a local group."""
    dist.init_process_group("gloo", init_method=(tmp_path / "rdzv").as_uri(), rank=0, world_size=1)
    try:
        yield
    finally:
        comm.destroy_process_groups()


def test_local_rank_and_size_from_torchrun_env(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="local process group has not been created.*HINT"):
        comm.get_local_rank()
    with pytest.raises(RuntimeError, match="local process group has not been created"):
        comm.get_local_size()
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert (comm.get_local_rank(), comm.get_local_size()) == (3, 4)


@pytest.mark.parametrize(
    ("spec", "node", "size"),
    [("2(x3),1", "2", 2), ("2(x3),1", "3", 1), ("4", "0", 4), ("1,3", "1", 3)],
)
def test_local_size_from_slurm_tasks_per_node(
    world_of_one: None, monkeypatch: pytest.MonkeyPatch, spec: str, node: str, size: int
) -> None:
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", node)
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", spec)
    assert (comm.get_local_rank(), comm.get_local_size()) == (0, size)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "7")  # when Slurm sets it, it wins
    assert comm.get_local_size() == 7


def test_local_group_once(world_of_one: None) -> None:
    comm.create_local_process_group(1)
    assert (comm.get_local_rank(), comm.get_local_size()) == (0, 1)
    assert comm.all_gather("x", group=comm.get_local_process_group()) == ["x"]
    with pytest.raises(RuntimeError, match="already created"):
        comm.create_local_process_group(1)
    with pytest.raises(RuntimeError, match="already created"):
        comm.create_local_process_group_by_machine("node0")


def test_local_group_by_machine(world_of_one: None) -> None:
    comm.create_local_process_group_by_machine("node0")
    assert (comm.get_local_rank(), comm.get_local_size()) == (0, 1)
    assert comm.all_gather("y", group=comm.get_local_process_group()) == ["y"]


def test_destroy_process_groups(tmp_path: Path) -> None:
    comm.destroy_process_groups()  # nothing to destroy: a no-op
    dist.init_process_group("gloo", init_method=(tmp_path / "rdzv").as_uri(), rank=0, world_size=1)
    comm.create_local_process_group(1)
    comm.destroy_process_groups()
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="local process group has not been created"):
        comm.get_local_process_group()
    comm.destroy_process_groups()


def test_public_api() -> None:
    assert comm.__all__ == sorted(comm.__all__)
    assert {"create_local_process_group_by_machine", "destroy_process_groups"} <= set(comm.__all__)


def test_collectives_survive_a_new_process_group(tmp_path: Path) -> None:
    # Nothing may be cached from a destroyed group (launch in a loop, tests, notebooks).
    for i in range(2):
        url = (tmp_path / f"rdzv{i}").as_uri()
        dist.init_process_group("gloo", init_method=url, rank=0, world_size=1)
        try:
            assert comm._get_global_gloo_group() is dist.group.WORLD
        finally:
            comm.destroy_process_groups()
