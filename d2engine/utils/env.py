"""The process environment: seeding every random number generator at once.

detectron2 users call ``seed_all_rng`` from ``detectron2.utils.env``; ``default_setup`` seeds
with it too.
"""

from __future__ import annotations

import logging
import os
import random
from datetime import datetime

import numpy as np
import torch

__all__ = ["TORCH_VERSION", "seed_all_rng"]

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
