"""Saving and loading checkpoints: atomic, safe by default, optionally asynchronous.

Mirrors ``detectron2.checkpoint``: :class:`Checkpointer`, :class:`DetectionCheckpointer`,
:class:`PeriodicCheckpointer`, plus the building blocks exact resume needs (:class:`Stateful`,
:func:`capture_rng_state`, :func:`restore_rng_state`). What is guaranteed about the files (atomic
writes, CRC-32 verification, ``last_checkpoint``): :mod:`d2engine.checkpoint.file_io`,
:mod:`d2engine.checkpoint.integrity` and ``docs/checkpoints.md``.
"""

from __future__ import annotations

from d2engine.checkpoint.async_saver import AsyncSaveError, AsyncSaver
from d2engine.checkpoint.checkpointer import (
    Checkpointer,
    DetectionCheckpointer,
    PeriodicCheckpointer,
)
from d2engine.checkpoint.file_io import CheckpointError, UnsafeCheckpointError
from d2engine.checkpoint.integrity import NonFiniteCheckpointError
from d2engine.checkpoint.model_loading import IncompatibleCheckpointError, LoadReport, ShapeMismatch
from d2engine.checkpoint.state import (
    RNGState,
    Stateful,
    capture_rng_state,
    gather_rng_states,
    restore_rng_state,
    snapshot_to_cpu,
)

__all__ = [
    "AsyncSaveError",
    "AsyncSaver",
    "CheckpointError",
    "Checkpointer",
    "DetectionCheckpointer",
    "IncompatibleCheckpointError",
    "LoadReport",
    "NonFiniteCheckpointError",
    "PeriodicCheckpointer",
    "RNGState",
    "ShapeMismatch",
    "Stateful",
    "UnsafeCheckpointError",
    "capture_rng_state",
    "gather_rng_states",
    "restore_rng_state",
    "snapshot_to_cpu",
]
