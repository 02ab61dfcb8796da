"""The Python examples of the documentation pages run as written (in a fresh directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_examples(page: str, cwd: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / page).read_text(encoding="utf-8"), re.S)
    assert blocks, f"{page} has no python example"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for i, code in enumerate(blocks):
        script = cwd / f"example_{i}.py"
        script.write_text(code)
        proc = subprocess.run(
            [sys.executable, script.name],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, f"{page} example {i}:\n{proc.stderr[-3000:]}"


def test_tracking_examples(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    _run_examples("docs/tracking.md", tmp_path)
    out = tmp_path / "output" / "mine"
    assert (out / "metrics.json").is_file() and (out / "mlflow.db").is_file()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,")
    assert [r.split(",")[0] for r in rows[1:]] == ["9", "19", "29", "39", "49"]
