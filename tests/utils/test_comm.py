"""d2engine.utils.comm without an initialised process group (multi-process cases: test_launch)."""

from __future__ import annotations

import pytest
import torch

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
