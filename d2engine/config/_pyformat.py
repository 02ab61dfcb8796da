"""Render a lazy config as Python-like text (``LazyConfig.to_py``), formatted as black would.

The text is for people to read (``print(LazyConfig.to_py(cfg))``): each top-level value becomes
one assignment ``cfg.a.b = ...``; a mapping with ``_target_`` becomes a call ``pkg.f(x=1)``.
Lines longer than 88 characters are split the way the black formatter splits them: first the
bracket's content on one indented line, otherwise one item per line with a trailing comma.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .instantiate import target_to_string

__all__ = ["config_to_py"]

_LINE_LENGTH = 88
_INDENT = "    "
_TARGET_KEY = "_target_"


@dataclass
class _Group:
    """A bracketed expression: ``head`` + items + ``close``, e.g. ``f(`` ``x=1`` ``)``."""

    head: str
    items: list[tuple[str, Any]]  # (prefix such as "x=" or '"a": ', node)
    close: str


def _str_literal(text: str) -> str:
    quoted = repr(text)
    if quoted.startswith("'") and '"' not in text:
        return '"' + quoted[1:-1] + '"'  # black prefers double quotes when nothing needs escaping
    return quoted


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    try:
        return target_to_string(target)
    except ValueError:
        module = getattr(target, "__module__", "?")
        return f"{module}.{getattr(target, '__qualname__', repr(target))}"


def _node(value: Any) -> Any:
    """Turn a plain container into a tree of :class:`_Group` and atom strings."""
    if isinstance(value, Mapping) and _TARGET_KEY in value:
        args = sorted((str(k), v) for k, v in value.items() if k != _TARGET_KEY)
        return _Group(
            _target_name(value[_TARGET_KEY]) + "(", [(f"{k}=", _node(v)) for k, v in args], ")"
        )
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return _Group("{", [(f"{_atom(k)}: ", _node(v)) for k, v in items], "}")
    if isinstance(value, (list, tuple)):
        return _Group("[", [("", _node(v)) for v in value], "]")
    return _atom(value)


def _atom(value: Any) -> str:
    return _str_literal(value) if isinstance(value, str) else repr(value)


def _flat(node: Any) -> str:
    if isinstance(node, str):
        return node
    return node.head + ", ".join(prefix + _flat(child) for prefix, child in node.items) + node.close


def _lines(node: Any, indent: str, prefix: str, suffix: str) -> list[str]:
    """The lines of ``prefix + node + suffix`` at ``indent``, split as needed."""
    flat = indent + prefix + _flat(node) + suffix
    if len(flat) <= _LINE_LENGTH or isinstance(node, str) or not node.items:
        return [flat]
    inner = indent + _INDENT
    body = inner + ", ".join(p + _flat(child) for p, child in node.items)
    if len(body) <= _LINE_LENGTH:
        middle = [body]
    else:
        middle = [line for p, child in node.items for line in _lines(child, inner, p, ",")]
    return [indent + prefix + node.head, *middle, indent + node.close + suffix]


def _statements(value: Any, prefix: str) -> list[str]:
    """One assignment per leaf of the top-level mapping tree (calls and values are leaves)."""
    if isinstance(value, Mapping) and _TARGET_KEY not in value and value:
        out: list[str] = []
        for key, item in sorted(value.items(), key=lambda kv: str(kv[0])):
            if not str(key).isidentifier():
                name = f"{prefix}[{_atom(key)}]"
            else:
                name = f"{prefix}.{key}" if prefix else str(key)
            out.extend(_statements(item, name))
        return out
    return _lines(_node(value), "", f"{prefix} = ", "")


def config_to_py(container: Any, prefix: str = "cfg.") -> str:
    """Render a plain (``OmegaConf.to_container``) config as Python-like text.

    Args:
        container: the config as plain dicts and lists (normally a dict).
        prefix: the name the assignments start with, ending with a dot (default ``"cfg."``).

    Returns:
        The text, one statement per top-level leaf, ending with a newline.
    """
    root = prefix[:-1] if prefix.endswith(".") else prefix
    if not isinstance(container, Mapping) or not container:
        return f"{root or 'cfg'} = {_flat(_node(container))}\n"
    return "".join(line + "\n" for line in _statements(container, root))
