"""Which checkpoint to trust: writing and tagging one, ``last_checkpoint`` resolved inside its
directory, the order of fallbacks, and finite weights.

The rule these serve: ``last_checkpoint`` only ever names a complete checkpoint with finite
weights, inside its own directory. :func:`write_checkpoint` (what
:class:`~d2engine.checkpoint.Checkpointer` saves with) writes it last, after the checkpoint file
is complete (see :mod:`d2engine.checkpoint.file_io`), and never for non-finite weights
(:func:`non_finite_tensors`). When resuming, the checkpointer reads it with
:func:`resolve_last_checkpoint` and verifies the file it names as it loads it
(:func:`~d2engine.checkpoint.file_io.verify_checkpoint_file`); when either fails, it falls back to
the checkpoints of the directory in :func:`newest_first` order.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from d2engine.checkpoint import file_io
from d2engine.checkpoint.file_io import CheckpointError

__all__ = [
    "LAST_CHECKPOINT",
    "NonFiniteCheckpointError",
    "newest_first",
    "non_finite_tensors",
    "resolve_last_checkpoint",
    "write_checkpoint",
]

#: The name of the text file holding the base name of a directory's newest complete checkpoint.
LAST_CHECKPOINT = "last_checkpoint"

_TRAILING_NUMBER = re.compile(r"(\d+)$")
_FORBIDDEN_IN_NAME = ("/", "\\", "\x00", ":")


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint was not saved because the model's parameters hold NaN or infinite values."""


def resolve_last_checkpoint(save_dir: str) -> str:
    """The path of the checkpoint that ``{save_dir}/last_checkpoint`` names, inside ``save_dir``.

    The file must hold a plain file name (surrounding whitespace is ignored), as
    :class:`~d2engine.checkpoint.Checkpointer` and detectron2 write it. Anything else — an empty
    file, bytes that are not UTF-8, an absolute path, a path with a directory part (``../x.pth``,
    ``sub/x.pth``), ``.``/``..`` or a URL — would load a file the directory does not own and is
    refused. Whether the named file exists is not checked here (loading it tells). A symbolic link
    inside ``save_dir`` is followed.

    Args:
        save_dir: the checkpoint directory (a local path or an fsspec URL).

    Returns:
        ``{save_dir}/{name}``.

    Raises:
        FileNotFoundError: ``save_dir`` has no ``last_checkpoint`` file.
        CheckpointError: its content is not a plain file name.
    """
    path = file_io.join(save_dir, LAST_CHECKPOINT)
    hint = (
        "HINT: a resume falls back to the newest checkpoint of the directory that loads; write "
        "the file name of a checkpoint in that directory (e.g. model_0000999.pth) into "
        "last_checkpoint to choose another."
    )
    try:
        name = file_io.read_text(path).strip()
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"{path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); it should hold a "
            f"checkpoint's file name. {hint}"
        ) from exc
    if not name:
        raise CheckpointError(f"{path!r} is empty; it should hold a checkpoint's file name. {hint}")
    if name in (".", "..") or any(c in name for c in _FORBIDDEN_IN_NAME):
        raise CheckpointError(
            f"{path!r} names {name[:200]!r}, not a file name inside {save_dir!r}; a checkpoint "
            f"outside the directory (an absolute path, '..', a sub-directory or a URL) is never "
            f"loaded from it. {hint}"
        )
    return file_io.join(save_dir, name)


def newest_first(paths: Iterable[str]) -> list[str]:
    """Checkpoint paths ordered newest first, the order in which a resume tries them.

    ``*_final`` files come first, then files by the number their name ends with (``model_0000999``
    before ``model_0000499``), then the others; ties by modification time, newest first.

    Args:
        paths: checkpoint file paths (local or fsspec URLs).

    Returns:
        A new list.
    """
    return sorted(paths, key=_recency, reverse=True)


def _recency(path: str) -> tuple[float, float]:
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if stem.endswith("_final"):
        number = math.inf
    else:
        match = _TRAILING_NUMBER.search(stem)
        number = float(match.group(1)) if match else -1.0
    return number, file_io.modified_time(path)


