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
import contextlib
import dataclasses
import inspect
import logging
import os
import pickle
import shutil
import threading
import types
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ._pyformat import config_to_py
from .cfg_node import check_yaml_size
from .instantiate import target_to_string

__all__ = ["LazyCall", "LazyConfig"]

logger = logging.getLogger(__name__)

_TARGET_KEY = "_target_"
_CFG_PACKAGE_NAME = "d2engine._cfg_loader"
_PY_SUFFIXES = (".py",)
_YAML_SUFFIXES = (".yaml", ".yml")
_import_lock = threading.RLock()
_loading: list[str] = []  # real paths of the config files being executed (cycle detection)
# Module name given to each executed config file -> (its path, the files of the same top-level
# load). Objects defined in a config file carry that module name in ``__module__``, which is how
# LazyConfig.save finds the file(s) to keep a copy of when such an object cannot be written.
_config_modules: dict[str, tuple[str, list[str]]] = {}
_current_group: list[list[str]] = []  # the file list of each load in progress (innermost last)
_in_load_rel = False  # LazyConfig.load is being called by LazyConfig.load_rel


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
        content: dict[str, Any] = {_TARGET_KEY: target, **kwargs}
        return DictConfig(content=content, flags={"allow_objects": True})

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
    group = _current_group[-1] if _current_group else [real]
    if real not in group:
        group.append(real)
    _config_modules[namespace["__name__"]] = (real, group)
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
        module.__path__ = [path]
        return module
    raise ImportError(
        f"Cannot resolve a relative import in a config file: {path}.py does not exist, nor a "
        f"directory {path}. HINT: relative imports in config files name other config files "
        "(from .common.optim import optimizer); check the path."
    )


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
            keys: return only the value of this top-level variable (a string), or a tuple of
                the values of these variables (a sequence); None returns the whole config,
                which holds the public top-level dicts, lists and configs. A key may name any
                top-level variable of a Python config, a string or number too.

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
            # A load starts a new group of files (the config file and those it imports
            # relatively), except a load_rel, which is a relative import by name.
            new_group = not (_loading and _in_load_rel)
            if new_group:
                _current_group.append([])
            try:
                with _patch_import():
                    namespace = _exec_config_file(filename)
            finally:
                if new_group:
                    _current_group.pop()
            if keys is not None:
                # As in detectron2, keys may name any top-level variable (a string too).
                return LazyConfig._select(namespace, keys, filename)
            content = {
                name: _cast_to_config(value)
                for name, value in namespace.items()
                if not name.startswith("_")
                and isinstance(value, (DictConfig, ListConfig, dict, list))
            }
            return DictConfig(content, flags={"allow_objects": True})
        try:
            with open(filename, encoding="utf-8") as f:
                check_yaml_size(f, filename)  # bounds what aliases expand to
            loaded = OmegaConf.load(filename)
        except yaml.constructor.ConstructorError as e:
            if "tag" not in str(e.problem):  # omegaconf's own bound on alias expansion
                raise ValueError(
                    f"Refusing to load {filename}: its YAML aliases expand to too many values "
                    f"({e.problem}). HINT: write the values out, or use a Python config."
                ) from None
            raise ValueError(
                f"Refusing to load {filename}: it contains a YAML tag that is not plain data "
                f"({e.problem}). YAML configs are read with a safe loader, which builds no "
                "Python object from a tag; describe objects with _target_ entries, which "
                "instantiate() calls (a config is code: load only configs you trust)."
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
        return LazyConfig._select(cfg, keys, filename)

    @staticmethod
    def _select(namespace: Mapping[str, Any], keys: str | Sequence[str], filename: str) -> Any:
        def one(key: str) -> Any:
            if key not in namespace:
                names = sorted(k for k in namespace if not str(k).startswith("__"))
                raise KeyError(f"{filename} has no top-level key {key!r}; it has {names}.")
            return _cast_to_config(namespace[key])

        if isinstance(keys, str):
            return one(keys)
        return tuple(one(key) for key in keys)

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
        global _in_load_rel
        outer, _in_load_rel = _in_load_rel, True
        try:
            return LazyConfig.load(os.path.join(os.path.dirname(caller_file), filename), keys)
        finally:
            _in_load_rel = outer

    @staticmethod
    def save(cfg: DictConfig | Mapping[str, Any], filename: str) -> None:
        """Save a lazy config as YAML (``LazyConfig.load`` reads it back); never fails on a value.

        Callable ``_target_`` values are written as import paths, classes and functions given as
        argument values as ``{_target_: d2engine.config.locate, name: <import path>}`` (which
        :func:`~d2engine.config.instantiate` turns back into the object), plain data as is.

        A value that YAML cannot hold (an object, a lambda, a class defined in the config file
        itself...) does not stop the save: the YAML gets a ``"<not saved: ...>"`` placeholder in
        its place, the config files that define such objects are copied into the folder
        ``<name>_sources/`` next to ``filename``, the whole config is also pickled to
        ``filename + ".pkl"`` when it can be (with cloudpickle if installed: an optional
        dependency), and one warning lists each unsaved key and why.

        Args:
            cfg: the config.
            filename: the ``.yaml`` file to write.
        """
        if not isinstance(cfg, DictConfig):
            cfg = DictConfig(cfg, flags={"allow_objects": True})
        container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
        unsaved: list[tuple[str, Any, str]] = []
        plain = _to_yaml_data(container, "cfg", unsaved)
        text = yaml.safe_dump(plain, default_flow_style=False, allow_unicode=True, sort_keys=False)
        directory = os.path.dirname(filename)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(filename, "w", encoding="utf-8") as f:
            f.write(text)
        if unsaved:
            _save_what_yaml_cannot_hold(cfg, filename, unsaved)

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

    @staticmethod
    def to_py(cfg: DictConfig | Mapping[str, Any], prefix: str = "cfg.") -> str:
        """Render a config as Python-like text, for people to read (not meant to be executed).

        Each top-level leaf becomes one assignment (``cfg.train.max_iter = 100``), a
        ``_target_`` mapping a call (``torch.nn.Linear(in_features=4, out_features=2)``); keys
        are sorted, interpolations resolved where they can be, and long lines split as the
        black formatter would.

        Args:
            cfg: the config.
            prefix: the name the assignments start with (default ``"cfg."``).

        Returns:
            The text, ending with a newline.
        """
        if not isinstance(cfg, DictConfig):
            cfg = DictConfig(cfg, flags={"allow_objects": True})
        try:
            container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        except (
            OmegaConfBaseException
        ):  # an interpolation that cannot be resolved: keep it as written
            container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
        return config_to_py(container, prefix)


_WORDS = {"true": True, "false": False, "null": None, "none": None}


def _parse_override_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _WORDS.get(text.lower(), text)


def _to_yaml_data(value: Any, path: str, unsaved: list[tuple[str, Any, str]]) -> Any:
    """Convert a container for ``yaml.safe_dump``; what it cannot hold becomes a placeholder.

    Each placeholder is recorded in ``unsaved`` as (key path, value, reason).
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == _TARGET_KEY and not isinstance(item, str):
                try:
                    out[key] = target_to_string(item)
                except ValueError as e:
                    out[key] = _placeholder(f"{path}.{key}", item, str(e), unsaved)
            else:
                out[str(key)] = _to_yaml_data(item, f"{path}.{key}", unsaved)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_yaml_data(item, f"{path}[{i}]", unsaved) for i, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
        try:
            return {_TARGET_KEY: _LOCATE, "name": target_to_string(value)}
        except ValueError as e:
            return _placeholder(path, value, str(e), unsaved)
    return _placeholder(
        path,
        value,
        f"YAML holds plain data and LazyCall descriptions, not a {type(value).__name__} object",
        unsaved,
    )


_LOCATE = "d2engine.config.locate"


def _placeholder(path: str, value: Any, reason: str, unsaved: list[tuple[str, Any, str]]) -> str:
    unsaved.append((path, value, reason))
    return f"<not saved: {type(value).__name__} {value!r:.60}>"


def _defining_files(value: Any) -> list[str]:
    """The config files loaded together with the one that defines ``value`` (or its class).

    The first is the top-level file of that load.
    """
    module = getattr(value, "__module__", None) or type(value).__module__  # instances: the class's
    entry = _config_modules.get(module if isinstance(module, str) else "")
    return list(entry[1]) if entry else []


def _copy_sources(groups: list[list[str]], folder: str) -> None:
    """Copy the files of each load (a config file and the files it imports relatively or with
    ``load_rel``), keeping their layout so that relative imports work in the copy."""
    for group in groups:
        root = os.path.commonpath([os.path.dirname(f) for f in group])
        for source in group:
            target = os.path.join(folder, os.path.relpath(source, root))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)


def _save_what_yaml_cannot_hold(
    cfg: DictConfig, filename: str, unsaved: list[tuple[str, Any, str]]
) -> None:
    """Copy the defining config files and pickle the config; warn once about the unsaved keys."""
    groups: list[list[str]] = []
    for _, value, _ in unsaved:
        group = _defining_files(value)
        if group and group not in groups:
            groups.append(group)
    notes: list[str] = []
    if groups:
        folder = os.path.splitext(filename)[0] + "_sources"
        _copy_sources(groups, folder)
        notes.append(f"the config file(s) defining them are copied to {folder}/")
    try:
        try:  # optional dependency: pickles lambdas and classes defined in config files
            import cloudpickle as pickler  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            pickler = pickle
        with open(filename + ".pkl", "wb") as f:
            pickler.dump(cfg, f)
        notes.append(f"the whole config is pickled to {filename}.pkl")
    except Exception as e:  # any pickling error: the YAML and the copies are what we keep
        with contextlib.suppress(OSError):
            os.remove(filename + ".pkl")
        notes.append(
            f"it could not be pickled either ({type(e).__name__}: {e}; installing cloudpickle "
            "helps)"
        )
    lines = "\n".join(f"  {path}: {reason}" for path, _, reason in unsaved)
    logger.warning(
        f"LazyConfig.save wrote {filename} with placeholders for {len(unsaved)} value(s) that YAML "
        f"cannot hold:\n{lines}\nLoading that file gives the placeholders back as strings; "
        + "; ".join(notes)
        + "."
    )
