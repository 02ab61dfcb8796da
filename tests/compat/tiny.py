"""The tiny model, datasets and TTA wrapper that the ported detectron2 scripts train.

They stand in for detectron2's detection models and COCO: ``TinyClassifier`` follows the
detectron2 model convention (a list of dicts in; a dict of losses in training, one output per
input in evaluation), ``tiny_train`` / ``tiny_test`` are registered in the catalog with
``evaluator_type = "classification"``. Importing this module registers them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from d2engine.config import configurable
from d2engine.data import DatasetCatalog, MetadataCatalog
from d2engine.modeling import META_ARCH_REGISTRY

__all__ = ["TinyClassifier", "TinyTTA", "tiny_dicts"]

_CLASSES = ["a", "b", "c"]


def tiny_dicts(split: str) -> list[dict[str, Any]]:
    """Three separable classes of 4-d points; 96 training and 30 test samples."""
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 96 if split == "train" else 30
    centers = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    dicts = []
    for i in range(n):
        label = i % 3
        x = centers[label] + 0.5 * torch.randn(4, generator=generator)
        # width/height as image datasets have them: the loader groups by aspect ratio
        dicts.append({"x": x, "label": label, "image_id": i, "width": 8 + i % 2, "height": 8})
    return dicts


for _split in ("train", "test"):
    _name = f"tiny_{_split}"
    if _name not in DatasetCatalog:
        DatasetCatalog.register(_name, lambda split=_split: tiny_dicts(split))
        MetadataCatalog.get(_name).set(thing_classes=_CLASSES, evaluator_type="classification")


@META_ARCH_REGISTRY.register()
class TinyClassifier(nn.Module):
    """A linear classifier of the tiny points, built from a config or from arguments."""

    @configurable
    def __init__(self, *, in_features: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        return {"num_classes": cfg.MODEL.NUM_CLASSES or len(_CLASSES)}

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def forward(self, batched_inputs: list[dict[str, Any]]) -> Any:
        x = torch.stack([d["x"] for d in batched_inputs]).to(self.device)
        logits = self.fc(x)
        if self.training:
            labels = torch.tensor([d["label"] for d in batched_inputs], device=self.device)
            return {"loss_cls": F.cross_entropy(logits, labels)}
        return [{"scores": s, "pred_class": int(s.argmax())} for s in logits]


class TinyTTA(nn.Module):
    """Test-time augmentation for the tiny model: average the scores of x and a jittered x."""

    def __init__(self, cfg: Any, model: nn.Module) -> None:
        super().__init__()
        self.cfg, self.model = cfg, model

    def forward(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        jittered = [{**d, "x": d["x"] * 1.01} for d in batched_inputs]
        outputs = []
        for a, b in zip(self.model(batched_inputs), self.model(jittered)):
            scores = (a["scores"] + b["scores"]) / 2
            outputs.append({"scores": scores, "pred_class": int(scores.argmax())})
        return outputs
