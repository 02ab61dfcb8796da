"""Griffe extension: d2engine's reST docstring markup as the Markdown of the API reference.

The docstrings are Google style with Sphinx's inline roles (``:class:`Checkpointer```,
``:meth:`save```, ``:func:`~d2engine.engine.launch.launch```) and reST literal blocks (a paragraph
ending with ``::``); MkDocs renders Markdown. Before the docstrings are parsed:

- a role whose target is a full ``d2engine.`` path becomes a cross-reference that must resolve: a
  target that does not exist is a warning, so ``mkdocs build --strict`` fails;
- a role with a short target (``Checkpointer``, ``save``, ``comm.get_rank``) is looked up where
  the docstring is (its class, its module, the enclosing packages), as Sphinx does. Found in
  d2engine, it becomes a link when the reference has a section for it (a private helper has none:
  then it is inline code); not found (``torch.nn.Module``), inline code;
- a literal block becomes a fenced code block.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import griffe

PACKAGE = "d2engine"
ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|mod|attr|data|exc|obj|const):`(?P<text>[^`]+)`"
)
EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
SHELL_START = (
    "$ ",
    "d2engine-",
    "python ",
    "torchrun ",
    "srun ",
    "sbatch ",
    "pip ",
    "tensorboard ",
)

log = logging.getLogger("mkdocs.plugins.d2engine.sphinx_roles")


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the d2engine package once it is loaded."""

    def on_package(
        self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any
    ) -> None:
        if pkg.path != PACKAGE:
            return
        for obj in _objects(pkg):
            if obj.docstring is not None:
                text = literal_blocks_to_fences(obj.docstring.value)
                obj.docstring.value = ROLE.sub(_linker(obj, loader), text)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not isinstance(member, griffe.Alias):
            yield from _objects(member)


def _linker(
    scope: griffe.Object, loader: griffe.GriffeLoader
) -> Callable[[re.Match[str]], str]:
    return lambda match: _link(match, scope, loader)


def _link(
    match: re.Match[str], scope: griffe.Object, loader: griffe.GriffeLoader
) -> str:
    text = match["text"]
    explicit = EXPLICIT_TITLE.match(text)
    if explicit:
        title, target = explicit["title"], explicit["target"]
    else:
        target = text.lstrip("~!")
        title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
    if target.startswith(PACKAGE + ".") or target == PACKAGE:
        obj = _lookup_path(target, loader)
        if obj is None:
            log.warning(
                "%s: the docstring refers to %s, which does not exist. HINT: correct the role "
                "%s in the docstring.",
                scope.path,
                target,
                match[0],
            )
            return f"`{title}`"
        if any(part.startswith("_") for part in obj.path.split(".")):
            return f"`{title}`"  # private: the reference has no section for it
        return f"[`{title}`][{obj.path}]"
    obj = _lookup_in_scope(target, scope)
    if obj is None or not obj.path.startswith(PACKAGE + "."):
        return f"`{title}`"
    # Optional: a link where the reference documents the object, inline code where it does not.
    return f'<autoref identifier="{obj.path}" optional><code>{html.escape(title)}</code></autoref>'


def _final(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    if not isinstance(obj, griffe.Alias):
        return obj
    try:
        return obj.final_target
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None  # imported from another package


def _member(obj: griffe.Object, name: str) -> griffe.Object | None:
    members = obj.all_members if obj.is_class else obj.members
    member = members.get(name)
    return None if member is None else _final(member)


def _walk(obj: griffe.Object | None, parts: list[str]) -> griffe.Object | None:
    for part in parts:
        if obj is None:
            return None
        obj = _member(obj, part)
    return obj


def _lookup_path(path: str, loader: griffe.GriffeLoader) -> griffe.Object | None:
    first, *rest = path.split(".")
    root = loader.modules_collection.members.get(first)
    return _walk(root, rest)


def _lookup_in_scope(name: str, scope: griffe.Object) -> griffe.Object | None:
    parts = name.split(".")
    current: griffe.Object | None = scope
    while current is not None:
        if current.is_class or current.is_module:
            found = _walk(current, parts)
            if found is not None:
                return found
        current = current.parent
    return None


def literal_blocks_to_fences(text: str) -> str:
    """Turns each reST literal block (after a line ending with ``::``) into a fenced block.

    The ``::`` becomes ``:`` (a line holding only ``::`` goes); the fence is put at the indentation
    of the paragraph that introduces the block. (``Example::`` stays a paragraph: a Google
    ``Example:`` section would need its content indented, which Markdown reads as a code block.)
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        indent = len(line) - len(line.lstrip())
        following = next(
            (j for j in range(i + 1, len(lines)) if lines[j].strip()), None
        )
        if (
            not stripped.endswith("::")
            or following is None
            or _indent(lines[following]) <= indent
        ):
            out.append(line)
            i += 1
            continue
        end = following
        while end < len(lines) and (
            not lines[end].strip() or _indent(lines[end]) > indent
        ):
            end += 1
        block = lines[following:end]
        while block and not block[-1].strip():
            block.pop()
        head = stripped[:-2].rstrip()
        if head.strip():
            out.append(head + ":")
        fence_indent = " " * indent
        language = "bash" if block[0].strip().startswith(SHELL_START) else "python"
        margin = min(_indent(b) for b in block if b.strip())
        out.append("")
        out.append(f"{fence_indent}```{language}")
        out.extend(fence_indent + b[margin:] if b.strip() else "" for b in block)
        out.append(f"{fence_indent}```")
        out.append("")
        i = end
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
