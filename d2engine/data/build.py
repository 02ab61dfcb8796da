"""Data loaders built from a config or a dataset: the resumable train loader and the test loader.

detectron2's call forms all work: ``build_detection_train_loader(cfg)``, ``(cfg, mapper)``,
``(dataset_list, mapper=..., total_batch_size=...)`` with the dataset first, keyword-only calls
from lazy configs, and ``build_detection_test_loader(cfg, name, mapper=...)`` or
``(dataset_list, mapper=...)``.

:func:`build_train_loader` returns a :class:`~d2engine.data.train_loader.TrainDataLoader`, an
infinite stream of batches whose ``state_dict()`` holds the data position, so a resumed run
continues with the very next batch (also across another number of processes); how the position
is kept, and what a resume reproduces, is told in :mod:`d2engine.data.train_loader`.
:func:`build_test_loader` returns a torch ``DataLoader`` over this process's shard of a test set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, IterableDataset

from d2engine.config.cfg_node import CfgNode
from d2engine.data.catalog import DatasetCatalog, MetadataCatalog
from d2engine.data.common import (
    DatasetFromList,
    MapDataset,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from d2engine.data.samplers import (
    GlobalStreamSampler,
    InferenceSampler,
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
    _seeded_torch_generator,
)
from d2engine.data.train_loader import TrainDataLoader, _aspect_ratio_buckets
from d2engine.utils import comm
from d2engine.utils.validation import check_positive_int

__all__ = [
    "TrainDataLoader",
    "build_batch_data_loader",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "build_test_loader",
    "build_train_loader",
    "get_detection_dataset_dicts",
]

logger = logging.getLogger(__name__)

TRAIN_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


# --------------------------------------------------------------------------- dataset dicts
def get_detection_dataset_dicts(
    names: str | Sequence[str],
    filter_empty: bool = True,
    min_keypoints: int = 0,
    proposal_files: Sequence[str] | None = None,
    check_consistency: bool = True,
) -> list[dict[str, Any]]:
    """Load datasets registered in :data:`~d2engine.data.catalog.DatasetCatalog`; concatenate them.

    Args:
        names: one dataset name or several.
        filter_empty: drop the dicts whose ``"annotations"`` list holds no non-crowd annotation
            (dicts without an ``"annotations"`` key are always kept).
        min_keypoints: drop the dicts with ``"annotations"`` holding fewer visible keypoints
            than this (0: keep all).
        proposal_files: precomputed-proposal files of detectron2's detection models; not
            supported (they are pickles, which d2engine does not load): must be None.
        check_consistency: check that the datasets agree on ``thing_classes`` in their metadata.

    Returns:
        The samples of all datasets, in order.

    Raises:
        ValueError: if no name is given, a dataset is empty or nothing is left after filtering,
            or the datasets' ``thing_classes`` differ.
        KeyError: if a name is not registered.
        NotImplementedError: if ``proposal_files`` is given.
    """
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError(
            "No dataset names given (cfg.DATASETS.TRAIN / TEST is empty). HINT: register a dataset "
            "with DatasetCatalog.register(name, func) and list its name in the config, or pass "
            "the dataset to the loader."
        )
    if proposal_files is not None:
        raise NotImplementedError(
            "get_detection_dataset_dicts(proposal_files=...): precomputed proposals belong to "
            "detectron2's detection models and are not loaded by d2engine. HINT: add the proposals "
            "to your dataset dicts in the function you register."
        )
    dicts: list[dict[str, Any]] = []
    for name in names:
        samples = DatasetCatalog.get(name)
        if not samples:
            raise ValueError(f"Dataset {name!r} is empty: its registered function returned [].")
        dicts.extend(samples)
    before = len(dicts)
    if filter_empty:
        dicts = [d for d in dicts if not _without_instances(d)]
    if min_keypoints > 0:
        dicts = [d for d in dicts if _visible_keypoints(d) >= min_keypoints]
    if len(dicts) < before:
        removed = before - len(dicts)
        logger.info("Removed %d samples without usable annotations; %d left.", removed, len(dicts))
    if not dicts:
        raise ValueError(
            f"No samples left in {names} after filtering (filter_empty={filter_empty}, "
            f"min_keypoints={min_keypoints}). HINT: check the annotations, or set "
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS False."
        )
    if check_consistency and len(names) > 1:
        _check_thing_classes(names)
    return dicts


def _without_instances(d: Any) -> bool:
    if not isinstance(d, Mapping) or "annotations" not in d:
        return False
    return not any(ann.get("iscrowd", 0) == 0 for ann in d["annotations"])


def _visible_keypoints(d: Any) -> int:
    if not isinstance(d, Mapping) or "annotations" not in d:
        return 1 << 30  # not an annotated sample: never filtered
    return sum(
        sum(1 for v in ann["keypoints"][2::3] if v > 0)
        for ann in d["annotations"]
        if "keypoints" in ann
    )


def _check_thing_classes(names: list[str]) -> None:
    classes = {n: MetadataCatalog.get(n).get("thing_classes") for n in names}
    known = {n: c for n, c in classes.items() if c is not None}
    if len({tuple(c) for c in known.values()}) > 1:
        listing = "; ".join(f"{n}: {list(c)}" for n, c in known.items())
        raise ValueError(
            f"The datasets {names} have different thing_classes in their metadata ({listing}), so "
            "a label would mean different classes. HINT: give them the same classes, or train on "
            "them separately."
        )


# ------------------------------------------------------------------------- helpers
def _is_config(obj: Any) -> bool:
    return isinstance(obj, (CfgNode, DictConfig)) or hasattr(obj, "DATASETS")


def _cfg_value(cfg: Any, dotted: str, default: Any) -> Any:
    """``cfg.A.B`` or ``default`` when the config lacks the key (configs made before it existed)."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part] if isinstance(node, Mapping) else getattr(node, part)
        except (KeyError, AttributeError):
            return default
    return node


