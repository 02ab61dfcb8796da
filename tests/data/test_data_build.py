"""d2engine.data.build: the resumable train loader and the test loader."""

from __future__ import annotations

import collections
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
    build_batch_data_loader,
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
    with pytest.raises(ValueError, match="without a cfg, pass the dataset and total_batch_size="):
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
    with pytest.raises(ValueError, match="saved with size=1, but this sampler has size=2"):
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


# ------------------------------------------------------------------ detectron2's call forms
def _double(d: dict[str, Any]) -> dict[str, Any]:
    return {"id": d["id"], "twice": 2 * d["id"]}


def test_train_loader_takes_the_dataset_first_as_detectron2_scripts_call_it() -> None:
    dicts = [{"id": i} for i in range(6)]
    loader = build_detection_train_loader(dicts, mapper=_double, total_batch_size=3)
    batch = next(loader)
    assert len(batch) == 3 and all(b["twice"] == 2 * b["id"] for b in batch)
    # the same stream as the keyword form with the same sampler
    a = build_detection_train_loader(
        dicts, mapper=_double, total_batch_size=2, sampler=TrainingSampler(6, seed=4)
    )
    b = build_train_loader(
        dataset=dicts, mapper=_double, total_batch_size=2, sampler=TrainingSampler(6, seed=4)
    )
    assert [ids(next(a)) for _ in range(5)] == [ids(next(b)) for _ in range(5)]
    with pytest.raises(ValueError, match="without a cfg, pass the dataset and total_batch_size="):
        build_detection_train_loader(dicts, mapper=_double)
    with pytest.raises(TypeError, match="either a config or the dataset first, not both"):
        build_detection_train_loader(dicts, dataset=dicts, total_batch_size=2)


def test_train_loader_cfg_with_positional_mapper(datasets: None) -> None:
    cfg = _cfg(batch=2)
    cfg.DATASETS.TRAIN = ("_test_a",)
    batch = next(build_detection_train_loader(cfg, _double))
    assert [d["twice"] for d in batch] == [2 * d["id"] for d in batch]


def test_loaders_from_a_lazy_config(datasets: None) -> None:
    # detectron2's lazy-config form: every argument a keyword, the dicts from the catalog
    from d2engine.config import LazyCall as L
    from d2engine.config import instantiate

    dataloader = {
        "train": L(build_detection_train_loader)(
            dataset=L(get_detection_dataset_dicts)(names="_test_a"),
            mapper=L(_double_factory)(),
            total_batch_size=2,
            num_workers=0,
        ),
        "test": L(build_detection_test_loader)(
            dataset=L(get_detection_dataset_dicts)(names="_test_b", filter_empty=False),
            mapper=L(_double_factory)(),
            num_workers=0,
        ),
    }
    built = instantiate(dataloader)
    assert len(next(built["train"])) == 2
    assert [b[0]["twice"] for b in built["test"]] == [12, 14, 16, 18]


def _double_factory() -> Any:
    return _double


def test_test_loader_takes_the_dataset_first(datasets: None) -> None:
    dicts = [{"id": i} for i in range(3)]
    loader = build_detection_test_loader(dicts, mapper=_double)
    assert [b[0]["twice"] for b in loader] == [0, 2, 4]
    by_name = build_detection_test_loader(_cfg(), "_test_b", _double)
    assert [b[0]["twice"] for b in by_name] == [12, 14, 16, 18]
    with pytest.raises(TypeError, match="not both"):
        build_detection_test_loader(dicts, dataset=dicts)


def test_get_detection_dataset_dicts_filters_empty_annotations() -> None:
    dicts = [
        {"id": 0, "annotations": [{"iscrowd": 0}]},
        {"id": 1, "annotations": []},
        {"id": 2, "annotations": [{"iscrowd": 1}]},
        {"id": 3},  # not an annotated sample: always kept
        {"id": 4, "annotations": [{"keypoints": [0, 0, 2, 1, 1, 0]}]},
    ]
    DatasetCatalog.register("_test_ann", lambda: dicts)
    try:
        assert [d["id"] for d in get_detection_dataset_dicts(["_test_ann"])] == [0, 3, 4]
        unfiltered = get_detection_dataset_dicts("_test_ann", filter_empty=False)
        assert [d["id"] for d in unfiltered] == [0, 1, 2, 3, 4]
        with_kp = get_detection_dataset_dicts("_test_ann", min_keypoints=1)
        assert [d["id"] for d in with_kp] == [3, 4]
        with pytest.raises(NotImplementedError, match="proposals"):
            get_detection_dataset_dicts("_test_ann", proposal_files=["p.pkl"])
    finally:
        DatasetCatalog.remove("_test_ann")


