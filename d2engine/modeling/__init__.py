"""Model building: the meta-architecture registry and :func:`build_model`."""

from __future__ import annotations

from d2engine.modeling.build import META_ARCH_REGISTRY, build_model

__all__ = ["META_ARCH_REGISTRY", "build_model"]