def _as_map_dataset(dataset: Any, mapper: Callable[[Any], Any] | None, what: str) -> Dataset:
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"{what}: an IterableDataset has no indices for the sampler to shard and resume. "
            f"HINT: pass a map-style dataset (with __len__ and __getitem__) or a list."
        )
    if isinstance(dataset, (list, tuple)):
        dataset = DatasetFromList(list(dataset), copy=False)
    elif not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(
            f"{what}: dataset must be a list or a map-style torch Dataset (with __len__ and "
            f"__getitem__), got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"{what}: the dataset is empty; there is nothing to load.")
    if mapper is not None:
        dataset = MapDataset(dataset, mapper)
    return dataset


# --------------------------------------------------------------------------- builders
def build_batch_data_loader(
    dataset: Any,
    sampler: Any,
    total_batch_size: int | None,
    *,
    aspect_ratio_grouping: bool = False,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    drop_last: bool = True,
    single_gpu_batch_size: int | None = None,
    pin_memory: bool = False,
    seed: int | None = None,
    **kwargs: Any,
) -> TrainDataLoader:
    """Batch a (mapped) dataset with a sampler into an infinite, resumable train loader.

    detectron2's lower-level builder, which :func:`build_train_loader` calls.

    Args:
        dataset: a list or map-style dataset whose items are what the model takes.
        sampler: a sampler of dataset indices (a
            :class:`~d2engine.data.samplers.GlobalStreamSampler` resumes in O(1)); None: a
            :class:`~d2engine.data.samplers.TrainingSampler`.
        total_batch_size: samples per iteration over all processes; each process loads
            ``total_batch_size // world_size``.
        aspect_ratio_grouping: batch landscape and portrait samples separately, by the
            ``"width"``/``"height"`` of the dataset dicts (a list of dicts, or a ``MapDataset``
            over one).
        num_workers: worker processes per training process.
        collate_fn: turns a list of samples into a batch (default: keep the list).
        drop_last: kept for detectron2's signature: the stream is infinite, so every batch is
            full.
        single_gpu_batch_size: the batch size of each process, instead of ``total_batch_size``.
        pin_memory: pin batches in page-locked memory.
        seed: mixed into the seeds of the worker processes.
        **kwargs: other ``torch.utils.data.DataLoader`` arguments (``prefetch_factor``...).

    Returns:
        A :class:`TrainDataLoader`.

    Raises:
        ValueError: if both or neither batch size is given, or the total is not a positive
            multiple of the number of processes.
    """
    del drop_last  # infinite stream: no partial batch
    batch_size = _per_process_batch_size(total_batch_size, single_gpu_batch_size)
    buckets = _aspect_ratio_buckets(dataset) if aspect_ratio_grouping else None
    dataset = _as_map_dataset(dataset, None, "build_batch_data_loader")
    if sampler is None:
        sampler = TrainingSampler(len(dataset))
    return TrainDataLoader(
        dataset,
        sampler,
        batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        aspect_ratio_buckets=buckets,
        seed=seed,
        **kwargs,
    )


def _per_process_batch_size(total: int | None, single_gpu: int | None) -> int:
    world_size = comm.get_world_size()
    if single_gpu:
        if total:
            raise ValueError(
                "Give total_batch_size or single_gpu_batch_size, not both (got "
                f"{total} and {single_gpu})."
            )
        return check_positive_int(single_gpu, "single_gpu_batch_size", "the train loader")
    if isinstance(total, bool) or not isinstance(total, int) or total <= 0 or total % world_size:
        raise ValueError(
            f"The total batch size (SOLVER.IMS_PER_BATCH) is {total!r}, but it must be a positive "
            f"multiple of the number of processes ({world_size}), each of which loads an equal "
            f"share. HINT: set SOLVER.IMS_PER_BATCH to a multiple of {world_size}."
        )
    return total // world_size


def _sampler_from_config(cfg: Any, dataset_dicts: Any, size: int) -> GlobalStreamSampler:
    name = _cfg_value(cfg, "DATALOADER.SAMPLER_TRAIN", "TrainingSampler")
    seed = cfg.SEED if _cfg_value(cfg, "SEED", -1) >= 0 else None
    if name == "TrainingSampler":
        return TrainingSampler(size, seed=seed)
    if name == "RepeatFactorTrainingSampler":
        if not isinstance(dataset_dicts, (list, tuple)):
            raise TypeError(
                "DATALOADER.SAMPLER_TRAIN RepeatFactorTrainingSampler computes repeat factors from "
                f"the dataset dicts, but the dataset is a {type(dataset_dicts).__name__}. HINT: "
                "pass sampler=RepeatFactorTrainingSampler(your_factors) to the loader."
            )
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts,
            _cfg_value(cfg, "DATALOADER.REPEAT_THRESHOLD", 0.0),
            sqrt=_cfg_value(cfg, "DATALOADER.REPEAT_SQRT", True),
        )
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        ratio = _cfg_value(cfg, "DATALOADER.RANDOM_SUBSET_RATIO", 1.0)
        return RandomSubsetTrainingSampler(size, ratio, seed_shuffle=seed, seed_subset=seed)
    raise ValueError(
        f"Unknown cfg.DATALOADER.SAMPLER_TRAIN {name!r}; expected one of {list(TRAIN_SAMPLERS)}. "
        "HINT: for another sampler, pass sampler= to build_detection_train_loader."
    )


