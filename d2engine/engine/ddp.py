"""Wrap a model for data-parallel training: :func:`create_ddp_model` (every rank holds the whole
model, DDP) and :func:`create_fsdp_model` (every rank holds a shard of it, FSDP2).

``docs/scale.md`` compares the two and tells what a sharded model changes for checkpoints.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from d2engine.utils import comm

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = ["broadcast_module_states", "create_ddp_model", "create_fsdp_model"]

_BROADCAST_BUCKET_BYTES = 64 * 1024 * 1024


def create_ddp_model(
    model: nn.Module, *, fp16_compression: bool = False, **kwargs: Any
) -> nn.Module | DistributedDataParallel:
    """Wrap ``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` in a multi-process job.

    With one process, or a model sharded by :func:`create_fsdp_model` (which synchronises the
    gradients itself), the model is returned as it is. Otherwise it is wrapped in DDP; on a CUDA
    model ``device_ids`` defaults to the model's device (``cuda:<local rank>`` under
    :func:`~d2engine.engine.launch.launch`); CPU models get none, as DDP requires.

    Args:
        model: the model; its parameters must already be on this process's device.
        fp16_compression: compress gradients to fp16 for the all-reduce (halves the traffic; the
            gradients are averaged in fp16, so very small gradients may underflow).
        kwargs: passed to ``DistributedDataParallel`` (e.g. ``broadcast_buffers=False``,
            ``find_unused_parameters=True``).

    Returns:
        ``model`` itself with one process or a sharded model, else the DDP wrapper.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"create_ddp_model expects a torch.nn.Module, got {type(model).__name__}. "
            "HINT: pass the model object, e.g. create_ddp_model(build_model(cfg))."
        )
    if comm.get_world_size() == 1:
        return model
    if isinstance(model, DistributedDataParallel) or comm.is_sharded_module(model):
        return model
    if "device_ids" not in kwargs:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cuda":
            kwargs["device_ids"] = [comm.get_local_rank() if device.index is None else device.index]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(state=None, hook=default_hooks.fp16_compress_hook)
    return ddp


def broadcast_module_states(module: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s parameters and buffers (a collective: call it on every rank).

    DDP does this when it wraps a model; :func:`create_fsdp_model` calls it before sharding, so
    that ranks seeded differently (``default_setup`` seeds with ``SEED + rank``) start from one
    model. Tensors are sent in buckets of at most 64 MiB per dtype and device.

    Args:
        module: the module, with the same structure on every rank.
        src: the rank whose values everyone gets.
    """
    if comm.get_world_size() == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)
    for t in itertools.chain(module.parameters(), module.buffers()):
        groups[(t.dtype, t.device)].append(t.detach())
    with torch.no_grad():
        for tensors in groups.values():
            for bucket in _buckets(tensors):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.broadcast(flat, src=src)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > _BROADCAST_BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _class_matches(module: nn.Module, entry: type[nn.Module] | str) -> bool:
    cls = type(module)
    if isinstance(entry, str):
        return entry in (cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}")
    return isinstance(module, entry)


def _modules_to_shard(
    model: nn.Module, shard_modules: Iterable[type[nn.Module] | str]
) -> list[nn.Module]:
    """The submodules (not the root) of a class in ``shard_modules``, innermost first."""
    entries = list(shard_modules)
    for entry in entries:
        if not isinstance(entry, str) and not (
            isinstance(entry, type) and issubclass(entry, nn.Module)
        ):
            raise TypeError(
                f"create_fsdp_model: shard_modules takes nn.Module classes or class names, got "
                f"{entry!r}. HINT: e.g. shard_modules=[TransformerBlock] or ['TransformerBlock']."
            )
    subs = [m for name, m in model.named_modules() if name]
    unmatched = [e for e in entries if not any(_class_matches(m, e) for m in subs)]
    if unmatched:
        available = sorted({type(m).__name__ for m in subs})
        raise ValueError(
            f"create_fsdp_model: no submodule of {type(model).__name__} is of the class(es) "
            f"{[e if isinstance(e, str) else e.__name__ for e in unmatched]} given in "
            f"shard_modules. HINT: the submodule classes are {available}."
        )
    chosen = [m for m in subs if any(_class_matches(m, e) for e in entries)]
    return chosen[::-1]  # pre-order reversed: a nested match is sharded before its parent


def create_fsdp_model(
    model: nn.Module,
    *,
    shard_modules: Iterable[type[nn.Module] | str] | None = None,
    mesh: DeviceMesh | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shard ``model`` across the processes of the job with FSDP2 (``fully_shard``).

    With one process the model is returned as it is. Otherwise rank 0's parameters and buffers are
    broadcast to every rank (:func:`broadcast_module_states`), ``fully_shard`` is applied to each
    submodule whose class is in ``shard_modules`` (innermost first), then to ``model`` itself. Each
    sharded module gathers its parameters for its forward and backward and frees them afterwards
    (with ``reshard_after_forward``), so the peak memory holds one such module's full parameters
    at a time, plus every rank's shard of the rest. The parameters become DTensors, in place:
    build the optimizer after this call. Module and parameter names do not change, so
    checkpoints stay compatible with the unsharded model (see ``docs/scale.md``).

    Args:
        model: the model, on this process's device, built identically on every rank.
        shard_modules: classes, or class names (``__name__``, ``__qualname__`` or
            ``module.qualname``), of the submodules to shard as units (e.g. the blocks of a
            transformer). None or empty: only the whole model is one unit.
        mesh: the device mesh to shard over; default a 1-D mesh of all processes on the model's
            device type. A 2-D mesh gives hybrid sharding (replicate, shard).
        mp_policy: FSDP2's mixed precision (e.g. bf16 parameters for compute, fp32 gradient
            reduction); None keeps the parameters' dtype.
        reshard_after_forward: free the gathered parameters after the forward pass (less memory,
            one more all-gather in the backward pass).
        activation_checkpointing: recompute the activations of each ``shard_modules`` module in
            the backward pass instead of keeping them (random draws such as dropout are replayed
            identically). Module names do not change.

    Returns:
        ``model`` itself, sharded in place (with one process: unchanged).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or a ``shard_modules`` entry is neither a
            module class nor a string.
        ValueError: a ``shard_modules`` entry matches no submodule, or
            ``activation_checkpointing`` is asked for without ``shard_modules``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"create_fsdp_model expects a torch.nn.Module, got {type(model).__name__}. "
            "HINT: pass the model object, e.g. create_fsdp_model(build_model(cfg))."
        )
    if isinstance(model, DistributedDataParallel):
        raise TypeError(
            "create_fsdp_model got a DistributedDataParallel model. HINT: pass the bare model; "
            "use either create_ddp_model or create_fsdp_model, not both."
        )
    units = _modules_to_shard(model, shard_modules or ())
    if activation_checkpointing and not units:
        raise ValueError(
            "create_fsdp_model(activation_checkpointing=True) checkpoints the shard_modules "
            "submodules, but none were given. HINT: list the model's blocks in shard_modules "
            "(MODEL.FSDP.SHARD_MODULES)."
        )
    if comm.get_world_size() == 1 or comm.is_sharded_module(model):
        return model
    # Imported here: torch.distributed.fsdp would add over a second to every import of d2engine.
    from torch.distributed._composable import checkpoint as checkpoint_activations
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    broadcast_module_states(model)
    if mesh is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (comm.get_world_size(),))
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for unit in units:
        if activation_checkpointing:
            checkpoint_activations(unit)
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model