def non_finite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``tensors`` holding a NaN or an infinity.

    One reduction per tensor and a single read back to the host per device: each tensor's sum is
    finite exactly when all its values are, unless the sum overflows; only tensors whose sum is
    not finite are checked value by value. Other values (integer tensors, non-tensors) are
    skipped.

    Args:
        tensors: e.g. a model's parameters by name.

    Returns:
        The names, in the order of ``tensors``.
    """
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, value in tensors.items():
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.numel()
            and value.device.type != "meta"
        ):
            by_device.setdefault(value.device, []).append((name, value.detach()))
    suspects: set[str] = set()
    for items in by_device.values():
        sums = torch.stack([_sum(t).float() for _, t in items])
        finite = torch.isfinite(sums).tolist()  # the one host read of this device
        suspects.update(name for (name, _), ok in zip(items, finite) if not ok)
    bad = {name for name in suspects if not _all_finite(tensors[name])}
    return [name for name in tensors if name in bad]


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype in (torch.float32, torch.float64):
        return tensor.sum()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.sum(dtype=torch.float32)  # a half-precision sum overflows early
    return tensor.float().sum()  # e.g. float8, which has no sum of its own


def _all_finite(tensor: torch.Tensor) -> bool:
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def write_checkpoint(
    data: Mapping[str, Any],
    path: str,
    save_dir: str,
    *,
    parameters: Iterable[str] = (),
    tag: bool = True,
) -> None:
    """Write ``data`` to ``path`` atomically and, with ``tag``, point ``last_checkpoint`` to it.

    With ``tag``, the entries of ``data["model"]`` named in ``parameters`` must be finite:
    otherwise nothing is written. When the file system refuses a write, the error says what stayed
    as it was.

    Args:
        data: the checkpoint (with a ``"model"`` state dict when ``parameters`` are given).
        path: the checkpoint file, ``{save_dir}/{name}``.
        save_dir: the directory whose ``last_checkpoint`` is updated.
        parameters: the names of the model's parameters in ``data["model"]`` (buffers, which may
            hold infinities on purpose, such as attention masks, are left out).
        tag: point ``last_checkpoint`` to ``path`` once it is complete.

    Raises:
        NonFiniteCheckpointError: a parameter holds NaN or infinite values (nothing written).
        CheckpointError: the file system refused a write (e.g. "No space left on device"): the
            message names the file and the checkpoint ``last_checkpoint`` still names.
    """
    if tag:
        model_state = data["model"]
        bad = non_finite_tensors({n: model_state[n] for n in parameters if n in model_state})
        if bad:
            raise NonFiniteCheckpointError(
                f"Not saving checkpoint {path!r}: the model's parameters hold NaN or infinite "
                f"values ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); "
                f"{_previous_checkpoint(save_dir)} HINT: training diverged; resume from that "
                "checkpoint with a lower learning rate (or gradient clipping), or look for bad "
                "inputs; save_untagged() still writes a copy for debugging."
            )
    try:
        file_io.atomic_save(data, path)
    except CheckpointError as exc:
        raise _write_error(
            f"Could not write checkpoint {path!r}", "no file was changed; ", save_dir, exc
        ) from exc
    if not tag:
        return
    try:
        file_io.atomic_write_text(file_io.join(save_dir, LAST_CHECKPOINT), os.path.basename(path))
    except CheckpointError as exc:
        what = f"Wrote checkpoint {path!r} but could not point {LAST_CHECKPOINT} to it"
        raise _write_error(what, "", save_dir, exc) from exc


def _write_error(what: str, changed: str, save_dir: str, exc: CheckpointError) -> CheckpointError:
    cause = exc.__cause__
    if not isinstance(cause, OSError):
        return exc
    return CheckpointError(
        f"{what}: {cause.strerror or cause}; {changed}{_previous_checkpoint(save_dir)} "
        f"HINT: {file_io._write_hint(cause)}"
    )


def _previous_checkpoint(save_dir: str) -> str:
    try:
        previous = resolve_last_checkpoint(save_dir)
    except (OSError, CheckpointError):
        return f"there is no earlier checkpoint in {save_dir!r}."
    return f"{LAST_CHECKPOINT} still names {os.path.basename(previous)}, which is intact."
