"""Python ("lazy") configs built on omegaconf: :class:`LazyCall` and :class:`LazyConfig`.

A lazy config describes objects as ``DictConfig`` trees with a ``_target_`` (what to call)
and the keyword arguments; nothing is built until :func:`~d2engine.config.instantiate`.
Config files are ordinary Python files (or YAML files saved by :meth:`LazyConfig.save`);
a Python config may import from other config files with relative imports::

    # configs/mlp.py
    from d2engine.config import LazyCall as L
    from .common import optimizer          # another config file next to this one
    model = L("torch.nn.Linear")(in_features=64, out_features=10)

Loading a Python config executes it, as importing a module would: load only files you trust.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import os
import threading
import types
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from .instantiate import target_to_string

__all__ = ["LazyCall", "LazyConfig"]

_TARGET_KEY = "_target_"
_CFG_PACKAGE_NAME = "d2engine._cfg_loader"
_PY_SUFFIXES = (".py",)
_YAML_SUFFIXES = (".yaml", ".yml")
_import_lock = threading.RLock()
_loading: list[str] = []  # real paths of the config files being executed (cycle detection)


class LazyCall:
    """Describe a call without making it: ``LazyCall(f)(x=1)`` is a config for ``f(x=1)``.

    The result is a ``DictConfig`` ``{"_target_": f, "x": 1}`` that can be edited like any
    config and built with :func:`~d2engine.config.instantiate`::

        from d2engine.config import LazyCall as L, instantiate
        opt = L(torch.optim.SGD)(params=None, lr=0.1)
        opt.lr = 0.05
        optimizer = instantiate(opt)  # after setting opt.params

    Args:
        target: a callable, or the import path of one (``"torch.optim.SGD"``).

    Raises:
        TypeError: if ``target`` is neither callable nor a string.
    """

    def __init__(self, target: Callable[..., Any] | str) -> None:
        if not (callable(target) or isinstance(target, str)):
            raise TypeError(
                f"LazyCall target must be a callable or an import path string, got "
                f"{type(target).__name__} ({target!r}). Example: LazyCall(torch.nn.Linear) or "
                "LazyCall('torch.nn.Linear')."
            )
        self._target = target

    def __call__(self, **kwargs: Any) -> DictConfig:
        """Return the config of a call to the target with ``kwargs``.

        Args:
            **kwargs: the keyword arguments (may themselves be lazy calls).

        Returns:
            A ``DictConfig`` with ``_target_`` and the arguments.

        Raises:
            TypeError: if ``_target_`` is passed as an argument.
        """
        if _TARGET_KEY in kwargs:
            raise TypeError(
                f"LazyCall(...)() got a {_TARGET_KEY!r} argument; the target is given to "
                "LazyCall itself."
            )
        target: Any = self._target
        if isinstance(target, type) and (
            dataclasses.is_dataclass(target) or issubclass(target, (dict, list, tuple))
        ):
            # omegaconf turns a dataclass type into a structured config and refuses container
            # types (dict, OrderedDict, list...) as values: store these targets by name.
            target = target_to_string(target)
        return DictConfig(content={_TARGET_KEY: target, **kwargs}, flags={"allow_objects": True})

    def __repr__(self) -> str:
        return f"LazyCall({self._target!r})"


def _cast_to_config(obj: Any) -> Any:
    """Turn plain dicts / lists into omegaconf containers that may hold any object."""
    if isinstance(obj, dict):
        return DictConfig(obj, flags={"allow_objects": True})
    if isinstance(obj, list):
        return ListConfig(obj, flags={"allow_objects": True})
    return obj


def _check_suffix(filename: str) -> str:
    ext = os.path.splitext(filename)[1].lower()
    if ext not in _PY_SUFFIXES + _YAML_SUFFIXES:
        raise ValueError(
            f"LazyConfig loads .py, .yaml or .yml files, got {filename!r}. Rename the file or, for "
            "a yacs-style YAML config, use get_cfg().merge_from_file()."
        )
    return ext


def _module_package() -> str:
    # A unique, never-importable package name marks the globals of a config file so that our
    # import hook recognises relative imports made from it.
    return f"{_CFG_PACKAGE_NAME}.c{uuid.uuid4().hex}"


def _exec_config_file(filename: str) -> dict[str, Any]:
    """Execute a Python config file and return its global namespace."""
    real = os.path.realpath(filename)
    if real in _loading:
        chain = " -> ".join([*_loading[_loading.index(real) :], real])
        raise ImportError(f"Config files import each other in a cycle: {chain}.")
    with open(filename, encoding="utf-8") as f:
        source = f.read()
    package = _module_package()
    namespace: dict[str, Any] = {
        "__file__": filename,
        "__name__": package + ".config",
        "__package__": package,
    }
    code = compile(source, filename, "exec")
    _loading.append(real)
    try:
        exec(code, namespace)  # executing the user's own config file is the point
    finally:
        _loading.pop()
    return namespace


def _load_relative(path: str) -> types.ModuleType:
    """Load the config file (or directory of config files) ``path`` refers to, as a module."""
    module = types.ModuleType(_module_package() + ".module")
    if os.path.isfile(path + ".py"):
        module.__file__ = path + ".py"
        namespace = _exec_config_file(path + ".py")
        for name, value in namespace.items():
            if not name.startswith("__"):
                setattr(module, name, _cast_to_config(value))
        return module
    if os.path.isdir(path):
        module.__path__ = [path]  # type: ignore[attr-defined]
        return module
    raise ImportError(f"Config import failed: neither {path}.py nor a directory {path} exists.")


@contextmanager
def _patch_import() -> Iterator[None]:
    """Let config files import other config files with relative imports while loading."""
    original_import = builtins.__import__

    def config_import(
        name: str,
        globals: Mapping[str, Any] | None = None,  # the builtin's parameter names
        locals: Mapping[str, Any] | None = None,
        fromlist: Sequence[str] | None = (),
        level: int = 0,
    ) -> Any:
        package = (globals or {}).get("__package__") or ""
        if level == 0 or not package.startswith(_CFG_PACKAGE_NAME + "."):
            return original_import(name, globals, locals, fromlist, level)
        base_dir = os.path.dirname(os.path.abspath(globals["__file__"]))  # type: ignore[index]
        for _ in range(level - 1):
            base_dir = os.path.dirname(base_dir)
        target = os.path.join(base_dir, *name.split(".")) if name else base_dir
        module = _load_relative(target) if name else types.ModuleType(package + ".dir")
        for item in fromlist or ():
            if item == "*":
                raise ImportError(
                    f"'from .{name} import *' is not supported in config files "
                    f"({globals['__file__']}); import names explicitly."  # type: ignore[index]
                )
            if hasattr(module, item):
                continue
            if getattr(module, "__file__", None):
                raise ImportError(
                    f"Cannot import name {item!r} from config file {module.__file__}: it defines "
                    f"no such top-level name."
                )
            setattr(module, item, _load_relative(os.path.join(target, item)))
        return module

    with _import_lock:
        builtins.__import__ = config_import
        try:
            yield
        finally:
            builtins.__import__ = original_import


class LazyConfig:
    """Load, save and override lazy configs (Python or YAML files of ``DictConfig`` trees)."""

    @staticmethod
    def load(filename: str, keys: str | Sequence[str] | None = None) -> Any:
        """Load a lazy config file.

        A ``.py`` file is executed (relative imports of sibling config files work) and its
        public top-level dicts, lists and configs form the result; a ``.yaml``/``.yml`` file
        is read with omegaconf's safe loader.

        Args:
            filename: path of the config file.
            keys: return only this top-level key (a string), or a tuple of the values of
                these keys (a sequence); None returns the whole config.

        Returns:
            A ``DictConfig`` (or the selected value(s)).

        Raises:
            ValueError: for an unsupported file type, or a YAML tag that would build a Python
                object (refused, never executed).
            FileNotFoundError: if the file does not exist.
            KeyError: if a requested key is not in the config.
        """
        filename = os.fspath(filename).replace("/./", "/")
        ext = _check_suffix(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"Lazy config file {filename!r} does not exist.")
        if ext in _PY_SUFFIXES:
            with _patch_import():
                namespace = _exec_config_file(filename)
            content = {
                name: _cast_to_config(value)
                for name, value in namespace.items()
                if not name.startswith("_")
                and isinstance(value, (DictConfig, ListConfig, dict, list))
            }
            cfg = DictConfig(content, flags={"allow_objects": True})
        else:
            try:
                loaded = OmegaConf.load(filename)
            except yaml.constructor.ConstructorError as e:
                raise ValueError(
                    f"Refusing to load {filename}: it contains a YAML tag that is not plain data "
                    f"({e.problem}). YAML configs are read with a safe loader that never builds "
                    "Python objects; describe objects with _target_ entries instead."
                ) from None
            if not isinstance(loaded, DictConfig):
                raise ValueError(
                    f"Lazy config {filename} must hold a mapping at the top level, got a list."
                )
            cfg = DictConfig(
                OmegaConf.to_container(loaded, resolve=False), flags={"allow_objects": True}
            )
        if keys is None:
            return cfg
        if isinstance(keys, str):
            return LazyConfig._select(cfg, keys, filename)
        return tuple(LazyConfig._select(cfg, key, filename) for key in keys)

    @staticmethod
    def _select(cfg: DictConfig, key: str, filename: str) -> Any:
        if key not in cfg:
            raise KeyError(f"{filename} has no top-level key {key!r}; it has {sorted(cfg)}.")
        return cfg[key]

    @staticmethod
    def load_rel(filename: str, keys: str | Sequence[str] | None = None) -> Any:
        """Like :meth:`load`, with ``filename`` relative to the file of the caller.

        Args:
            filename: path relative to the directory of the calling file.
            keys: as in :meth:`load`.

        Returns:
            As in :meth:`load`.
        """
        frame = inspect.currentframe()
        caller_file = frame.f_back.f_code.co_filename if frame and frame.f_back else "<unknown>"
        del frame  # frames hold references to their locals
        if caller_file.startswith("<"):
            raise ValueError("LazyConfig.load_rel must be called from a file; use load() instead.")
        return LazyConfig.load(os.path.join(os.path.dirname(caller_file), filename), keys)

    @staticmethod
    def save(cfg: DictConfig | Mapping[str, Any], filename: str) -> None:
        """Save a lazy config as YAML (``LazyConfig.load`` reads it back).

        Callable ``_target_`` values are written as import paths. Any other value must be
        plain data (numbers, strings, booleans, None, lists, dicts).

        Args:
            cfg: the config.
            filename: the ``.yaml`` file to write.

        Raises:
            ValueError: naming the key of a value that YAML cannot hold, or of a
                ``_target_`` that cannot be written as an import path.
        """
        if not isinstance(cfg, DictConfig):
            cfg = DictConfig(cfg, flags={"allow_objects": True})
        container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
        plain = _to_yaml_data(container, "cfg")
        text = yaml.safe_dump(plain, default_flow_style=False, allow_unicode=True, sort_keys=False)
        directory = os.path.dirname(filename)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(filename, "w", encoding="utf-8") as f:
            f.write(text)

    @staticmethod
    def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
        """Apply command-line style overrides ``["a.b=1", "c.d=[1, 2]", "e=foo"]`` in place.

        Values are parsed as Python literals (numbers, strings, lists, tuples, dicts, True /
        False / None); ``true`` / ``false`` / ``null`` work as well, and anything else is kept as
        a string. A key may add a new entry under an existing config node.

        Args:
            cfg: the config to change.
            overrides: the ``key=value`` strings.

        Returns:
            ``cfg``, for chaining.

        Raises:
            ValueError: for an override without ``=`` or with an empty key.
            KeyError: if a parent of the key is a plain value rather than a config node.
        """
        if isinstance(overrides, str):
            raise TypeError(
                f"apply_overrides takes a list of 'key=value' strings, got one string "
                f"{overrides!r}; wrap it in a list."
            )
        for override in overrides:
            key, sep, raw = override.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(
                    f"Override {override!r} must have the form key=value, e.g. "
                    "'train.max_iter=1000' or 'model.num_classes=10'."
                )
            parts = key.split(".")
            for depth in range(1, len(parts)):
                prefix = ".".join(parts[:depth])
                node = OmegaConf.select(cfg, prefix, default=None)
                if node is None:
                    break
                if not OmegaConf.is_config(node):
                    raise KeyError(
                        f"Cannot apply override {override!r}: {prefix} is a "
                        f"{type(node).__name__} ({node!r}), not a config node with keys."
                    )
            OmegaConf.update(cfg, key, _parse_override_value(raw.strip()), merge=True)
        return cfg


_WORDS = {"true": True, "false": False, "null": None, "none": None}


def _parse_override_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _WORDS.get(text.lower(), text)


def _to_yaml_data(value: Any, path: str) -> Any:
    """Check (and convert) a container so that ``yaml.safe_dump`` can write it."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if key == _TARGET_KEY and not isinstance(item, str):
                try:
                    out[key] = target_to_string(item)
                except ValueError as e:
                    raise ValueError(f"Cannot save {path}.{key}: {e}") from None
            else:
                out[str(key)] = _to_yaml_data(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_yaml_data(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(
        f"Cannot save {path} as YAML: it holds a {type(value).__name__} object ({value!r:.80}). "
        "Keep configs to plain data and LazyCall(...) descriptions, and build objects with "
        "instantiate() when they are needed."
    )
