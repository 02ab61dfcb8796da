"""The UCI handwritten digits scikit-learn ships, registered as ``digits_train``/``digits_test``.

``sklearn.datasets.load_digits`` holds 1,797 grayscale 8x8 images of the digits 0-9 (pixel values
0-16, light ink on a dark background). Nothing is downloaded: the data is part of scikit-learn.

The split is fixed and needs no random numbers: within each class, taken in the order scikit-learn
returns the samples, every fifth sample (positions 0, 5, 10, ...) goes to ``digits_test`` and the
others to ``digits_train``. That gives 1,433 training and 364 test images, every class in the same
proportion in both.

Each dataset dict holds:

- ``"image"``: a ``torch.uint8`` tensor of shape ``(1, 8, 8)`` (C x H x W, one channel, values
  ``round(v * 255 / 16)`` so that 0 is background and 255 full ink) — the layout and value range of
  an 8x8 grayscale image file read by :class:`d2engine.engine.defaults.DefaultPredictor` with
  ``INPUT.FORMAT = "L"``;
- ``"label"``: the digit, an ``int`` in ``0..9``;
- ``"height"``, ``"width"``: 8;
- ``"image_id"``: the sample's index in ``load_digits()``.

The metadata has ``thing_classes = ["0", ..., "9"]`` and ``evaluator_type = "classification"``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from d2engine.data.catalog import DatasetCatalog, MetadataCatalog

__all__ = ["DIGITS_CLASSES", "DIGITS_SPLITS", "load_digits_dicts", "register_digits"]

DIGITS_CLASSES: list[str] = [str(d) for d in range(10)]
"""The class names, index = label."""

DIGITS_SPLITS: dict[str, str] = {"digits_train": "train", "digits_test": "test"}
"""The registered dataset names and the split each one holds."""

_TEST_EVERY = 5
"""Within each class, every ``_TEST_EVERY``-th sample belongs to the test split."""


@functools.lru_cache(maxsize=1)
def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:  # imported here: scikit-learn is an optional dependency (the "digits" extra)
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The digits datasets need scikit-learn, which is not installed. "
            "HINT: pip install 'd2engine[digits]' (or pip install scikit-learn)."
        ) from e
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    return images, labels


def _split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    in_test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        in_test[members[::_TEST_EVERY]] = True
    return np.flatnonzero(in_test if split == "test" else ~in_test)


def load_digits_dicts(split: str) -> list[dict[str, Any]]:
    """Build the dataset dicts of one split.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        One dict per image, in increasing ``image_id`` order (the keys: see the module docstring).

    Raises:
        ValueError: ``split`` is neither ``"train"`` nor ``"test"``.
        ImportError: scikit-learn is not installed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Unknown digits split {split!r}: expected 'train' or 'test'.")
    images, labels = _load_arrays()
    dicts = []
    for idx in _split_indices(labels, split).tolist():
        dicts.append(
            {
                "image": torch.from_numpy(images[idx].copy()).unsqueeze(0),
                "label": int(labels[idx]),
                "height": 8,
                "width": 8,
                "image_id": idx,
            }
        )
    return dicts


def register_digits() -> None:
    """Register ``digits_train`` and ``digits_test`` in the catalogs (a no-op when already there).

    The data itself is read lazily, when a dataset is first requested from the
    :class:`~d2engine.data.catalog.DatasetCatalog`.
    """
    for name, split in DIGITS_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, functools.partial(load_digits_dicts, split))
        MetadataCatalog.get(name).set(
            thing_classes=list(DIGITS_CLASSES), evaluator_type="classification", split=split
        )
