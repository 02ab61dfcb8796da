"""Tests for d2engine.tools.plot: the d2engine-plot command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from d2engine.tools.plot import cli
from d2engine.utils.plotting import figure_size

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parents[2]


def _run_dir(path: Path, scale: float) -> Path:
    path.mkdir(parents=True)
    lines = [
        {"iteration": it, "total_loss": scale / (it + 1), "lr": 0.1, "time": 0.01}
        for it in range(9, 200, 10)
    ]
    lines.append({"iteration": 199, "accuracy/top1": 90.0 * scale})
    (path / "metrics.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_one_run_is_drawn_into_its_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run_dir(tmp_path / "demo", 1.0)
    cli([str(run)])
    assert capsys.readouterr().out.strip() == str(run / "curves.png")
    assert _size(run / "curves.png") == figure_size(4)  # loss, lr, time, accuracy
    cli([str(run / "metrics.json"), "--metrics", "total_loss", "--dpi", "50"])
    assert _size(run / "curves.png") == figure_size(1, 50)


def test_several_runs_overlay_into_one_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _run_dir(tmp_path / "a", 1.0), _run_dir(tmp_path / "b", 2.0)
    monkeypatch.chdir(tmp_path)
    cli([str(a), str(b), "--labels", "base", "wide"])
    assert (tmp_path / "curves.png").is_file()  # several runs: curves.png here
    cli([str(a), str(b), "--out", str(tmp_path / "cmp" / "x.png"), "--metrics", "accuracy/*"])
    assert _size(tmp_path / "cmp" / "x.png") == figure_size(1)
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "cmp" / "x.png")


def test_errors_exit_with_code_2_and_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli([str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert "No metrics file at" in capsys.readouterr().err
    run = _run_dir(tmp_path / "demo", 1.0)
    with pytest.raises(SystemExit) as exc:
        cli([str(run), "--metrics", "nope"])
    assert exc.value.code == 2 and "matches none of the metrics" in capsys.readouterr().err


def test_console_script_and_module_entry_point(tmp_path: Path) -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert 'd2engine-plot = "d2engine.tools.plot:cli"' in scripts
    run = _run_dir(tmp_path / "demo", 1.0)
    proc = subprocess.run(
        [sys.executable, "-m", "d2engine.tools.plot", str(run)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "curves.png") and (run / "curves.png").is_file()
