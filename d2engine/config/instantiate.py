"""Build objects from lazy configs: ``instantiate`` calls every ``_target_`` in a config tree."""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["InstantiationError", "instantiate", "locate", "target_to_string"]

logger = logging.getLogger(__name__)

_TARGET_KEY = "_target_"


class InstantiationError(RuntimeError):
    """Calling a ``_target_`` failed; the message names the config key and the target.

    The original exception is kept as ``__cause__``.
    """


def locate(name: str) -> Any:
    """Return the object that a dotted import path names.

    ``"torch.optim.SGD"``, ``"collections.OrderedDict"``, ``"mypkg.models.Net.from_config"``
    and builtins such as ``"dict"`` all work: the longest importable module prefix is
    imported and the rest is read as attributes.

    Args:
        name: the dotted path.

    Returns:
        The object.

    Raises:
        ImportError: if no module prefix can be imported or an attribute is missing.
    """
    if not isinstance(name, str) or not name or name.startswith(".") or ".." in name:
        raise ImportError(
            f"Cannot locate {name!r}: expected a dotted import path like 'pkg.mod.Name'."
        )
    parts = name.split(".")
    module: Any = None
    index = len(parts)
    while index > 0:
        module_name = ".".join(parts[:index])
        try:
            module = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as e:
            # Keep going only if the missing module is this prefix (or a parent of it);
            # an import that fails *inside* an existing module is a real error.
            if e.name is None or not (
                module_name == e.name or module_name.startswith(e.name + ".")
            ):
                raise
            index -= 1
    if module is None:
        if hasattr(builtins, parts[0]):
            module, index = builtins, 0
        else:
            raise ImportError(
                f"Cannot locate {name!r}: no module {parts[0]!r} can be imported. Check the "
                "spelling and that the package is installed (or give the object itself instead of "
                "a string)."
            )
    obj = module
    for depth in range(index, len(parts)):
        try:
            obj = getattr(obj, parts[depth])
        except AttributeError:
            found = ".".join(parts[:depth]) or "builtins"
            raise ImportError(
                f"Cannot locate {name!r}: {found!r} has no attribute {parts[depth]!r}."
            ) from None
    return obj


def target_to_string(target: Any) -> str:
    """Return the shortest import path under which ``locate`` finds ``target`` again.

    ``torch.nn.modules.conv.Conv2d`` becomes ``"torch.nn.Conv2d"``.

    Args:
        target: a class or function defined at module level.

    Returns:
        The dotted path.

    Raises:
        ValueError: if the object cannot be found again by import (a lambda, a local class...).
    """
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise ValueError(
            f"{target!r} cannot be written as an import path (it is not defined at the top level "
            "of a module, e.g. a lambda or a class defined inside a function). Define it at module "
            "level, or give the import path as a string."
        )
    parts = module.split(".")
    for k in range(1, len(parts) + 1):
        candidate = ".".join(parts[:k]) + "." + qualname
        try:
            if locate(candidate) is target:
                return candidate
        except ImportError:
            continue
    raise ValueError(
        f"{module}.{qualname} cannot be imported again under that name, so it cannot be written as "
        "an import path. Define it at module level in an importable module."
    )


def instantiate(cfg: Any) -> Any:
    """Recursively build the objects a lazy config describes.

    A mapping with a ``_target_`` key is replaced by ``target(**other_keys)``, after its
    values were instantiated; ``_target_`` is a callable or an import path string. Mappings
    without ``_target_`` become plain dicts and sequences become lists, with their items
    instantiated. Other values (numbers, strings, objects) are returned unchanged. A
    structured (dataclass-typed) ``DictConfig`` becomes its dataclass.

    Any importable callable can be a target (``os.system`` too), whether the config came from a
    ``.py`` or a YAML file: instantiating a config runs code it chooses. Instantiate only configs
    from sources you trust (see "Security" in the README).

    Args:
        cfg: a ``DictConfig`` / ``ListConfig`` / dict / list (typically made with
            :class:`~d2engine.config.LazyCall`), or any value.

    Returns:
        The built object(s).

    Raises:
        ImportError: if a ``_target_`` string cannot be imported (message names the key).
        TypeError: if a ``_target_`` is neither callable nor a string.
        InstantiationError: if calling a target fails; the cause is chained.
    """
    return _instantiate(cfg, "cfg")


def _instantiate(cfg: Any, path: str) -> Any:
    if isinstance(cfg, (ListConfig, list, tuple)):
        items = [_instantiate(item, f"{path}[{i}]") for i, item in enumerate(cfg)]
        return tuple(items) if isinstance(cfg, tuple) else items
    if isinstance(cfg, DictConfig):
        object_type = OmegaConf.get_type(cfg)
        if object_type is not None and dataclasses.is_dataclass(object_type):
            return OmegaConf.to_object(cfg)
    if not isinstance(cfg, Mapping):
        return cfg
    if _TARGET_KEY not in cfg:
        return {key: _instantiate(value, f"{path}.{key}") for key, value in cfg.items()}

    kwargs = {
        str(key): _instantiate(value, f"{path}.{key}")
        for key, value in cfg.items()
        if key != _TARGET_KEY
    }
    target = cfg[_TARGET_KEY]
    if isinstance(target, str):
        name = target
        try:
            target = locate(name)
        except ImportError as e:
            raise ImportError(f"Cannot instantiate {path}: _target_ {name!r} not found. {e}") from e
    else:
        name = (
            f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        )
    if not callable(target):
        raise TypeError(
            f"Cannot instantiate {path}: _target_ must be a callable or an import path string, "
            f"got {type(target).__name__} ({target!r})."
        )
    try:
        return target(**kwargs)
    except Exception as e:
        raise InstantiationError(
            f"Error instantiating {path} with _target_={name}"
            f"(**{{{', '.join(sorted(kwargs))}}}): {type(e).__name__}: {e}"
        ) from e
