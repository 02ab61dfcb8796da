"""Configs: yacs-style :class:`CfgNode` trees with checked merging, and Python lazy configs."""

from __future__ import annotations

from .config import (
    CfgNode,
    ConfigKeyError,
    ConfigTypeError,
    FrozenConfigError,
    configurable,
    get_cfg,
    global_cfg,
    set_global_cfg,
)
from .instantiate import InstantiationError, instantiate, locate
from .lazy import LazyCall, LazyConfig

__all__ = [
    "CfgNode",
    "ConfigKeyError",
    "ConfigTypeError",
    "FrozenConfigError",
    "InstantiationError",
    "LazyCall",
    "LazyConfig",
    "configurable",
    "get_cfg",
    "global_cfg",
    "instantiate",
    "locate",
    "set_global_cfg",
]
