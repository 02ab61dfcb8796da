"""Sharded checkpoints: one directory per checkpoint, in ``torch.distributed.checkpoint`` (DCP)
format, for models whose parameters are DTensors (FSDP2): the layout, and writing one.

A checkpoint ``{save_dir}/{name}/`` holds what a ``.pth`` checkpoint holds, split in two:

- every DTensor (the model's sharded parameters, the optimizer state of those parameters, ...)
  is written by DCP: each rank writes its own shards (``__{rank}_0.distcp``) and rank 0 writes
  ``.metadata``, the index of the shards;
- everything else (non-sharded tensors such as buffers, numbers, strings, the trainer's hooks,
  RNG states, data position, ...) is written by rank 0 with ``torch.save`` into
  :data:`STATE_FILE`, where each DTensor is replaced by a reference to its DCP entry
  (``{"dcp": key, "placements": [...]}``, see :func:`references`).

Saving is a collective: every rank calls :meth:`ShardedSaver.save` at the same point. The
directory is written under a temporary name (``.{name}.dcp-tmp``) and renamed to ``{name}`` only
after every rank's shards and the metadata are complete (DCP's own commit step, a collective),
so a job killed at any moment leaves the previous checkpoint intact; temporary directories of
killed saves are removed at the next save. Asynchronous saves use DCP's ``async_save`` on a
process group of their own (a collective on the default group while FSDP trains on it would
interleave with FSDP's and break gloo): the shards are staged into CPU memory, reused from save to
save, and written in the background. Reading: :mod:`d2engine.checkpoint.sharded_reader`.

Only local paths are supported: the commit is a directory rename.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.optim.optimizer import register_optimizer_step_pre_hook

from d2engine.checkpoint import file_io
from d2engine.checkpoint.async_saver import AsyncSaver
from d2engine.checkpoint.file_io import (
    CheckpointError,
)
from d2engine.checkpoint.integrity import NonFiniteCheckpointError, non_finite_tensors
from d2engine.checkpoint.state import snapshot_to_cpu
from d2engine.utils import comm

__all__ = [
    "METADATA_FILE",
    "REFERENCE_KEY",
    "STATE_FILE",
    "ShardedSaver",
    "decode_placements",
    "is_sharded_checkpoint",
    "list_sharded_checkpoints",
    "local_directory",
    "references",
    "remove_sharded_checkpoint",
    "remove_stale_temp_dirs",
    "resolve_references",
    "restore_replaced_checkpoint",
]

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
"""The file of a sharded checkpoint that holds everything but the DTensors (written by rank 0)."""

METADATA_FILE = ".metadata"
"""DCP's index of the shards (written by rank 0 once every rank wrote its shards)."""

REFERENCE_KEY = "dcp"
"""The key of a reference to a DCP entry in the state file (with ``"placements"``)."""
_TMP_SUFFIX = ".dcp-tmp"
_OLD_SUFFIX = ".dcp-old"
_TMP_DIR = re.compile(r"^\..+(\.dcp-tmp|\.dcp-old)$")


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
def local_directory(path: str, what: str) -> str:
    """``path`` as a local file system path (``file://`` removed).

    Args:
        path: a checkpoint directory.
        what: the caller, for the error message.

    Returns:
        The local path.

    Raises:
        CheckpointError: ``path`` is a URL of another file system.
    """
    if not file_io.is_local(path):
        raise CheckpointError(
            f"{what}: sharded (DCP) checkpoints are written and read on the local file system "
            f"only, got {path!r}. HINT: use a local or network-mounted directory for OUTPUT_DIR, "
            f"or copy the checkpoint directory there first."
        )
    return path.split("://", 1)[1] if "://" in path else path


