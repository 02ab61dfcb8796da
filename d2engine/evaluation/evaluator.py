"""The evaluator interface and :func:`inference_on_dataset` (runs a model over a test loader)."""

from __future__ import annotations

import datetime
import logging
import time
from collections import OrderedDict, abc
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from d2engine.utils import comm
from d2engine.utils.progress import console_logs_above_bars, progress_bar, progress_bar_enabled
from d2engine.utils.watchdog import keep_alive

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_context", "inference_on_dataset"]

logger = logging.getLogger(__name__)

_LOG_PERIOD_S = 5.0
"""Seconds between two progress lines of :func:`inference_on_dataset`."""

_CALLBACK_NAMES = ("on_start", "before_inference", "after_inference", "on_end")


class DatasetEvaluator:
    """Base class of evaluators: accumulate (input, output) pairs, then compute metrics.

    :func:`inference_on_dataset` calls :meth:`reset` once, :meth:`process` after every batch and
    :meth:`evaluate` at the end. In a multi-process job every process sees its own shard; an
    evaluator gathers what it needs across processes in :meth:`evaluate` (a collective, so every
    process must call it) and returns the results on the main process.
    """

    def reset(self) -> None:
        """Prepare for a new round of evaluation (called before the first :meth:`process`)."""

    def process(self, inputs: Any, outputs: Any) -> None:
        """Accumulate one batch.

        Args:
            inputs: the batch given to the model (usually a list of dicts).
            outputs: the model's return value for it (usually a list, one output per input).
        """

    def evaluate(self) -> dict[str, Any] | None:
        """Compute the metrics over everything processed since :meth:`reset`.

        Returns:
            A dict ``{task: {metric: value}}`` (e.g. ``{"accuracy": {"top1": 93.1}}``), or None.
            In a multi-process job, only the main process needs to return results.
        """
        return None


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run as one; their results are merged into one dict."""

    def __init__(self, evaluators: Iterable[DatasetEvaluator]) -> None:
        """Wrap evaluators.

        Args:
            evaluators: the evaluators, run in order.
        """
        super().__init__()
        self._evaluators = list(evaluators)

    def reset(self) -> None:
        """Reset every evaluator."""
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs: Any, outputs: Any) -> None:
        """Pass the batch to every evaluator."""
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> dict[str, Any]:
        """Evaluate every evaluator (on every process) and merge the results of the main process.

        Raises:
            ValueError: if two evaluators return the same top-level key.
        """
        results: dict[str, Any] = OrderedDict()
        for evaluator in self._evaluators:
            result = evaluator.evaluate()
            if not comm.is_main_process() or result is None:
                continue
            for key, value in result.items():
                if key in results:
                    raise ValueError(
                        f"Two evaluators returned results under the same key {key!r} (the second "
                        f"is {type(evaluator).__name__}). HINT: give each evaluator its own task "
                        f"name."
                    )
                results[key] = value
        return results

    def __len__(self) -> int:
        return len(self._evaluators)


@contextmanager
def inference_context(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own mode.

    Each submodule's ``training`` flag is restored as it was (so a frozen BatchNorm kept in eval
    mode inside a training model stays so), also when the block raises.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_callbacks(callbacks: Mapping[str, Callable[[], None]] | None) -> dict[str, Any]:
    callbacks = dict(callbacks or {})
    unknown = sorted(set(callbacks) - set(_CALLBACK_NAMES))
    if unknown:
        raise ValueError(
            f"inference_on_dataset: unknown callback names {unknown}; the supported ones are "
            f"{list(_CALLBACK_NAMES)}."
        )
    for name, func in callbacks.items():
        if not callable(func):
            raise TypeError(f"inference_on_dataset: callback {name!r} is not callable: {func!r}.")
    return callbacks


def _eval_bar(total: int | None) -> Any:
    """The evaluation's bar (a context manager): erased when done, below a training bar."""
    return progress_bar(total=total, desc="eval", leave=False, unit="batch")


def _lockstep_batches(model: Any, total: int | None) -> int:
    """The number of forward passes every rank makes: the most batches of any rank when the model
    is sharded (its forward is a collective) in a multi-process job, else 0 (no padding)."""
    if comm.get_world_size() == 1 or not (
        isinstance(model, nn.Module) and comm.is_sharded_module(model)
    ):
        return 0
    if total is None:
        raise TypeError(
            "inference_on_dataset: the model is sharded (FSDP), so every rank must run as many "
            "forward passes, but the data loader has no len(). HINT: use a loader with a length "
            "(d2engine.data.build_test_loader)."
        )
    return max(int(n) for n in comm.all_gather(total))


def _first_sample_batch(data_loader: Any) -> Any:
    """A batch to run on a rank whose shard of the test set is empty (never evaluated)."""
    dataset, collate = (
        getattr(data_loader, "dataset", None),
        getattr(data_loader, "collate_fn", None),
    )
    if dataset is None or collate is None:
        raise TypeError(
            "inference_on_dataset: this rank has no test batch, but the sharded model needs a "
            "forward pass on every rank, and the data loader has no dataset/collate_fn to take "
            "one sample from. HINT: use a torch DataLoader (d2engine.data.build_test_loader)."
        )
    return collate([dataset[0]])


