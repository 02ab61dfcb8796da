"""Tests for d2engine.engine.predictor: DefaultPredictor (also exported by engine.defaults)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from d2engine.config import CfgNode, get_cfg
from d2engine.data import DatasetCatalog, MetadataCatalog
from d2engine.engine import defaults
from d2engine.engine.predictor import DefaultPredictor
from d2engine.modeling import META_ARCH_REGISTRY


class _EchoModel(nn.Module):
    """Returns its input image times a learnable scale (1 at init): shows what the model got."""

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**d, "image": d["image"] * self.scale} for d in batch]


if "_TestEchoModel" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(_EchoModel, name="_TestEchoModel")
for _ds in ("_test_predictor_a", "_test_predictor_b"):
    if _ds not in DatasetCatalog.list():
        DatasetCatalog.register(_ds, list)


def test_exported_by_defaults() -> None:
    assert defaults.DefaultPredictor is DefaultPredictor


def _predictor_cfg(fmt: str = "BGR", min_size: int = 0, max_size: int = 0) -> CfgNode:
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "_TestEchoModel"
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.FORMAT = fmt
    cfg.INPUT.MIN_SIZE_TEST = min_size
    cfg.INPUT.MAX_SIZE_TEST = max_size
    return cfg


def _bgr_image(h: int = 6, w: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_predictor_format_conversion() -> None:
    image = _bgr_image()
    out_bgr = DefaultPredictor(_predictor_cfg("BGR"))(image)
    out_rgb = DefaultPredictor(_predictor_cfg("RGB"))(image)
    out_l = DefaultPredictor(_predictor_cfg("L"))(image)

    assert out_bgr["image"].dtype == torch.float32 and out_bgr["image"].shape == (3, 6, 10)
    assert torch.equal(out_bgr["image"], torch.from_numpy(image).permute(2, 0, 1).float())
    assert torch.equal(out_rgb["image"], out_bgr["image"].flip(0))
    # "L" matches PIL's conversion of the RGB image exactly.
    from PIL import Image

    pil_l = np.array(Image.fromarray(np.ascontiguousarray(image[:, :, ::-1])).convert("L"))
    assert out_l["image"].shape == (1, 6, 10)
    assert torch.equal(out_l["image"][0], torch.from_numpy(pil_l).float())
    assert (out_l["height"], out_l["width"]) == (6, 10)
    # Grayscale input (H x W) is accepted.
    gray = pil_l.copy()
    assert torch.equal(
        DefaultPredictor(_predictor_cfg("L"))(gray)["image"][0], torch.from_numpy(gray).float()
    )
    assert DefaultPredictor(_predictor_cfg("RGB"))(gray)["image"].shape == (3, 6, 10)


def test_predictor_resizing() -> None:
    image = _bgr_image(20, 40)
    cases = [
        ((10, 0), (10, 20)),  # shortest edge to 10, no cap
        ((10, 15), (8, 15)),  # 10 x 20 capped to longest 15: 7.5 -> 8
        ((0, 15), (20, 40)),  # MIN_SIZE_TEST 0 disables resizing
        ((40, 0), (40, 80)),  # upscaling
    ]
    for (min_size, max_size), expected in cases:
        out = DefaultPredictor(_predictor_cfg("BGR", min_size, max_size))(image)
        assert tuple(out["image"].shape[1:]) == expected, (min_size, max_size)
        assert (out["height"], out["width"]) == (20, 40)  # the original size
    # A constant image stays constant after (antialiased bilinear) resizing.
    flat = np.full((20, 40, 3), 77, dtype=np.uint8)
    out = DefaultPredictor(_predictor_cfg("BGR", 10, 0))(flat)
    torch.testing.assert_close(out["image"], torch.full((3, 10, 20), 77.0))


def test_predictor_loads_weights_runs_no_grad_and_has_metadata(tmp_path) -> None:
    model = _EchoModel(get_cfg())
    with torch.no_grad():
        model.scale.fill_(3.0)
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    cfg = _predictor_cfg("BGR")
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.DATASETS.TEST = ("_test_predictor_a", "_test_predictor_b")
    predictor = DefaultPredictor(cfg)
    assert not predictor.model.training
    out = predictor(_bgr_image())
    assert not out["image"].requires_grad  # computed under no_grad
    assert torch.equal(out["image"], 3 * torch.from_numpy(_bgr_image()).permute(2, 0, 1).float())
    assert predictor.metadata is MetadataCatalog.get("_test_predictor_a")
    assert DefaultPredictor(_predictor_cfg()).metadata is None
    cfg.MODEL.WEIGHTS = "changed"
    kept = predictor.cfg.MODEL.WEIGHTS
    assert kept == str(weights)  # the predictor keeps its own copy


def test_predictor_errors() -> None:
    with pytest.raises(ValueError, match=r"INPUT.FORMAT must be one of .*got 'YUV'"):
        DefaultPredictor(_predictor_cfg("YUV"))
    predictor = DefaultPredictor(_predictor_cfg())
    with pytest.raises(ValueError, match=r"got an array of shape \(4, 4, 4\)"):
        predictor(np.zeros((4, 4, 4), dtype=np.uint8))
