"""Model building: the meta-architecture registry and :func:`build_model`, the weights' moving
average (:class:`ModelEMA`) and :func:`compile_model`."""

from __future__ import annotations

from d2engine.modeling.build import META_ARCH_REGISTRY, build_model
from d2engine.modeling.classifier import ImageClassifier, add_classifier_config
from d2engine.modeling.compile import compile_model
from d2engine.modeling.ema import ModelEMA, load_ema_weights

__all__ = [
    "META_ARCH_REGISTRY",
    "ImageClassifier",
    "ModelEMA",
    "add_classifier_config",
    "build_model",
    "compile_model",
    "load_ema_weights",
]
