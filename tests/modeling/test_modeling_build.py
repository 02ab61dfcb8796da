"""d2engine.modeling.build: META_ARCH_REGISTRY and build_model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from d2engine.config import get_cfg
from d2engine.modeling import META_ARCH_REGISTRY, build_model


class _TinyArch(nn.Module):
    """Follows the model convention: losses in training, one output per input in eval."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg_arch = cfg.MODEL.META_ARCHITECTURE
        self.linear = nn.Linear(2, 3)

    def forward(self, batch: list[dict[str, Any]]) -> Any:
        x = torch.stack([d["x"] for d in batch])
        scores = self.linear(x)
        if self.training:
            return {"loss": scores.pow(2).mean()}
        return [{"scores": s} for s in scores]


@pytest.fixture
def registered() -> Iterator[str]:
    names = ["_TestTinyArch", "_TestNotAModule"]
    META_ARCH_REGISTRY.register(_TinyArch, name=names[0])
    META_ARCH_REGISTRY.register(lambda cfg: "not a module", name=names[1])
    yield names[0]
    for name in names:  # keep the global registry clean for other tests
        META_ARCH_REGISTRY._obj_map.pop(name)


def test_build_model_calls_registered_arch_on_device(registered: str) -> None:
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = registered
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert isinstance(model, _TinyArch)
    assert model.cfg_arch == registered  # called with the cfg
    assert next(model.parameters()).device == torch.device("cpu")
    batch = [{"x": torch.ones(2)}, {"x": torch.zeros(2)}]
    assert set(model(batch)) == {"loss"}
    model.eval()
    outputs = model(batch)
    assert len(outputs) == 2 and outputs[0]["scores"].shape == (3,)


def test_build_model_moves_to_meta_device(registered: str) -> None:
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = registered
    cfg.MODEL.DEVICE = "meta"  # any torch device works; "meta" proves the move without a GPU
    assert next(build_model(cfg).parameters()).device.type == "meta"


def test_unknown_arch_lists_registered(registered: str) -> None:
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "_TestTinyArc"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(KeyError, match=r"'_TestTinyArc'.*Did you mean '_TestTinyArch'"):
        build_model(cfg)


def test_arch_must_return_module(registered: str) -> None:
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "_TestNotAModule"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(TypeError, match=r"'_TestNotAModule' returned a str, expected a torch"):
        build_model(cfg)


def test_bad_device(registered: str) -> None:
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = registered
    cfg.MODEL.DEVICE = "gpu0"
    with pytest.raises(ValueError, match=r"MODEL.DEVICE='gpu0' is not a valid torch device"):
        build_model(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(registered: str) -> None:
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = registered
    cfg.MODEL.DEVICE = "cuda"
    with pytest.raises(RuntimeError, match=r"CUDA is not available.*MODEL.DEVICE cpu"):
        build_model(cfg)


def test_detectron2_meta_arch_import_paths() -> None:
    from d2engine.modeling import META_ARCH_REGISTRY, build_model
    from d2engine.modeling.meta_arch import META_ARCH_REGISTRY as from_meta_arch
    from d2engine.modeling.meta_arch.build import build_model as build_from_meta_arch

    assert from_meta_arch is META_ARCH_REGISTRY and build_from_meta_arch is build_model
