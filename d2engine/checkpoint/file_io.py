"""File operations for checkpoints: atomic writes and safe loads, on local paths or fsspec URLs.

Writes never expose a partial file under the target name. On a local file system the data goes to
a hidden temporary file in the same directory (``.{name}.{pid}.{random}.tmp``), which is flushed,
fsynced and then renamed over the target with :func:`os.replace`; the directory is fsynced too.
A process killed mid-write leaves at most such a temporary file behind, which
:func:`remove_stale_temp_files` deletes and :func:`list_checkpoint_files` ignores.

On other fsspec file systems (``memory://``, ``s3://``, ...) the data is written to a temporary path
and then moved over the target with ``fs.mv``. This is best effort: object stores have no atomic
rename (a move is a copy and a delete), but a reader still never sees the temporary path under
the target name, and most object stores publish an object only once it is complete.

Loads use ``torch.load(..., weights_only=True)`` unless the caller opts out: a file that needs
arbitrary pickled objects raises :class:`UnsafeCheckpointError` and nothing in it is executed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import safetensors.torch
import torch

from d2engine.utils.file_io import PathManager, is_local, join
from d2engine.utils.file_io import local_path as _local
from d2engine.utils.file_io import url_to_fs as _fs

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "atomic_save",
    "atomic_write_text",
    "exists",
    "is_local",
    "join",
    "list_checkpoint_files",
    "load_checkpoint_file",
    "makedirs",
    "modified_time",
    "read_text",
    "remove",
    "remove_stale_temp_files",
]

_TMP_SUFFIX = ".tmp"
_TMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or written (corrupt, truncated, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary pickled objects, which safe (``weights_only``) loading refuses."""


# --------------------------------------------------------------------------------------------
# Paths: local or fsspec (the primitives live in d2engine.utils.file_io, with PathManager)
# --------------------------------------------------------------------------------------------
def _split(path: str) -> tuple[str, str]:
    if is_local(path):
        return os.path.split(path)
    head, _, tail = path.rstrip("/").rpartition("/")
    return head, tail


def exists(path: str) -> bool:
    """Whether a file or directory exists at ``path``."""
    return PathManager.exists(path)


def makedirs(directory: str) -> None:
    """Create ``directory`` and its parents if needed."""
    PathManager.mkdirs(directory)


def remove(path: str) -> None:
    """Delete the file at ``path``; a missing file is not an error."""
    with contextlib.suppress(FileNotFoundError):
        PathManager.rm(path)


def read_text(path: str) -> str:
    """Read a small text file."""
    with PathManager.open(path, "r", encoding="utf-8") as f:
        return str(f.read())


def modified_time(path: str) -> float:
    """The modification time of ``path`` in seconds since the epoch (0.0 when unknown)."""
    if is_local(path):
        try:
            return os.path.getmtime(_local(path))
        except OSError:
            return 0.0
    fs, fs_path = _fs(path)
    try:
        return fs.modified(fs_path).timestamp()
    except (NotImplementedError, OSError, AttributeError, KeyError, FileNotFoundError):
        return 0.0


def _listdir(directory: str) -> list[str]:
    if is_local(directory):
        try:
            return sorted(os.listdir(_local(directory)))
        except FileNotFoundError:
            return []
    fs, fs_path = _fs(directory)
    if not fs.exists(fs_path):
        return []
    return sorted(_split(entry)[1] for entry in fs.ls(fs_path, detail=False))


def list_checkpoint_files(directory: str) -> list[str]:
    """The checkpoint files in ``directory`` (``.pth``, ``.pt``, ``.safetensors``), sorted by name.

    Hidden files, among them the temporary files of unfinished writes, are left out.
    """
    return [
        join(directory, name)
        for name in _listdir(directory)
        if not name.startswith(".") and name.endswith(_CHECKPOINT_SUFFIXES)
    ]


def remove_stale_temp_files(directory: str) -> list[str]:
    """Delete temporary files left in ``directory`` by writes of processes that were killed.

    Temporary files of the calling process are kept (it may be writing them right now).

    Returns:
        The paths deleted.
    """
    removed = []
    for name in _listdir(directory):
        match = _TMP_PATTERN.match(name)
        if match is None or int(match.group("pid")) == os.getpid():
            continue
        path = join(directory, name)
        remove(path)
        removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
def _temp_path(path: str) -> str:
    directory, name = _split(path)
    return join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)