def is_sharded_checkpoint(path: str) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (it holds ``.metadata``).

    Args:
        path: a path (a file, a directory, or nothing).

    Returns:
        True for a directory with DCP's ``.metadata`` (a complete DCP checkpoint).
    """
    if not path or not file_io.is_local(path):
        return False
    local = local_directory(path, "is_sharded_checkpoint")
    return os.path.isdir(local) and os.path.isfile(os.path.join(local, METADATA_FILE))


def list_sharded_checkpoints(directory: str) -> list[str]:
    """The sharded checkpoint directories in ``directory``, sorted by name.

    Hidden entries (the temporary directories of unfinished saves among them) are left out.
    """
    if not file_io.is_local(directory):
        return []
    local = local_directory(directory, "list_sharded_checkpoints")
    try:
        names = sorted(os.listdir(local))
    except FileNotFoundError:
        return []
    return [
        file_io.join(directory, name)
        for name in names
        if not name.startswith(".") and is_sharded_checkpoint(file_io.join(directory, name))
    ]


def remove_sharded_checkpoint(path: str) -> None:
    """Delete a sharded checkpoint directory; a missing one is not an error.

    It is renamed to a hidden temporary name first, so a deletion killed halfway never leaves a
    partial checkpoint under its name (the rest goes at the next save).
    """
    local = local_directory(path, "remove_sharded_checkpoint")
    if not os.path.isdir(local):
        return
    parent, name = os.path.split(local.rstrip(os.sep))
    doomed = os.path.join(parent, f".{name}{_OLD_SUFFIX}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(local, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _replaced_path(path: str) -> str:
    parent, name = os.path.split(path.rstrip(os.sep))
    return os.path.join(parent, f".{name}{_OLD_SUFFIX}")


def restore_replaced_checkpoint(path: str) -> bool:
    """Put back the checkpoint directory ``path`` when a save that replaced it was killed.

    Saving a checkpoint under the name of an existing one moves the old directory aside
    (``.{name}.dcp-old``) just before moving the new one in; a job killed between the two renames
    leaves no directory under the name. Then the old one is moved back.

    Args:
        path: a checkpoint directory that may be missing.

    Returns:
        Whether ``path`` was restored.
    """
    local = local_directory(path, "restore_replaced_checkpoint")
    old = _replaced_path(local)
    if os.path.exists(local) or not is_sharded_checkpoint(old):
        return False
    try:
        os.replace(old, local)
    except FileNotFoundError:  # another rank restored it first
        return os.path.isdir(local)
    logger.warning("Restored %s, which an interrupted save was replacing.", path)
    return True


def remove_stale_temp_dirs(directory: str) -> list[str]:
    """Delete the temporary directories that killed saves left in ``directory``.

    A checkpoint that an interrupted save was replacing is put back instead
    (:func:`restore_replaced_checkpoint`). Call it only when no save of this job is in progress
    (the checkpointer does, on rank 0, before its first save).

    Returns:
        The paths deleted.
    """
    local = local_directory(directory, "remove_stale_temp_dirs")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(local)):
            path = os.path.join(local, name)
            if not (_TMP_DIR.match(name) and os.path.isdir(path)):
                continue
            if name.endswith(_OLD_SUFFIX):
                original = os.path.join(local, name[1 : -len(_OLD_SUFFIX)])
                if restore_replaced_checkpoint(original):
                    continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Splitting a checkpoint into DTensors (DCP) and the rest (the state file)
# --------------------------------------------------------------------------------------------
def _encode_placements(placements: tuple[Placement, ...], key: str) -> list[str]:
    codes = []
    for p in placements:
        if type(p) is Shard:
            codes.append(f"S{p.dim}")
        elif type(p) is Replicate:
            codes.append("R")
        else:
            raise CheckpointError(
                f"Cannot save {key!r}: its DTensor placement {p!r} is not supported by sharded "
                f"checkpoints (only Shard(dim) and Replicate()). HINT: shard the model with "
                f"d2engine.engine.create_fsdp_model (FSDP2 over a 1-D or 2-D mesh)."
            )
    return codes


def decode_placements(codes: Any, key: str) -> list[Placement]:
    """The DTensor placements of a reference (``["S0"]`` is ``[Shard(0)]``, ``"R"`` Replicate).

    Args:
        codes: the reference's ``"placements"``.
        key: its DCP key, for the error message.

    Returns:
        The placements.

    Raises:
        CheckpointError: an unknown code (a corrupt state file).
    """
    out: list[Placement] = []
    for code in codes if isinstance(codes, (list, tuple)) else [None]:
        if code == "R":
            out.append(Replicate())
        elif isinstance(code, str) and re.fullmatch(r"S\d+", code):
            out.append(Shard(int(code[1:])))
        else:
            raise CheckpointError(
                f"The state file's reference to {key!r} has placements {codes!r}; expected a list "
                f"of 'S<dim>' and 'R'. HINT: the checkpoint is corrupt; load an older one."
            )
    return out


def _split(obj: Any, path: tuple[str, ...], flat: dict[str, DTensor]) -> Any:
    """``obj`` with each DTensor replaced by a reference; the DTensors go into ``flat``."""
    if isinstance(obj, DTensor):
        key = "/".join(path)
        if key in flat and flat[key] is not obj:
            raise CheckpointError(
                f"Two entries of the checkpoint map to the same key {key!r}. HINT: avoid '/' in "
                f"state dict keys."
            )
        flat[key] = obj
        return {REFERENCE_KEY: key, "placements": _encode_placements(tuple(obj.placements), key)}
    if isinstance(obj, dict):
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _split(v, (*path, str(k)), flat)
        metadata = getattr(obj, "_metadata", None)  # module versions in a model's state_dict
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [_split(v, (*path, str(i)), flat) for i, v in enumerate(obj)]
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _is_ref(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and set(obj) == {REFERENCE_KEY, "placements"}
        and isinstance(obj[REFERENCE_KEY], str)
    )


def references(obj: Any) -> Iterator[dict[str, Any]]:
    """The references to DCP entries in a state file's content, depth first.

    Args:
        obj: what :data:`STATE_FILE` holds.

    Yields:
        ``{"dcp": key, "placements": [...]}`` dicts.
    """
    if _is_ref(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from references(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from references(v)


def resolve_references(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A state file's content with each reference replaced by its tensor.

    Args:
        obj: what :data:`STATE_FILE` holds.
        tensors: the tensors read from DCP, by key.

    Returns:
        A copy of ``obj`` (a model state dict's ``_metadata`` kept).
    """
    if _is_ref(obj):
        return tensors[obj[REFERENCE_KEY]]
    if isinstance(obj, dict):
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[k] = resolve_references(v, tensors)
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [resolve_references(v, tensors) for v in obj]
        if isinstance(obj, list):
            return items
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
class ShardedSaver:
    """Writes sharded checkpoints for one :class:`~d2engine.checkpoint.Checkpointer`.

    It owns what is kept between saves: the process group of the saves (created by the first
    save, a collective) and, for asynchronous saves, DCP's stager with its CPU buffers. Call
    :meth:`close` when done (the checkpointer's ``close()`` does).

    Asynchronous saves copy the shards into CPU memory on a background thread too, while the
    next forward and backward passes run: only an optimizer step changes them, and every
    ``optimizer.step()`` first waits until the copy is complete (a global optimizer step
    pre-hook, registered from the first asynchronous save to :meth:`close`, which does nothing
    when no copy is in progress). A sharded tensor changed in place by other code before the next
    optimizer step would be saved with that change.

    Args:
        async_save: stage the shards into CPU memory and write them in the background
            (``torch.distributed.checkpoint.async_save``).
    """

    def __init__(self, *, async_save: bool = False) -> None:
        self.async_save = bool(async_save)
        self._group: dist.ProcessGroup | None = None
        self._stager: DefaultStager | None = None
        self._staging: Future[Any] | None = None  # the copy into CPU memory in progress
        self._fence: Any = None  # the handle of the optimizer step pre-hook
        self._state_buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._cleaned: set[str] = set()

    def _process_group(self) -> dist.ProcessGroup:
        if self._group is None:
            # Created at the first save, which every rank makes at the same point.
            self._group = comm.new_group(backend="gloo")  # the job's collective timeout
        return self._group

    def save(
        self,
        data: dict[str, Any],
        path: str,
        *,
        commit: bool,
        on_commit: Callable[[], None],
        saver: AsyncSaver | None,
        parameters: Iterable[str] = (),
    ) -> None:
        """Write ``data`` as the sharded checkpoint directory ``path`` (a collective).

        Every rank calls it at the same point, with the same ``path``. The rank that ``commit``
        s (rank 0, which is also DCP's coordinator) removes a leftover temporary directory of
        ``path`` first, and, once every rank's shards and DCP's metadata are written, writes the
        state file, renames the directory into place and calls ``on_commit`` (which points
        ``last_checkpoint`` to it). With ``async_save`` the shards are staged into CPU memory
        before this returns and the rest runs on ``saver``'s thread.

        Args:
            data: the checkpoint (``{"model": ..., <checkpointable>: ..., **extra}``).
            path: the checkpoint directory.
            commit: whether this process completes the save (rank 0).
            on_commit: called after the directory is in place (on the committing rank only).
            saver: the checkpointer's background writer (required with ``async_save``).
            parameters: names of ``data["model"]`` entries that must be finite (each rank checks
                its shards; the ranks agree before anything is written).

        Raises:
            NonFiniteCheckpointError: a rank's shard of ``parameters`` holds NaN or infinite
                values (raised on every rank; nothing written).
            CheckpointError: a DTensor placement that cannot be saved, a remote path, or a write
                that failed (the previous checkpoints are intact).
        """
        local = local_directory(path, "ShardedSaver.save")
        parent, name = os.path.split(local.rstrip(os.sep))
        tmp = os.path.join(parent, f".{name}{_TMP_SUFFIX}")
        group = self._process_group()
        if commit:
            if parent not in self._cleaned:
                self._cleaned.add(parent)
                os.makedirs(parent, exist_ok=True)
                for stale in remove_stale_temp_dirs(parent):
                    logger.info("Removed a directory left by an interrupted save: %s", stale)
            shutil.rmtree(tmp, ignore_errors=True)
        model_state = data.get("model", {})
        local_shards = {n: _local(model_state[n]) for n in parameters if n in model_state}
        bad_here = non_finite_tensors(local_shards)
        # Also a barrier: no rank writes into the temporary directory before it was cleaned.
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, bad_here, group=group)
        bad = sorted({n for names in gathered for n in names})
        if bad:
            raise NonFiniteCheckpointError(
                f"Not saving checkpoint {path!r}: the model's parameters hold NaN or infinite "
                f"values ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the previous "
                f"checkpoints and last_checkpoint are unchanged. HINT: training diverged; resume "
                f"from the last checkpoint with a lower learning rate (or gradient clipping)."
            )

        flat: dict[str, DTensor] = {}
        structure = _split(data, (), flat)
        writer = FileSystemWriter(tmp, sync_files=True)
        planner = DefaultSavePlanner()

        def finish() -> None:
            file_io.atomic_save(structure, os.path.join(tmp, STATE_FILE))
            _commit_dir(tmp, local)
            on_commit()

        if not self.async_save:
            try:
                dcp.save(flat, storage_writer=writer, planner=planner, process_group=group)
            except CheckpointException as exc:  # every rank gets it
                raise _write_failed(path, exc) from exc
            if commit:
                finish()
            return
        if saver is None:
            raise ValueError("ShardedSaver.save(async_save=True) needs the checkpointer's saver.")
        if self._stager is None:
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=torch.cuda.is_available(),
                    use_shared_memory=False,
                    use_async_staging=True,
                    use_non_blocking_copy=False,
                )
            )
            self._fence = register_optimizer_step_pre_hook(self._wait_for_staging)
        response = dcp.async_save(
            flat,
            storage_writer=writer,
            planner=planner,
            process_group=group,
            async_stager=self._stager,
        )
        if isinstance(response, AsyncSaveResponse):  # staging in the background
            self._staging, upload = response.staging_completion, response.upload_completion
        else:
            self._staging, upload = None, response
        if commit:
            # The state file's own tensors (buffers, RNG states, ...) are copied now too.
            structure = snapshot_to_cpu(structure, buffers=self._state_buffers)

        def write() -> None:
            try:
                upload.result()
            except CheckpointException as exc:
                raise _write_failed(path, exc) from exc
            if commit:
                finish()
                logger.info("Finished writing checkpoint %s", path)

        saver.submit(write, f"write sharded checkpoint {path}")

    def _wait_for_staging(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before any optimizer step: let the copy of the shards in progress finish."""
        staging, self._staging = self._staging, None
        if staging is not None:
            futures.wait([staging])  # a failed copy is reported by the write (AsyncSaveError)

    def close(self) -> None:
        """Release the staging buffers and the optimizer hook (the next asynchronous save sets
        them up again). Call it once the pending writes are complete."""
        if self._fence is not None:
            self._fence.remove()
            self._fence = None
        self._staging = None
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        self._state_buffers.clear()


def _local(tensor: Any) -> Any:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _write_failed(path: str, exc: BaseException) -> CheckpointError:
    first = str(exc).strip().splitlines()
    causes = [line.strip() for line in first if "Error" in line][-1:] or first[:1]
    return CheckpointError(
        f"Could not write sharded checkpoint {path!r}: {'; '.join(causes)[:300]}; the previous "
        f"checkpoints and last_checkpoint are unchanged. HINT: check the free space and "
        f"permissions of the directory on every machine."
    )


def _commit_dir(tmp: str, target: str) -> None:
    """Move the complete directory ``tmp`` to ``target`` (replacing an older one), durably."""
    parent = os.path.dirname(target) or "."
    _fsync_dir(tmp)
    if os.path.exists(target):
        old = _replaced_path(target)  # restored if the job dies before the next rename
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(parent)
