"""The config tree: :class:`CfgNode`, its errors and the safe YAML loader behind it.

A :class:`CfgNode` is a ``dict`` whose keys can also be read and written as attributes
(``cfg.SOLVER.BASE_LR``). Merging (from a YAML file, a list of overrides or another config)
checks every key and every type against the values already present, so that a typo or a wrong
value fails loudly instead of being ignored.

YAML files are read with a *safe* loader: a tag that would build a Python object
(``!!python/object/apply:...``) is refused before anything is executed, and so is a document whose
aliases (``&anchor`` / ``*alias``) expand it to more than :data:`MAX_YAML_VALUES` values or refer to
themselves (:func:`check_yaml_size`), before it is built. Safe loading is not a sandbox: a config
still decides what a training job does (see "Security" in the README).

This module is the leaf of :mod:`d2engine.config`: it imports nothing else of the package, so
the defaults (:mod:`d2engine.config.defaults`), ``@configurable`` and the detectron2-compatible
face :mod:`d2engine.config.config` can all build on it. Users import these names from
``d2engine.config`` (or ``d2engine.config.config``, as in detectron2).
"""

from __future__ import annotations

import ast
import copy
import difflib
import io
import os
from collections.abc import Mapping
from typing import IO, Any

import fsspec
import yaml

__all__ = [
    "BASE_KEY",
    "MAX_YAML_VALUES",
    "CfgNode",
    "ConfigKeyError",
    "ConfigTypeError",
    "FrozenConfigError",
    "check_yaml_size",
]

#: The key through which a YAML file names the file(s) it inherits from.
BASE_KEY = "_BASE_"

#: The most values (scalars, lists and mappings) a YAML config may expand to through its aliases.
MAX_YAML_VALUES = 1_000_000

# Value types a config leaf may hold (besides a nested CfgNode).
_VALID_TYPES = (tuple, list, str, int, float, bool, type(None))


