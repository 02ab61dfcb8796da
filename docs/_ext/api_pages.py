"""MkDocs hook: the API reference pages, generated from the ``__all__`` of every public module.

The nav names the pages (``api/engine.md``, ``api/engine.hooks.md``, ...; ``api/index.md`` is the
package itself); each stands for the package ``d2engine.<stem>``. Every public module of d2engine
(no ``_`` in its dotted path) goes on one page and each name of its ``__all__`` is documented once,
where users import it: at the shortest module path that exports it (``d2engine.checkpoint``, not
``d2engine.checkpoint.checkpointer``), except that the hooks are documented in
``d2engine.engine.hooks`` and the event writers in ``d2engine.utils.events``, as in detectron2. A
module shows its docstring, the names documented in it and links to the others, on the page of
its package, or on the page where most of its names are documented (``d2engine.engine.monitoring``:
with the hooks). A public module that no page takes fails the build.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import griffe
from mkdocs.structure.files import File, Files

PACKAGE = "d2engine"
# Where detectron2's users import these names from, although a shorter path exports them too.
PREFERRED_MODULES = ("d2engine.engine.hooks", "d2engine.utils.events")
API_DIR = "api/"


def _public_modules(module: griffe.Module) -> Iterator[griffe.Module]:
    yield module
    for name, member in sorted(module.modules.items()):
        if not name.startswith("_") and not member.is_alias:
            yield from _public_modules(member)


def _page_roots(nav: Any) -> list[str]:
    """The ``api/*.md`` files the nav names, in nav order."""
    if isinstance(nav, str):
        return [nav] if nav.startswith(API_DIR) and nav.endswith(".md") else []
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _page_roots(value)]
    if isinstance(nav, list):
        return [page for item in nav for page in _page_roots(item)]
    return []


def _root_of(page: str) -> str:
    stem = page[len(API_DIR) : -len(".md")]
    return PACKAGE if stem == "index" else f"{PACKAGE}.{stem}"


Section = tuple[str, list[str], list[tuple[str, str]]]
"""A module on a page: its path, the names documented there, (name, documented path) of others."""


def plan(package: griffe.Module, pages: list[str]) -> dict[str, list[Section]]:
    """Which modules each page shows, the names documented there, and the names linked elsewhere.

    Returns:
        ``{page: [(module path, [names documented there], [(name, documented path)])]}``.

    Raises:
        ValueError: a public module that no page's package contains.
    """
    modules = list(_public_modules(package))
    exports = {m.path: [str(name) for name in m.exports or ()] for m in modules}
    exported: dict[
        str, list[tuple[str, str]]
    ] = {}  # canonical path -> [(module, name)]
    for module in modules:
        for name in exports[module.path]:
            if name not in module.members:
                raise ValueError(
                    f"{module.path}.__all__ names {name!r}, which is not defined there"
                )
            target = _target(module, name)
            if target is None or target.is_module:
                continue  # another package's object, or a submodule (its own section)
            exported.setdefault(target.path, []).append((module.path, name))

    def rank(entry: tuple[str, str]) -> tuple[bool, int, str]:
        path = entry[0]
        return (path not in PREFERRED_MODULES, path.count("."), path)

    documented_at = {
        canonical: min(entries, key=rank) for canonical, entries in exported.items()
    }
    roots = {_root_of(page): page for page in pages}

    def page_by_prefix(path: str) -> str | None:
        # The index page shows the package itself only: a package without a page is an error.
        matches = [
            r for r in roots if path == r or (r != PACKAGE and path.startswith(r + "."))
        ]
        return roots[max(matches, key=len)] if matches else None

    result: dict[str, list[Section]] = {page: [] for page in pages}
    for module in modules:
        names = [n for n in exports[module.path] if _kind(module, n) == "d2engine"]
        foreign = [n for n in exports[module.path] if _kind(module, n) == "foreign"]
        here = [
            n for n in names if documented_at[_canonical(module, n)] == (module.path, n)
        ]
        elsewhere = [
            (n, ".".join(documented_at[_canonical(module, n)]))
            for n in names
            if n not in here
        ]
        page = page_by_prefix(module.path)
        # A module goes where most of its names are documented (the hook modules: engine.hooks).
        homes = Counter(
            page_by_prefix(path.rsplit(".", 1)[0])
            for _, path in elsewhere
            if path.startswith(PACKAGE + ".")
        )
        if homes and module.path not in roots:  # a page's own package stays on it
            home, count = homes.most_common(1)[0]
            if count > len(here):
                page = home
        if page is None:
            raise ValueError(
                f"The public module {module.path} is on no API page. HINT: add a page "
                f"api/<package>.md for its package to the nav in mkdocs.yml."
            )
        elsewhere += [(n, _foreign_path(module.members[n])) for n in foreign]
        result[page].append((module.path, here, elsewhere))
    for (
        page,
        sections,
    ) in result.items():  # the page's own package first, then the rest by name
        root = _root_of(page)
        sections.sort(key=lambda section: (section[0] != root, section[0]))
    return result


def _target(module: griffe.Module, name: str) -> griffe.Object | None:
    """What ``module.name`` is; None for an object of another package (``torch``)."""
    member = module.members[name]
    if not isinstance(member, griffe.Alias):
        return member
    try:
        return member.final_target
    except griffe.AliasResolutionError:
        return None


def _foreign_path(alias: griffe.Object | griffe.Alias) -> str:
    """The path of another package's object that ``alias`` (maybe through others) names."""
    assert isinstance(alias, griffe.Alias)
    path = alias.target_path
    while True:
        try:
            obj = alias.modules_collection.get_member(path)
        except KeyError:
            return path
        if not obj.is_alias:
            return path
        path = obj.target_path


def _kind(module: griffe.Module, name: str) -> str:
    target = _target(module, name)
    if target is None:
        return "foreign"
    return "module" if target.is_module else "d2engine"


def _canonical(module: griffe.Module, name: str) -> str:
    target = _target(module, name)
    assert target is not None
    return target.path


def _markdown(page: str, sections: list[Section]) -> str:
    root = _root_of(page)
    lines = [
        f"# `{root}`",
        "",
        "Generated from the docstrings; each name of a module's `__all__` is documented once, "
        "where it is usually imported from.",
        "",
    ]
    for module, here, elsewhere in sections:
        members = "[" + ", ".join(here) + "]" if here else "false"
        lines += [f"::: {module}", "    options:", f"      members: {members}", ""]
        if elsewhere:
            links = ", ".join(
                f"[`{name}`][{path}]"
                if path.startswith(PACKAGE + ".")
                else f"`{name}` (`{path}`)"
                for name, path in elsewhere
            )
            lines += [f"Also exports {links}.", ""]
    return "\n".join(lines)


def on_files(files: Files, config: Any) -> Files:
    pages = _page_roots(config["nav"])
    repo = Path(config["config_file_path"]).parent
    package = griffe.load(PACKAGE, search_paths=[str(repo)], resolve_aliases=True)
    assert isinstance(package, griffe.Module)
    for page, sections in plan(package, pages).items():
        if not sections:
            raise ValueError(f"The API page {page} shows no module of d2engine.")
        files.append(File.generated(config, page, content=_markdown(page, sections)))
    return files
