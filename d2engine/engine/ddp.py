"""Wrap a model for data-parallel training: :func:`create_ddp_model`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from d2engine.utils import comm

__all__ = ["create_ddp_model"]


def create_ddp_model(
    model: nn.Module, *, fp16_compression: bool = False, **kwargs: Any
) -> nn.Module | DistributedDataParallel:
    """Wrap ``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` in a multi-process job.

    With one process the model is returned as it is. Otherwise it is wrapped in DDP; on a CUDA
    model ``device_ids`` defaults to the model's device (``cuda:<local rank>`` under
    :func:`~d2engine.engine.launch.launch`); CPU models get none, as DDP requires.

    Args:
        model: the model; its parameters must already be on this process's device.
        fp16_compression: compress gradients to fp16 for the all-reduce (halves the traffic; the
            gradients are averaged in fp16, so very small gradients may underflow).
        kwargs: passed to ``DistributedDataParallel`` (e.g. ``broadcast_buffers=False``,
            ``find_unused_parameters=True``).

    Returns:
        ``model`` itself with one process, else the DDP wrapper.

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
    if isinstance(model, DistributedDataParallel):
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
