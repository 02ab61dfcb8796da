"""Reading sharded checkpoint directories (:mod:`d2engine.checkpoint.sharded`) safely, into
sharded or unsharded models, and exporting their weights as one file.

Loading (:func:`load_sharded_checkpoint`) makes no collective. Each DTensor entry is read as a
DTensor laid out on the target model's device mesh when that model is sharded (each rank reads
only its shards, whatever the number of ranks that wrote them: DCP reshards), and as a full
tensor otherwise (one process, an unsharded model, :func:`consolidate_checkpoint`).

Nothing is unpickled beyond what ``torch.load(weights_only=True)`` allows: the state file is read
with it; only tensor entries are requested from DCP (an entry the metadata declares as pickled
data is refused, so DCP's ``torch.load(weights_only=False)`` of such data never runs), and DCP
reads tensors with ``weights_only=True``, after their bytes are checked against the CRC-32s
stored with them; ``.metadata``, which DCP writes with plain ``pickle``, is read by an unpickler
that only builds DCP's own metadata records. ``weights_only=False`` reads the state file and
``.metadata`` with plain pickle, for trusted directories only.

A ``.pth`` checkpoint (one process, DDP) loaded into a sharded model is read whole by every rank;
:func:`distribute_like_model` and :func:`shard_optimizer_states` keep each rank's part.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import warnings
from collections import OrderedDict
from typing import IO, Any

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import empty as dtensor_empty

from d2engine.checkpoint import file_io
from d2engine.checkpoint.file_io import (
    CheckpointError,
    UnsafeCheckpointError,
    verify_checkpoint_bytes,
)
from d2engine.checkpoint.sharded import (
    METADATA_FILE,
    REFERENCE_KEY,
    STATE_FILE,
    decode_placements,
    local_directory,
    references,
    resolve_references,
    restore_replaced_checkpoint,
)
from d2engine.utils import comm

__all__ = [
    "consolidate_checkpoint",
    "distribute_like_model",
    "load_sharded_checkpoint",
    "shard_optimizer_states",
]

logger = logging.getLogger(__name__)


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "BytesStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else (no arbitrary callable can run)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not a DCP metadata record")


class _Reader(FileSystemReader):
    """DCP's file system reader, checking each shard record against its CRC-32, and with
    ``safe``, reading ``.metadata`` with :class:`_MetadataUnpickler`."""

    def __init__(self, path: str, *, safe: bool) -> None:
        super().__init__(path)
        self.safe = safe

    def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
        data = super()._slice_file(file, sinfo).read()
        where = f"{os.path.join(str(self.path), sinfo.relative_path)} at byte {sinfo.offset}"
        if len(data) != sinfo.length:
            raise CheckpointError(
                f"Sharded checkpoint file {where}: {len(data)} of {sinfo.length} bytes; it is "
                f"truncated. HINT: load an older checkpoint."
            )
        verify_checkpoint_bytes(data, where)  # each tensor is a torch.save archive with CRCs
        return io.BytesIO(data)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if not self.safe:
            return super().read_metadata(*args, **kwargs)
        path = self._get_metadata_path(kwargs.get("rank"))
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as exc:
                raise UnsafeCheckpointError(
                    f"The DCP metadata {str(path)!r} holds objects that are not DCP metadata "
                    f"records ({exc}); nothing in it was executed. HINT: if you trust this "
                    f"directory, load it with weights_only=False."
                ) from exc
        if not isinstance(metadata, Metadata):
            raise CheckpointError(
                f"{str(path)!r} holds a {type(metadata).__name__}, not DCP metadata. HINT: the "
                f"checkpoint is corrupt; load an older one."
            )
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


def _model_mesh(model: nn.Module | None) -> DeviceMesh | None:
    if model is None:
        return None
    for p in model.parameters():
        if isinstance(p, DTensor):
            return p.device_mesh
    return None


def _template(
    ref: dict[str, Any], metadata: Metadata, mesh: DeviceMesh | None, path: str
) -> torch.Tensor:
    key = ref[REFERENCE_KEY]
    entry = metadata.state_dict_metadata.get(key)
    if not isinstance(entry, TensorStorageMetadata):
        raise CheckpointError(
            f"Checkpoint {path!r}: the state file refers to the tensor {key!r}, which the DCP "
            f"metadata {'does not list' if entry is None else 'lists as non-tensor data'}. "
            f"HINT: the checkpoint is corrupt or mixed from two saves; load an older one."
        )
    size, dtype = tuple(entry.size), entry.properties.dtype
    placements = decode_placements(ref["placements"], key)
    if mesh is not None and mesh.ndim == len(placements):
        return dtensor_empty(size, dtype=dtype, device_mesh=mesh, placements=placements)
    return torch.empty(size, dtype=dtype)


def load_sharded_checkpoint(
    path: str, model: nn.Module | None = None, *, weights_only: bool = True
) -> dict[str, Any]:
    """Read a sharded checkpoint directory into a dict like a ``.pth`` checkpoint's (no collective).

    Args:
        path: the checkpoint directory.
        model: the model the checkpoint will be loaded into. When its parameters are DTensors,
            DTensor entries are read as DTensors on its device mesh (each rank reads its shards
            only); otherwise (or None) as full tensors on the CPU.
        weights_only: read safely (see the module docstring); False for trusted directories only.

    Returns:
        ``{"model": ..., <checkpointable>: ..., **extra}`` as it was saved.

    Raises:
        FileNotFoundError: no checkpoint directory at ``path``.
        UnsafeCheckpointError: the state file or ``.metadata`` holds objects safe loading refuses.
        CheckpointError: the directory is incomplete or corrupt.
    """
    local = local_directory(path, "load_sharded_checkpoint")
    if not os.path.isdir(local) and not restore_replaced_checkpoint(local):
        raise FileNotFoundError(f"Sharded checkpoint directory {path!r} does not exist.")
    for required in (METADATA_FILE, STATE_FILE):
        if not os.path.isfile(os.path.join(local, required)):
            raise CheckpointError(
                f"Sharded checkpoint {path!r} has no {required}: it is incomplete or not written "
                f"by d2engine. HINT: load an older checkpoint; a DCP directory written by other "
                f"tools can be read with torch.distributed.checkpoint directly."
            )
    structure = file_io.load_checkpoint_file(
        os.path.join(local, STATE_FILE), weights_only=weights_only
    )
    if not isinstance(structure, dict):
        raise CheckpointError(
            f"Sharded checkpoint {path!r}: {STATE_FILE} holds a {type(structure).__name__}, not a "
            f"dict. HINT: the checkpoint is corrupt; load an older one."
        )
    reader = _Reader(local, safe=weights_only)
    try:
        metadata = reader.read_metadata()
        mesh = _model_mesh(model)
        templates = {
            ref[REFERENCE_KEY]: _template(ref, metadata, mesh, path)
            for ref in references(structure)
        }
        if templates:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load")
                dcp.load(templates, storage_reader=reader, no_dist=True)
    except (CheckpointError, FileNotFoundError, MemoryError):
        raise
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        message = str(exc).split("\n")[0][:300]
        raise CheckpointError(
            f"Sharded checkpoint {path!r} cannot be read: {type(exc).__name__}: {message}. HINT: "
            f"a shard file is missing or truncated; load an older checkpoint."
        ) from exc
    return resolve_references(structure, templates)


# --------------------------------------------------------------------------------------------
# Full tensors into a sharded model (a .pth loaded by an FSDP job)
# --------------------------------------------------------------------------------------------
def _distribute(value: Any, like: DTensor) -> Any:
    full = isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
    if full and tuple(value.shape) == tuple(like.shape):
        # Every rank holds the full tensor: each keeps its part, no communication.
        return distribute_tensor(
            value.to(like.device), like.device_mesh, like.placements, src_data_rank=None
        )
    return value


def distribute_like_model(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Turn the full tensors of a model state dict into DTensors laid out like ``model``'s.

    For a ``.pth`` checkpoint (one process, or DDP) loaded into a sharded model. Entries whose
    shape differs from the model's are left alone (the model loading reports them).

    Args:
        state: a model state dict of full tensors (e.g. from ``torch.load``).
        model: the sharded model.

    Returns:
        A new dict (``_metadata`` kept).
    """
    targets = model.state_dict()
    out: dict[str, Any] = OrderedDict()
    for key, value in state.items():
        target = targets.get(key)
        for prefix in ("module.", "_orig_mod."):  # wrapper prefixes the model loading strips
            if target is None and key.startswith(prefix):
                target = targets.get(key[len(prefix) :])
        out[key] = _distribute(value, target) if isinstance(target, DTensor) else value
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def shard_optimizer_states(optimizers: list[torch.optim.Optimizer]) -> None:
    """Lay out full optimizer state tensors of DTensor parameters like the parameters.

    ``optimizer.load_state_dict`` of a ``.pth`` checkpoint puts full tensors into the state of
    sharded parameters; the next ``step()`` would fail on them. Called after loading one.

    Args:
        optimizers: the optimizers to fix (others' state is not touched).
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not isinstance(param, DTensor) or param not in optimizer.state:
                    continue
                state = optimizer.state[param]
                for key, value in state.items():
                    state[key] = _distribute(value, param)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def consolidate_checkpoint(path: str, output: str, *, weights_only: bool = True) -> str:
    """Write the model weights of a sharded checkpoint as one file an unsharded model loads.

    The ``.pth`` output holds ``{"model": weights}`` (what
    :class:`~d2engine.checkpoint.Checkpointer` and ``DefaultPredictor`` load); a ``.safetensors``
    output holds the weights alone. Runs in one process, without a process group; the output is
    written atomically. The command line tool ``d2engine-export`` calls it.

    Args:
        path: a sharded checkpoint directory (e.g. ``output/model_final``).
        output: the file to write, ending in ``.pth``/``.pt`` or ``.safetensors``.
        weights_only: read ``path`` safely (see :func:`load_sharded_checkpoint`).

    Returns:
        ``output``.

    Raises:
        ValueError: ``output`` has another extension.
        FileNotFoundError: no checkpoint directory at ``path``.
        CheckpointError: ``path`` is not a readable sharded checkpoint, or has no model weights.
    """
    if not output.endswith((".pth", ".pt", ".safetensors")):
        raise ValueError(
            f"consolidate_checkpoint: the output {output!r} must end in .pth, .pt or "
            f".safetensors. HINT: e.g. output/model_final.pth."
        )
    checkpoint = load_sharded_checkpoint(path, None, weights_only=weights_only)
    weights = checkpoint.get("model")
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(
            f"Sharded checkpoint {path!r} has no model weights (keys: {sorted(checkpoint)}). "
            f"HINT: pass a checkpoint written by a d2engine Checkpointer."
        )
    target = local_directory(output, "consolidate_checkpoint")
    if output.endswith(".safetensors"):
        tensors = {k: v.contiguous() for k, v in weights.items() if isinstance(v, torch.Tensor)}
        data = safetensors.torch.save(tensors)
        directory = os.path.dirname(target) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    else:
        file_io.atomic_save({"model": weights}, target)
    logger.info(
        "Wrote the %d model tensors of %s to %s (rank %d)",
        len(weights),
        path,
        output,
        comm.get_rank(),
    )
    return output
