"""The d2engine-export command's arguments and errors (its output is tested with a real sharded
checkpoint in tests/engine/test_fsdp.py and tests/checkpoint/test_sharded.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2engine.tools.export import build_parser, main


def test_errors_are_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "missing"), str(tmp_path / "out.pth")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "not_sharded").mkdir()
    assert main([str(tmp_path / "not_sharded"), str(tmp_path / "out.pth")]) == 1
    assert "has no .metadata" in capsys.readouterr().err
    assert main([str(tmp_path / "not_sharded"), str(tmp_path / "out.bin")]) == 1
    assert "must end in .pth, .pt or .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_parser() -> None:
    args = build_parser().parse_args(["ckpt", "out.safetensors", "--trust"])
    assert (args.checkpoint, args.output, args.trust) == ("ckpt", "out.safetensors", True)
