"""Profiling hooks: :class:`TorchProfiler`, :class:`AutogradProfiler`, :class:`TorchMemoryStats`.

Re-exported by :mod:`d2engine.engine.hooks` (``d2engine.engine.hooks.TorchProfiler`` is the
public path, as in detectron2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from d2engine.engine.train_loop import HookBase
from d2engine.utils import comm
from d2engine.utils.validation import check_positive_int

__all__ = ["AutogradProfiler", "TorchMemoryStats", "TorchProfiler"]

logger = logging.getLogger(__name__)


class TorchProfiler(HookBase):
    """Profile the iterations selected by a predicate with ``torch.profiler``.

    Runs ``before_step`` (calls the predicate; starts the profiler) and ``after_step`` (stops it
    and writes the trace). With ``save_tensorboard`` the trace goes to
    ``output_dir/log/profiler-tensorboard-iter{N}/`` (view with TensorBoard's profiler plugin);
    otherwise a chrome trace ``output_dir/profiler-trace-iter{N}.json``. A profiler left open
    by a failed iteration is closed in ``after_train``. Stateless.

    Args:
        enable_predicate: ``f(trainer) -> bool``, called every iteration.
        output_dir: where traces go.
        activities: as in ``torch.profiler.profile`` (default: CPU, plus CUDA when available).
        save_tensorboard: write a TensorBoard trace instead of a chrome trace.
    """

    def __init__(
        self,
        enable_predicate: Callable[[Any], bool],
        output_dir: str | os.PathLike[str],
        *,
        activities: Iterable[Any] | None = None,
        save_tensorboard: bool = True,
    ) -> None:
        self._enable_predicate = enable_predicate
        self._activities = activities
        self._output_dir = os.fspath(output_dir)
        self._save_tensorboard = save_tensorboard
        self._profiler: Any = None

    def _make_profiler(self) -> Any:
        on_trace_ready = None
        if self._save_tensorboard:
            on_trace_ready = torch.profiler.tensorboard_trace_handler(
                os.path.join(
                    self._output_dir, "log", f"profiler-tensorboard-iter{self.trainer.iter}"
                ),
                f"worker{comm.get_rank()}",
            )
        return torch.profiler.profile(
            activities=self._activities,
            on_trace_ready=on_trace_ready,
            record_shapes=True,
            profile_memory=True,
            with_stack=True,
            with_flops=True,
        )

    def before_step(self) -> None:
        if self._enable_predicate(self.trainer):
            self._profiler = self._make_profiler()
            self._profiler.__enter__()
        else:
            self._profiler = None

    def after_step(self) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        if not self._save_tensorboard:
            os.makedirs(self._output_dir, exist_ok=True)
            out_file = os.path.join(
                self._output_dir, f"profiler-trace-iter{self.trainer.iter}.json"
            )
            profiler.export_chrome_trace(out_file)

    def after_train(self) -> None:
        if self._profiler is not None:  # an iteration failed while profiling
            profiler, self._profiler = self._profiler, None
            profiler.__exit__(None, None, None)


class AutogradProfiler(TorchProfiler):
    """Profile the selected iterations with ``torch.autograd.profiler``; write chrome traces.

    Runs like :class:`TorchProfiler` with ``save_tensorboard=False``: each selected iteration
    writes ``output_dir/profiler-trace-iter{N}.json`` (open it in chrome://tracing or Perfetto).
    Works on CPU: ``use_cuda`` is ignored when CUDA is not available. Stateless.

    With NCCL on older GPUs the autograd profiler may deadlock (it allocates memory on every
    visible device); prefer :class:`TorchProfiler` there.

    Args:
        enable_predicate: ``f(trainer) -> bool``, called every iteration.
        output_dir: where traces go.
        use_cuda: also profile CUDA kernels (when CUDA is available).
    """

    def __init__(
        self,
        enable_predicate: Callable[[Any], bool],
        output_dir: str | os.PathLike[str],
        *,
        use_cuda: bool = True,
    ) -> None:
        super().__init__(enable_predicate, output_dir, save_tensorboard=False)
        self._use_cuda = use_cuda

    def _make_profiler(self) -> Any:
        use_device = "cuda" if self._use_cuda and torch.cuda.is_available() else None
        return torch.autograd.profiler.profile(use_device=use_device)


_MB = 1024.0 * 1024.0


class TorchMemoryStats(HookBase):
    """Log CUDA memory statistics every ``period`` iterations, at most ``max_runs`` times.

    Runs after every ``period``-th iteration and the last one until it has logged ``max_runs``
    times; the last run also logs ``torch.cuda.memory_summary()``. The peak statistics are reset
    after each run. Without CUDA it logs one line at ``before_train`` and does nothing else (no
    per-step cost). Stateless.

    Args:
        period: the logging period in iterations.
        max_runs: the most times it logs.
    """

    def __init__(self, period: int = 20, max_runs: int = 10) -> None:
        self._period = check_positive_int(period, "period", "TorchMemoryStats")
        self._max_runs = check_positive_int(max_runs, "max_runs", "TorchMemoryStats")
        self._runs = 0

    def implements(self, stage: str) -> bool:
        """``before_train``; ``after_step`` only when CUDA is available."""
        if stage == "before_train":
            return True
        return stage == "after_step" and torch.cuda.is_available()

    def before_train(self) -> None:
        if not torch.cuda.is_available():
            logger.info("TorchMemoryStats: CUDA is not available; no memory statistics logged.")

    def after_step(self) -> None:
        if self._runs >= self._max_runs:
            return
        it = self.trainer.iter
        if (it + 1) % self._period != 0 and it != self.trainer.max_iter - 1:
            return
        logger.info(
            "iter: %d  max_reserved_mem: %.0fMB  reserved_mem: %.0fMB  max_allocated_mem: "
            "%.0fMB  allocated_mem: %.0fMB",
            it,
            torch.cuda.max_memory_reserved() / _MB,
            torch.cuda.memory_reserved() / _MB,
            torch.cuda.max_memory_allocated() / _MB,
            torch.cuda.memory_allocated() / _MB,
        )
        self._runs += 1
        if self._runs == self._max_runs:
            logger.info("\n%s", torch.cuda.memory_summary())
        torch.cuda.reset_peak_memory_stats()
