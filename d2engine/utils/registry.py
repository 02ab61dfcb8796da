"""A name -> object registry, to build objects named in a config (e.g. the meta-architecture)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

__all__ = ["Registry"]

_T = TypeVar("_T")


class Registry:
    """A mapping from names to objects (usually classes or functions) that a config refers to.

    Register an object as a decorator or by a direct call::

        BACKBONE_REGISTRY = Registry("BACKBONE")

        @BACKBONE_REGISTRY.register()
        class MyBackbone(nn.Module): ...

        BACKBONE_REGISTRY.register(other_function)
        BACKBONE_REGISTRY.register(other_function, name="alias")

    and look it up with ``BACKBONE_REGISTRY.get("MyBackbone")``. ``name in registry``, ``len()`` and
    iteration over ``(name, obj)`` pairs work too. A name can be registered only once.
    """

    def __init__(self, name: str) -> None:
        """Create an empty registry.

        Args:
            name: the registry's name, used in error messages.
        """
        self._name = name
        self._obj_map: dict[str, Any] = {}

    @property
    def name(self) -> str:
        """The registry's name."""
        return self._name

    def _do_register(self, name: str, obj: Any) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"A name in the {self._name!r} registry must be a non-empty string, got {name!r}."
            )
        if name in self._obj_map:
            raise ValueError(
                f"An object named {name!r} is already registered in the {self._name!r} registry "
                f"({self._obj_map[name]!r}). HINT: give the new object another name with "
                f"register(obj, name=...)."
            )
        self._obj_map[name] = obj

    @overload
    def register(self, obj: None = None, *, name: str | None = None) -> Callable[[_T], _T]: ...

    @overload
    def register(self, obj: _T, *, name: str | None = None) -> _T: ...

    def register(self, obj: Any = None, *, name: str | None = None) -> Any:
        """Register an object under ``name`` (default: its ``__name__``).

        Args:
            obj: the object to register; when None, return a decorator that registers its argument.
            name: the name to register under; defaults to ``obj.__name__``.

        Returns:
            The object itself (direct call), or a decorator that registers and returns its argument.

        Raises:
            ValueError: if the name is already registered.
            TypeError: if no name is given and the object has no ``__name__``.
        """

        def deco(func_or_class: _T) -> _T:
            key = name if name is not None else getattr(func_or_class, "__name__", None)
            if key is None:
                raise TypeError(
                    f"{type(func_or_class).__name__} object has no __name__ to register it under "
                    f"in the {self._name!r} registry. HINT: pass register(obj, name=...)."
                )
            self._do_register(key, func_or_class)
            return func_or_class

        if obj is None:
            return deco
        return deco(obj)

    def get(self, name: str) -> Any:
        """Return the object registered under ``name``.

        Raises:
            KeyError: if nothing is registered under ``name``; the message lists what is registered
                and the closest names.
        """
        try:
            return self._obj_map[name]
        except (KeyError, TypeError):
            pass
        registered = sorted(self._obj_map)
        close = difflib.get_close_matches(str(name), registered, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"No object named {name!r} found in the {self._name!r} registry.{hint} "
            f"Registered: {registered if registered else 'nothing yet'}. HINT: make sure the "
            f"module that registers it was imported."
        )

    def __contains__(self, name: object) -> bool:
        return name in self._obj_map

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(list(self._obj_map.items()))

    def __len__(self) -> int:
        return len(self._obj_map)

    def __repr__(self) -> str:
        names = ", ".join(self._obj_map)
        return f"Registry(name={self._name!r}, objects=[{names}])"
