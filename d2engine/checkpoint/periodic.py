"""When checkpoints are written and which are kept: :class:`PeriodicCheckpointer` (fvcore's).

Re-exported by :mod:`d2engine.checkpoint.checkpointer` (detectron2's path for it); the
checkpointer it drives writes the files. The trainer's hook of the same name
(:mod:`d2engine.engine.checkpoint_hooks`) reuses its schedule and its save.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from d2engine.checkpoint import file_io
from d2engine.checkpoint.interop import as_checkpointer
from d2engine.utils.validation import check_positive_int

if TYPE_CHECKING:  # a cycle: checkpointer re-exports this module's class
    from d2engine.checkpoint.checkpointer import Checkpointer

__all__ = ["PeriodicCheckpointer"]


class PeriodicCheckpointer:
    """Saves a checkpoint every ``period`` iterations and at the end, keeping the newest ones.

    :meth:`step` saves ``{file_prefix}_{iteration:07d}`` when ``(iteration + 1) % period == 0``
    and ``{file_prefix}_final`` when ``iteration >= max_iter - 1``, each with
    ``iteration=iteration`` plus the given keyword arguments. With ``max_to_keep``, the oldest
    periodic files that *this object wrote* are deleted once the newer file is complete; final
    files and files of other prefixes never are.

    Its state (:meth:`state_dict`) is the list of periodic files it keeps and the files it is about
    to delete. Registered as a checkpointable of the checkpointer it uses (or saved by the
    trainer's hook), the state in each checkpoint already names the file being written, so a run
    resumed from it goes on deleting the right files, including deletions the killed run did not
    get to.

    Args:
        checkpointer: the checkpointer that writes the files: d2engine's, or one with fvcore's
            interface (see :mod:`d2engine.checkpoint.interop`).
        period: save every this many iterations.
        max_iter: the number of iterations of the run (None: never write the final file).
        max_to_keep: keep at most this many periodic files (None: keep all).
        file_prefix: the file name prefix.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        period: int,
        max_iter: int | None = None,
        max_to_keep: int | None = None,
        file_prefix: str = "model",
    ) -> None:
        period = check_positive_int(period, "period", "PeriodicCheckpointer")
        if max_to_keep is not None:
            max_to_keep = check_positive_int(max_to_keep, "max_to_keep", "PeriodicCheckpointer")
        self.checkpointer = as_checkpointer(checkpointer)
        self.period = period
        self.max_iter = max_iter
        self.max_to_keep = max_to_keep
        self.file_prefix = file_prefix
        # base names of the periodic files kept, oldest first
        self.recent_checkpoints: list[str] = []
        # base names dropped from recent_checkpoints, not yet deleted
        self._to_delete: list[str] = []
        # files, or directories of sharded checkpoints
        self._periodic_name = re.compile(re.escape(file_prefix) + r"_\d{7,}(\.pth)?")

    def step(self, iteration: int, **kwargs: Any) -> None:
        """Save if ``iteration`` is due (see the class docstring).

        Args:
            iteration: the iteration that just finished.
            kwargs: more entries for the checkpoint.
        """
        iteration = int(iteration)
        if (iteration + 1) % self.period == 0:
            self._save_periodic(iteration, **kwargs)
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self.save(f"{self.file_prefix}_final", **{"iteration": iteration, **kwargs})

    def save(self, name: str, **kwargs: Any) -> None:
        """Save a checkpoint named ``name`` now (not counted in ``max_to_keep``).

        Every save of this object goes through this method.

        Args:
            name: the file name without ``.pth``.
            kwargs: more entries for the checkpoint.
        """
        self.checkpointer.save(name, **kwargs)

    def _save_periodic(self, iteration: int, **kwargs: Any) -> None:
        """Save ``{file_prefix}_{iteration:07d}``, counted in ``max_to_keep``."""
        name = f"{self.file_prefix}_{iteration:07d}"
        keep = self.max_to_keep if self.checkpointer.writes else None
        if keep is not None:
            # before saving: the saved state names the file
            self._track(file_io.basename(self.checkpointer.checkpoint_path(name)), keep)
        self.save(name, **{"iteration": iteration, **kwargs})
        if keep is not None:
            self._delete_dropped()

    def _track(self, basename: str, max_to_keep: int) -> None:
        if basename in self.recent_checkpoints:
            self.recent_checkpoints.remove(basename)
        self.recent_checkpoints.append(basename)
        while len(self.recent_checkpoints) > max_to_keep:
            self._to_delete.append(self.recent_checkpoints.pop(0))

    def _delete_dropped(self) -> None:
        for old in self._to_delete:
            if self._periodic_name.fullmatch(old) and old not in self.recent_checkpoints:
                self.checkpointer.remove_checkpoint(file_io.join(self.checkpointer.save_dir, old))
        self._to_delete = []

    def state_dict(self) -> dict[str, Any]:
        """``{"recent_checkpoints": [kept periodic files, oldest first], "to_delete": [...]}``.

        Base names only, so a moved output directory still works.
        """
        return {
            "recent_checkpoints": list(self.recent_checkpoints),
            "to_delete": list(self._to_delete),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the lists saved by :meth:`state_dict`; pending deletions run at the next save."""
        self.recent_checkpoints = [str(name) for name in state_dict.get("recent_checkpoints", [])]
        self._to_delete = [str(name) for name in state_dict.get("to_delete", [])]
