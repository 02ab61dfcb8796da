"""Tests for d2engine.modeling.classifier: the ImageClassifier meta-architecture."""

from __future__ import annotations

import pytest
import torch

from d2engine.config import get_cfg
from d2engine.data.catalog import DatasetCatalog, MetadataCatalog
from d2engine.modeling import META_ARCH_REGISTRY, build_model
from d2engine.modeling.classifier import ImageClassifier, add_classifier_config


def _cfg(**overrides: object):
    cfg = get_cfg()
    add_classifier_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "ImageClassifier"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NUM_CLASSES = 4
    cfg.MODEL.PIXEL_MEAN = [100.0]
    cfg.MODEL.PIXEL_STD = [50.0]
    cfg.MODEL.CLASSIFIER.CHANNELS = [4, 8]
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def _batch(n: int, size: int = 8, channels: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8),
            "label": i % 4,
        }
        for i in range(n)
    ]


def test_registered_and_built_from_config() -> None:
    assert "ImageClassifier" in META_ARCH_REGISTRY
    model = build_model(_cfg())
    assert isinstance(model, ImageClassifier)
    assert model.num_classes == 4 and model.in_channels == 1 and model.input_size == (8, 8)


def test_add_classifier_config_keeps_existing_values() -> None:
    cfg = _cfg()
    cfg.MODEL.CLASSIFIER.DROPOUT = 0.3
    add_classifier_config(cfg)
    assert cfg.MODEL.CLASSIFIER.DROPOUT == 0.3
    assert cfg.MODEL.CLASSIFIER.INPUT_SIZE == [8, 8]
    # The keys exist, so a YAML file / override list may set them.
    cfg.merge_from_list(["MODEL.CLASSIFIER.INPUT_SIZE", "[16, 16]"])
    assert cfg.MODEL.CLASSIFIER.INPUT_SIZE == [16, 16]


def test_training_returns_loss_dict_that_learns() -> None:
    model = build_model(_cfg())
    model.train()
    batch = _batch(16)
    first = None
    for _ in range(60):
        losses = model(batch)
        assert set(losses) == {"loss_cls"} and losses["loss_cls"].dim() == 0
        first = float(losses["loss_cls"].detach()) if first is None else first
        model.zero_grad()
        losses["loss_cls"].backward()
        with torch.no_grad():  # plain gradient descent
            for p in model.parameters():
                p -= 0.3 * p.grad
    assert float(model(batch)["loss_cls"].detach()) < 0.5 * first


def test_eval_returns_scores_and_pred_class() -> None:
    model = build_model(_cfg()).eval()
    with torch.no_grad():
        outputs = model(_batch(3))
    assert len(outputs) == 3
    for out in outputs:
        assert set(out) == {"scores", "pred_class"}
        assert out["scores"].shape == (4,)
        assert torch.isclose(out["scores"].sum(), torch.tensor(1.0))
        assert isinstance(out["pred_class"], int) and out["pred_class"] == int(
            out["scores"].argmax()
        )


def test_other_sizes_are_resized_and_floats_accepted() -> None:
    model = build_model(_cfg()).eval()
    small = {"image": torch.full((1, 8, 8), 200.0)}
    big = {"image": torch.full((1, 24, 40), 200.0)}  # a constant image looks the same resized
    with torch.no_grad():
        a, b = model([small]), model([big])
    torch.testing.assert_close(a[0]["scores"], b[0]["scores"])


def test_wrong_channel_count_is_a_clear_error() -> None:
    model = build_model(_cfg())
    with pytest.raises(ValueError, match=r"C = len\(MODEL.PIXEL_MEAN\) = 1, got shape \(3, 8, 8\)"):
        model(_batch(2, channels=3))


def test_pixel_mean_std_mismatch() -> None:
    with pytest.raises(ValueError, match="one value per input channel"):
        build_model(_cfg(**{"MODEL.PIXEL_STD": "[1.0, 2.0]"}))


def test_num_classes_from_metadata() -> None:
    name = "test_classifier_meta_ds"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    try:
        cfg = _cfg()
        cfg.MODEL.NUM_CLASSES = 0
        cfg.DATASETS.TRAIN = (name,)
        assert build_model(cfg).num_classes == 3
        cfg.DATASETS.TRAIN = ()
        with pytest.raises(ValueError, match="MODEL.NUM_CLASSES is 0"):
            build_model(cfg)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