def test_datasets_with_different_classes_are_refused() -> None:
    from d2engine.data import MetadataCatalog

    for name, classes in (("_test_c1", ["a", "b"]), ("_test_c2", ["b", "a"])):
        DatasetCatalog.register(name, lambda: [{"id": 0}])
        MetadataCatalog.get(name).set(thing_classes=classes)
    try:
        with pytest.raises(ValueError, match="different thing_classes"):
            get_detection_dataset_dicts(["_test_c1", "_test_c2"])
        assert (
            len(get_detection_dataset_dicts(["_test_c1", "_test_c2"], check_consistency=False)) == 2
        )
    finally:
        for name in ("_test_c1", "_test_c2"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


# ------------------------------------------------------------------ aspect-ratio grouping
def _sized(n: int) -> list[dict[str, Any]]:
    # ids divisible by 3 are landscape, the others portrait
    return [
        {"id": i, "width": 20 if i % 3 == 0 else 10, "height": 10 if i % 3 == 0 else 20}
        for i in range(n)
    ]


def _landscape(batch: list[dict[str, Any]]) -> set[bool]:
    return {d["width"] > d["height"] for d in batch}


def test_aspect_ratio_grouping_batches_one_orientation_at_a_time() -> None:
    data = _sized(30)
    loader = build_detection_train_loader(
        data, total_batch_size=4, sampler=TrainingSampler(30, seed=1), aspect_ratio_grouping=True
    )
    batches = [next(loader) for _ in range(20)]
    assert all(len(_landscape(b)) == 1 for b in batches)
    assert {True, False} == {next(iter(_landscape(b))) for b in batches}
    # within a group, samples keep the sampler's order
    stream = list(itertools.islice(iter(TrainingSampler(30, seed=1)), 200))
    first_portrait = next(b for b in batches if _landscape(b) == {False})
    assert ids(first_portrait) == [i for i in stream if i % 3][:4]
    plain = build_detection_train_loader(
        data, total_batch_size=4, sampler=TrainingSampler(30, seed=1), aspect_ratio_grouping=False
    )
    assert any(len(_landscape(next(plain))) == 2 for _ in range(20))


def test_grouping_leaves_data_without_sizes_in_order() -> None:
    data = [{"id": i} for i in range(9)]
    grouped = build_detection_train_loader(
        data, total_batch_size=2, sampler=TrainingSampler(9, seed=2), aspect_ratio_grouping=True
    )
    plain = build_detection_train_loader(
        data, total_batch_size=2, sampler=TrainingSampler(9, seed=2), aspect_ratio_grouping=False
    )
    assert [ids(next(grouped)) for _ in range(12)] == [ids(next(plain)) for _ in range(12)]
    assert "pending" not in grouped.state_dict()  # nothing to group: the plain loader


@pytest.mark.parametrize("workers", [0, 2])
def test_grouped_loader_resumes_exactly(workers: int) -> None:
    data = _sized(25)
    cfg = _cfg(batch=4, workers=workers, seed=3)
    original = build_detection_train_loader(cfg, dataset=data)
    head = [ids(next(original)) for _ in range(5)]
    state = original.state_dict()
    assert any(state["pending"])  # indices were waiting in a group at the checkpoint
    continuation = [ids(next(original)) for _ in range(8)]
    original.close()
    resumed = build_detection_train_loader(_cfg(batch=4, workers=workers, seed=77), dataset=data)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(8)] == continuation
    resumed.close()
    again = build_detection_train_loader(cfg, dataset=data)
    assert [ids(next(again)) for _ in range(13)] == head + continuation
    again.close()  # closing and reopening keeps the position and the waiting indices
    closed = build_detection_train_loader(cfg, dataset=data)
    stream = [ids(next(closed)) for _ in range(5)]
    closed.close()
    assert stream + [ids(next(closed)) for _ in range(8)] == head + continuation


def test_build_batch_data_loader_detectron2_form() -> None:
    from d2engine.data import DatasetFromList, MapDataset, build_batch_data_loader

    dataset = MapDataset(DatasetFromList(_sized(12), copy=False), lambda d: d)
    loader = build_batch_data_loader(
        dataset, TrainingSampler(12, seed=0), 3, aspect_ratio_grouping=True, num_workers=0
    )
    assert all(len(_landscape(next(loader))) == 1 for _ in range(8))
    per_gpu = build_batch_data_loader(_sized(12), None, None, single_gpu_batch_size=5)
    assert len(next(per_gpu)) == 5
    with pytest.raises(ValueError, match="not both"):
        build_batch_data_loader(_sized(12), None, 4, single_gpu_batch_size=2)


