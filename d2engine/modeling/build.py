"""The meta-architecture registry and :func:`build_model`.

A model built by :func:`build_model` follows detectron2's convention: ``model(batch)`` takes a list
of dicts (one per input, as produced by the data loaders of :mod:`d2engine.data`) and returns a dict
of scalar losses in training mode, and a list with one output per input in eval mode.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from d2engine.utils.registry import Registry

__all__ = ["META_ARCH_REGISTRY", "build_model"]

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """
Registry for meta-architectures, i.e. whole models.

The registered object is called with ``cfg`` and must return an ``nn.Module``.
"""


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"cfg.MODEL.DEVICE={name!r} is not a valid torch device. HINT: use 'cpu', 'cuda' or "
            f"'cuda:N'."
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"cfg.MODEL.DEVICE={name!r} but CUDA is not available on this machine. HINT: set "
            f"MODEL.DEVICE cpu (e.g. with the command-line override 'MODEL.DEVICE cpu')."
        )
    return device


def build_model(cfg: Any) -> nn.Module:
    """Build the model named by ``cfg.MODEL.META_ARCHITECTURE`` and move it to ``cfg.MODEL.DEVICE``.

    Args:
        cfg: a config (see :func:`d2engine.config.get_cfg`).

    Returns:
        The model, on ``cfg.MODEL.DEVICE``. It is not wrapped in DistributedDataParallel.

    Raises:
        KeyError: if no meta-architecture of that name is registered.
        TypeError: if the registered object does not return an ``nn.Module``.
        ValueError, RuntimeError: if ``cfg.MODEL.DEVICE`` is not a usable device.
    """
    meta_arch = cfg.MODEL.META_ARCHITECTURE
    device = _device(cfg.MODEL.DEVICE)
    model = META_ARCH_REGISTRY.get(meta_arch)(cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The meta-architecture {meta_arch!r} returned a {type(model).__name__}, expected a "
            f"torch.nn.Module. HINT: register an nn.Module subclass or a function returning one."
        )
    model.to(device)
    logging.getLogger(__name__).debug("Built model %s on %s", meta_arch, device)
    return model
