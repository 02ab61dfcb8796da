"""The documentation site: its code runs as written, it builds with warnings as errors, and its API
reference documents every public name.

Code blocks (in every page under ``docs/``):

- each ```` ```python ```` block runs; the blocks of a page run in order as one script, in an
  empty directory (``tmp_path``), so a page reads like a notebook;
- a block with a ``title="name"`` (```` ```python title="points.py" ````, ```` ```yaml
  title="base.yaml" ````) is that file: it is written to the directory before the script runs;
- a ```` ```python ```` block right after ``<!-- docs-test: skip (why) -->`` is not run. Use it
  sparingly: :data:`SKIPPED` lists each page's skipped blocks, so adding one means changing it here.

Other languages (``bash``, ``text``, ``yaml`` without a title) are not run.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import d2engine

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

SKIPPED = {"scale.md": 1}
"""The number of python blocks each page marks ``docs-test: skip`` (pages not named: none)."""

_FENCE = re.compile(
    r"(?P<skip><!-- docs-test: skip \((?P<why>[^)\n]+)\) -->[ \t]*\n\s*\n)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)(?P<attrs>[^\n]*)\n"
    r"(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.M | re.S,
)
_TITLE = re.compile(r'title="([^"]+)"')


@dataclass
class Block:
    lang: str
    title: str | None
    skipped: bool
    line: int
    code: str


def page_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in _FENCE.finditer(text):
        indent = m["indent"]
        code = "".join(line.removeprefix(indent) for line in m["body"].splitlines(keepends=True))
        title = _TITLE.search(m["attrs"])
        line = text.count("\n", 0, m.start("lang")) + 1
        blocks.append(Block(m["lang"], title[1] if title else None, bool(m["skip"]), line, code))
    return blocks


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _runnable_pages() -> list[str]:
    return [
        str(page.relative_to(DOCS))
        for page in _pages()
        if any(b.lang == "python" and not b.title and not b.skipped for b in page_blocks(page))
    ]


def _check_tracking(cwd: Path) -> None:
    out = cwd / "output" / "mine"
    assert (out / "metrics.json").is_file() and (out / "mlflow.db").is_file()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,")
    assert [r.split(",")[0] for r in rows[1:]] == ["9", "19", "29", "39", "49"]


# What a page's code needs beyond the `dev` and `all` extras' core, and checks after it ran.
NEEDS: dict[str, tuple[str, ...]] = {"tracking.md": ("mlflow", "sqlalchemy")}
CHECKS: dict[str, Callable[[Path], None]] = {"tracking.md": _check_tracking}


def run_page(page: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Write a page's titled blocks as files and run its python blocks as one script in ``cwd``."""
    parts = []
    for block in page_blocks(DOCS / page):
        if block.title:
            path = cwd / block.title
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.code)
        elif block.lang == "python" and not block.skipped:
            parts.append(f"# ---- docs/{page}, the block at line {block.line}\n{block.code}")
    script = cwd / "page_code.py"
    script.write_text("\n".join(parts))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, script.name],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("page", _runnable_pages())
def test_the_python_blocks_of_a_page_run(page: str, tmp_path: Path) -> None:
    for module in NEEDS.get(page, ()):
        pytest.importorskip(module)
    proc = run_page(page, tmp_path)
    script = (tmp_path / "page_code.py").read_text()
    assert proc.returncode == 0, (
        f"docs/{page}: its code failed (page_code.py joins the blocks; each starts with a "
        f"'# ---- docs/{page}, the block at line N' comment):\n{proc.stderr[-4000:]}\n"
        f"---- page_code.py ----\n{script}"
    )
    if page in CHECKS:
        CHECKS[page](tmp_path)


def test_every_tutorial_runs_code_and_skipped_blocks_are_counted() -> None:
    runnable = set(_runnable_pages())
    tutorials = {str(p.relative_to(DOCS)) for p in (DOCS / "tutorials").glob("*.md")}
    assert tutorials and tutorials <= runnable
    skipped = {}
    for page in _pages():
        blocks = page_blocks(page)
        assert not [b for b in blocks if b.skipped and (b.lang != "python" or b.title)]
        count = sum(b.skipped for b in blocks)
        if count:
            skipped[str(page.relative_to(DOCS))] = count
    assert skipped == SKIPPED
    # Every marker was recognised: a misspelt one would leave its block to run (or be ignored).
    markers = sum(p.read_text(encoding="utf-8").count("docs-test:") for p in _pages())
    assert markers == sum(SKIPPED.values())


