"""Checks on the test suite itself."""

from __future__ import annotations

import re
from pathlib import Path

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
