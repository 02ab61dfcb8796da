"""``@configurable``: let a constructor or function also take a config.

detectron2's pattern for objects that can be built both from explicit arguments and from a
config: the config is mapped to the arguments by a ``from_config`` function, so the
arguments stay visible in the signature and the config is optional. Public as
``d2engine.config.configurable`` (and ``d2engine.config.config.configurable``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf import DictConfig

from .cfg_node import CfgNode

__all__ = ["configurable"]

_F = TypeVar("_F", bound=Callable[..., Any])


def configurable(init_func: Callable | None = None, *, from_config: Callable | None = None) -> Any:
    """Let a class ``__init__`` (or a function) also be called with a config.

    Decorate ``__init__`` of a class that has a ``from_config(cls, cfg, ...)`` classmethod
    returning the keyword arguments of ``__init__``; then both ``Cls(a=1, b=2)`` and
    ``Cls(cfg)`` work. For a function, pass ``from_config=`` explicitly::

        @configurable(from_config=lambda cfg: {"lr": cfg.SOLVER.BASE_LR})
        def build(lr, momentum=0.9): ...

        build(cfg, momentum=0.8)  # lr taken from cfg

    A call is treated as "from a config" when its first argument (or a ``cfg=`` keyword) is
    a ``CfgNode`` or an omegaconf ``DictConfig``.

    Args:
        init_func: the decorated ``__init__`` (when used as ``@configurable``).
        from_config: for functions, the callable that maps the config (and the extra
            arguments it declares) to keyword arguments.

    Returns:
        The wrapped function, or a decorator.

    Raises:
        TypeError: if used on ``__init__`` of a class without a ``from_config`` classmethod,
            or on a function without ``from_config=``.
    """
    if init_func is not None:
        if from_config is not None:
            raise TypeError("configurable: pass from_config= only with @configurable(...).")
        if not (inspect.isfunction(init_func) and init_func.__name__ == "__init__"):
            raise TypeError(
                "configurable: @configurable without arguments decorates a class __init__; "
                "for a function use @configurable(from_config=...)."
            )

        @functools.wraps(init_func)
        def wrapped_init(self: Any, *args: Any, **kwargs: Any) -> None:
            from_cfg = getattr(type(self), "from_config", None)
            if from_cfg is None or not inspect.ismethod(from_cfg):
                raise TypeError(
                    f"{type(self).__name__}.__init__ is @configurable, so the class needs a "
                    "classmethod from_config(cls, cfg, ...) returning the __init__ arguments."
                )
            if _called_with_cfg(*args, **kwargs):
                kwargs = _get_args_from_config(from_cfg, *args, **kwargs)
                init_func(self, **kwargs)
            else:
                init_func(self, *args, **kwargs)

        return wrapped_init

    if from_config is None:
        return configurable  # @configurable() on __init__

    if not callable(from_config):
        raise TypeError(f"configurable: from_config must be callable, got {from_config!r}.")

    def decorator(func: _F) -> _F:
        @functools.wraps(func)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if _called_with_cfg(*args, **kwargs):
                return func(**_get_args_from_config(from_config, *args, **kwargs))
            return func(*args, **kwargs)

        wrapped.from_config = from_config  # type: ignore[attr-defined]
        return wrapped  # type: ignore[return-value]

    return decorator


def _called_with_cfg(*args: Any, **kwargs: Any) -> bool:
    if args and isinstance(args[0], (CfgNode, DictConfig)):
        return True
    return isinstance(kwargs.get("cfg"), (CfgNode, DictConfig))


def _get_args_from_config(from_config: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call ``from_config`` with the arguments it accepts; pass the rest through."""
    params = inspect.signature(from_config).parameters
    names = list(params)
    if not names or names[0] != "cfg":
        name = getattr(from_config, "__qualname__", repr(from_config))
        raise TypeError(f"{name} must take 'cfg' as its first argument, got ({', '.join(names)}).")
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_var_kw:
        result = from_config(*args, **kwargs)
    else:
        accepted = set(names)
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted}
        result = from_config(*args, **own)
    if not isinstance(result, dict):
        name = getattr(from_config, "__qualname__", repr(from_config))
        raise TypeError(
            f"{name} must return a dict of keyword arguments, got {type(result).__name__}."
        )
    if not takes_var_kw:
        result.update(kwargs)
    return result
