"""Datasets that ship with d2engine, registered in the catalogs when this package is imported.

- ``digits_train`` / ``digits_test``: the UCI handwritten digits of scikit-learn
  (see :mod:`d2engine.data.datasets.digits`).
"""

from __future__ import annotations

from d2engine.data.datasets.digits import (
    DIGITS_CLASSES,
    DIGITS_SPLITS,
    load_digits_dicts,
    register_digits,
)

__all__ = ["DIGITS_CLASSES", "DIGITS_SPLITS", "load_digits_dicts", "register_digits"]

register_digits()
