"""The configs shipped inside the package, found by name as in detectron2's ``model_zoo``."""

from __future__ import annotations

from d2engine.model_zoo.model_zoo import get_config, get_config_file

__all__ = ["get_config", "get_config_file"]
