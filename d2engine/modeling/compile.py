"""Compiling a model with ``torch.compile``, with an early, clear error where it cannot work:
:func:`compile_model` (``MODEL.COMPILE`` in DefaultTrainer; ``docs/features.md``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "compile_model"]

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``mode`` values ``torch.compile`` accepts (``MODEL.COMPILE.MODE``)."""

_HINT = (
    "HINT: train without compiling (MODEL.COMPILE.ENABLED False), or install what the error "
    "names (inductor needs a C++ compiler for CPU code and Triton for CUDA code)."
)


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """Return ``torch.compile(model, mode=mode)`` after checking that this platform can compile.

    ``torch.compile`` compiles lazily, at the first forward pass, so a platform that cannot
    compile (no C++ compiler, an unsupported Python, no Triton for CUDA) would fail in the middle
    of the first training step with a long trace. This compiles and runs a tiny function on the
    model's device first (a few seconds once; inductor caches it) and turns a failure into one
    error that says how to turn compilation off. Compile before wrapping the model in DDP, as
    PyTorch recommends (DefaultTrainer does). The compiled module shares its parameters with
    ``model``; checkpoints never hold its ``_orig_mod.`` prefix (d2engine's Checkpointer saves the
    unwrapped module, and strips the prefix from files that have it).

    Args:
        model: the model.
        mode: one of :data:`COMPILE_MODES`.

    Returns:
        The compiled module (``torch._dynamo.OptimizedModule``); ``model`` is ``._orig_mod``.

    Raises:
        ValueError: an unknown ``mode``.
        RuntimeError: ``torch.compile`` does not work on this platform.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"MODEL.COMPILE.MODE must be one of {COMPILE_MODES}, got {mode!r}. HINT: 'default' "
            "suits most models."
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        torch.compile(_probe, mode=mode)(torch.ones(4, device=device))
    except Exception as e:  # any failure means this platform cannot compile
        raise RuntimeError(
            f"torch.compile cannot compile on this platform (device {device}, torch "
            f"{torch.__version__}): {type(e).__name__}: {str(e).strip()[:2000]}\n{_HINT}"
        ) from e
    logger.info("Compiling the model with torch.compile(mode=%r) at its first forward.", mode)
    return torch.compile(model, mode=mode)  # type: ignore[return-value]
