"""A small convolutional image classifier, the meta-architecture ``"ImageClassifier"``.

It follows the model convention of :func:`d2engine.modeling.build_model`: the model takes a list of
dicts, each with ``"image"`` (a C x H x W tensor, uint8 or float, pixel values in 0..255) and, in
training, ``"label"`` (an int). In training mode it returns ``{"loss_cls": cross_entropy}``; in eval
mode one dict per input, ``{"scores": <1-D tensor of class probabilities>, "pred_class": <int>}``,
the format :class:`d2engine.evaluation.ClassificationEvaluator` reads.

Images of any size are accepted: one whose size differs from ``MODEL.CLASSIFIER.INPUT_SIZE`` is
resized to it (bilinear, antialiased), so the model also takes what
:class:`d2engine.engine.defaults.DefaultPredictor` makes of an image file.

It reads ``MODEL.NUM_CLASSES``, ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` and the options under
``cfg.MODEL.CLASSIFIER``; call :func:`add_classifier_config` on a config
before merging a file that sets them (``d2engine-train`` does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from d2engine.data.catalog import MetadataCatalog
from d2engine.modeling.build import META_ARCH_REGISTRY

__all__ = ["ImageClassifier", "add_classifier_config"]

_DEFAULTS: dict[str, Any] = {
    "INPUT_SIZE": [8, 8],
    "CHANNELS": [32, 64, 64],
    "DROPOUT": 0.0,
}
"""``MODEL.CLASSIFIER`` defaults: the H x W the network sees, the width of each conv stage (a 2x2
max-pool follows every stage but the first) and the dropout before the final linear layer."""


def add_classifier_config(cfg: Any) -> None:
    """Add the ``MODEL.CLASSIFIER`` options (with their defaults) to a config, in place.

    Keys the config already has keep their values, so calling it twice is harmless. The classifier
    also reads ``MODEL.NUM_CLASSES`` (0: the number of ``thing_classes`` of ``DATASETS.TRAIN[0]``)
    and ``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD`` (one value per input channel, for pixel values
    in 0..255), which every config has.

    Args:
        cfg: a :class:`d2engine.config.CfgNode` (e.g. from ``get_cfg()``), not frozen.
    """
    if "CLASSIFIER" not in cfg.MODEL:
        cfg.MODEL.CLASSIFIER = type(cfg)()
    for key, value in _DEFAULTS.items():
        if key not in cfg.MODEL.CLASSIFIER:
            cfg.MODEL.CLASSIFIER[key] = list(value) if isinstance(value, list) else value


def _num_classes(cfg: Any) -> int:
    num_classes = int(cfg.MODEL.get("NUM_CLASSES", 0) or 0)
    if num_classes > 0:
        return num_classes
    train_sets = list(cfg.DATASETS.TRAIN) if "DATASETS" in cfg else []
    classes = None
    if train_sets:
        classes = MetadataCatalog.get(train_sets[0]).get("thing_classes", None)
    if not classes:
        raise ValueError(
            "ImageClassifier needs the number of classes: MODEL.NUM_CLASSES is 0 and "
            f"DATASETS.TRAIN={tuple(train_sets)} gives no metadata with 'thing_classes'. "
            "HINT: set MODEL.NUM_CLASSES, or set thing_classes in the MetadataCatalog entry of "
            "the first training dataset."
        )
    return len(classes)


@META_ARCH_REGISTRY.register()
class ImageClassifier(nn.Module):
    """Conv-BN-ReLU stages, global average pooling and a linear layer.

    Built from a config (``ImageClassifier(cfg)``, as :func:`~d2engine.modeling.build_model` does)
    with options from ``cfg.MODEL.CLASSIFIER`` (defaults: see :func:`add_classifier_config`); the
    number of input channels is ``len(cfg.MODEL.PIXEL_MEAN)``.
    """

    # buffers, set by register_buffer in __init__
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        opts = {**_DEFAULTS, **dict(cfg.MODEL.get("CLASSIFIER", None) or {})}
        self.num_classes = _num_classes(cfg)
        self.input_size = (int(opts["INPUT_SIZE"][0]), int(opts["INPUT_SIZE"][1]))
        mean, std = (
            [float(v) for v in cfg.MODEL.PIXEL_MEAN],
            [float(v) for v in cfg.MODEL.PIXEL_STD],
        )
        if len(mean) != len(std) or not mean:
            raise ValueError(
                f"MODEL.PIXEL_MEAN and MODEL.PIXEL_STD need one value per input channel, got "
                f"{mean} and {std}."
            )
        self.in_channels = len(mean)
        widths = [int(w) for w in opts["CHANNELS"]]
        if not widths:
            raise ValueError(
                "MODEL.CLASSIFIER.CHANNELS must list at least one stage width, got []."
            )
        layers: list[nn.Module] = []
        prev = self.in_channels
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(prev, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if i > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            prev = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(float(opts["DROPOUT"]))
        self.head = nn.Linear(prev, self.num_classes)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device the model's parameters are on."""
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> torch.Tensor:
        """Stack the inputs' images into a normalised N x C x H x W float batch.

        Args:
            batched_inputs: dicts with an ``"image"`` C x H x W tensor (pixel values 0..255).

        Returns:
            The batch on the model's device, resized to ``INPUT_SIZE`` where needed.

        Raises:
            ValueError: an image is not C x H x W with ``len(MODEL.PIXEL_MEAN)`` channels.
        """
        images = []
        for item in batched_inputs:
            image = item["image"]
            if not isinstance(image, torch.Tensor):
                image = torch.as_tensor(image)
            if image.dim() != 3 or image.shape[0] != self.in_channels:
                raise ValueError(
                    f"ImageClassifier expects each 'image' as a C x H x W tensor with "
                    f"C = len(MODEL.PIXEL_MEAN) = {self.in_channels}, got shape "
                    f"{tuple(image.shape)}. HINT: for grayscale models set INPUT.FORMAT to 'L'."
                )
            image = image.to(self.device, non_blocking=True).float()
            if tuple(image.shape[-2:]) != self.input_size:
                image = F.interpolate(
                    image[None],
                    size=self.input_size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
            images.append(image)
        batch = torch.stack(images)
        return (batch - self.pixel_mean) / self.pixel_std

    def forward(self, batched_inputs: list[dict[str, Any]]) -> Any:
        """Classify a batch.

        Args:
            batched_inputs: dicts with ``"image"`` and, in training mode, ``"label"``.

        Returns:
            Training: ``{"loss_cls": tensor}``. Eval: a list of ``{"scores", "pred_class"}`` dicts.
        """
        logits = self.head(
            self.dropout(self.features(self.preprocess_image(batched_inputs)).mean((2, 3)))
        )
        if self.training:
            labels = torch.as_tensor([int(x["label"]) for x in batched_inputs], device=self.device)
            return {"loss_cls": F.cross_entropy(logits, labels)}
        scores = logits.softmax(dim=1)
        pred = scores.argmax(dim=1).tolist()
        return [{"scores": s, "pred_class": p} for s, p in zip(scores, pred)]
