"""Tests for d2engine.checkpoint.file_io: atomic writes, safe loads, fsspec paths."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from d2engine.checkpoint import file_io
from d2engine.checkpoint.file_io import CheckpointError, UnsafeCheckpointError


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def memory_dir():
    """A fresh directory on fsspec's in-memory file system, removed afterwards."""
    url = "memory://d2e-io-test"
    fs = fsspec.filesystem("memory")
    if fs.exists("/d2e-io-test"):
        fs.rm("/d2e-io-test", recursive=True)
    yield url
    if fs.exists("/d2e-io-test"):
        fs.rm("/d2e-io-test", recursive=True)


def test_atomic_save_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "ckpt.pth"
    file_io.atomic_save({"w": torch.arange(3)}, str(target))
    file_io.atomic_save({"w": torch.arange(4)}, str(target))  # overwrite
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt.pth"]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(4))


def test_atomic_save_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pth"
    file_io.atomic_save({"w": torch.zeros(2)}, str(target))

    class Unpicklable:
        def __reduce__(self):  # noqa: ANN204
            raise RuntimeError("cannot pickle me")

    with pytest.raises(RuntimeError, match="cannot pickle me"):
        file_io.atomic_save({"w": torch.ones(2), "bad": Unpicklable()}, str(target))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(2))


def test_atomic_write_text(tmp_path: Path) -> None:
    path = tmp_path / "last_checkpoint"
    file_io.atomic_write_text(str(path), "model_0000009.pth")
    assert path.read_text() == "model_0000009.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_stale_temp_files_are_listed_never_and_removed(tmp_path: Path) -> None:
    file_io.atomic_save({"w": torch.zeros(1)}, str(tmp_path / "a.pth"))
    stale = tmp_path / ".a.pth.999999.0123abcd.tmp"
    stale.write_bytes(b"partial")
    own = tmp_path / f".b.pth.{os.getpid()}.0123abcd.tmp"
    own.write_bytes(b"being written")
    unrelated = tmp_path / ".hidden"
    unrelated.write_text("x")
    assert file_io.list_checkpoint_files(str(tmp_path)) == [str(tmp_path / "a.pth")]
    assert file_io.remove_stale_temp_files(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and own.exists() and unrelated.exists()


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*weights_only=False"):
        file_io.load_checkpoint_file(str(path))
    assert not marker.exists()


def test_opt_in_loads_trusted_pickles(tmp_path: Path) -> None:
    path = tmp_path / "trusted.pth"
    torch.save({"model": {}, "ratio": Fraction(1, 3)}, path)
    with pytest.raises(UnsafeCheckpointError, match="trusted.pth"):
        file_io.load_checkpoint_file(str(path))
    assert file_io.load_checkpoint_file(str(path), weights_only=False)["ratio"] == Fraction(1, 3)


def test_pkl_files_need_opt_in(tmp_path: Path) -> None:
    import pickle

    import numpy as np

    path = tmp_path / "weights.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"w": np.ones(2, dtype=np.float32)}}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"plain pickle \(\.pkl\)"):
        file_io.load_checkpoint_file(str(path))
    loaded = file_io.load_checkpoint_file(str(path), weights_only=False)
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("keep", [0, 10, 300])
def test_truncated_or_garbage_file_names_the_file(tmp_path: Path, keep: int) -> None:
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(100)}}, good)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=r"bad\.pth.*corrupt, truncated"):
        file_io.load_checkpoint_file(str(bad))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        file_io.load_checkpoint_file(str(tmp_path / "nope.pth"))


def test_safetensors_load_as_model(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"fc.weight": torch.ones(2, 2)}, str(path))
    loaded = file_io.load_checkpoint_file(str(path))
    assert set(loaded) == {"model"} and torch.equal(loaded["model"]["fc.weight"], torch.ones(2, 2))
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match=r"w\.safetensors"):
        file_io.load_checkpoint_file(str(path))


def test_memory_filesystem_round_trip(memory_dir: str) -> None:
    path = file_io.join(memory_dir, "run/ckpt.pth")
    assert path == "memory://d2e-io-test/run/ckpt.pth"
    file_io.atomic_save({"w": torch.arange(5)}, path)
    file_io.atomic_write_text(file_io.join(memory_dir, "run/last_checkpoint"), "ckpt.pth")
    assert file_io.exists(path)
    assert file_io.read_text(file_io.join(memory_dir, "run/last_checkpoint")) == "ckpt.pth"
    assert file_io.list_checkpoint_files(file_io.join(memory_dir, "run")) == [path]
    assert torch.equal(file_io.load_checkpoint_file(path)["w"], torch.arange(5))
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/d2e-io-test/run", detail=False)) == [
        "ckpt.pth",
        "last_checkpoint",
    ]
    file_io.remove(path)
    assert not file_io.exists(path)
    file_io.remove(path)  # missing: no error


def test_data_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync:" + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("replace:" + os.path.basename(str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(file_io.os, "fsync", fsync)
    monkeypatch.setattr(file_io.os, "replace", replace)
    file_io.atomic_save({"w": torch.zeros(1)}, str(tmp_path / "c.pth"))
    assert events[0].startswith("fsync:.c.pth.") and events[0].endswith(".tmp")
    assert events[1:] == ["replace:c.pth", f"fsync:{tmp_path.name}"]  # then the directory
