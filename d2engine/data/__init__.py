"""Data: dataset/metadata catalogs, samplers and data loaders built from a config."""

from __future__ import annotations

from d2engine.data import datasets  # noqa: F401,E402  (registers digits_train / digits_test)
from d2engine.data.build import (
    TrainDataLoader,
    build_batch_data_loader,
    build_detection_test_loader,
    build_detection_train_loader,
    build_test_loader,
    build_train_loader,
    get_detection_dataset_dicts,
)
from d2engine.data.catalog import (
    DatasetAlreadyRegisteredError,
    DatasetCatalog,
    Metadata,
    MetadataCatalog,
)
from d2engine.data.common import DatasetFromList, MapDataset
from d2engine.data.samplers import (
    GlobalStreamSampler,
    InferenceSampler,
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)

__all__ = [
    "DatasetAlreadyRegisteredError",
    "DatasetCatalog",
    "DatasetFromList",
    "GlobalStreamSampler",
    "InferenceSampler",
    "MapDataset",
    "Metadata",
    "MetadataCatalog",
    "RandomSubsetTrainingSampler",
    "RepeatFactorTrainingSampler",
    "TrainDataLoader",
    "TrainingSampler",
    "build_batch_data_loader",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "build_test_loader",
    "build_train_loader",
    "get_detection_dataset_dicts",
]
