"""detectron2's ``modeling.meta_arch`` import path for the meta-architecture registry.

``from detectron2.modeling.meta_arch import META_ARCH_REGISTRY`` becomes
``from d2engine.modeling.meta_arch import META_ARCH_REGISTRY``; the objects live in
:mod:`d2engine.modeling.build`.
"""

from __future__ import annotations

from d2engine.modeling.build import META_ARCH_REGISTRY, build_model

__all__ = ["META_ARCH_REGISTRY", "build_model"]
