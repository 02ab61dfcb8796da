"""d2engine.data.common: DatasetFromList, MapDataset, worker seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from d2engine.data.common import (
    DatasetFromList,
    MapDataset,
    trivial_batch_collator,
    worker_init_reset_seed,
)


@pytest.mark.parametrize("serialize", [True, False])
def test_dataset_from_list_returns_copies(serialize: bool) -> None:
    items = [{"x": [1, 2]}, {"x": [3]}, {"x": []}]
    ds = DatasetFromList(items, copy=True, serialize=serialize)
    assert len(ds) == 3
    assert [ds[i] for i in range(3)] == items
    assert ds[-1] == {"x": []}
    ds[0]["x"].append(99)  # a mapper modifying its input does not change the dataset
    assert ds[0] == {"x": [1, 2]}
    with pytest.raises(IndexError, match="index 3 out of range for a dataset of 3 items"):
        ds[3]


def test_dataset_from_list_without_copy_shares_items() -> None:
    items = [{"x": 1}]
    assert DatasetFromList(items, copy=False, serialize=False)[0] is items[0]
    assert len(DatasetFromList([])) == 0


def test_map_dataset_retries_rejected_samples_deterministically() -> None:
    mapped = MapDataset(list(range(10)), lambda x: None if x % 2 else x * 10)
    assert mapped[4] == 40
    first = mapped[3]  # rejected: replaced by another (even) sample
    assert first % 20 == 0
    assert mapped[3] == first  # the replacement depends only on the index
    with pytest.raises(RuntimeError, match="returned None for 1000 samples in a row"):
        MapDataset([1], lambda x: None)[0]


def test_worker_init_seeds_numpy_and_random_from_torch() -> None:
    torch.manual_seed(1234)
    worker_init_reset_seed(0)
    np_value, py_value = np.random.rand(), random.random()
    assert np_value == np.random.RandomState(1234).rand()
    assert py_value == random.Random(1234).random()


def test_trivial_collator_keeps_the_list() -> None:
    batch = [{"a": 1}, {"a": 2}]
    assert trivial_batch_collator(batch) is batch