def build_train_loader(
    cfg: Any = None,
    mapper: Callable[[Any], Any] | None = None,
    dataset: Any = None,
    sampler: Any = None,
    *,
    total_batch_size: int | None = None,
    aspect_ratio_grouping: bool | None = None,
    num_workers: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
    **kwargs: Any,
) -> TrainDataLoader:
    """Build the infinite, resumable training loader.

    Call forms (detectron2's): ``build_train_loader(cfg)``, ``(cfg, mapper)``,
    ``(dataset, mapper=..., total_batch_size=...)`` with a list or map-style dataset first, and
    keyword-only calls (``dataset=...``) from lazy configs.

    Args:
        cfg: a config, providing ``DATASETS.TRAIN`` (when no dataset is given),
            ``SOLVER.IMS_PER_BATCH``, ``DATALOADER.NUM_WORKERS``, ``DATALOADER.SAMPLER_TRAIN`` (and
            its options), ``DATALOADER.ASPECT_RATIO_GROUPING``,
            ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` and ``SEED`` (the sampler's seed when >= 0).
            A list or dataset in this place is taken as ``dataset``. May be None when ``dataset``
            and ``total_batch_size`` are given.
        mapper: called on each sample (e.g. to read and augment an image); None keeps the
            samples as they are. Returning None skips a sample.
        dataset: a list or a map-style torch Dataset to use instead of ``cfg.DATASETS.TRAIN``.
        sampler: defaults to the config's ``DATALOADER.SAMPLER_TRAIN`` (without a config, a
            :class:`~d2engine.data.samplers.TrainingSampler`) over the dataset.
        total_batch_size: samples per iteration over all processes (default
            ``cfg.SOLVER.IMS_PER_BATCH``); each process loads ``total_batch_size // world_size``.
        aspect_ratio_grouping: batch landscape and portrait samples separately (default
            ``cfg.DATALOADER.ASPECT_RATIO_GROUPING``, or True as in detectron2); only dicts with
            ``"width"`` and ``"height"`` are grouped.
        num_workers: worker processes per process (default ``cfg.DATALOADER.NUM_WORKERS``, or 0).
        collate_fn: turns a list of samples into a batch (default: keep the list).
        pin_memory: pin batches in page-locked memory.
        **kwargs: as in :func:`build_batch_data_loader`: ``single_gpu_batch_size``, ``seed``,
            and ``torch.utils.data.DataLoader`` arguments (``prefetch_factor``...).

    Returns:
        A :class:`TrainDataLoader` (infinite; its ``state_dict()`` holds the data position).

    Raises:
        ValueError: if the batch size is not a positive multiple of the world size, or the
            dataset is empty.
        TypeError: if the dataset is not a list or map-style dataset.
    """
    if cfg is not None and not _is_config(cfg):
        if dataset is not None:
            raise TypeError(
                f"build_train_loader got a {type(cfg).__name__} as its first argument and also "
                "dataset=. HINT: pass either a config or the dataset first, not both."
            )
        cfg, dataset = None, cfg
    if cfg is None and (
        dataset is None or (total_batch_size is None and not kwargs.get("single_gpu_batch_size"))
    ):
        raise ValueError(
            "build_train_loader: without a cfg, pass the dataset and total_batch_size=, e.g. "
            "build_detection_train_loader(dicts, mapper=mapper, total_batch_size=16)."
        )
    if dataset is None:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=_cfg_value(cfg, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", True),
        )
    raw = dataset
    if aspect_ratio_grouping is None:
        aspect_ratio_grouping = (
            _cfg_value(cfg, "DATALOADER.ASPECT_RATIO_GROUPING", True) if cfg is not None else True
        )
    buckets = _aspect_ratio_buckets(raw) if aspect_ratio_grouping else None
    dataset = _as_map_dataset(dataset, mapper, "build_train_loader")
    if total_batch_size is None and cfg is not None and not kwargs.get("single_gpu_batch_size"):
        total_batch_size = cfg.SOLVER.IMS_PER_BATCH
    if num_workers is None:
        num_workers = cfg.DATALOADER.NUM_WORKERS if cfg is not None else 0
    if sampler is None:
        if cfg is not None:
            sampler = _sampler_from_config(cfg, raw, len(dataset))
        else:
            sampler = TrainingSampler(len(dataset))
    single_gpu_batch_size = kwargs.pop("single_gpu_batch_size", None)
    kwargs.pop("drop_last", None)  # infinite stream: no partial batch
    return TrainDataLoader(
        dataset,
        sampler,
        _per_process_batch_size(total_batch_size, single_gpu_batch_size),
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        aspect_ratio_buckets=buckets,
        **kwargs,
    )


