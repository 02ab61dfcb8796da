"""detectron2's ``config.config`` module: :func:`get_cfg`, the global config, and the names users
import from here.

detectron2 users write ``from detectron2.config.config import CfgNode, get_cfg, configurable``;
the same names import from ``d2engine.config.config`` (and from ``d2engine.config``). Each lives
in the module of its idea:

- :class:`CfgNode`, its errors and the safe YAML loader: :mod:`d2engine.config.cfg_node`;
- the default tree that :func:`get_cfg` copies: :mod:`d2engine.config.defaults`;
- ``@configurable``: :mod:`d2engine.config._configurable`.

This module only gathers them and holds :func:`get_cfg` and ``global_cfg``.
"""

from __future__ import annotations

from ._configurable import configurable
from .cfg_node import (
    BASE_KEY,
    MAX_YAML_VALUES,
    CfgNode,
    ConfigKeyError,
    ConfigTypeError,
    FrozenConfigError,
    _rebuild_node,  # noqa: F401  (CfgNode pickles written by d2engine 0.1.0 name it here)
    check_yaml_size,
)
from .defaults import _C

__all__ = [
    "BASE_KEY",
    "MAX_YAML_VALUES",
    "CfgNode",
    "ConfigKeyError",
    "ConfigTypeError",
    "FrozenConfigError",
    "check_yaml_size",
    "configurable",
    "get_cfg",
    "global_cfg",
    "set_global_cfg",
]


def get_cfg() -> CfgNode:
    """Return a fresh, mutable copy of d2engine's default config.

    Returns:
        A ``CfgNode`` with every default documented in :mod:`d2engine.config.defaults`.
    """
    return _C.clone()


global_cfg = CfgNode()


def set_global_cfg(cfg: CfgNode) -> None:
    """Replace the content of ``d2engine.config.config.global_cfg`` with ``cfg``.

    A global config is an escape hatch for quick experiments (read an option anywhere
    without threading it through constructors). Prefer passing the config explicitly.

    Args:
        cfg: the config whose content becomes the global config.
    """
    dict.clear(global_cfg)
    dict.update(global_cfg, cfg.clone())
