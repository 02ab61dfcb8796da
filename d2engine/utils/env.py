"""The process environment: seeding every random number generator at once, float32 precision.

detectron2 users call ``seed_all_rng`` from ``detectron2.utils.env``; ``default_setup`` seeds
with it and applies ``FLOAT32_PRECISION`` with :func:`set_float32_precision`.
"""

from __future__ import annotations

import logging
import os
import random
from datetime import datetime

import numpy as np
import torch

__all__ = ["FLOAT32_PRECISIONS", "TORCH_VERSION", "seed_all_rng", "set_float32_precision"]

FLOAT32_PRECISIONS = ("highest", "high", "medium")
"""The values of ``cfg.FLOAT32_PRECISION`` (besides "", which leaves torch's default)."""

TORCH_VERSION: tuple[int, ...] = tuple(int(x) for x in torch.__version__.split(".")[:2])
"""PyTorch's (major, minor) version, e.g. ``(2, 13)``; compare with tuples."""

logger = logging.getLogger(__name__)


def seed_all_rng(seed: int | None = None) -> int:
    """Seed python's ``random``, numpy and torch (every device) with one seed.

    Args:
        seed: the seed; None draws one from the process id, the time and the operating system's
            randomness, and logs it so that the run can be repeated.

    Returns:
        The seed used.
    """
    if seed is None:
        seed = (
            os.getpid()
            + int(datetime.now().strftime("%S%f"))
            + int.from_bytes(os.urandom(2), "big")
        )
        logger.info("Using a generated random seed %d", seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def set_float32_precision(precision: str) -> bool:
    """Set the internal precision of float32 matrix multiplications and convolutions on CUDA.

    "highest" keeps full float32; "high" and "medium" allow TF32 (and "medium" bfloat16) inside
    matmuls, and TF32 in cuDNN convolutions. Without CUDA nothing changes, as in detectron2.

    Args:
        precision: "highest", "high" or "medium".

    Returns:
        Whether the setting was applied (CUDA is available).

    Raises:
        ValueError: for another value.
    """
    if precision not in FLOAT32_PRECISIONS:
        raise ValueError(
            f"FLOAT32_PRECISION must be one of {FLOAT32_PRECISIONS} (or '' for torch's default), "
            f"got {precision!r}."
        )
    if not torch.cuda.is_available():
        return False
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"
    logger.info(
        "float32 precision %r: matmul precision %s, cudnn.allow_tf32=%s",
        precision,
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
    )
    return True
