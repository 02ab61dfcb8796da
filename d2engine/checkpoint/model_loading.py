"""Loading a checkpoint's weights into a model leniently, and reporting what did not fit.

:func:`load_model_state` strips a ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix
when every key has it, skips tensors whose shape differs from the model's, loads the rest
non-strictly and returns a :class:`LoadReport`. The report formats the skipped tensors as one
table and the missing/unexpected keys grouped by module. :func:`stale_optimizer_state` finds the
optimizer state that a shape change left behind (resuming it would crash the first step).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from d2engine.checkpoint.file_io import CheckpointError

__all__ = [
    "IncompatibleCheckpointError",
    "LoadReport",
    "ShapeMismatch",
    "check_optimizer_state",
    "group_keys",
    "load_model_state",
    "stale_optimizer_state",
    "strip_prefix_if_present",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint's training state (e.g. the optimizer's) does not fit the model being resumed.

    Raised when resuming, not for loading weights: the file is fine, another checkpoint of the
    same run would not fit either, so no fallback is tried.
    """


@dataclass(frozen=True)
class ShapeMismatch:
    """A tensor skipped because its shape in the checkpoint differs from the model's."""

    key: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass
class LoadReport:
    """What happened when a checkpoint's weights were loaded into a model.

    Attributes:
        missing_keys: model keys the checkpoint does not have (they keep their values).
        unexpected_keys: checkpoint keys the model does not have (ignored).
        shape_mismatches: tensors skipped because their shapes differ.
    """

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every tensor of the model was loaded and every checkpoint tensor was used."""
        return not (self.missing_keys or self.unexpected_keys or self.shape_mismatches)

    def shape_table(self) -> str:
        """The skipped tensors as one text table (empty string when there are none)."""
        if not self.shape_mismatches:
            return ""
        rows = [("name", "shape in checkpoint", "shape in model")]
        rows += [
            (m.key, _fmt_shape(m.checkpoint_shape), _fmt_shape(m.model_shape))
            for m in self.shape_mismatches
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return (
            f"Skipped loading {len(self.shape_mismatches)} tensor(s) whose shape in the checkpoint "
            f"differs from the model's:\n" + "\n".join(lines)
        )

    def log(self, log: logging.Logger = logger) -> None:
        """Log the shape table and the grouped missing/unexpected keys as warnings."""
        if self.shape_mismatches:
            log.warning(self.shape_table())
        if self.missing_keys:
            log.warning(
                "Some model parameters or buffers are not in the checkpoint (they keep their "
                "current values):\n%s",
                "\n".join(group_keys(self.missing_keys)),
            )
        if self.unexpected_keys:
            log.warning(
                "The checkpoint holds keys that the model does not use:\n%s",
                "\n".join(group_keys(self.unexpected_keys)),
            )


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def group_keys(keys: Iterable[str]) -> list[str]:
    """Group dotted keys by module: ``["a.b.weight", "a.b.bias"]`` → ``["a.b.{bias, weight}"]``.

    Args:
        keys: state dict keys.

    Returns:
        One line per module prefix, sorted.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        prefix, _, leaf = key.rpartition(".")
        groups[prefix].append(leaf)
    lines = []
    for prefix in sorted(groups):
        leaves = sorted(groups[prefix])
        body = leaves[0] if len(leaves) == 1 else "{" + ", ".join(leaves) + "}"
        lines.append(f"{prefix}.{body}" if prefix else body)
    return lines


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_prefix_if_present(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``state_dict`` without ``prefix`` on its keys if every key has it, else unchanged.

    Args:
        state_dict: a model state dict.
        prefix: e.g. ``"module."``.

    Returns:
        A new dict (the ``_metadata`` of a module state dict is renamed too) or ``state_dict``.
    """
    if not state_dict or not all(key.startswith(prefix) for key in state_dict):
        return state_dict
    stripped = type(state_dict)() if isinstance(state_dict, dict) else {}
    for key, value in state_dict.items():
        stripped[key[len(prefix) :]] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        renamed = type(metadata)()
        for key, value in metadata.items():
            if key == prefix[:-1]:
                key = ""
            elif key.startswith(prefix):
                key = key[len(prefix) :]
            renamed[key] = value
        stripped._metadata = renamed  # type: ignore[attr-defined]
    return stripped


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any]) -> LoadReport:
    """Load ``state_dict`` into ``model`` leniently (see the module docstring).

    Args:
        model: the model (wrappers are unwrapped).
        state_dict: the checkpoint's weights; numpy arrays are converted to tensors.

    Returns:
        What did not fit.
    """
    model = unwrap_model(model)
    checkpoint_state = dict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    for key, value in checkpoint_state.items():
        if isinstance(value, np.ndarray):
            checkpoint_state[key] = torch.from_numpy(value)
    if metadata is not None:
        checkpoint_state = _with_metadata(checkpoint_state, metadata)
    for prefix in _WRAPPER_PREFIXES:
        checkpoint_state = strip_prefix_if_present(checkpoint_state, prefix)

    model_state = model.state_dict()
    mismatches = []
    for key in list(checkpoint_state):
        if key not in model_state:
            continue
        value, target = checkpoint_state[key], model_state[key]
        if not isinstance(value, torch.Tensor) or not isinstance(target, torch.Tensor):
            continue
        if tuple(value.shape) != tuple(target.shape):
            mismatches.append(ShapeMismatch(key, tuple(value.shape), tuple(target.shape)))
            del checkpoint_state[key]
    result = model.load_state_dict(checkpoint_state, strict=False)
    mismatched = {m.key for m in mismatches}
    return LoadReport(
        missing_keys=[k for k in result.missing_keys if k not in mismatched],
        unexpected_keys=list(result.unexpected_keys),
        shape_mismatches=mismatches,
    )


def _with_metadata(state: dict[str, Any], metadata: Any) -> dict[str, Any]:
    out: dict[str, Any] = OrderedDict(state)
    out._metadata = metadata  # type: ignore[attr-defined]
    return out


def stale_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, mismatches: Iterable[ShapeMismatch]
) -> list[ShapeMismatch]:
    """The shape mismatches of a load for which ``optimizer`` holds per-parameter state.

    After the model skipped a checkpoint tensor whose shape differs, the optimizer state loaded
    from the same checkpoint (momentum, Adam's moments, ...) still has the checkpoint's shape for
    that parameter, and the first ``optimizer.step()`` fails ("The size of tensor a (16) must
    match the size of tensor b (8)"). A parameter without tensor state (plain SGD) is fine.

    Args:
        optimizer: the optimizer, after loading its state.
        model: the model the optimizer updates (wrappers are unwrapped).
        mismatches: the load's :attr:`LoadReport.shape_mismatches`.

    Returns:
        The mismatches of parameters that have non-scalar tensors in the optimizer's state.
    """
    parameters = dict(unwrap_model(model).named_parameters())
    stale = []
    for mismatch in mismatches:
        param = parameters.get(mismatch.key)
        state = optimizer.state.get(param, {}) if param is not None else {}
        if any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in state.values()):
            stale.append(mismatch)
    return stale


def check_optimizer_state(
    restored: Iterable[Any], model: nn.Module, mismatches: Iterable[ShapeMismatch], path: str
) -> None:
    """Refuse a resume whose restored optimizer state does not fit the model's shapes.

    Called after a checkpoint's model weights and checkpointables were loaded. The optimizers
    checked are those among ``restored`` and their ``optimizer`` attributes (a trainer's).

    Args:
        restored: the checkpointables just restored.
        model: the model (wrappers are unwrapped).
        mismatches: the load's :attr:`LoadReport.shape_mismatches`.
        path: the checkpoint, for the message.

    Raises:
        IncompatibleCheckpointError: an optimizer holds state for a parameter whose shape changed
            (see :func:`stale_optimizer_state`).
    """
    mismatches = list(mismatches)
    if not mismatches:
        return
    optimizers = []
    for obj in restored:
        for candidate in (obj, getattr(obj, "optimizer", None)):
            if isinstance(candidate, torch.optim.Optimizer):
                optimizers.append(candidate)
    stale = {m.key: m for opt in optimizers for m in stale_optimizer_state(opt, model, mismatches)}
    if not stale:
        return
    rows = "; ".join(
        f"{m.key}: {_fmt_shape(m.checkpoint_shape)} in the checkpoint, "
        f"{_fmt_shape(m.model_shape)} in the model"
        for m in stale.values()
    )
    raise IncompatibleCheckpointError(
        f"Cannot resume from {path!r}: the checkpoint's optimizer state does not match the model, "
        f"whose parameter shapes changed ({rows}); its first step would fail. HINT: to start a "
        f"new run from these weights, load the weights only: set MODEL.WEIGHTS {path} and run "
        "without --resume (resume_or_load(path, resume=False)), in a new OUTPUT_DIR, so that a "
        "fresh optimizer is built."
    )