def _atomic_write(
    path: str, write_local: Callable[[str], None], write_stream: Callable[[IO[Any]], None]
) -> None:
    tmp = _temp_path(path)
    if is_local(path):
        target, tmp = _local(path), _local(tmp)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        try:
            write_local(tmp)
            _fsync_file(tmp)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(os.path.dirname(target))
        return
    fs, fs_tmp = _fs(tmp)
    _, fs_target = _fs(path)
    fs.makedirs(_split(fs_target)[0], exist_ok=True)
    try:
        with fs.open(fs_tmp, "wb") as f:
            write_stream(f)
        fs.mv(fs_tmp, fs_target)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(fs_tmp):
                fs.rm(fs_tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` holds either its old content or all of ``obj``.

    Args:
        obj: what to save (anything ``torch.save`` accepts).
        path: the target, a local path or an fsspec URL.
    """
    _atomic_write(path, lambda tmp: torch.save(obj, tmp), lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_save`)."""
    data = text.encode("utf-8")

    def write_local(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    def write_stream(f: IO[Any]) -> None:
        f.write(data)

    _atomic_write(path, write_local, write_stream)


# --------------------------------------------------------------------------------------------
# Safe loads
# --------------------------------------------------------------------------------------------
_OPT_IN_HINT = (
    "HINT: if you trust the source of this file, load it with weights_only=False "
    "(Checkpointer(..., weights_only=False) or checkpointer.load(path, weights_only=False)), "
    "or allow the classes it needs with torch.serialization.add_safe_globals([...])."
)


def _torch_load(path: str, weights_only: bool) -> Any:
    if is_local(path):
        return torch.load(_local(path), map_location="cpu", weights_only=weights_only)
    fs, fs_path = _fs(path)
    with fs.open(fs_path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=weights_only)


def _safetensors_load(path: str) -> dict[str, Any]:
    if is_local(path):
        return {"model": safetensors.torch.load_file(_local(path), device="cpu")}
    fs, fs_path = _fs(path)
    with fs.open(fs_path, "rb") as f:
        return {"model": safetensors.torch.load(f.read())}


def _pickle_load(path: str) -> Any:
    # Detectron-style .pkl model files: plain pickles, numpy arrays as weights.
    if is_local(path):
        with open(_local(path), "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        fs, fs_path = _fs(path)
        with fs.open(fs_path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    if isinstance(data, dict) and "blobs" in data and "model" not in data:
        data = {**data, "model": data.pop("blobs")}
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data["model"] = {
            k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
            for k, v in data["model"].items()
        }
    return data


def load_checkpoint_file(path: str, *, weights_only: bool = True) -> Any:
    """Read a checkpoint file into CPU memory.

    ``.safetensors`` files give ``{"model": tensors}``; ``.pkl`` files are plain pickles (only
    with ``weights_only=False``); any other file is read with ``torch.load``.

    Args:
        path: a local path or an fsspec URL.
        weights_only: refuse files that need arbitrary pickled objects (the safe default).

    Returns:
        What the file holds.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file needs arbitrary pickled objects and ``weights_only`` is set.
        CheckpointError: the file is corrupt, truncated or not a checkpoint.
    """
    if not exists(path):
        raise FileNotFoundError(f"Checkpoint file {path!r} does not exist.")
    if path.endswith(".pkl") and weights_only:
        raise UnsafeCheckpointError(
            f"Checkpoint {path!r} is a plain pickle (.pkl), which can run arbitrary code when "
            f"loaded; safe loading refuses it. {_OPT_IN_HINT}"
        )
    try:
        if path.endswith(".safetensors"):
            return _safetensors_load(path)
        if path.endswith(".pkl"):
            return _pickle_load(path)
        return _torch_load(path, weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only and "weights only load failed" in str(exc).lower():
            reason = str(exc).split("\n")
            detail = next((line.strip() for line in reason if "GLOBAL" in line), "")
            raise UnsafeCheckpointError(
                f"Checkpoint {path!r} holds objects that safe loading (weights_only=True) does "
                f"not allow; nothing in it was executed. {detail} {_OPT_IN_HINT}"
            ) from exc
        raise _corrupt(path, exc) from exc
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _corrupt(path: str, exc: BaseException) -> CheckpointError:
    message = str(exc).split("\n")[0][:300]
    return CheckpointError(
        f"Checkpoint {path!r} cannot be read: it is corrupt, truncated or not a checkpoint "
        f"({type(exc).__name__}: {message}). HINT: a run killed while writing it without "
        f"d2engine's atomic saves leaves such files; load an older checkpoint."
    )
