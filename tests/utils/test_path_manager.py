"""d2engine.utils.file_io.PathManager: iopath's calls on local paths and fsspec URLs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
from iopath.common.file_io import PathHandler

from d2engine.utils.file_io import PathManager, PathManagerBase, is_local, join


@pytest.fixture
def memdir() -> Any:
    root = "memory://d2engine-test-file-io"
    fs = fsspec.filesystem("memory")
    yield root
    if fs.exists("/d2engine-test-file-io"):
        fs.rm("/d2engine-test-file-io", recursive=True)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_the_iopath_calls_detectron2_code_makes(where: str, tmp_path: Path, memdir: str) -> None:
    root = str(tmp_path) if where == "local" else memdir
    sub = join(root, "a", "b")
    PathManager.mkdirs(sub)
    PathManager.mkdirs(sub)  # existing is fine
    assert PathManager.isdir(sub) and PathManager.exists(sub)
    path = join(sub, "x.txt")
    with PathManager.open(path, "w") as f:
        f.write("hello")
    with PathManager.open(path) as f:
        assert f.read() == "hello"
    with PathManager.open(path, "rb") as f:
        assert f.read() == b"hello"
    assert PathManager.isfile(path) and not PathManager.isdir(path)
    assert PathManager.ls(sub) == ["x.txt"]
    copy = join(sub, "y.txt")
    assert PathManager.copy(path, copy) is True
    assert PathManager.copy(path, copy) is False  # no overwrite unless asked
    assert PathManager.copy(path, copy, overwrite=True) is True
    assert PathManager.mv(copy, join(sub, "z.txt"))
    assert sorted(PathManager.ls(sub)) == ["x.txt", "z.txt"]
    PathManager.rm(join(sub, "z.txt"))
    assert not PathManager.exists(join(sub, "z.txt"))
    with pytest.raises(FileNotFoundError):
        PathManager.rm(join(sub, "z.txt"))


def test_get_local_path_downloads_once(
    tmp_path: Path, memdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("D2ENGINE_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "w.bin"
    local.write_bytes(b"abc")
    assert PathManager.get_local_path(str(local)) == str(local)
    assert PathManager.get_local_path(f"file://{local}") == str(local)
    remote = join(memdir, "w.bin")
    assert PathManager.copy_from_local(str(local), remote)
    cached = PathManager.get_local_path(remote)
    assert cached.startswith(str(tmp_path / "cache")) and Path(cached).read_bytes() == b"abc"
    with PathManager.open(remote, "wb") as f:
        f.write(b"new")
    assert Path(PathManager.get_local_path(remote)).read_bytes() == b"abc"  # cached copy
    assert Path(PathManager.get_local_path(remote, force=True)).read_bytes() == b"new"


def test_iopath_handlers_take_their_prefix(tmp_path: Path) -> None:
    class Handler(PathHandler):
        PREFIX = "d2engine_test://"

        def _get_supported_prefixes(self) -> list[str]:
            return [self.PREFIX]

        def _get_local_path(self, path: str, **kwargs: Any) -> str:
            return os.path.join(tmp_path, path[len(self.PREFIX) :])

        def _open(self, path: str, mode: str = "r", **kwargs: Any) -> Any:
            return open(self._get_local_path(path), mode)

    manager = PathManagerBase()
    manager.register_handler(Handler())
    (tmp_path / "f.txt").write_text("via handler")
    with manager.open("d2engine_test://f.txt") as f:
        assert f.read() == "via handler"
    assert manager.get_local_path("d2engine_test://f.txt") == str(tmp_path / "f.txt")
    with pytest.raises(ValueError, match="already has a handler.*allow_override"):
        manager.register_handler(Handler())
    manager.register_handler(Handler(), allow_override=True)
    with pytest.raises(TypeError, match="iopath-style PathHandler.*fsspec"):
        manager.register_handler(object())
    assert is_local("/x") and is_local("file:///x") and not is_local("s3://b/x")
