"""Model building: the meta-architecture registry and :func:`build_model`."""

from __future__ import annotations

from d2engine.modeling.build import META_ARCH_REGISTRY, build_model
from d2engine.modeling.classifier import ImageClassifier, add_classifier_config

__all__ = ["META_ARCH_REGISTRY", "ImageClassifier", "add_classifier_config", "build_model"]