# --------------------------------------------------------------------- samplers from cfg
def test_cfg_selects_the_training_sampler() -> None:
    from d2engine.data import RandomSubsetTrainingSampler, RepeatFactorTrainingSampler

    data = [{"id": i, "label": i % 2 if i < 8 else 2} for i in range(10)]
    cfg = _cfg(batch=2)
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.5
    cfg.DATALOADER.REPEAT_SQRT = False  # label 2: factor 2.5, labels 0 and 1: 1.25
    loader = build_detection_train_loader(cfg, dataset=data)
    assert isinstance(loader.sampler, RepeatFactorTrainingSampler)
    counts = collections.Counter(i for _ in range(500) for i in ids(next(loader)))
    assert counts[8] > 1.5 * counts[0]  # the rare label is oversampled
    state = loader.state_dict()
    resumed = build_detection_train_loader(cfg, dataset=data)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(5)] == [ids(next(loader)) for _ in range(5)]

    cfg.DATALOADER.SAMPLER_TRAIN = "RandomSubsetTrainingSampler"
    cfg.DATALOADER.RANDOM_SUBSET_RATIO = 0.5
    subset = build_detection_train_loader(cfg, dataset=data)
    assert isinstance(subset.sampler, RandomSubsetTrainingSampler)
    assert {i for _ in range(30) for i in ids(next(subset))} == set(subset.sampler.subset)
    cfg.DATALOADER.SAMPLER_TRAIN = "Nope"
    with pytest.raises(ValueError, match="Unknown cfg.DATALOADER.SAMPLER_TRAIN 'Nope'"):
        build_detection_train_loader(cfg, dataset=data)


def _rank_loaders(data: list[dict[str, int]], world: int, total: int) -> list[TrainDataLoader]:
    """The loaders the ``world`` ranks of a job would build (global batch ``total``)."""
    return [
        TrainDataLoader(
            data, TrainingSampler(len(data), seed=11, rank=r, world_size=world), total // world
        )
        for r in range(world)
    ]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_number_of_processes_reads_the_same_samples(
    before: int, after: int, caplog: pytest.LogCaptureFixture
) -> None:
    """What the new ranks read together, batch by batch, is what the old ranks would have read."""
    data = [{"id": i} for i in range(13)]  # passes do not align with batches
    old = _rank_loaders(data, before, 4)
    for loader in old:
        for _ in range(5):
            next(loader)
    state = old[0].state_dict()  # the main process's state is the one saved
    assert state["world_size"] == before and state["batch_size"] == 4 // before
    would_read = [sorted(i for lo in old for i in ids(next(lo))) for _ in range(6)]
    new = _rank_loaders(data, after, 4)
    with caplog.at_level("INFO"):
        for loader in new:
            loader.load_state_dict(state)
    read = [sorted(i for lo in new for i in ids(next(lo))) for _ in range(6)]
    assert read == would_read
    assert f"data stream of {before} process(es) on {after}" in caplog.text
    assert "global batch" not in caplog.text  # 4 samples per iteration in both


def test_resume_with_another_global_batch_warns_what_to_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = [{"id": i} for i in range(13)]
    old = _rank_loaders(data, 2, 8)
    next(old[0])
    next(old[1])
    resumed = _rank_loaders(data, 1, 4)[0]  # IMS_PER_BATCH auto-scaled from 8 to 4
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(old[0].state_dict())
    assert "global batch of 8 samples (2 process(es) x 4)" in caplog.text
    assert "set SOLVER.IMS_PER_BATCH to 8 and SOLVER.REFERENCE_WORLD_SIZE to 0" in caplog.text
    position = old[0].state_dict()["sampler"]["position"]
    stream = list(itertools.islice(iter(TrainingSampler(13, seed=11)), position + 4))
    assert ids(next(resumed)) == stream[position:]  # the next samples, 4 at a time now


# ------------------------------------------- aspect-ratio grouping in a multi-process job
def _grouped_ranks(data: list[dict[str, Any]], world: int, total: int) -> list[TrainDataLoader]:
    """The grouped loaders the ``world`` ranks of a job would build (global batch ``total``)."""
    return [
        build_batch_data_loader(
            data,
            TrainingSampler(len(data), seed=4, rank=r, world_size=world),
            None,
            single_gpu_batch_size=total // world,
            aspect_ratio_grouping=True,
        )
        for r in range(world)
    ]


def _gathered(loaders: list[TrainDataLoader]) -> dict[str, Any]:
    """The state the main process saves after ``gather_state()`` on every rank: its own position
    and, under "ranks", every rank's."""
    states = [{k: v for k, v in lo.state_dict().items() if k != "ranks"} for lo in loaders]
    return {**states[0], "ranks": states} if len(loaders) > 1 else states[0]