def inference_on_dataset(
    model: Callable[[Any], Any],
    data_loader: Iterable[Any],
    evaluator: DatasetEvaluator | list[DatasetEvaluator] | None,
    callbacks: Mapping[str, Callable[[], None]] | None = None,
    *,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Run ``model`` on every batch of ``data_loader`` and evaluate the outputs.

    An ``nn.Module`` is put in eval mode for the call (each submodule's mode is restored afterwards,
    also on an exception), and the whole call runs under ``torch.no_grad()``. A sharded model
    (FSDP2: every forward pass is a collective) runs as many forward passes on every rank: a rank
    whose shard of the data has fewer batches repeats its last batch (the first sample of the
    dataset when it has none) and the outputs of these extra passes are not evaluated, so each
    sample still counts once. The timing reported at
    the end leaves out the first ``min(5, len(data_loader) - 1)`` warm-up batches; a progress line
    with an ETA is logged every few seconds. On a terminal a progress bar over the batches is
    shown too (erased at the end; see :func:`d2engine.utils.progress.progress_bar_enabled`), with
    the log lines printed above it. Each batch counts as progress for a training's hang watchdog
    (:func:`d2engine.utils.watchdog.keep_alive`).

    Args:
        model: a callable (usually an ``nn.Module``) taking one batch of the loader.
        data_loader: an iterable of batches (usually from :func:`d2engine.data.build_test_loader`);
            ``len()`` gives the ETA when it is defined.
        evaluator: a :class:`DatasetEvaluator`, a list of them, or None to only run the model.
        callbacks: optional functions without arguments under the keys "on_start",
            "before_inference", "after_inference" and "on_end".
        progress_bar: (d2engine) False never shows the bar (e.g. ``cfg.OUTPUT.PROGRESS_BAR``).

    Returns:
        The evaluator's results (``{}`` when there is no evaluator or it returned None).

    Raises:
        ValueError: for an unknown callback name.
        TypeError: the model is sharded and the data loader has no ``len()``.
    """
    cbs = _check_callbacks(callbacks)
    num_devices = comm.get_world_size()
    try:
        total: int | None = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    lockstep = _lockstep_batches(model, total)
    logger.info(
        "Start inference on %s batches", total if total is not None else "an unknown number of"
    )

    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif isinstance(evaluator, abc.MutableSequence):
        evaluator = DatasetEvaluators(evaluator)
    evaluator.reset()

    num_warmup = min(5, total - 1) if total is not None else 5
    num_warmup = max(num_warmup, 0)
    start_time = time.perf_counter()
    total_data_time = total_compute_time = total_eval_time = 0.0
    last_log = time.perf_counter()
    num_batches = 0
    with ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())
        bar = None
        if progress_bar_enabled(progress_bar):
            stack.enter_context(console_logs_above_bars())
            bar = stack.enter_context(_eval_bar(total))
        if "on_start" in cbs:
            cbs["on_start"]()
        start_data_time = time.perf_counter()
        inputs = None
        for idx, inputs in enumerate(data_loader):
            num_batches = idx + 1
            total_data_time += time.perf_counter() - start_data_time
            if idx == num_warmup:
                start_time = time.perf_counter()
                total_data_time = total_compute_time = total_eval_time = 0.0

            start_compute_time = time.perf_counter()
            if "before_inference" in cbs:
                cbs["before_inference"]()
            outputs = model(inputs)
            if "after_inference" in cbs:
                cbs["after_inference"]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # so that the compute time includes the queued kernels
            total_compute_time += time.perf_counter() - start_compute_time

            start_eval_time = time.perf_counter()
            evaluator.process(inputs, outputs)
            total_eval_time += time.perf_counter() - start_eval_time
            if bar is not None:
                bar.update(1)
            keep_alive()  # a long evaluation is progress for a training's hang watchdog

            now = time.perf_counter()
            iters_after_start = idx + 1 - num_warmup * int(idx >= num_warmup)
            compute_per_iter = total_compute_time / iters_after_start
            if (idx >= num_warmup * 2 or compute_per_iter > 5) and now - last_log >= _LOG_PERIOD_S:
                last_log = now
                total_per_iter = (now - start_time) / iters_after_start
                if total is not None:
                    eta = str(datetime.timedelta(seconds=int(total_per_iter * (total - idx - 1))))
                else:
                    eta = "unknown"
                logger.info(
                    "Inference done %d/%s. Dataloading: %.4f s/iter. Inference: %.4f s/iter. "
                    "Eval: %.4f s/iter. Total: %.4f s/iter. ETA=%s",
                    idx + 1,
                    total if total is not None else "?",
                    total_data_time / iters_after_start,
                    compute_per_iter,
                    total_eval_time / iters_after_start,
                    total_per_iter,
                    eta,
                )
            start_data_time = time.perf_counter()
        for _ in range(num_batches, lockstep):  # keep in step with ranks that have more batches
            model(inputs if num_batches else _first_sample_batch(data_loader))
        if "on_end" in cbs:
            cbs["on_end"]()

    total_time = time.perf_counter() - start_time
    timed = max(num_batches - num_warmup, 1)
    logger.info(
        "Total inference time: %s (%.6f s / iter per device, on %d devices)",
        str(datetime.timedelta(seconds=int(total_time))),
        total_time / timed,
        num_devices,
    )
    logger.info(
        "Total inference pure compute time: %s (%.6f s / iter per device, on %d devices)",
        str(datetime.timedelta(seconds=int(total_compute_time))),
        total_compute_time / timed,
        num_devices,
    )

    results = evaluator.evaluate()
    # An evaluator may return None on non-main processes; callers can then use the result as a dict.
    if results is None:
        results = {}
    return results
