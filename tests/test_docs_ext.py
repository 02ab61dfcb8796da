"""The documentation site's build extensions (``docs/_ext``): the generated API pages and the
docstrings' Sphinx markup turned into Markdown."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from types import ModuleType

import pytest
import yaml

griffe = pytest.importorskip("griffe")
pytest.importorskip("mkdocs")

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"_docs_ext_{name}", REPO / "docs/_ext" / f"{name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api_pages = _load("api_pages")
sphinx_roles = _load("sphinx_roles")


@pytest.fixture(scope="module")
def package() -> griffe.Module:
    return griffe.load("d2engine", search_paths=[str(REPO)], resolve_aliases=True)


def _nav_pages() -> list[str]:
    # mkdocs.yml has no custom YAML tags: a plain safe load reads its nav.
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    return api_pages._page_roots(config["nav"])


def test_every_public_module_is_on_one_api_page_and_each_name_documented_once(
    package: griffe.Module,
) -> None:
    pages = _nav_pages()
    plan = api_pages.plan(package, pages)
    placed = [module for sections in plan.values() for module, _, _ in sections]
    public = [m.path for m in api_pages._public_modules(package)]
    assert sorted(placed) == sorted(public) and len(set(placed)) == len(placed)
    documented = [
        f"{module}.{name}"
        for sections in plan.values()
        for module, here, _ in sections
        for name in here
    ]
    assert len(documented) == len(set(documented))
    by_module = {module: (here, elsewhere) for s in plan.values() for module, here, elsewhere in s}
    # Where users import them: the package, and the hooks in engine.hooks (as in detectron2).
    assert "Checkpointer" in by_module["d2engine.checkpoint"][0]
    assert by_module["d2engine.checkpoint.checkpointer"][0] == []
    assert ("Checkpointer", "d2engine.checkpoint.Checkpointer") in by_module[
        "d2engine.checkpoint.checkpointer"
    ][1]
    assert "PeriodicCheckpointer" in by_module["d2engine.engine.hooks"][0]
    assert "PeriodicCheckpointer" not in by_module["d2engine.engine"][0]
    assert {"JSONWriter", "CommonMetricPrinter", "CSVWriter"} <= set(
        by_module["d2engine.utils.events"][0]
    )
    assert by_module["d2engine.utils.event_writers"][0] == []
    # A module goes where most of its names are.
    hooks_page = [module for module, _, _ in plan["api/engine.hooks.md"]]
    assert {"d2engine.engine.monitoring", "d2engine.engine.checkpoint_hooks"} <= set(hooks_page)
    assert "d2engine.engine.defaults" in [module for module, _, _ in plan["api/engine.md"]]
    # Each page starts with its own package.
    for page, sections in plan.items():
        assert sections[0][0] == api_pages._root_of(page)
    # Another package's object re-exported for compatibility is named, not documented.
    assert ("LRScheduler", "torch.optim.lr_scheduler.LRScheduler") in by_module["d2engine.solver"][
        1
    ]


def test_a_public_module_on_no_page_fails_the_build(package: griffe.Module) -> None:
    pages = [p for p in _nav_pages() if p != "api/utils.md"]
    with pytest.raises(ValueError, match=r"d2engine\.utils.* is on no API page"):
        api_pages.plan(package, pages)


def _convert(text: str, scope: griffe.Object, loader: griffe.GriffeLoader) -> str:
    return sphinx_roles.ROLE.sub(lambda m: sphinx_roles._link(m, scope, loader), text)


def test_roles_become_links_or_code(caplog: pytest.LogCaptureFixture) -> None:
    loader = griffe.GriffeLoader(search_paths=[str(REPO)])
    package = loader.load("d2engine")
    checkpointer = package["checkpoint.checkpointer.Checkpointer"]
    # A full path must resolve: a link that the strict build checks.
    assert _convert(":class:`~d2engine.checkpoint.Checkpointer`", checkpointer, loader) == (
        "[`Checkpointer`][d2engine.checkpoint.checkpointer.Checkpointer]"
    )
    # A short name is looked up where the docstring is (here a method of the class): optional.
    assert _convert(":meth:`save`", checkpointer, loader) == (
        '<autoref identifier="d2engine.checkpoint.checkpointer.Checkpointer.save" optional>'
        "<code>save</code></autoref>"
    )
    # Another package's object, or a private one: code.
    assert _convert(":class:`torch.nn.Module`", checkpointer, loader) == "`torch.nn.Module`"
    assert _convert(":mod:`d2engine.config._configurable`", checkpointer, loader) == (
        "`d2engine.config._configurable`"
    )
    # A full path that does not exist: code and a warning, which fails `mkdocs build --strict`.
    with caplog.at_level(logging.WARNING):
        assert _convert(":func:`d2engine.no.such`", checkpointer, loader) == "`d2engine.no.such`"
    assert "d2engine.no.such, which does not exist" in caplog.text


def test_literal_blocks_become_fenced_code() -> None:
    text = (
        "Use it like this::\n\n    trainer.train()\n    x = 1\n\nAfter.\n\n"
        "Example::\n\n    d2engine-train --help\n"
    )
    assert sphinx_roles.literal_blocks_to_fences(text) == (
        "Use it like this:\n\n```python\ntrainer.train()\nx = 1\n```\n\nAfter.\n\n"
        "Example:\n\n```bash\nd2engine-train --help\n```\n"
    )
    assert sphinx_roles.literal_blocks_to_fences("A ratio a::b stays.") == "A ratio a::b stays."
    assert re.search(r"::$", sphinx_roles.literal_blocks_to_fences("Ends with::")) is not None