def build_test_loader(
    cfg: Any = None,
    dataset_name: str | Sequence[str] | None = None,
    mapper: Callable[[Any], Any] | None = None,
    *,
    dataset: Any = None,
    sampler: Any = None,
    batch_size: int = 1,
    num_workers: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """Build a loader that visits this process's shard of a test set once, in order.

    Call forms (detectron2's): ``build_test_loader(cfg, "name")``, ``(cfg, "name", mapper)``,
    ``(dataset, mapper=...)`` with a list or map-style dataset first, and ``dataset=...``.

    Args:
        cfg: a config; provides ``DATALOADER.NUM_WORKERS``. A list or dataset in this place is
            taken as ``dataset``. May be None.
        dataset_name: the registered dataset(s) to load (unfiltered), when no dataset is given.
        mapper: called on each sample; None keeps the samples as they are.
        dataset: a list or map-style torch Dataset to use instead of ``dataset_name``.
        sampler: defaults to an :class:`InferenceSampler` over the dataset.
        batch_size: samples per batch on this process.
        num_workers: worker processes (default ``cfg.DATALOADER.NUM_WORKERS``, or 0 without cfg).
        collate_fn: turns a list of samples into a batch (default: keep the list).

    Returns:
        A torch DataLoader; ``len()`` is the number of batches on this process.

    Raises:
        ValueError: if neither a dataset nor a dataset name is given, or ``batch_size <= 0``.
    """
    if cfg is not None and not _is_config(cfg):
        if dataset is not None:
            raise TypeError(
                f"build_test_loader got a {type(cfg).__name__} as its first argument and also "
                "dataset=. HINT: pass either a config or the dataset first, not both."
            )
        cfg, dataset = None, cfg
    if dataset is None:
        if dataset_name is None:
            raise ValueError(
                "build_test_loader: pass dataset_name (a registered dataset) or dataset=."
            )
        dataset = get_detection_dataset_dicts(dataset_name, filter_empty=False)
    dataset = _as_map_dataset(dataset, mapper, "build_test_loader")
    batch_size = check_positive_int(batch_size, "batch_size", "build_test_loader")
    if num_workers is None:
        num_workers = cfg.DATALOADER.NUM_WORKERS if cfg is not None else 0
    if sampler is None:
        sampler = InferenceSampler(len(dataset))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=collate_fn if collate_fn is not None else trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
        generator=_seeded_torch_generator(0, comm.get_rank()),  # leaves the global RNG untouched
    )


build_detection_train_loader = build_train_loader
"""detectron2's name for :func:`build_train_loader`."""

build_detection_test_loader = build_test_loader
"""detectron2's name for :func:`build_test_loader`."""
