"""Tests for d2engine.data.datasets: the digits datasets registered from scikit-learn."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

import d2engine.data.datasets  # noqa: E402,F401  (registers the digits datasets)
from d2engine.data.catalog import DatasetCatalog, MetadataCatalog  # noqa: E402
from d2engine.data.datasets import DIGITS_CLASSES, load_digits_dicts, register_digits  # noqa: E402


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: DatasetCatalog.get(name) for name in ("digits_train", "digits_test")}


def test_registered_with_metadata() -> None:
    assert {"digits_train", "digits_test"} <= set(DatasetCatalog.list())
    for name in ("digits_train", "digits_test"):
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == [str(d) for d in range(10)] == DIGITS_CLASSES
        assert meta.evaluator_type == "classification"


def test_register_is_idempotent() -> None:
    register_digits()  # a second call must not raise "already registered"
    assert DatasetCatalog.list().count("digits_train") == 1


def test_dict_format(splits: dict[str, list[dict]]) -> None:
    item = splits["digits_train"][0]
    assert set(item) == {"image", "label", "height", "width", "image_id"}
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 8, 8)
    assert (item["height"], item["width"]) == (8, 8)
    assert isinstance(item["label"], int) and 0 <= item["label"] <= 9
    # Values use the full 0..255 range (sklearn's 0..16 rescaled).
    all_pixels = torch.stack([d["image"] for d in splits["digits_train"]])
    assert int(all_pixels.min()) == 0 and int(all_pixels.max()) == 255


def test_split_is_fixed_disjoint_and_stratified(splits: dict[str, list[dict]]) -> None:
    train, test = splits["digits_train"], splits["digits_test"]
    train_ids = [d["image_id"] for d in train]
    test_ids = [d["image_id"] for d in test]
    assert len(train) == 1433 and len(test) == 364
    assert not set(train_ids) & set(test_ids)
    assert sorted(set(train_ids) | set(test_ids)) == list(range(1797))
    # Deterministic: the same ids every time, and the first test image of each class is its first
    # sample (every fifth sample of a class goes to test).
    assert [d["image_id"] for d in load_digits_dicts("test")] == test_ids
    assert test_ids[:10] == list(range(10))
    for cls in range(10):
        n_train = sum(d["label"] == cls for d in train)
        n_test = sum(d["label"] == cls for d in test)
        assert n_test == -(-(n_train + n_test) // 5)  # ceil(n / 5)


def test_same_pixels_as_sklearn(splits: dict[str, list[dict]]) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    item = splits["digits_test"][7]
    expected = torch.from_numpy(digits.images[item["image_id"]] * 255.0 / 16.0).round()
    assert torch.equal(item["image"][0].double(), expected)
    assert item["label"] == int(digits.target[item["image_id"]])


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="Unknown digits split 'val'"):
        load_digits_dicts("val")
