"""Checkpointer and DetectionCheckpointer (and PeriodicCheckpointer, from
:mod:`d2engine.checkpoint.periodic`).

A checkpoint is one file ``{save_dir}/{name}.pth`` holding ``{"model": model.state_dict(),
<name>: checkpointable.state_dict() for each checkpointable, **extra}``; the text file
``{save_dir}/last_checkpoint`` holds the base name of the newest complete checkpoint. Both are
written atomically (see :mod:`d2engine.checkpoint.file_io`), the checkpoint first, so a job killed
at any moment leaves ``last_checkpoint`` pointing to a file that loads; it never names a checkpoint
whose weights are not finite, nor a file outside ``save_dir``
(:mod:`d2engine.checkpoint.integrity`). Files are verified against their CRC-32s and read with
``torch.load(weights_only=True)`` unless the checkpointer is built with ``weights_only=False``.

When the model is sharded (DTensor parameters, FSDP2) a checkpoint is the directory
``{save_dir}/{name}/`` in ``torch.distributed.checkpoint`` format instead, written by every rank
(:mod:`d2engine.checkpoint.sharded`); loading accepts either kind into either kind of model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from d2engine.checkpoint import file_io, integrity
from d2engine.checkpoint.async_saver import AsyncSaver
from d2engine.checkpoint.file_io import CheckpointError, UnsafeCheckpointError
from d2engine.checkpoint.integrity import LAST_CHECKPOINT
from d2engine.checkpoint.model_loading import (
    IncompatibleCheckpointError,
    LoadReport,
    check_optimizer_state,
    load_model_state,
    unwrap_model,
)
from d2engine.checkpoint.periodic import PeriodicCheckpointer
from d2engine.checkpoint.state import CollectiveStateful, Stateful, snapshot_to_cpu
from d2engine.utils import comm
from d2engine.utils.file_io import PathManager

__all__ = ["Checkpointer", "DetectionCheckpointer", "PeriodicCheckpointer"]

logger = logging.getLogger(__name__)

# Errors after which resume_or_load does not try an older checkpoint: they are not about the file.
_NO_FALLBACK = (UnsafeCheckpointError, IncompatibleCheckpointError)


class Checkpointer:
    """Saves and loads a model and other checkpointable objects.

    Args:
        model: the model; DistributedDataParallel / DataParallel / ``torch.compile`` wrappers are
            unwrapped, so checkpoints never carry a ``module.`` prefix.
        save_dir: the directory (a local path or an fsspec URL such as ``s3://bucket/run``) where
            checkpoints are saved; ``""`` disables saving.
        save_to_disk: whether :meth:`save` writes anything (e.g. only on the main process).
        async_save: copy the state to CPU memory in :meth:`save` and write it on a background
            thread (see :meth:`save`). The CPU copy is kept between saves and reused, so
            this holds about one checkpoint's size of host memory until :meth:`close`.
        weights_only: load files with ``torch.load(weights_only=True)``, refusing files that
            need arbitrary pickled objects. Set to False only for files from a trusted source.
        checkpointables: other objects with ``state_dict()`` / ``load_state_dict()`` (optimizer,
            scheduler, ...), saved under their keyword. ``async_save`` and ``weights_only`` are
            therefore not usable as names.

    Attributes:
        last_load_report: what did not fit when the model weights were last loaded (shape
            mismatches, missing and unexpected keys); None before the first load.
        path_manager: reads the files given to :meth:`load` whose path has the prefix of one of
            its handlers (d2engine's :data:`~d2engine.utils.file_io.PathManager` by default;
            an iopath ``PathManager`` with custom handlers may be assigned, as in detectron2).
            Other paths, and every write, go through fsspec.
        resumed_from: the checkpoint the last :meth:`resume_or_load` resumed from (``""`` when it
            did not resume: nothing to resume, ``resume=False``, or before the first call).
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: bool = True,
        async_save: bool = False,
        weights_only: bool = True,
        **checkpointables: Stateful,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Checkpointer expects an nn.Module as model; got {type(model).__name__}."
            )
        self.model = unwrap_model(model)
        self.save_dir = str(save_dir) if save_dir else ""
        self.save_to_disk = bool(save_to_disk)
        self.async_save = bool(async_save)
        self.weights_only = bool(weights_only)
        self.checkpointables: dict[str, Stateful] = {}
        for key, obj in checkpointables.items():
            self.add_checkpointable(key, obj)
        self.logger = logger
        self.path_manager: Any = PathManager
        self.last_load_report: LoadReport | None = None
        self.resumed_from = ""
        self._saver: AsyncSaver | None = AsyncSaver() if self.async_save else None
        # CPU copies of the state from the last async save, reused by the next one.
        self._snapshot_buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._prepared_dir = False
        self._sharded_saver: Any = None  # a sharded.ShardedSaver, from the first sharded save

    # ----------------------------------------------------------------------------------------
    # registration
    # ----------------------------------------------------------------------------------------
    def add_checkpointable(self, key: str, checkpointable: Stateful) -> None:
        """Save and load ``checkpointable`` under ``key`` from now on.

        Args:
            key: its name in the checkpoint.
            checkpointable: an object with ``state_dict()`` and ``load_state_dict()``.

        Raises:
            KeyError: ``key`` is "model" or already registered.
            TypeError: the object has no ``state_dict`` / ``load_state_dict``.
        """
        if key == "model" or key in self.checkpointables:
            raise KeyError(
                f"Cannot add checkpointable {key!r}: the name is already used "
                f"(taken: {['model', *self.checkpointables]}). HINT: pick another key."
            )
        if not isinstance(checkpointable, Stateful):
            raise TypeError(
                f"Checkpointable {key!r} must have state_dict() and load_state_dict(); got "
                f"{type(checkpointable).__name__}."
            )
        self.checkpointables[key] = checkpointable

    # ----------------------------------------------------------------------------------------
    # saving
    # ----------------------------------------------------------------------------------------
    @property
    def writes(self) -> bool:
        """Whether :meth:`save` writes files in this process (``save_dir`` and ``save_to_disk``)."""
        return bool(self.save_dir) and self.save_to_disk

    def gather_states(self) -> None:
        """Collect the cross-rank state of the checkpointables before a save (a collective).

        Calls ``gather_state()`` of every :class:`~d2engine.checkpoint.state.CollectiveStateful`
        checkpointable (a trainer: every rank's RNG state). Call it on every rank at the same point,
        right before :meth:`save` (which writes on the main process only with
        :class:`DetectionCheckpointer`); the ``PeriodicCheckpointer`` hook does.
        """
        for obj in self.checkpointables.values():
            if isinstance(obj, CollectiveStateful):
                obj.gather_state()

    def checkpoint_path(self, name: str) -> str:
        """The path :meth:`save` writes for ``name``: ``{save_dir}/{name}.pth``, or the directory
        ``{save_dir}/{name}`` when the model is sharded."""
        if comm.is_sharded_module(self.model):
            return file_io.join(self.save_dir, name)
        return file_io.join(self.save_dir, f"{name}.pth")

    def save(self, name: str, **extra: Any) -> None:
        """Write a checkpoint ``{save_dir}/{name}.pth``, then point ``last_checkpoint`` to it.

        Does nothing when ``save_dir`` is empty or ``save_to_disk`` is False. With
        ``async_save``, the previous pending save is waited for, the state is copied to CPU
        memory (later in-place changes of the model do not change what is written), and the
        write happens on a background thread; ``last_checkpoint`` is updated once the file is
        complete. :meth:`wait` blocks until then.

        The model's parameters must be finite: NaN or infinite values raise
        :class:`~d2engine.checkpoint.integrity.NonFiniteCheckpointError` and nothing is written
        (with ``async_save``, from the next :meth:`save` or :meth:`wait`).

        Args:
            name: the file name without ``.pth``, e.g. ``"model_0000999"``.
            extra: more entries for the checkpoint (e.g. ``iteration=999``).

        Raises:
            KeyError: an extra key is "model" or a checkpointable's name.
            NonFiniteCheckpointError: the model's parameters hold NaN or infinite values.
            CheckpointError: the file system refused the write (e.g. "No space left on device");
                ``last_checkpoint`` and the checkpoint it names were not changed.
            AsyncSaveError: the previous asynchronous save failed.
        """
        self._save(name, extra, tag=True)

    def save_untagged(self, name: str, **extra: Any) -> None:
        """Like :meth:`save`, but leave ``last_checkpoint`` alone.

        For side copies such as a best-model checkpoint: a resumed run must continue from the
        latest state, not from the best one. Parameters are not checked for finite values.

        Args:
            name: the file name without ``.pth``, e.g. ``"model_best"``.
            extra: more entries for the checkpoint.

        Raises:
            KeyError: an extra key is "model" or a checkpointable's name.
            AsyncSaveError: the previous asynchronous save failed.
        """
        self._save(name, extra, tag=False)

    def _save(self, name: str, extra: dict[str, Any], *, tag: bool) -> None:
        sharded = bool(self.save_dir) and comm.is_sharded_module(self.model)
        if not (self.writes or sharded):  # a sharded save needs every rank
            return
        clashes = sorted(set(extra) & {"model", *self.checkpointables})
        if clashes:
            raise KeyError(
                f"Checkpointer.save got extra keys {clashes} that clash with the model or a "
                f"checkpointable. HINT: rename the extra entries."
            )
        if self._saver is not None:
            self._saver.wait()  # at most one snapshot in memory; re-raises a failed save
        data: dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(extra)
        path = self.checkpoint_path(name)
        if sharded:
            self._save_sharded(data, path, tag=tag)
            return
        self._prepare_dir()
        self.logger.info("Saving checkpoint to %s", path)
        if self._saver is None:
            self._write(data, path, tag=tag)
            return
        # The previous write is complete (waited for above), so its CPU buffers can be reused.
        snapshot = snapshot_to_cpu(data, buffers=self._snapshot_buffers)
        del data

        def write() -> None:
            self._write(snapshot, path, tag=tag)  # the finite check runs here, off the loop
            self.logger.info("Finished writing checkpoint %s", path)

        self._saver.submit(write, f"write checkpoint {path}")

    def _write(self, data: dict[str, Any], path: str, *, tag: bool) -> None:
        parameters = [name for name, _ in self.model.named_parameters()] if tag else []
        integrity.write_checkpoint(data, path, self.save_dir, parameters=parameters, tag=tag)

    def _save_sharded(self, data: dict[str, Any], path: str, *, tag: bool) -> None:
        """Write the checkpoint directory ``path`` with every rank (rank 0 completes it).

        ``save_to_disk`` is not consulted: every rank writes its own shards. See
        :mod:`d2engine.checkpoint.sharded`.
        """
        if self._sharded_saver is None:
            self._sharded_saver = _sharded().ShardedSaver(async_save=self.async_save)
        commit = comm.is_main_process()
        last, basename = self._last_checkpoint_path(), file_io.basename(path)

        def on_commit() -> None:
            if tag:
                file_io.atomic_write_text(last, basename)

        if commit:
            self.logger.info("Saving sharded checkpoint to %s", path)
        parameters = [name for name, _ in self.model.named_parameters()] if tag else []
        self._sharded_saver.save(
            data, path, commit=commit, on_commit=on_commit, saver=self._saver, parameters=parameters
        )

    def _prepare_dir(self) -> None:
        if self._prepared_dir:
            return
        file_io.makedirs(self.save_dir)
        for stale in file_io.remove_stale_temp_files(self.save_dir):
            self.logger.info("Removed a temporary file left by an interrupted save: %s", stale)
        self._prepared_dir = True

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` to ``last_filename_basename`` (written atomically).

        With ``async_save`` and saves pending, the update is queued after them.

        Args:
            last_filename_basename: a file name in ``save_dir``, e.g. ``"model_final.pth"``.
        """
        path = self._last_checkpoint_path()
        if self._saver is not None and self._saver.pending:
            self._saver.submit(
                lambda: file_io.atomic_write_text(path, last_filename_basename), f"update {path}"
            )
        else:
            file_io.atomic_write_text(path, last_filename_basename)

    def remove_checkpoint(self, path: str) -> None:
        """Delete a checkpoint file once the pending saves are complete.

        The file ``last_checkpoint`` points to at that moment is never deleted (a warning is
        logged instead). A missing file is not an error.

        Args:
            path: the file's path (e.g. from :meth:`checkpoint_path`).
        """

        def remove() -> None:
            if path == self.get_checkpoint_file():
                self.logger.warning("Not deleting %s: last_checkpoint points to it.", path)
                return
            if _is_local_dir(path):
                _sharded().remove_sharded_checkpoint(path)
            else:
                file_io.remove(path)

        if self._saver is not None and self._saver.pending:
            self._saver.submit(remove, f"delete {path}")
        else:
            remove()

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete (no-op without ``async_save``).

        Raises:
            AsyncSaveError: a pending save failed.
        """
        if self._saver is not None:
            self._saver.wait()

    def close(self) -> None:
        """Finish pending saves and stop the background writer (it restarts on the next save).

        Raises:
            AsyncSaveError: a pending save failed.
        """
        if self._saver is not None:
            self._saver.close()
            self._snapshot_buffers.clear()
        if self._sharded_saver is not None:
            self._sharded_saver.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------
    # finding checkpoints
    # ----------------------------------------------------------------------------------------
    def _last_checkpoint_path(self) -> str:
        return file_io.join(self.save_dir, LAST_CHECKPOINT)

    def has_checkpoint(self) -> bool:
        """Whether ``save_dir`` has a ``last_checkpoint`` file."""
        return bool(self.save_dir) and file_io.exists(self._last_checkpoint_path())

    def get_checkpoint_file(self) -> str:
        """The path of the checkpoint ``last_checkpoint`` names, or ``""`` if none.

        ``""`` too when ``last_checkpoint`` does not hold a file name inside ``save_dir`` (see
        :func:`~d2engine.checkpoint.integrity.resolve_last_checkpoint`).
        """
        if not self.save_dir:
            return ""
        try:
            return integrity.resolve_last_checkpoint(self.save_dir)
        except (OSError, CheckpointError):
            return ""

    def get_all_checkpoint_files(self) -> list[str]:
        """All checkpoints in ``save_dir`` (``.pth``, ``.pt``, ``.safetensors`` files and sharded
        checkpoint directories), by name."""
        if not self.save_dir:
            return []
        found = file_io.list_checkpoint_files(self.save_dir)
        if _has_subdirectories(self.save_dir):
            found += _sharded().list_sharded_checkpoints(self.save_dir)
        return sorted(found)

    # ----------------------------------------------------------------------------------------
    # loading
    # ----------------------------------------------------------------------------------------
    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """Resume from ``save_dir``'s last checkpoint if ``resume`` and one exists, else load path.

        Resuming loads everything (model and all checkpointables) from the file
        ``last_checkpoint`` names, and sets :attr:`resumed_from`. When that file is corrupt (a
        CRC-32 mismatch, truncated), missing, or ``last_checkpoint`` itself does not name a file
        inside ``save_dir`` (empty, not UTF-8, ``../x.pth``, an absolute path), the newest other
        checkpoint of ``save_dir`` that loads is used, with a warning naming what was bad.
        Without a ``last_checkpoint`` only the model weights of ``path`` are loaded.

        Args:
            path: weights to start from when not resuming (``""``: none).
            resume: whether to resume.

        Returns:
            The unused entries of the loaded checkpoint (e.g. ``{"iteration": 999}``).

        Raises:
            CheckpointError: no checkpoint in ``save_dir`` loads.
            UnsafeCheckpointError: the checkpoint needs arbitrary pickled objects.
            IncompatibleCheckpointError: the checkpoint's optimizer state does not fit the model
                (its shapes changed); no fallback is tried.
        """
        self.resumed_from = ""
        if not (resume and self.has_checkpoint()):
            if resume and self.get_all_checkpoint_files():
                self.logger.warning(
                    "%s holds checkpoint files but no %s: not resuming. HINT: to resume, write "
                    "the file name of one of them into %s.",
                    self.save_dir,
                    LAST_CHECKPOINT,
                    self._last_checkpoint_path(),
                )
            return self.load(path, checkpointables=[])
        try:
            last = integrity.resolve_last_checkpoint(self.save_dir)
        except (OSError, CheckpointError) as exc:
            self.logger.warning("%s; falling back to the newest checkpoint that loads.", exc)
            return self._load_newest_valid(exclude="", first_error=exc)
        try:
            result = self.load(last)
        except _NO_FALLBACK:
            raise
        except (CheckpointError, FileNotFoundError) as exc:
            self.logger.warning(
                "The last checkpoint %s cannot be loaded (%s); falling back to the newest "
                "checkpoint in %s that loads.",
                last,
                exc,
                self.save_dir,
            )
            return self._load_newest_valid(exclude=last, first_error=exc)
        self.resumed_from = last
        return result

    def _load_newest_valid(self, exclude: str, first_error: BaseException) -> dict[str, Any]:
        """Load the newest checkpoint of ``save_dir`` other than ``exclude`` that loads."""
        candidates = integrity.newest_first(
            p for p in self.get_all_checkpoint_files() if p != exclude
        )
        errors = [f"{exclude or LAST_CHECKPOINT}: {first_error}"]
        for candidate in candidates:
            try:
                result = self.load(candidate)
            except _NO_FALLBACK:
                raise
            except (CheckpointError, FileNotFoundError) as exc:
                self.logger.warning("Checkpoint %s cannot be loaded either: %s", candidate, exc)
                errors.append(f"{candidate}: {exc}")
                continue
            self.logger.warning(
                "Resumed from %s instead of the bad %s.", candidate, exclude or LAST_CHECKPOINT
            )
            self.resumed_from = candidate
            return result
        raise CheckpointError(
            f"No checkpoint in {self.save_dir!r} can be loaded:\n  "
            + "\n  ".join(errors)
            + "\nHINT: resume=False starts from the initial weights."
        )

    def load(
        self,
        path: str | None,
        checkpointables: Iterable[str] | None = None,
        *,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint into the model and the named checkpointables.

        Args:
            path: a checkpoint file (local or fsspec URL); ``""`` or None loads nothing.
            checkpointables: the checkpointables to restore (default: all); others stay in the
                returned dict.
            weights_only: override the checkpointer's ``weights_only`` for this call.

        Returns:
            The checkpoint entries that were not used (e.g. ``{"iteration": 999}``).

        Raises:
            FileNotFoundError: no file at ``path``.
            UnsafeCheckpointError: the file needs arbitrary pickled objects (see ``weights_only``).
            CheckpointError: the file is corrupt (its CRC-32s do not match), truncated or has no
                model weights.
            IncompatibleCheckpointError: a restored optimizer holds state for parameters whose
                shape changed (see
                :func:`~d2engine.checkpoint.model_loading.stale_optimizer_state`).
            KeyError: a name in ``checkpointables`` is not registered.
        """
        if not path:
            self.logger.info("No checkpoint found. Initializing model from scratch.")
            return {}
        self.wait()
        names = list(self.checkpointables) if checkpointables is None else list(checkpointables)
        unknown = [name for name in names if name not in self.checkpointables]
        if unknown:
            raise KeyError(
                f"Checkpointer.load was asked to restore {unknown}, which are not registered "
                f"checkpointables (registered: {sorted(self.checkpointables)})."
            )
        self.logger.info("[Checkpointer] Loading from %s ...", path)
        only_weights = self.weights_only if weights_only is None else bool(weights_only)
        checkpoint = self._read_checkpoint(path, weights_only=only_weights)
        report = self._load_model(checkpoint)
        report.log(self.logger)
        self.last_load_report = report
        restored = []
        for name in names:
            if name in checkpoint:
                self.logger.info("Loading %s from %s ...", name, path)
                self.checkpointables[name].load_state_dict(checkpoint.pop(name))
                restored.append(self.checkpointables[name])
        if comm.is_sharded_module(self.model):  # full optimizer states of a .pth: shard them
            _sharded_reader().shard_optimizer_states(_optimizers(restored))
        check_optimizer_state(restored, self.model, report.shape_mismatches, path)
        return checkpoint

    def _read_checkpoint(self, path: str, *, weights_only: bool) -> dict[str, Any]:
        """Read a checkpoint file or sharded directory, laid out for this checkpointer's model."""
        if _is_local_dir(path) or _replaced_sharded_dir(path):
            reader = _sharded_reader()
            loaded = reader.load_sharded_checkpoint(path, self.model, weights_only=weights_only)
            return self._as_checkpoint(path, loaded)
        checkpoint = self._load_file(path, weights_only=weights_only)
        if comm.is_sharded_module(self.model) and isinstance(checkpoint.get("model"), dict):
            weights = checkpoint["model"]
            checkpoint["model"] = _sharded_reader().distribute_like_model(weights, self.model)
        return checkpoint

    def _load_file(self, path: str, *, weights_only: bool = True) -> dict[str, Any]:
        """Read ``path`` into a dict with a "model" entry.

        A bare state dict (no "model" key, only tensors) is accepted as model weights.
        """
        manager = self.path_manager
        readable = path
        if manager is not PathManager or PathManager.handles(path):
            readable = manager.get_local_path(path)  # a handler's prefix (an iopath manager)
        return self._as_checkpoint(
            path, file_io.load_checkpoint_file(readable, weights_only=weights_only)
        )

    def _as_checkpoint(self, path: str, loaded: Any) -> dict[str, Any]:
        if not isinstance(loaded, dict):
            raise CheckpointError(
                f"Checkpoint {path!r} holds a {type(loaded).__name__}, not a dict. HINT: save "
                f"checkpoints with Checkpointer.save or torch.save(model.state_dict(), path)."
            )
        if "model" in loaded:
            return dict(loaded)
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return {"model": loaded}
        raise CheckpointError(
            f"Checkpoint {path!r} has no 'model' entry (keys: {sorted(map(str, loaded))[:10]}) and "
            f"is not a bare state dict of tensors. HINT: DetectionCheckpointer loads any dict "
            f"without a 'model' entry as model weights."
        )

    def _load_model(self, checkpoint: dict[str, Any]) -> LoadReport:
        """Load ``checkpoint.pop("model")`` into the model leniently and report what did not fit."""
        return load_model_state(self.model, checkpoint.pop("model"))


def _sharded() -> ModuleType:
    """:mod:`d2engine.checkpoint.sharded`, imported when a sharded model or directory is met:
    ``torch.distributed.checkpoint`` would add over a second to every ``import d2engine``."""
    from d2engine.checkpoint import sharded

    return sharded


def _sharded_reader() -> ModuleType:
    """:mod:`d2engine.checkpoint.sharded_reader`, imported when needed (see :func:`_sharded`)."""
    from d2engine.checkpoint import sharded_reader

    return sharded_reader


def _is_local_dir(path: str) -> bool:
    return file_io.is_local(path) and os.path.isdir(path.split("://", 1)[-1])


def _replaced_sharded_dir(path: str) -> bool:
    """Whether ``path`` is a sharded checkpoint that an interrupted save moved aside."""
    if not file_io.is_local(path) or file_io.exists(path):
        return False
    parent, name = os.path.split(path.split("://", 1)[-1].rstrip(os.sep))
    return os.path.isdir(os.path.join(parent, f".{name}.dcp-old"))


def _has_subdirectories(directory: str) -> bool:
    if not _is_local_dir(directory):
        return False
    with os.scandir(directory.split("://", 1)[-1]) as entries:
        return any(e.is_dir() and not e.name.startswith(".") for e in entries)


def _optimizers(objects: Iterable[Any]) -> list[torch.optim.Optimizer]:
    """The optimizers among ``objects`` or held by them as ``optimizer`` (a trainer's)."""
    found = []
    for obj in objects:
        if not isinstance(obj, torch.optim.Optimizer):
            obj = getattr(obj, "optimizer", None)
        if isinstance(obj, torch.optim.Optimizer):
            found.append(obj)
    return found


class DetectionCheckpointer(Checkpointer):
    """A :class:`Checkpointer` that saves on the main process only (by default) and loads any
    dict without a "model" entry as bare model weights.

    Args:
        model: see :class:`Checkpointer`.
        save_dir: see :class:`Checkpointer`.
        save_to_disk: whether to write; None (default): only on the main process.
        checkpointables: see :class:`Checkpointer` (``async_save`` and ``weights_only`` too).
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: bool | None = None,
        **checkpointables: Any,
    ) -> None:
        super().__init__(
            model,
            save_dir,
            save_to_disk=comm.is_main_process() if save_to_disk is None else save_to_disk,
            **checkpointables,
        )

    def _as_checkpoint(self, path: str, loaded: Any) -> dict[str, Any]:
        if isinstance(loaded, dict) and "model" not in loaded:
            return {"model": loaded}
        return super()._as_checkpoint(path, loaded)
