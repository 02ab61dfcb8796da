"""Checks on the test suite itself."""

from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools.config.pyprojecttoml import read_configuration  # tomllib is 3.11+

TESTS = Path(__file__).resolve().parent


def test_no_test_skips_on_a_broken_d2engine_import() -> None:
    """``pytest.importorskip`` is for optional third-party packages: on one of d2engine's own
    modules a broken import would skip the test instead of failing it."""
    pattern = re.compile(r"importorskip\(\s*[\"']d2engine")
    offenders = [
        str(path.relative_to(TESTS))
        for path in sorted(TESTS.rglob("*.py"))
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


REPO = TESTS.parent


def _make_targets() -> dict[str, tuple[list[str], list[str]]]:
    """The Makefile's rules: target -> (prerequisites, recipe lines)."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: list[str] | None = None
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith("\t") and current is not None:
            current.append(line.strip())
            continue
        rule = re.match(r"^([\w.$()/-]+)\s*:(?![:=])(.*)$", line)
        if rule and not line.startswith("."):
            current = []
            rules[rule.group(1)] = (rule.group(2).split(), current)
        elif line.strip() and not line.startswith("#"):
            current = None
    return rules


def _commands_of(target: str, rules: dict[str, tuple[list[str], list[str]]]) -> list[str]:
    """The commands ``make target`` runs, prerequisites first (those that are Makefile rules)."""
    prerequisites, recipe = rules[target]
    commands: list[str] = []
    for prerequisite in prerequisites:
        if prerequisite in rules:
            commands += _commands_of(prerequisite, rules)
    return commands + recipe


def test_make_test_runs_the_linters_and_the_type_checker_before_pytest() -> None:
    """CI runs ``make test``: it must fail on a lint, format or type error, not only on a test."""
    commands = _commands_of("test", _make_targets())

    def first(pattern: str) -> int:
        found = [i for i, command in enumerate(commands) if re.search(pattern, command)]
        assert found, f"`make test` runs no command matching {pattern!r}: {commands}"
        return found[0]

    pytest_at = first(r"-m pytest\b")
    for check in (r"\bruff check \.$", r"\bruff format --check \.$", r"\bmypy d2engine$"):
        assert first(check) < pytest_at, f"{check!r} runs after pytest in {commands}"


def test_type_checker_and_line_length_are_not_switched_off() -> None:
    """mypy checks the bodies of unannotated functions with no blanket ignore; E501 is on."""
    pyproject = read_configuration(REPO / "pyproject.toml", expand=False)["tool"]
    mypy = pyproject["mypy"]
    assert mypy["check_untyped_defs"] is True and mypy["warn_unused_ignores"] is True
    assert "ignore_errors" not in mypy
    assert all("ignore_errors" not in override for override in mypy.get("overrides", []))
    ruff = pyproject["ruff"]
    assert ruff["line-length"] == 100
    assert "E501" not in ruff["lint"].get("ignore", []) + ruff["lint"].get("extend-ignore", [])
    assert "E" in ruff["lint"]["select"]


def test_no_merge_conflict_markers() -> None:
    """A conflict left inside a docstring or a Markdown file passes ruff and the tests unnoticed."""
    marker = re.compile(r"^(<{7}|>{7}) ", re.MULTILINE)
    skip = {".venv", ".git", "build", "dist", "output", ".mypy_cache", ".ruff_cache", "__pycache__"}
    suffixes = {".py", ".md", ".toml", ".yaml", ".cfg", ".in", ".txt"}
    offenders = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(root, name)
            if path.suffix not in suffixes and name != "Makefile":
                continue
            if marker.search(path.read_text(encoding="utf-8", errors="replace")):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
