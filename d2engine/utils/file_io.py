"""Paths that may be local or remote: detectron2's ``PathManager``, backed by fsspec.

detectron2 code reads and writes files through ``PathManager`` (iopath's); the same calls work
here on local paths and on any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...)::

    from d2engine.utils.file_io import PathManager

    with PathManager.open("s3://bucket/run/metrics.json") as f:
        ...
    PathManager.mkdirs(out_dir)
    local = PathManager.get_local_path("s3://bucket/weights.pth")  # downloaded once, cached

Local paths (and ``file://`` URLs) go straight to the operating system. Handlers written for
iopath (objects with ``_get_supported_prefixes()`` and ``_open``, ``_get_local_path``...) can be
registered with :meth:`PathManagerBase.register_handler`: paths with their prefixes go to them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import IO, Any

import fsspec

__all__ = ["PathManager", "PathManagerBase", "is_local", "join", "local_path", "url_to_fs"]

_CACHE_ENV = "D2ENGINE_CACHE"


def is_local(path: str) -> bool:
    """Whether ``path`` is on the local file system (a plain path or a ``file://`` URL)."""
    protocol, _ = fsspec.core.split_protocol(os.fspath(path))
    return protocol in (None, "file", "local")


def local_path(path: str) -> str:
    """The operating-system path of a local ``path`` (``file:///x`` becomes ``/x``)."""
    path = os.fspath(path)
    return fsspec.core.split_protocol(path)[1] if "://" in path else path


def url_to_fs(path: str) -> tuple[Any, str]:
    """The fsspec file system of ``path`` and the path within it."""
    fs, fs_path = fsspec.core.url_to_fs(os.fspath(path))
    return fs, fs_path


def join(directory: str, *names: str) -> str:
    """Join a directory (a local path or a URL) and names."""
    if is_local(directory):
        return os.path.join(directory, *names)
    return "/".join([directory.rstrip("/"), *names])


def _cache_dir() -> str:
    return os.environ.get(_CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "d2engine", "file_io"
    )


class PathManagerBase:
    """The file operations of iopath's ``PathManager``, on local paths and fsspec URLs.

    Every method takes a path that is a local path, a ``file://`` URL, an fsspec URL, or a path
    with the prefix of a registered iopath-style handler.
    """

    def __init__(self) -> None:
        self._handlers: list[tuple[str, Any]] = []  # (prefix, handler), longest prefix first

    def register_handler(self, handler: Any, allow_override: bool = False) -> None:
        """Send paths with the handler's prefixes to an iopath-style ``PathHandler``.

        Args:
            handler: an object with ``_get_supported_prefixes()`` and the ``_open``,
                ``_get_local_path``, ``_exists``... methods it supports.
            allow_override: replace a handler already registered for a prefix.

        Raises:
            TypeError: if ``handler`` has no ``_get_supported_prefixes``.
            ValueError: if a prefix is taken and ``allow_override`` is False.
        """
        prefixes = getattr(handler, "_get_supported_prefixes", None)
        if prefixes is None:
            raise TypeError(
                f"register_handler expects an iopath-style PathHandler with "
                f"_get_supported_prefixes(), got {type(handler).__name__}. HINT: for a new URL "
                "scheme, register an fsspec file system (fsspec.register_implementation) instead."
            )
        for prefix in prefixes():
            taken = [h for p, h in self._handlers if p == prefix]
            if taken and not allow_override:
                raise ValueError(
                    f"The prefix {prefix!r} already has a handler ({type(taken[0]).__name__}). "
                    "HINT: pass allow_override=True to replace it."
                )
            self._handlers = [(p, h) for p, h in self._handlers if p != prefix]
            self._handlers.append((prefix, handler))
        self._handlers.sort(key=lambda item: -len(item[0]))

    def handles(self, path: str) -> bool:
        """Whether a registered handler takes ``path`` (by its prefix)."""
        return self._handler(path) is not None

    def _handler(self, path: str) -> Any:
        path = os.fspath(path)
        for prefix, handler in self._handlers:
            if path.startswith(prefix):
                return handler
        return None

    def _call(self, name: str, path: str, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        handler = self._handler(path)
        if handler is None:
            return False, None
        method = getattr(handler, f"_{name}", None)
        if method is None:
            raise NotImplementedError(
                f"The handler {type(handler).__name__} for {path!r} has no _{name} method."
            )
        return True, method(path, *args, **kwargs)

    def open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs: Any) -> IO[Any]:
        """Open a file, like the built-in ``open``.

        Args:
            path: the file.
            mode: "r", "rb", "w", "wb", "a"...
            buffering: as in ``open`` (local files only).
            **kwargs: ``encoding``, ``newline``... for text modes.

        Returns:
            A file object (a context manager).
        """
        handled, result = self._call("open", path, mode, buffering=buffering, **kwargs)
        if handled:
            return result
        if is_local(path):
            return open(local_path(path), mode, buffering, **kwargs)  # noqa: SIM115
        fs, fs_path = url_to_fs(path)
        return fs.open(fs_path, mode, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        """Whether a file or directory exists at ``path``."""
        handled, result = self._call("exists", path, **kwargs)
        if handled:
            return bool(result)
        if is_local(path):
            return os.path.exists(local_path(path))
        fs, fs_path = url_to_fs(path)
        return bool(fs.exists(fs_path))

    def isfile(self, path: str, **kwargs: Any) -> bool:
        """Whether ``path`` is a file."""
        handled, result = self._call("isfile", path, **kwargs)
        if handled:
            return bool(result)
        if is_local(path):
            return os.path.isfile(local_path(path))
        fs, fs_path = url_to_fs(path)
        return bool(fs.isfile(fs_path))

    def isdir(self, path: str, **kwargs: Any) -> bool:
        """Whether ``path`` is a directory."""
        handled, result = self._call("isdir", path, **kwargs)
        if handled:
            return bool(result)
        if is_local(path):
            return os.path.isdir(local_path(path))
        fs, fs_path = url_to_fs(path)
        return bool(fs.isdir(fs_path))

    def ls(self, path: str, **kwargs: Any) -> list[str]:
        """The names (not paths) of the entries of directory ``path``, like ``os.listdir``."""
        handled, result = self._call("ls", path, **kwargs)
        if handled:
            return list(result)
        if is_local(path):
            return os.listdir(local_path(path))
        fs, fs_path = url_to_fs(path)
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(fs_path, detail=False)]

    def mkdirs(self, path: str, **kwargs: Any) -> None:
        """Create directory ``path`` and its parents; an existing directory is fine."""
        handled, _ = self._call("mkdirs", path, **kwargs)
        if handled:
            return
        if is_local(path):
            os.makedirs(local_path(path), exist_ok=True)
        else:
            fs, fs_path = url_to_fs(path)
            fs.makedirs(fs_path, exist_ok=True)

    def rm(self, path: str, **kwargs: Any) -> None:
        """Delete the file at ``path``.

        Raises:
            FileNotFoundError: if there is no such file.
        """
        handled, _ = self._call("rm", path, **kwargs)
        if handled:
            return
        if is_local(path):
            os.remove(local_path(path))
            return
        fs, fs_path = url_to_fs(path)
        if not fs.exists(fs_path):
            raise FileNotFoundError(f"PathManager.rm: no file at {path!r}.")
        fs.rm(fs_path)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False, **kwargs: Any) -> bool:
        """Copy a file, possibly between file systems.

        Args:
            src_path: the file to copy.
            dst_path: the destination file.
            overwrite: replace an existing destination; without it an existing destination is
                left alone and False returned (iopath's behaviour).

        Returns:
            Whether the file was copied.
        """
        handled, result = self._call("copy", src_path, dst_path, overwrite, **kwargs)
        if handled:
            return bool(result)
        if self.exists(dst_path) and not overwrite:
            return False
        with self.open(src_path, "rb") as src, self.open(dst_path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return True

    def mv(self, src_path: str, dst_path: str, **kwargs: Any) -> bool:
        """Move a file (copy then delete across file systems).

        Returns:
            True once moved.
        """
        handled, result = self._call("mv", src_path, dst_path, **kwargs)
        if handled:
            return bool(result)
        if is_local(src_path) and is_local(dst_path):
            shutil.move(local_path(src_path), local_path(dst_path))
            return True
        self.copy(src_path, dst_path, overwrite=True)
        self.rm(src_path)
        return True

    def copy_from_local(
        self, local_path: str, dst_path: str, overwrite: bool = False, **kwargs: Any
    ) -> bool:
        """Upload a local file to ``dst_path`` (see :meth:`copy`)."""
        return self.copy(local_path, dst_path, overwrite=overwrite, **kwargs)

    def get_local_path(self, path: str, force: bool = False, **kwargs: Any) -> str:
        """A local file with the content of ``path``: the path itself when local, else a copy.

        Remote files are downloaded once into a cache folder (``$D2ENGINE_CACHE``, default
        ``~/.cache/d2engine/file_io``) and the cached copy is reused afterwards.

        Args:
            path: the file.
            force: download again even if a cached copy exists.

        Returns:
            The local path.
        """
        handled, result = self._call("get_local_path", path, **kwargs)
        if handled:
            return str(result)
        if is_local(path):
            return local_path(path)
        cache = os.path.join(_cache_dir(), fsspec.core.split_protocol(path)[0] or "remote")
        target = os.path.join(cache, fsspec.core.split_protocol(path)[1].lstrip("/"))
        if force or not os.path.isfile(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            partial = f"{target}.part{os.getpid()}"
            try:
                with self.open(path, "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(partial, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial)
        return target


PathManager = PathManagerBase()
"""The process-wide path manager (detectron2's ``detectron2.utils.file_io.PathManager``)."""
