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

__all__ = [
    "CfgNode",
    "ConfigKeyError",
    "ConfigTypeError",
    "FrozenConfigError",
    "configurable",
    "get_cfg",
    "global_cfg",
    "set_global_cfg",
]