def test_page_blocks_reads_titles_skips_and_indented_fences(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "Text\n\n```python\nx = 1\n```\n\n"
        '```yaml title="a.yaml"\nA: 1\n```\n\n'
        "<!-- docs-test: skip (a fragment) -->\n\n```python\nundefined_name\n```\n\n"
        "- item:\n\n    ```python\n    y = 2\n    ```\n"
    )
    blocks = page_blocks(page)
    assert [(b.lang, b.title, b.skipped, b.code) for b in blocks] == [
        ("python", None, False, "x = 1\n"),
        ("yaml", "a.yaml", False, "A: 1\n"),
        ("python", None, True, "undefined_name\n"),
        ("python", None, False, "y = 2\n"),
    ]
    assert blocks[0].line == 3


# --------------------------------------------------------------------------- the site
def _public_modules() -> list[str]:
    names = ["d2engine"]
    for info in pkgutil.walk_packages(d2engine.__path__, "d2engine."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    return out


@pytest.mark.slow
def test_site_builds_with_every_page(site: Path) -> None:
    for page in _pages():
        path = page.relative_to(DOCS)
        html = path.with_name("index.html") if path.name == "index.md" else path.with_suffix("")
        html = html if html.suffix == ".html" else html / "index.html"
        assert (site / html).is_file(), f"{page} was not built"
    assert (site / "images" / "curves.png").is_file()


@pytest.mark.slow
def test_api_reference_documents_every_public_name(site: Path) -> None:
    pages = sorted((site / "api").rglob("index.html"))
    html = "\n".join(p.read_text(encoding="utf-8") for p in pages)
    for page in pages:  # api/engine/index.html documents d2engine.engine, ...
        folder = page.parent.relative_to(site / "api").as_posix()
        root = "d2engine" if folder == "." else f"d2engine.{folder}"
        assert f'id="{root}"' in page.read_text(encoding="utf-8"), f"{root} is not on its page"
    ids = set(re.findall(r'id="(d2engine[\w.]*)"', html))
    modules = {name: importlib.import_module(name) for name in _public_modules()}
    exporters: dict[int, set[str]] = {}  # id(object) -> "module.name" of each export
    for name, module in modules.items():
        for attr in getattr(module, "__all__", ()):
            exporters.setdefault(id(getattr(module, attr)), set()).add(f"{name}.{attr}")
    missing = []
    for name, module in modules.items():
        if name not in ids:
            missing.append(f"the module {name}")
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if inspect.ismodule(obj):
                continue
            defined = inspect.isclass(obj) or inspect.isroutine(obj)
            if defined and not obj.__module__.startswith("d2engine"):
                foreign = f"{obj.__module__}.{obj.__qualname__}"  # e.g. torch's LRScheduler
                if foreign not in html:
                    missing.append(f"{name}.{attr} (= {foreign})")
                continue
            same = {e for e in exporters[id(obj)] if defined or e.endswith(f".{attr}")}
            if not same & ids:
                missing.append(f"{name}.{attr}")
    assert not missing, "not in the API reference: " + ", ".join(missing)
    # The docstrings' Sphinx roles became links or code (docs/_ext/sphinx_roles.py).
    assert not re.search(r":(class|func|meth|mod|attr|data|exc):`", html)
    assert "```" not in html  # literal blocks became code blocks, not text
    assert 'href="../checkpoint/#d2engine.checkpoint.Checkpointer"' in html


def test_the_readme_and_the_porting_page_have_the_same_import_table() -> None:
    def table(text: str) -> list[str]:
        start = text.index("| detectron2 | d2engine |")
        return text[start:].split("\n\n", 1)[0].splitlines()

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert table(readme) == table((DOCS / "porting.md").read_text(encoding="utf-8"))
