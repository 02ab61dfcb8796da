"""Running out of CUDA memory: retry once with a cleared cache, then on the CPU."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["retry_if_cuda_oom"]

_R = TypeVar("_R")

logger = logging.getLogger(__name__)


def _to_cpu(value: Any) -> Any:
    device = getattr(value, "device", None)
    if getattr(device, "type", None) == "cuda" and hasattr(value, "to"):
        return value.to(device="cpu")
    return value


def retry_if_cuda_oom(func: Callable[..., _R]) -> Callable[..., _R]:
    """Wrap ``func`` so that a CUDA out-of-memory error makes it retry instead of failing.

    The first retry follows ``torch.cuda.empty_cache()``; the second moves the arguments that
    are CUDA tensors (or have a CUDA ``device`` and a ``to`` method; nested containers are not
    searched) to the CPU, so ``func`` must then run on the CPU and its result may be on the CPU.
    ``func`` may run up to three times, so it must have no side effects. Other errors pass
    through at once.

    Example::

        boxes = retry_if_cuda_oom(pairwise_iou)(boxes1, boxes2)

    Args:
        func: a stateless function of tensors.

    Returns:
        The wrapped function.
    """

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> _R:
        try:
            return func(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()
        try:
            return func(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            pass
        logger.info("Out of CUDA memory twice in %s: retrying with the inputs on the CPU.", func)
        cpu_args = [_to_cpu(a) for a in args]
        cpu_kwargs = {k: _to_cpu(v) for k, v in kwargs.items()}
        return func(*cpu_args, **cpu_kwargs)

    return wrapped
