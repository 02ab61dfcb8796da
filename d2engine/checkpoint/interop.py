"""Checkpointers written for detectron2 (fvcore's interface) in d2engine's checkpoint code.

detectron2's hooks take any ``fvcore.common.checkpoint.Checkpointer`` (its own tests pass one to
``PeriodicCheckpointer`` and ``BestCheckpointer``). d2engine's hooks and
:class:`~d2engine.checkpoint.PeriodicCheckpointer` use a few more operations: ``writes``,
``wait()``, ``gather_states()``, ``checkpoint_path()``, ``save_untagged()`` and
``remove_checkpoint()``. :func:`as_checkpointer` returns a d2engine checkpointer unchanged, and
wraps any other object with fvcore's interface (``save(name, **extra)``, ``save_dir``,
``save_to_disk``, ``has_checkpoint()``, ``get_checkpoint_file()``, ``tag_last_checkpoint()``,
``path_manager``) so that these operations do what fvcore's checkpointer can: nothing to wait for
or gather, a plain save, and a best-model save that puts ``last_checkpoint`` back afterwards.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from d2engine.utils.file_io import PathManager

__all__ = ["FvcoreCheckpointer", "as_checkpointer"]

_EXTRAS = (
    "writes",
    "wait",
    "gather_states",
    "checkpoint_path",
    "save_untagged",
    "remove_checkpoint",
)
_LAST_CHECKPOINT = "last_checkpoint"


def as_checkpointer(checkpointer: Any) -> Any:
    """``checkpointer`` itself if it has d2engine's operations, else a :class:`FvcoreCheckpointer`.

    Args:
        checkpointer: a d2engine checkpointer, or one with fvcore's interface.

    Returns:
        An object with d2engine's checkpointer operations.

    Raises:
        TypeError: if the object has no ``save`` method and ``save_dir``.
    """
    if all(hasattr(checkpointer, name) for name in _EXTRAS):
        return checkpointer
    if not (callable(getattr(checkpointer, "save", None)) and hasattr(checkpointer, "save_dir")):
        raise TypeError(
            f"Expected a checkpointer (d2engine's, or one with fvcore's interface: save(name, "
            f"**extra) and save_dir), got {type(checkpointer).__name__}. HINT: pass "
            "d2engine.checkpoint.Checkpointer(model, save_dir, ...)."
        )
    return FvcoreCheckpointer(checkpointer)


class FvcoreCheckpointer:
    """A checkpointer with fvcore's interface, seen through d2engine's operations.

    Every other attribute is the wrapped checkpointer's (looked up at each use, so patching the
    wrapped object works).
    """

    def __init__(self, checkpointer: Any) -> None:
        """Wrap ``checkpointer`` (see the module docstring)."""
        object.__setattr__(self, "wrapped", checkpointer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.wrapped, name, value)

    @property
    def writes(self) -> bool:
        """Whether ``save`` writes in this process (a ``save_dir`` and ``save_to_disk``)."""
        return bool(self.wrapped.save_dir) and bool(getattr(self.wrapped, "save_to_disk", True))

    def wait(self) -> None:
        """Nothing to wait for: fvcore saves synchronously."""

    def gather_states(self) -> None:
        """Nothing to gather: fvcore checkpointables have no cross-rank state."""

    def checkpoint_path(self, name: str) -> str:
        """The file :meth:`save` writes for ``name`` (fvcore's ``{save_dir}/{name}.pth``)."""
        return os.path.join(self.wrapped.save_dir, f"{name}.pth")

    def save(self, name: str, **extra: Any) -> None:
        """The wrapped checkpointer's save (it also updates ``last_checkpoint``)."""
        self.wrapped.save(name, **extra)

    def save_untagged(self, name: str, **extra: Any) -> None:
        """Save without moving ``last_checkpoint``: fvcore's save moves it, so put it back.

        A resume then still starts from the latest checkpoint rather than from this file.
        """
        previous = ""
        if self.writes and self.wrapped.has_checkpoint():
            previous = self.wrapped.get_checkpoint_file()
        self.wrapped.save(name, **extra)
        if not self.writes:
            return
        if previous:
            self.wrapped.tag_last_checkpoint(os.path.basename(previous))
        else:
            path = os.path.join(self.wrapped.save_dir, _LAST_CHECKPOINT)
            with contextlib.suppress(FileNotFoundError):
                self._path_manager().rm(path)

    def remove_checkpoint(self, path: str) -> None:
        """Delete a checkpoint file (a missing file is not an error)."""
        with contextlib.suppress(FileNotFoundError):
            self._path_manager().rm(path)

    def _path_manager(self) -> Any:
        return getattr(self.wrapped, "path_manager", None) or PathManager

    def __repr__(self) -> str:
        return f"FvcoreCheckpointer({self.wrapped!r})"
