"""d2engine.data.build: the resumable train loader and the test loader."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, SequentialSampler

from d2engine.config import CfgNode, get_cfg
from d2engine.data import (
    DatasetCatalog,
    InferenceSampler,
    TrainDataLoader,
    TrainingSampler,
    build_detection_test_loader,
    build_detection_train_loader,
    build_test_loader,
    build_train_loader,
    get_detection_dataset_dicts,
)
from d2engine.utils import comm


def _cfg(batch: int = 4, workers: int = 0, seed: int = 5) -> CfgNode:
    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.SEED = seed
    return cfg


def ids(batch: list[dict[str, Any]]) -> list[int]:
    return [d["id"] for d in batch]


@pytest.fixture
def datasets() -> Iterator[None]:
    DatasetCatalog.register("_test_a", lambda: [{"id": i} for i in range(6)])
    DatasetCatalog.register("_test_b", lambda: [{"id": i} for i in range(6, 10)])
    DatasetCatalog.register("_test_empty", lambda: [])
    yield
    for name in ("_test_a", "_test_b", "_test_empty"):
        DatasetCatalog.remove(name)


class _Stream(IterableDataset):
    def __iter__(self) -> Iterator[int]:
        return iter(range(3))


class _Squares(Dataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"id": i, "sq": i * i}


def test_train_loader_from_cfg_datasets_concatenated(datasets: None) -> None:
    cfg = _cfg(batch=5)
    cfg.DATASETS.TRAIN = ("_test_a", "_test_b")
    loader = build_train_loader(cfg)
    assert isinstance(loader, TrainDataLoader)
    assert iter(loader) is loader  # one stream per loader
    batches = [next(loader) for _ in range(6)]  # 3 passes over 10 samples
    assert all(isinstance(b, list) and len(b) == 5 for b in batches)
    seen = [i for b in batches for i in ids(b)]
    for p in range(3):
        assert sorted(seen[p * 10 : (p + 1) * 10]) == list(range(10))
    assert get_detection_dataset_dicts("_test_b") == [{"id": i} for i in range(6, 10)]


def test_cfg_seed_makes_order_reproducible() -> None:
    data = [{"id": i} for i in range(20)]
    first = [ids(next(build_train_loader(_cfg(seed=3), dataset=data))) for _ in range(1)]
    again = [ids(next(build_train_loader(_cfg(seed=3), dataset=data))) for _ in range(1)]
    other = [ids(next(build_train_loader(_cfg(seed=4), dataset=data))) for _ in range(1)]
    assert first == again != other


def test_mapper_and_torch_dataset() -> None:
    loader = build_train_loader(
        _cfg(batch=2), mapper=lambda d: {**d, "mapped": True}, dataset=_Squares()
    )
    batch = next(loader)
    assert len(batch) == 2
    assert all(d["mapped"] and d["sq"] == d["id"] ** 2 for d in batch)
    plain = next(build_train_loader(_cfg(batch=2), dataset=[{"id": 0, "t": torch.ones(1)}] * 3))
    assert set(plain[0]) == {"id", "t"}  # mapper None passes the dicts as they are


def test_batch_is_split_across_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    loader = build_train_loader(_cfg(batch=6), dataset=[{"id": i} for i in range(10)])
    assert loader.batch_size == 3 and len(next(loader)) == 3
    with pytest.raises(
        ValueError,
        match=r"is 5, but it must be a positive multiple of the number of processes \(2\)",
    ):
        build_train_loader(_cfg(batch=5), dataset=[{"id": 0}])


def test_bad_inputs(datasets: None) -> None:
    with pytest.raises(ValueError, match="must be a positive multiple"):
        build_train_loader(_cfg(batch=0), dataset=[{"id": 0}])
    with pytest.raises(ValueError, match=r"cfg.DATASETS.TRAIN / TEST is empty"):
        build_train_loader(_cfg())
    cfg = _cfg()
    cfg.DATASETS.TRAIN = ("_test_empty",)
    with pytest.raises(ValueError, match="Dataset '_test_empty' is empty"):
        build_train_loader(cfg)
    cfg.DATASETS.TRAIN = ("_test_missing",)
    with pytest.raises(KeyError, match="'_test_missing' is not registered"):
        build_train_loader(cfg)
    with pytest.raises(ValueError, match="the dataset is empty"):
        build_train_loader(_cfg(), dataset=[])
    with pytest.raises(TypeError, match="an IterableDataset has no indices"):
        build_train_loader(_cfg(), dataset=_Stream())
    with pytest.raises(TypeError, match="must be a list or a map-style torch Dataset.*got int"):
        build_train_loader(_cfg(), dataset=3)
    with pytest.raises(ValueError, match="without a cfg, pass both dataset= and total_batch_size="):
        build_train_loader(dataset=[{"id": 0}])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        TrainDataLoader([1], TrainingSampler(1, seed=0), 0)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        TrainDataLoader([1], TrainingSampler(1, seed=0), 1, num_workers=-1)
    with pytest.raises(ValueError, match="pass dataset_name"):
        build_test_loader(_cfg())
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        build_test_loader(dataset=[{"id": 0}], batch_size=0)


def test_loader_leaves_global_rng_untouched() -> None:
    # Creating a torch DataLoader iterator normally draws from the global torch RNG; a trainer
    # that creates it after restoring RNG states would then diverge from an uninterrupted run.
    loader = build_train_loader(_cfg(), dataset=[{"id": i} for i in range(8)])
    state = torch.get_rng_state()
    next(loader)
    loader.load_state_dict(loader.state_dict())
    next(loader)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_next_batch(workers: int) -> None:
    data = [{"id": i} for i in range(7)]
    original = build_train_loader(_cfg(batch=3, workers=workers), dataset=data)
    head = [ids(next(original)) for _ in range(4)]  # workers prefetch beyond these
    state = original.state_dict()
    assert state["num_batches"] == 4
    assert state["sampler"]["position"] == 12
    continuation = [ids(next(original)) for _ in range(5)]
    original.close()

    resumed = build_train_loader(_cfg(batch=3, workers=workers, seed=99), dataset=data)
    resumed.load_state_dict(state)  # the seed comes from the state
    assert resumed.num_batches == 4
    assert [ids(next(resumed)) for _ in range(5)] == continuation
    assert resumed.state_dict()["num_batches"] == 9
    resumed.close()
    reference = TrainingSampler(7, seed=5)
    flat = list(itertools.islice(iter(reference), 27))
    assert [i for b in head + continuation for i in b] == flat


def test_resume_twice_and_close_keeps_position() -> None:
    data = [{"id": i} for i in range(5)]
    loader = build_train_loader(_cfg(batch=2), dataset=data)
    stream = [ids(next(loader)) for _ in range(2)]
    loader.close()  # restarts at the same position
    stream += [ids(next(loader)) for _ in range(2)]
    second = build_train_loader(_cfg(batch=2), dataset=data)
    second.load_state_dict({"num_batches": 0, "sampler": second.state_dict()["sampler"]})
    assert [ids(next(second)) for _ in range(4)] == stream
    third = build_train_loader(_cfg(batch=2), dataset=data)
    third.load_state_dict(second.state_dict())
    fourth = build_train_loader(_cfg(batch=2), dataset=data)
    fourth.load_state_dict(third.state_dict())  # a state loaded but not yet used saves the same
    assert ids(next(fourth)) == ids(next(second))


def test_resume_with_custom_sampler_replays_indices(caplog: pytest.LogCaptureFixture) -> None:
    data = [{"id": i} for i in range(5)]
    loader = build_train_loader(_cfg(batch=2), dataset=data, sampler=SequentialSampler(range(5)))
    # A finite sampler is cycled: the loader stays infinite.
    assert [ids(next(loader)) for _ in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    state = loader.state_dict()
    assert "sampler" not in state
    resumed = build_train_loader(_cfg(batch=2), dataset=data, sampler=SequentialSampler(range(5)))
    resumed.load_state_dict(state)
    assert "no O(1) resume" in caplog.text
    assert ids(next(resumed)) == [3, 4]


def test_load_state_errors() -> None:
    loader = build_train_loader(_cfg(), dataset=[{"id": 0}])
    with pytest.raises(KeyError, match="lacks 'num_batches'"):
        loader.load_state_dict({})
    with pytest.raises(KeyError, match="lacks 'sampler'"):
        loader.load_state_dict({"num_batches": 3})
    other = build_train_loader(_cfg(), dataset=[{"id": 0}, {"id": 1}])
    with pytest.raises(ValueError, match="saved for a dataset of 1 samples"):
        other.load_state_dict(loader.state_dict())


def _worker_draws(d: dict[str, int]) -> dict[str, Any]:
    info = torch.utils.data.get_worker_info()
    return {"id": d["id"], "worker": info.id if info else -1, "np": float(np.random.rand())}


def test_workers_are_seeded_differently_and_reproducibly() -> None:
    data = [{"id": i} for i in range(8)]

    def draws() -> list[dict[str, Any]]:
        loader = build_train_loader(_cfg(batch=2, workers=2), mapper=_worker_draws, dataset=data)
        out = [d for _ in range(4) for d in next(loader)]
        loader.close()
        return out

    first, second = draws(), draws()
    assert first == second  # deterministic given the seed and position
    by_worker = {w: [d["np"] for d in first if d["worker"] == w] for w in (0, 1)}
    assert by_worker[0] and by_worker[1]
    assert by_worker[0][0] != by_worker[1][0]
    assert os.getpid() not in {d["worker"] for d in first}


def test_test_loader(datasets: None) -> None:
    loader = build_test_loader(_cfg(), "_test_a")
    assert len(loader) == 6
    assert [ids(b) for b in loader] == [[i] for i in range(6)]
    assert isinstance(loader.sampler, InferenceSampler)
    batched = build_test_loader(
        _cfg(), ["_test_a", "_test_b"], mapper=lambda d: d["id"], batch_size=4
    )
    assert len(batched) == 3
    assert list(batched) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    from_list = build_test_loader(dataset=[{"id": 3}, {"id": 4}])
    assert [ids(b) for b in from_list] == [[3], [4]]
    assert [b[0]["sq"] for b in build_test_loader(dataset=_Squares())] == [0, 1, 4, 9, 16]


def test_test_loader_shards_by_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(comm, "get_rank", lambda rank=rank: rank)
        seen.append(
            [i for b in build_test_loader(dataset=[{"id": i} for i in range(5)]) for i in ids(b)]
        )
    assert seen == [[0, 1, 2], [3, 4]]


def test_detectron2_aliases() -> None:
    assert build_detection_train_loader is build_train_loader
    assert build_detection_test_loader is build_test_loader
