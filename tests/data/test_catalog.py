"""d2engine.data.catalog: DatasetCatalog, MetadataCatalog, Metadata."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import pytest

from d2engine.data import DatasetCatalog, Metadata, MetadataCatalog


@pytest.fixture
def names() -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for name in created:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog:
            MetadataCatalog.remove(name)


def test_register_get_list_remove(names: list[str]) -> None:
    names.append("_test_ds")
    calls = []

    def load() -> list[dict[str, int]]:
        calls.append(1)
        return [{"label": 0}, {"label": 1}]

    DatasetCatalog.register("_test_ds", load)
    assert "_test_ds" in DatasetCatalog.list()
    assert DatasetCatalog.get("_test_ds") == [{"label": 0}, {"label": 1}]
    DatasetCatalog.get("_test_ds")
    assert len(calls) == 2  # called on every get, nothing cached by the catalog
    DatasetCatalog.remove("_test_ds")
    assert "_test_ds" not in DatasetCatalog.list()
    with pytest.raises(KeyError, match="'_test_ds' is not registered"):
        DatasetCatalog.remove("_test_ds")


def test_register_errors(names: list[str]) -> None:
    names.append("_test_dup")
    DatasetCatalog.register("_test_dup", list)
    with pytest.raises(ValueError, match=r"'_test_dup' is already registered.*remove"):
        DatasetCatalog.register("_test_dup", list)
    with pytest.raises(TypeError, match="expects a function returning a list of dicts, got a list"):
        DatasetCatalog.register("_test_not_callable", [{"a": 1}])


def test_registering_twice_is_an_assertion_error_as_in_detectron2(names: list[str]) -> None:
    # Code written for detectron2 re-runs its registration and catches AssertionError.
    names.append("_test_twice")
    for _ in range(2):
        try:
            DatasetCatalog.register("_test_twice", list)
        except AssertionError as e:
            assert "already registered" in str(e) and "HINT" in str(e)
    assert DatasetCatalog.get("_test_twice") == []


def test_get_unknown_lists_registered(names: list[str]) -> None:
    names.append("_test_digits")
    DatasetCatalog.register("_test_digits", list)
    with pytest.raises(
        KeyError, match=r"'_test_digit' is not registered\. Did you mean '_test_digits'"
    ):
        DatasetCatalog.get("_test_digit")
    with pytest.raises(KeyError, match=r"Registered datasets: \[.*'_test_digits'"):
        DatasetCatalog.get("_test_other")


def test_get_checks_list(names: list[str]) -> None:
    names.append("_test_tuple")
    DatasetCatalog.register("_test_tuple", lambda: ({"a": 1},))
    with pytest.raises(
        TypeError, match=r"'_test_tuple' returned a tuple, expected a list of dicts"
    ):
        DatasetCatalog.get("_test_tuple")


def test_metadata_catalog_creates_and_keeps(names: list[str]) -> None:
    names.append("_test_meta")
    meta = MetadataCatalog.get("_test_meta")
    assert meta.name == "_test_meta"
    assert MetadataCatalog.get("_test_meta") is meta
    assert "_test_meta" in MetadataCatalog.list()
    assert meta.set(thing_classes=["a", "b"], evaluator_type="classification") is meta
    assert MetadataCatalog.get("_test_meta").thing_classes == ["a", "b"]
    assert meta.as_dict() == {
        "name": "_test_meta",
        "thing_classes": ["a", "b"],
        "evaluator_type": "classification",
    }
    MetadataCatalog.remove("_test_meta")
    assert MetadataCatalog.get("_test_meta") is not meta
    with pytest.raises(TypeError, match="expects a dataset name"):
        MetadataCatalog.get("")
    with pytest.raises(KeyError, match="No metadata for dataset '_test_never'"):
        MetadataCatalog.remove("_test_never")


def test_metadata_attribute_errors() -> None:
    meta = Metadata(name="ds", thing_classes=["a"])
    with pytest.raises(
        AttributeError, match=r"'thing_clases' does not exist.*Did you mean 'thing_classes'"
    ):
        _ = meta.thing_clases
    with pytest.raises(AttributeError, match=r"Available: \['name', 'thing_classes'\]"):
        _ = meta.other
    assert meta.get("other", 7) == 7
    assert meta.get("thing_classes") == ["a"]
    meta.thing_classes = ["a"]  # the same value again is fine
    with pytest.raises(
        ValueError, match=r"'thing_classes'.*already set to \['a'\].*cannot be changed"
    ):
        meta.thing_classes = ["b"]
    assert meta.thing_classes == ["a"]


def test_metadata_copies_and_pickles() -> None:
    meta = Metadata(name="ds", thing_classes=["a"])
    assert pickle.loads(pickle.dumps(meta)) == meta
    clone = copy.deepcopy(meta)
    assert clone == meta and clone.thing_classes is not meta.thing_classes
    assert "thing_classes=['a']" in repr(meta)