class ConfigKeyError(KeyError):
    """A key that does not exist in the config (or may not be created there).

    It is a ``KeyError`` whose message prints as written (``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(TypeError, ValueError):
    """A value whose type does not match the default value of its key.

    Subclasses both ``TypeError`` and ``ValueError`` (yacs raised ``ValueError``).
    """


class FrozenConfigError(AttributeError):
    """An attempt to change a frozen :class:`CfgNode`."""


def _rebuild_node(
    cls: type[CfgNode], items: dict, frozen: bool, new_allowed: bool, path: tuple[str, ...] = ()
) -> CfgNode:
    """Unpickle a :class:`CfgNode` (items first, then the flags, so frozen nodes load).

    ``path`` (the node's dotted key path, for error messages) is absent from pickles written by
    d2engine 0.1.0.
    """
    node = cls.__new__(cls)
    object.__setattr__(node, "_frozen", False)
    object.__setattr__(node, "_new_allowed", new_allowed)
    object.__setattr__(node, "_path", tuple(path))
    dict.update(node, items)
    object.__setattr__(node, "_frozen", frozen)
    return node


def _decode_value(value: Any) -> Any:
    """Turn a string into the Python literal it spells, or keep it as a string.

    ``"0.1"`` becomes ``0.1``, ``"(1, 2)"`` a tuple, ``"True"`` a bool, ``"None"`` None;
    anything that is not a literal (``"cpu"``, ``"./output"``) stays a string.
    """
    if isinstance(value, Mapping):
        return CfgNode(value)
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def _coerce(original: Any, replacement: Any, raw: Any, full_key: str) -> Any:
    """Check ``replacement`` against the default ``original`` and cast it where that is safe.

    Args:
        original: the value currently in the config (the default's type is authoritative).
        replacement: the decoded new value.
        raw: the value as given, before literal decoding (kept when the default is a string).
        full_key: dotted key, for the error message.

    Returns:
        The value to store.

    Raises:
        ConfigTypeError: if the types are incompatible.
    """
    if isinstance(original, str) and isinstance(raw, str):
        # A string key keeps the text as written: MODEL.WEIGHTS "123" stays "123".
        return raw
    original_type, replacement_type = type(original), type(replacement)
    if replacement_type is original_type:
        return replacement
    if original is None or replacement is None:
        return replacement
    if original_type in (list, tuple) and replacement_type in (list, tuple):
        return original_type(replacement)
    if original_type is float and replacement_type is int:
        return float(replacement)
    hint = ""
    if original_type in (list, tuple) and isinstance(replacement, str):
        hint = f" Write a sequence instead, e.g. {full_key} \"('{replacement}',)\"."
    elif original_type is bool and replacement_type is str:
        hint = " Write True or False."
    raise ConfigTypeError(
        f"Type mismatch for config key {full_key}: the default is {original_type.__name__} "
        f"({original!r}), got {replacement_type.__name__} ({replacement!r}).{hint}"
    )


def _open_text(path: str) -> io.TextIOBase:
    """Open a local file, or a URL-like path (``s3://``, ``memory://``...) through fsspec."""
    if "://" in path:
        return fsspec.open(path, "r", encoding="utf-8").open()
    return open(path, encoding="utf-8")


def _resolve_base(base: str, including_file: str) -> str:
    """Return the path of a ``_BASE_`` entry, relative to the directory of the including file."""
    base = os.path.expanduser(base)
    if "://" in base or os.path.isabs(base):
        return base
    if "://" in including_file:
        return including_file.rsplit("/", 1)[0] + "/" + base
    return os.path.normpath(os.path.join(os.path.dirname(including_file), base))


def _merge_dicts(base: dict, override: Mapping) -> dict:
    """Recursively merge ``override`` into (a copy of) ``base``; ``override`` wins."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge_dicts(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


class CfgNode(dict):
    """A config tree node: a ``dict`` with attribute access, freezing and checked merging.

    Nested dicts become ``CfgNode`` objects. ``freeze()`` makes the whole tree read-only;
    merging (from a YAML file, a list of overrides or another config) rejects keys that are
    not already present unless the node was created with ``new_allowed=True``, and checks
    that every new value has the type of the value it replaces.

    Example::

        cfg = get_cfg()
        cfg.merge_from_file("configs/digits/convnet.yaml")
        cfg.merge_from_list(["SOLVER.BASE_LR", "0.05", "SOLVER.STEPS", "(300, 400)"])
        cfg.freeze()
    """

    _frozen: bool
    _new_allowed: bool
    _path: tuple[str, ...]  # the dotted key path of this node in its tree, for error messages

    def __init__(
        self,
        init_dict: Mapping[str, Any] | None = None,
        key_list: list[str] | None = None,
        new_allowed: bool = False,
    ) -> None:
        """Create a node.

        Args:
            init_dict: initial content; nested mappings become ``CfgNode`` objects.
            key_list: the dotted path of this node, used only in error messages.
            new_allowed: whether merging may add keys that this node does not have yet
                (applies to this node and the nodes created from ``init_dict``).

        Raises:
            ConfigTypeError: if a value is not one of the supported types.
        """
        object.__setattr__(self, "_frozen", False)
        object.__setattr__(self, "_new_allowed", new_allowed)
        key_list = list(key_list or [])
        object.__setattr__(self, "_path", tuple(key_list))
        super().__init__()
        for key, value in (init_dict or {}).items():
            if isinstance(value, Mapping) and not isinstance(value, CfgNode):
                value = type(self)(value, key_list + [str(key)], new_allowed=new_allowed)
            _check_value_type(value, ".".join(key_list + [str(key)]))
            self[key] = value

    # ----------------------------------------------------------------- attribute access
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            if name.startswith("__"):
                raise AttributeError(name) from None
            close = difflib.get_close_matches(name, [str(k) for k in self], n=3)
            hint = f" Did you mean: {', '.join(self._full_key(c) for c in close)}?" if close else ""
            raise AttributeError(
                f"Config has no key {self._full_key(name)!r}.{hint} HINT: a key that a script "
                "reads must exist in the defaults (get_cfg()) or be added before use, e.g. by "
                "the project's add_*_config(cfg) function."
            ) from None

    def _full_key(self, name: str) -> str:
        """The dotted path of key ``name`` of this node, from the root of its tree."""
        return ".".join((*self.__dict__.get("_path", ()), name))

    def _set_path(self, path: tuple[str, ...]) -> None:
        object.__setattr__(self, "_path", path)
        for key, value in self.items():
            if isinstance(value, CfgNode):
                value._set_path((*path, str(key)))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_frozen", "_new_allowed", "_path"):
            raise AttributeError(
                f"{name!r} is internal state of CfgNode; use freeze()/defrost()/set_new_allowed()."
            )
        self[name] = value

    def __delattr__(self, name: str) -> None:
        self._check_mutable(name)
        try:
            dict.__delitem__(self, name)
        except KeyError:
            raise AttributeError(f"Config has no key {self._full_key(name)!r}.") from None

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_mutable(key)
        if isinstance(value, Mapping) and not isinstance(value, CfgNode):
            value = type(self)(value, [str(key)], new_allowed=self._new_allowed)
        _check_value_type(value, self._full_key(str(key)))
        if isinstance(value, CfgNode):
            value._set_path((*self.__dict__.get("_path", ()), str(key)))
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._check_mutable(key)
        dict.__delitem__(self, key)

    def _check_mutable(self, key: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise FrozenConfigError(
                f"Cannot set or delete config key {key!r}: the config is frozen (immutable). "
                "Call cfg.defrost() first, or change a copy made with cfg.clone()."
            )

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Set several keys, with the same checks as item assignment."""
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        """Return ``self[key]``, setting it to ``default`` first if missing."""
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key: str, *default: Any) -> Any:
        """Remove ``key`` and return its value (refused on a frozen config)."""
        self._check_mutable(key)
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the last item (refused on a frozen config)."""
        self._check_mutable("<popitem>")
        return dict.popitem(self)

    def clear(self) -> None:
        """Remove every key (refused on a frozen config)."""
        self._check_mutable("<clear>")
        dict.clear(self)

    # ---------------------------------------------------------------------- copying
    def __reduce__(self) -> tuple:
        return (
            _rebuild_node,
            (type(self), dict(self), self._frozen, self._new_allowed, self._path),
        )

    def __copy__(self) -> CfgNode:
        return _rebuild_node(type(self), dict(self), self._frozen, self._new_allowed, self._path)

    def __deepcopy__(self, memo: dict) -> CfgNode:
        items = {key: copy.deepcopy(value, memo) for key, value in self.items()}
        node = _rebuild_node(type(self), items, self._frozen, self._new_allowed, self._path)
        memo[id(self)] = node
        return node

    def clone(self) -> CfgNode:
        """Return a deep copy (frozen if this node is frozen)."""
        return copy.deepcopy(self)

    # ------------------------------------------------------------------- freezing
    def freeze(self) -> None:
        """Make this node and every node below it immutable."""
        self._set_frozen(True)

    def defrost(self) -> None:
        """Make this node and every node below it mutable again."""
        self._set_frozen(False)

    def is_frozen(self) -> bool:
        """Return whether the node is frozen."""
        return self._frozen

    def _set_frozen(self, frozen: bool) -> None:
        object.__setattr__(self, "_frozen", frozen)
        for value in self.values():
            if isinstance(value, CfgNode):
                value._set_frozen(frozen)

    def set_new_allowed(self, is_new_allowed: bool) -> None:
        """Allow or forbid merging new keys into this node and every node below it."""
        object.__setattr__(self, "_new_allowed", is_new_allowed)
        for value in self.values():
            if isinstance(value, CfgNode):
                value.set_new_allowed(is_new_allowed)

    def is_new_allowed(self) -> bool:
        """Return whether merging may add keys to this node."""
        return self._new_allowed

    # -------------------------------------------------------------------- merging
    @classmethod
    def load_yaml_with_base(cls, filename: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a YAML config file and everything it inherits through ``_BASE_``.

        ``_BASE_`` holds a path or a list of paths, relative to the directory of the file
        that names them (absolute paths and ``~`` work too). Bases are merged in order, later
        ones overriding earlier ones, and the file's own keys override all of them.

        Args:
            filename: path of the YAML file.

        Returns:
            The merged content as plain dicts (no ``_BASE_`` key left).

        Raises:
            ValueError: if the inheritance forms a cycle, a file is not a mapping, or a file
                contains a tag that would build a Python object.
            FileNotFoundError: if a file (or a base) does not exist.
        """
        return _load_yaml_with_base(os.fspath(filename), ())

    def merge_from_file(self, cfg_filename: str | os.PathLike[str]) -> None:
        """Merge a YAML config file (and its ``_BASE_`` files) into this config.

        Args:
            cfg_filename: path of the YAML file.

        Raises:
            ConfigKeyError: for a key that the defaults do not have.
            ConfigTypeError: for a value whose type differs from the default's.
            FrozenConfigError: if the config is frozen.
            ValueError: for an unsafe tag, a ``_BASE_`` cycle or an unsupported ``VERSION``.
        """
        cfg_filename = os.fspath(cfg_filename)
        loaded = self.load_yaml_with_base(cfg_filename)
        version = loaded.get("VERSION")
        if version is not None and "VERSION" in self and version != self["VERSION"]:
            raise ValueError(
                f"{cfg_filename} declares config VERSION {version!r}, but d2engine reads VERSION "
                f"{self['VERSION']!r} (detectron2's current format). Update the file's keys to "
                f"the current names and set VERSION: {self['VERSION']!r}."
            )
        self._merge(loaded, (), source=f" (from {cfg_filename})")

    def merge_from_other_cfg(self, cfg_other: Mapping[str, Any]) -> None:
        """Merge another config (a ``CfgNode`` or a plain mapping) into this one.

        Args:
            cfg_other: the config whose values override this one's.

        Raises:
            ConfigKeyError: for a key that this config does not have.
            ConfigTypeError: for a value whose type differs from this config's.
            FrozenConfigError: if the config is frozen.
        """
        self._merge(cfg_other, ())

    def merge_from_list(self, cfg_list: list[Any] | tuple[Any, ...]) -> None:
        """Merge ``[key1, value1, key2, value2, ...]`` overrides, e.g. from the command line.

        Keys are dotted (``"SOLVER.BASE_LR"``); string values are parsed as Python literals
        (``"0.1"``, ``"(3, 4)"``, ``"[1, 2]"``, ``"True"``, ``"None"``) and otherwise kept as
        strings. An int may replace a float, a list a tuple and vice versa (cast to the
        default's type); a string key keeps the text as given.

        Args:
            cfg_list: alternating keys and values.

        Raises:
            ValueError: if the list has an odd length.
            ConfigKeyError: for a key that the defaults do not have.
            ConfigTypeError: for a value whose type differs from the default's.
            FrozenConfigError: if the config is frozen.
        """
        cfg_list = list(cfg_list)
        if len(cfg_list) % 2 != 0:
            raise ValueError(
                f"Override list must hold key/value pairs, got an odd number of items "
                f"({len(cfg_list)}): {cfg_list}. Give every key a value, e.g. "
                "['SOLVER.BASE_LR', '0.1', 'OUTPUT_DIR', './out']."
            )
        for full_key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
            if not isinstance(full_key, str) or not full_key:
                raise ConfigKeyError(
                    f"Override keys must be non-empty dotted strings like 'SOLVER.BASE_LR', "
                    f"got {full_key!r}."
                )
            *parents, leaf = full_key.split(".")
            node = self
            for depth, part in enumerate(parents):
                child = node.get(part) if part in node else None
                if not isinstance(child, CfgNode):
                    raise self._unknown_key(".".join(parents[: depth + 1]), full_key)
                node = child
            node._set_checked(leaf, raw, parents, source="")

    def _merge(self, other: Mapping[str, Any], key_list: tuple[str, ...], source: str = "") -> None:
        """Merge ``other`` into this node; ``key_list`` is this node's dotted path."""
        for key, value in other.items():
            self._set_checked(str(key), value, list(key_list), source)

    def _set_checked(self, key: str, raw: Any, key_list: list[str], source: str) -> None:
        """Set one key (merging sub-trees) after checking that it exists and its type."""
        full_key = ".".join([*key_list, key])
        self._check_mutable(full_key)
        if key not in self:
            if not self._new_allowed:
                raise self._root_unknown_key(full_key, source)
            value = _decode_value(raw)
            if isinstance(value, CfgNode):
                value.set_new_allowed(True)
            self[key] = value
            return
        current = self[key]
        if isinstance(current, CfgNode):
            if isinstance(raw, str):
                raw = _decode_value(raw)
            if not isinstance(raw, Mapping):
                names = [str(k) for k in current]
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise ConfigTypeError(
                    f"Config key {full_key} is a group of keys ({shown}); "
                    f"it cannot be replaced by {type(raw).__name__} ({raw!r}){source}. Set its "
                    f"sub-keys instead, e.g. {full_key}.{next(iter(current), 'KEY')}."
                )
            current._merge(raw, (*key_list, key), source)
            return
        value = _decode_value(raw)
        if isinstance(value, CfgNode):
            raise ConfigTypeError(
                f"Config key {full_key} holds a {type(current).__name__} ({current!r}), "
                f"got a mapping ({raw!r}){source}."
            )
        self[key] = _coerce(current, value, raw, full_key)

    def _root_unknown_key(self, full_key: str, source: str) -> ConfigKeyError:
        # Suggestions are computed over the keys of this node's sub-tree, prefixed with its path.
        prefix = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        candidates = [prefix + k for k in self._flat_keys()]
        return _unknown_key_error(full_key, candidates, source)

    def _unknown_key(self, partial_key: str, full_key: str) -> ConfigKeyError:
        return _unknown_key_error(full_key, self._flat_keys(), "", missing=partial_key)

    def _flat_keys(self) -> list[str]:
        keys = []
        for key, value in self.items():
            keys.append(str(key))
            if isinstance(value, CfgNode):
                keys.extend(f"{key}.{sub}" for sub in value._flat_keys())
        return keys

    # ------------------------------------------------------------------ dumping
    def to_dict(self) -> dict[str, Any]:
        """Return the content as plain nested dicts (tuples become lists)."""
        return _to_plain(self)

    def dump(self, **kwargs: Any) -> str:
        """Serialize to YAML; merging the result into the defaults gives back an equal config.

        Args:
            **kwargs: passed to ``yaml.safe_dump`` (e.g. ``sort_keys=False``).

        Returns:
            The YAML text.
        """
        kwargs.setdefault("sort_keys", False)
        kwargs.setdefault("default_flow_style", False)
        return yaml.safe_dump(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return self.dump().rstrip("\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _check_value_type(value: Any, full_key: str) -> None:
    if isinstance(value, (CfgNode, _VALID_TYPES)):
        return
    valid = ", ".join(t.__name__ for t in _VALID_TYPES)
    raise ConfigTypeError(
        f"Config key {full_key} got a value of type {type(value).__name__} ({value!r}); a "
        f"CfgNode holds only {valid} or nested nodes. Store a plain value (e.g. a name or a "
        "path) and build the object from it in code, or use a lazy config (LazyConfig)."
    )


def _unknown_key_error(
    full_key: str, candidates: list[str], source: str, missing: str | None = None
) -> ConfigKeyError:
    close = difflib.get_close_matches(full_key, candidates, n=3, cutoff=0.6)
    what = f"Non-existent config key: {full_key}{source}"
    if missing is not None and missing != full_key:
        what += f" ({missing} is not a group of keys)"
    hint = f". Did you mean: {', '.join(close)}?" if close else "."
    return ConfigKeyError(
        what
        + hint
        + " A new key must first exist in the defaults (add it to the config before merging,"
        " or create its node with new_allowed=True)."
    )


def _load_yaml_with_base(filename: str, chain: tuple[str, ...]) -> dict[str, Any]:
    key = filename if "://" in filename else os.path.realpath(filename)
    if key in chain:
        cycle = " -> ".join([*chain[chain.index(key) :], key])
        raise ValueError(
            f"Config files inherit from each other in a cycle through {BASE_KEY}: {cycle}. "
            f"Remove one of these {BASE_KEY} entries."
        )
    try:
        with _open_text(filename) as f:
            loaded = _safe_load(f, filename)
    except FileNotFoundError:
        where = f", named by {BASE_KEY} in {chain[-1]}" if chain else ""
        raise FileNotFoundError(
            f"Config file {filename} does not exist{where} (working directory {os.getcwd()}). "
            f"HINT: check the path; a relative {BASE_KEY} path is relative to the file that "
            "names it."
        ) from None
    except yaml.constructor.ConstructorError as e:
        raise ValueError(
            f"Refusing to load {filename}: it contains a YAML tag that is not plain data "
            f"({e.problem}{e.problem_mark or ''}). Config files are read with a safe YAML loader "
            "that builds no Python object from a tag; use plain values, or a lazy config "
            "(LazyConfig.load, _target_ entries) for objects."
        ) from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"Config file {filename} must hold a mapping of keys to values at the top level, "
            f"got {type(loaded).__name__}."
        )
    bases = loaded.pop(BASE_KEY, None)
    if bases is None:
        return loaded
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(
            f"{BASE_KEY} in {filename} must be a path or a list of paths, got {bases!r}."
        )
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = _resolve_base(base, filename)
        merged = _merge_dicts(merged, _load_yaml_with_base(base_path, (*chain, key)))
    return _merge_dicts(merged, loaded)


def _safe_load(stream: Any, source: str) -> Any:
    """``yaml.safe_load`` that checks the document's size (:func:`check_yaml_size`) before
    building it."""
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node_size(node, source, MAX_YAML_VALUES)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def check_yaml_size(
    stream: str | IO[str], source: str, *, max_values: int = MAX_YAML_VALUES
) -> None:
    """Refuse a YAML document that its aliases would expand beyond ``max_values`` values.

    YAML aliases (``&anchor`` ... ``*anchor``) let a few hundred bytes describe a billion values
    (nested lists of aliases): building, copying or dumping such a config takes all the memory
    of the machine. This counts the values (scalars, lists and mappings) of the document with
    every alias expanded, from its parsed node graph, in time proportional to the file (no value
    is built). A document that does not use aliases is never refused: its own size bounds it.
    ``CfgNode`` YAML files are checked when loaded; :class:`~d2engine.config.LazyConfig` checks
    its YAML files with this function too.

    Args:
        stream: the YAML text, or a text stream to read it from.
        source: the file name, for the error message.
        max_values: the most values the expanded document may hold.

    Raises:
        ValueError: the expanded document holds more than ``max_values`` values, or an alias
            refers to a node that contains it (an infinite document).
        yaml.YAMLError: the text is not valid YAML.
    """
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    if node is not None:
        _check_node_size(node, source, max_values)


def _check_node_size(root: yaml.Node, source: str, max_values: int) -> None:
    sizes: dict[int, int] = {}  # id(node) -> values in its expansion (aliases share nodes)
    visiting: set[int] = set()

    def expanded(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            mark = node.start_mark
            raise ValueError(
                f"Refusing to load {source}: the YAML node at line {mark.line + 1} refers to "
                "itself through an alias (an anchor used inside its own value), which makes the "
                "document infinite. HINT: remove the alias from inside the anchored value."
            )
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(expanded(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(expanded(k) + expanded(v) for k, v in node.value)
        visiting.discard(key)
        sizes[key] = total
        return total

    total = expanded(root)
    if total > max_values and total > len(sizes):  # aliases repeat nodes: len(sizes) is unique
        raise ValueError(
            f"Refusing to load {source}: its YAML aliases (&anchor / *anchor) expand it to more "
            f"than {max_values:,} values ({total:,} from {len(sizes):,} written), which would "
            "exhaust memory when the config is built or dumped. HINT: write the values out, or "
            "use fewer nested aliases; a config needs far fewer values."
        )
