"""The README's "Your own model and data" example runs as written: it learns (accuracy well above
chance) and prints no warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _example_code() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own model and data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section should hold one python example"
    return blocks[0]


def test_own_model_example_learns_without_warnings(tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text(_example_code())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # the filters a user has by default
    proc = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()[-1]
    match = re.search(r"'top1': ([0-9.]+)", printed)
    assert match, printed
    assert float(match.group(1)) >= 85.0  # three classes: chance is 33%
    warnings = [
        line for line in (proc.stdout + proc.stderr).splitlines() if "warning" in line.lower()
    ]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "output" / "mine" / "model_final.pth").is_file()
