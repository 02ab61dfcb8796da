"""Global catalogs of datasets (how to load them) and of their metadata (what they contain).

``DatasetCatalog.register(name, func)`` records a function that returns the dataset as a list of
dicts, one per sample; the data loaders of :mod:`d2engine.data.build` call it by name from
``cfg.DATASETS.TRAIN`` / ``cfg.DATASETS.TEST``. ``MetadataCatalog.get(name)`` returns the
:class:`Metadata` of a dataset (class names, evaluator type, ...), created empty on first use.
"""

from __future__ import annotations

import difflib
from collections import UserDict
from collections.abc import Callable
from typing import Any

__all__ = ["DatasetAlreadyRegisteredError", "DatasetCatalog", "Metadata", "MetadataCatalog"]


class DatasetAlreadyRegisteredError(AssertionError, ValueError):
    """A dataset name registered twice.

    An ``AssertionError`` as in detectron2 (whose ``register`` asserts, and code that re-runs its
    registration catches ``AssertionError``), and a ``ValueError`` as d2engine raised before.
    """


def _close_names(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class _DatasetCatalog(UserDict):
    """Name -> function returning the dataset as a list of dicts; use the ``DatasetCatalog``.

    The function is called every time :meth:`get` is called, so it should be cheap or cache its
    result; the catalog itself stores no data.
    """

    def register(self, name: str, func: Callable[[], list[dict[str, Any]]]) -> None:
        """Register a dataset.

        Args:
            name: the name that configs use to refer to the dataset.
            func: a function without arguments returning the dataset as a list of dicts.

        Raises:
            TypeError: if ``func`` is not callable.
            DatasetAlreadyRegisteredError: if ``name`` is already registered (an
                ``AssertionError`` and a ``ValueError``).
        """
        if not callable(func):
            raise TypeError(
                f"DatasetCatalog.register({name!r}, ...) expects a function returning a list of "
                f"dicts, got a {type(func).__name__}. HINT: pass `lambda: my_list`."
            )
        if name in self:
            raise DatasetAlreadyRegisteredError(
                f"Dataset {name!r} is already registered. HINT: choose another name or call "
                f"DatasetCatalog.remove({name!r}) first."
            )
        self[name] = func

    def get(self, name: str) -> list[dict[str, Any]]:  # type: ignore[override]
        """Call the function registered under ``name`` and return its list of dicts.

        Raises:
            KeyError: if ``name`` is not registered (the message lists the registered names).
            TypeError: if the function did not return a list.
        """
        try:
            func = self[name]
        except KeyError:
            names = sorted(self.keys())
            raise KeyError(
                f"Dataset {name!r} is not registered.{_close_names(name, names)} Registered "
                f"datasets: {names if names else 'none'}. HINT: call "
                f"DatasetCatalog.register({name!r}, func) before building a data loader."
            ) from None
        dicts = func()
        if not isinstance(dicts, list):
            raise TypeError(
                f"The function registered for dataset {name!r} returned a {type(dicts).__name__}, "
                f"expected a list of dicts. HINT: return `list(...)` of your samples."
            )
        return dicts

    def list(self) -> list[str]:
        """The names of all registered datasets."""
        return list(self.keys())

    def remove(self, name: str) -> None:
        """Forget the dataset registered under ``name``.

        Raises:
            KeyError: if ``name`` is not registered.
        """
        if name not in self:
            raise KeyError(
                f"Dataset {name!r} is not registered; registered: {sorted(self.keys())}."
            )
        del self[name]

    def __str__(self) -> str:
        return f"DatasetCatalog(registered datasets: {', '.join(self.keys())})"

    __repr__ = __str__


DatasetCatalog = _DatasetCatalog()
"""The global dataset catalog (see :class:`_DatasetCatalog`)."""


class Metadata:
    """Attributes of a dataset, with attribute access: ``MetadataCatalog.get("x").thing_classes``.

    Attributes are write-once: setting an existing attribute to a different value is an error, so
    that two pieces of code cannot silently disagree about a dataset. Reading a missing attribute
    raises an ``AttributeError`` listing the available ones; use :meth:`get` for a default.
    """

    def __init__(self, **kwargs: Any) -> None:
        """Create metadata holding the given attributes (usually at least ``name``)."""
        self.set(**kwargs)

    def __getattr__(self, key: str) -> Any:
        # Only called when normal lookup fails, i.e. for attributes that were never set.
        if key.startswith("__"):
            raise AttributeError(key)
        name = self.__dict__.get("name", "N/A")
        available = sorted(self.__dict__)
        raise AttributeError(
            f"Attribute {key!r} does not exist in the metadata of dataset {name!r}."
            f"{_close_names(key, available)} Available: {available}. HINT: set it with "
            f"MetadataCatalog.get({name!r}).set({key}=...), or read it with .get({key!r}, default)."
        )

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.__dict__:
            old = self.__dict__[key]
            try:
                same = bool(old == value)
            except Exception:  # e.g. numpy arrays, whose == is elementwise
                same = old is value
            if not same:
                name = self.__dict__.get("name", "N/A")
                raise ValueError(
                    f"Attribute {key!r} of the metadata of dataset {name!r} is already set to "
                    f"{old!r} and cannot be changed to {value!r}. HINT: register the dataset under "
                    f"a new name, or MetadataCatalog.remove({name!r}) first."
                )
            return
        self.__dict__[key] = value

    def as_dict(self) -> dict[str, Any]:
        """A shallow copy of all attributes as a dict."""
        return dict(self.__dict__)

    def set(self, **kwargs: Any) -> Metadata:
        """Set several attributes at once.

        Returns:
            The metadata itself, for chaining.
        """
        for key, value in kwargs.items():
            setattr(self, key, value)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        """The attribute ``key``, or ``default`` if it does not exist."""
        return self.__dict__.get(key, default)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"Metadata({items})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Metadata) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _MetadataCatalog(UserDict):
    """Name -> :class:`Metadata`, created on first access. Use the instance ``MetadataCatalog``."""

    def get(self, name: str) -> Metadata:  # type: ignore[override]
        """The metadata of dataset ``name``; an empty one (``name`` set) is created if needed."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"MetadataCatalog.get() expects a dataset name, got {name!r}.")
        meta = self.data.get(name)
        if meta is None:
            meta = self.data[name] = Metadata(name=name)
        return meta

    def list(self) -> list[str]:
        """The names of all datasets that have metadata."""
        return list(self.keys())

    def remove(self, name: str) -> None:
        """Forget the metadata of dataset ``name``.

        Raises:
            KeyError: if ``name`` has no metadata.
        """
        if name not in self:
            raise KeyError(f"No metadata for dataset {name!r}; known: {sorted(self.keys())}.")
        del self[name]

    def __str__(self) -> str:
        return f"MetadataCatalog(registered metadata: {', '.join(self.keys())})"

    __repr__ = __str__


MetadataCatalog = _MetadataCatalog()
"""The global metadata catalog (see :class:`_MetadataCatalog`)."""