def test_grouped_ranks_resume_their_own_position(caplog: pytest.LogCaptureFixture) -> None:
    data = _sized(61)
    old = _grouped_ranks(data, 2, 6)
    for lo in old:
        for _ in range(4):
            next(lo)
    with caplog.at_level("WARNING"):
        ungathered = old[1].state_dict()
    # without gather_state() the other rank's position is missing, and that is said
    assert ungathered["ranks"][0] is None and ungathered["ranks"][1] is not None
    assert "without the other processes' positions" in caplog.text
    state = _gathered(old)
    positions = [e["sampler"]["position"] for e in state["ranks"]]
    assert positions[0] != positions[1]  # the ranks have read different numbers of indices
    assert any(state["ranks"][1]["pending"])  # rank 1 has indices waiting in a group
    continuation = [[ids(next(lo)) for _ in range(8)] for lo in old]
    new = _grouped_ranks(data, 2, 6)
    for lo in new:
        lo.load_state_dict(state)
    assert [[ids(next(lo)) for _ in range(8)] for lo in new] == continuation
    # rank 0's state alone (what was saved before every rank's was kept): rank 1 is not exact
    legacy = {k: v for k, v in state.items() if k != "ranks"}
    caplog.clear()
    new = _grouped_ranks(data, 2, 6)
    with caplog.at_level("WARNING"):
        for lo in new:
            lo.load_state_dict(legacy)
    assert [ids(next(new[0])) for _ in range(8)] == continuation[0]
    assert "no entry for process 1 of 2" in caplog.text
    assert "may be repeated or skipped" in caplog.text


def test_one_process_grouped_state_keeps_its_format() -> None:
    loader = _grouped_ranks(_sized(20), 1, 4)[0]
    next(loader)
    loader.gather_state()  # one process: nothing to gather
    assert set(loader.state_dict()) == {
        "num_batches",
        "batch_size",
        "world_size",
        "sampler",
        "pending",
    }


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_grouped_elastic_resume_loses_and_repeats_nothing(
    before: int, after: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Every sample of the global stream is read once across a resume on another number of
    processes: what the old ranks read, what the new ones read, and what is still waiting
    (in a group or to be read first) together are the stream up to the new ranks' positions."""
    data = _sized(197)  # one pass: each index once in the part of the stream read here
    total = 6
    old = _grouped_ranks(data, before, total)
    seen = [i for lo in old for _ in range(6) for i in ids(next(lo))]
    state = _gathered(old)
    saved = state["ranks"] if before > 1 else [state]
    assert any(e["pending"] != [[], [], []] for e in saved)  # indices waiting in groups
    assert before == 1 or len({e["sampler"]["position"] for e in saved}) > 1
    new = _grouped_ranks(data, after, total)
    with caplog.at_level("INFO"):
        for lo in new:
            lo.load_state_dict(state)
    seen += [i for lo in new for _ in range(9) for i in ids(next(lo))]
    final = _gathered(new)
    entries = final["ranks"] if after > 1 else [final]
    waiting = [i for e in entries for i in [*e.get("carry", []), *sum(e["pending"], [])]]
    stream = TrainingSampler(len(data), seed=4).epoch_indices(0)
    low = min(e["sampler"]["position"] for e in entries)
    high = max(e["sampler"]["position"] for e in entries)
    accounted = seen + waiting
    assert len(accounted) == len(set(accounted))  # nothing read twice
    assert set(stream[:low]) <= set(accounted) <= set(stream[:high])  # nothing lost
    assert "read but not yet batched are shared among the processes" in caplog.text


def test_grouped_state_of_another_world_without_every_rank_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = _sized(61)
    old = _grouped_ranks(data, 2, 6)
    for lo in old:
        for _ in range(3):
            next(lo)
    legacy = {k: v for k, v in _gathered(old).items() if k != "ranks"}
    new = _grouped_ranks(data, 1, 6)[0]
    with caplog.at_level("WARNING"):
        new.load_state_dict(legacy)
    assert "no entry for the saved process(es) [1]" in caplog.text
    assert "by a version that kept the main process's only" in caplog.text


def test_samples_still_to_be_read_after_an_elastic_resume_are_saved() -> None:
    data = _sized(197)
    old = _grouped_ranks(data, 2, 12)
    next(old[0])
    next(old[1])
    # a smaller batch than saved (a warning), so that shared-out indices are left after a batch
    loader = _grouped_ranks(data, 1, 4)[0]
    loader.load_state_dict(_gathered(old))
    next(loader)
    state = loader.state_dict()
    assert state["carry"]  # shared-out indices not read yet
    loader.close()  # closing keeps them too
    continuation = [ids(next(loader)) for _ in range(6)]
    resumed = _grouped_ranks(data, 1, 4)[0]
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(6)] == continuation
    assert set(state["carry"]) <= {i for batch in continuation for i in batch}


def test_grouped_state_without_any_position_is_refused() -> None:
    state = _grouped_ranks(_sized(20), 1, 4)[0].state_dict()
    loader = _grouped_ranks(_sized(20), 2, 4)[0]
    with pytest.raises(ValueError, match="holds no process's position"):
        loader.load_state_dict({**state, "ranks": [None, None, None]})
