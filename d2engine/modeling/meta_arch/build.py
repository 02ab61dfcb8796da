"""detectron2's ``modeling.meta_arch.build`` import path; the objects live in
:mod:`d2engine.modeling.build`."""

from __future__ import annotations

from d2engine.modeling.build import META_ARCH_REGISTRY, build_model

__all__ = ["META_ARCH_REGISTRY", "build_model"]
