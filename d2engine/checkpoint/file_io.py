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

A write that fails (a full disk, a read-only directory, a lost connection) raises
:class:`CheckpointError` naming the file and the reason; the target keeps its previous content.

Loads verify the file first (:func:`verify_checkpoint_file`): a ``torch.save`` file is a zip
archive that stores a CRC-32 of each of its records, which ``torch.load`` never checks; a record
whose bytes changed after the write raises :class:`CheckpointError` instead of loading wrong
weights. Then they use ``torch.load(..., weights_only=True)`` unless the caller opts out: a file
that needs arbitrary pickled objects raises :class:`UnsafeCheckpointError` and nothing in it is
executed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import pickle
import re
import secrets
import struct
import zipfile
import zlib
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
    "basename",
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
    "verify_checkpoint_bytes",
    "verify_checkpoint_file",
]

_TMP_SUFFIX = ".tmp"
_TMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or written (corrupt, truncated, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary pickled objects, which ``weights_only`` loading refuses."""


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


def basename(path: str) -> str:
    """The last component of ``path`` (a local path or a URI; a trailing ``/`` ignored)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


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


def _atomic_write(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Write through ``write(file)`` to a temporary file, then move it over ``path``.

    Local writes go through a Python file object, so that an error of the operating system
    (``ENOSPC``...) arrives as the :class:`OSError` it is, not as the bare ``RuntimeError`` that
    ``torch.save`` to a path raises ("unexpected pos ..."). An :class:`OSError` is raised as a
    :class:`CheckpointError` naming ``path``.
    """
    tmp = _temp_path(path)
    try:
        if is_local(path):
            _atomic_write_local(_local(path), _local(tmp), write)
        else:
            _atomic_write_fsspec(path, tmp, write)
    except OSError as exc:
        raise CheckpointError(
            f"Could not write {path!r}: {exc.strerror or exc}"
            f"{f' (errno {exc.errno})' if exc.errno else ''}. {path!r} was not changed and no "
            f"partial file was left. HINT: {_write_hint(exc)}"
        ) from exc


def _write_hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that disk (or write to another directory) and save again."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the directory writable, or write to another directory."
    return "check that the directory exists, is writable and its file system is healthy."


def _atomic_write_local(target: str, tmp: str, write: Callable[[IO[bytes]], object]) -> None:
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(target))


def _atomic_write_fsspec(path: str, tmp: str, write: Callable[[IO[bytes]], object]) -> None:
    fs, fs_tmp = _fs(tmp)
    _, fs_target = _fs(path)
    fs.makedirs(_split(fs_target)[0], exist_ok=True)
    try:
        with fs.open(fs_tmp, "wb") as f:
            write(f)
        fs.mv(fs_tmp, fs_target)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(fs_tmp):
                fs.rm(fs_tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path``, which then holds either its old content or all of ``obj``.

    Args:
        obj: what to save (anything ``torch.save`` accepts).
        path: the target, a local path or an fsspec URL.

    Raises:
        CheckpointError: the file system refused the write (e.g. "No space left on device");
            ``path`` was not changed.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_save`).

    Raises:
        CheckpointError: the file system refused the write; ``path`` was not changed.
    """
    data = text.encode("utf-8")
    _atomic_write(path, lambda f: f.write(data))


# --------------------------------------------------------------------------------------------
# Safe loads
# --------------------------------------------------------------------------------------------
_OPT_IN_HINT = (
    "HINT: if you trust the source of this file, load it with weights_only=False "
    "(Checkpointer(..., weights_only=False) or checkpointer.load(path, weights_only=False)), "
    "or allow the classes it needs with torch.serialization.add_safe_globals([...])."
)


def _torch_load(source: str | IO[bytes], weights_only: bool) -> Any:
    return torch.load(source, map_location="cpu", weights_only=weights_only)


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


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"


def _verify_zip(buffer: Any, path: str) -> bool:
    """Check every record of the zip archive in ``buffer`` (bytes or an mmap) against its CRC-32.

    Returns False when the buffer is not a zip archive (e.g. the legacy ``torch.save`` format) or
    its records carry no CRC (saved with ``torch.utils.serialization.config.save.compute_crc32``
    off): nothing to verify.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(buffer) if isinstance(buffer, bytes) else buffer)
    except (zipfile.BadZipFile, ValueError, OSError):
        return False  # not a zip archive: torch.load decides what it is
    with archive, memoryview(buffer) as view:
        records = archive.infolist()
        if not any(r.CRC for r in records if r.file_size):
            return False
        for record in records:
            _verify_record(archive, view, record, path)
    return True


def _verify_record(
    archive: zipfile.ZipFile, view: memoryview, record: zipfile.ZipInfo, path: str
) -> None:
    start = record.header_offset
    header = bytes(view[start : start + _LOCAL_HEADER.size])
    if len(header) < _LOCAL_HEADER.size:
        raise _damaged(path, record.filename, "its header lies past the end of the file")
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_HEADER_SIGNATURE:
        raise _damaged(path, record.filename, "its local header is damaged")
    if record.compress_type != zipfile.ZIP_STORED:  # torch stores records; other writers may not
        try:
            with archive.open(record) as f:
                while f.read(1 << 24):
                    pass  # zipfile checks the CRC-32 at the end
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise _damaged(path, record.filename, str(exc)) from exc
        return
    begin = start + _LOCAL_HEADER.size + name_length + extra_length
    with view[begin : begin + record.compress_size] as data:
        if len(data) != record.compress_size:
            raise _damaged(path, record.filename, "its data is cut short")
        crc = zlib.crc32(data)
    if crc != record.CRC:
        raise _damaged(
            path,
            record.filename,
            f"the CRC-32 of its bytes is {crc:#010x}, the archive recorded {record.CRC:#010x}",
        )


def _damaged(path: str, record: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint {path!r} is corrupt: record {record!r} does not match its CRC-32 check "
        f"({what}); the file changed after it was written (a bad disk, a faulty copy or an edit). "
        "HINT: load an older checkpoint; resume_or_load falls back to the newest one that "
        "verifies."
    )


def verify_checkpoint_file(path: str) -> bool:
    """Check that a checkpoint file's bytes are those written, where the format allows it.

    A ``torch.save`` file (``.pth``, ``.pt``, ...) is a zip archive holding a CRC-32 of each record
    (the pickled structure and every tensor's bytes): every record is read and checked, in time
    proportional to the file size and without building any tensor. The file is memory-mapped
    (local) or read once (fsspec URL). Formats without checksums pass unverified: the legacy
    (pre-1.6, non-zip) ``torch.save`` format, ``.safetensors`` (its header is checked when it is
    loaded, its data is not), ``.pkl`` files and archives saved without CRCs.

    CRC-32 detects accidental changes (every flipped bit, burst or truncation), not deliberate
    ones: whoever can edit the file can also update its CRCs.

    Args:
        path: a local path or an fsspec URL.

    Returns:
        True if every record was checked, False if the format has nothing to check.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: a record's bytes do not match its CRC-32, or the archive is damaged.
    """
    if path.endswith((".safetensors", ".pkl")):
        if not exists(path):
            raise FileNotFoundError(f"Checkpoint file {path!r} does not exist.")
        return False
    if not is_local(path):
        fs, fs_path = _fs(path)
        return _verify_zip(fs.cat_file(fs_path), path)
    with open(_local(path), "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _verify_zip(mapped, path)


def verify_checkpoint_bytes(data: bytes, name: str) -> bool:
    """:func:`verify_checkpoint_file` for a ``torch.save`` archive held in memory (e.g. one record
    of a sharded checkpoint's shard file).

    Args:
        data: the archive's bytes.
        name: where they come from, for the error message.

    Returns:
        True if every record was checked, False if there is nothing to check.

    Raises:
        CheckpointError: a record's bytes do not match its CRC-32.
    """
    return _verify_zip(data, name)


def load_checkpoint_file(path: str, *, weights_only: bool = True, verify: bool = True) -> Any:
    """Read a checkpoint file into CPU memory.

    ``.safetensors`` files give ``{"model": tensors}``; ``.pkl`` files are plain pickles (only
    with ``weights_only=False``); any other file is read with ``torch.load``.

    Args:
        path: a local path or an fsspec URL.
        weights_only: refuse files that need arbitrary pickled objects (the safe default).
        verify: check the file's CRC-32s first (see :func:`verify_checkpoint_file`). An fsspec
            file is then downloaded once and loaded from memory.

    Returns:
        What the file holds.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file needs arbitrary pickled objects and ``weights_only`` is set.
        CheckpointError: the file is corrupt (a CRC-32 mismatch), truncated or not a checkpoint.
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
        if is_local(path):
            if verify:
                verify_checkpoint_file(path)
            return _torch_load(_local(path), weights_only)
        fs, fs_path = _fs(path)
        if verify:
            data = fs.cat_file(fs_path)  # one download, verified and loaded from memory
            _verify_zip(data, path)
            return _torch_load(io.BytesIO(data), weights_only)
        with fs.open(fs_path, "rb") as f:
            return _torch_load(f, weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only and "weights only load failed" in str(exc).lower():
            reason = str(exc).split("\n")
            detail = next((line.strip() for line in reason if "GLOBAL" in line), "")
            raise UnsafeCheckpointError(
                f"Checkpoint {path!r} holds objects that safe loading (weights_only=True) does "
                f"not allow; nothing in it was executed. {detail} {_OPT_IN_HINT}"
            ) from exc
        raise _corrupt(path, exc) from exc
    except (FileNotFoundError, MemoryError, CheckpointError):
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
