"""Hooks driven by evaluations during training: :class:`LossEvalHook` (the model's losses on a
validation set) and :class:`EarlyStopping` (stop when a metric stops improving). Re-exported by
:mod:`d2engine.engine.hooks`; ``docs/features.md`` shows them in a config.

An *evaluation hook* is one with a ``last_eval_iter`` attribute: the iteration after which it last
evaluated (None before), set on every rank. :class:`~d2engine.engine.hooks.EvalHook` and
:class:`LossEvalHook` are; :class:`EarlyStopping` acts after the evaluations of those registered
before it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sized
from typing import Any

import torch
from torch import nn

from d2engine.checkpoint.model_loading import unwrap_model
from d2engine.checkpoint.state import capture_rng_state, restore_rng_state
from d2engine.engine.checkpoint_hooks import _is_periodic_eval_step, warn_if_saved_before
from d2engine.engine.train_loop import HookBase, SimpleTrainer
from d2engine.evaluation.evaluator import _first_sample_batch, _lockstep_batches
from d2engine.utils import comm
from d2engine.utils.events import EventStorage
from d2engine.utils.validation import check_positive_int

__all__ = ["EarlyStopping", "LossEvalHook"]

logger = logging.getLogger(__name__)

# Layers whose training mode changes what they compute or update; LossEvalHook runs them in eval.
_MODE_DEPENDENT_LAYERS = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    return "{" + ", ".join(f"{k!r}: shape {tuple(v.shape)}" for k, v in dict(out).items()) + "}"


class LossEvalHook(HookBase):
    """Put the model's mean losses over a validation loader into the storage, periodically.

    Runs on :class:`~d2engine.engine.hooks.EvalHook`'s schedule: after every ``eval_period``-th
    iteration except the last, and in ``after_train`` when training completed (not after a
    failure or a stop). Each evaluation runs the model's loss computation over the whole loader
    under ``torch.no_grad()`` and puts, with ``smoothing_hint=False``, ``validation_loss`` (the
    mean of the summed losses) and ``validation_<name>`` for each loss the model returns, the
    mean over every batch of every rank. Register it on every rank (the means are gathered); each
    rank reads its own loader (d2engine's test loaders shard the data); with a sharded (FSDP2)
    model, whose forward pass is a collective, every rank runs as many passes (the loader needs a
    ``len()``; the extra passes do not count).

    It does not change training. Models return their losses in training mode, so the model stays
    in training mode, except its normalization layers (``_NormBase``: BatchNorm, SyncBatchNorm,
    InstanceNorm) and dropout layers, which run in eval mode: running statistics are used and not
    updated, no dropout, no collective of SyncBatchNorm. This is the loss of the model as it is
    evaluated. Afterwards every module's mode and every buffer are restored, and so are the random
    generators (python, numpy, torch), which the loader or the model may draw from; what the model
    puts into the event storage goes to a throw-away one. A DDP or ``torch.compile`` wrapper is
    unwrapped: the plain module runs, with no DDP collectives. Stateless.

    Args:
        eval_period: evaluate every this many iterations; 0 only after training.
        model: the model being trained (or its wrapper).
        data_loader: an iterable of model inputs with what the loss needs (e.g. labels); iterated
            from its start at each evaluation.

    Attributes:
        last_eval_iter: the iteration after which it last evaluated, or None.

    Raises:
        ValueError: ``eval_period`` is negative or not an integer.
    """

    def __init__(self, eval_period: int, model: nn.Module, data_loader: Iterable[Any]) -> None:
        if isinstance(eval_period, bool) or not isinstance(eval_period, int) or eval_period < 0:
            raise ValueError(
                f"LossEvalHook eval_period must be an integer >= 0, got {eval_period!r}. HINT: 0 "
                "evaluates only after the last iteration."
            )
        self._period = eval_period
        self._model = model
        self._data_loader = data_loader
        self.last_eval_iter: int | None = None

    @property
    def eval_period(self) -> int:
        """The evaluation period in iterations (0: only after training)."""
        return self._period

    def after_step(self) -> None:
        if _is_periodic_eval_step(self._period, self.trainer):
            self._do_loss_eval()

    def after_train(self) -> None:
        if self.trainer.completed:  # not after a failure or a stop
            self._do_loss_eval()

    def _do_loss_eval(self) -> None:
        losses = self.compute_losses()
        storage = self.trainer.storage
        for name, value in losses.items():
            storage.put_scalar(name, value, smoothing_hint=False)
        self.last_eval_iter = self.trainer.iter
        logger.info(
            "Validation loss after iteration %d: %s",
            self.trainer.iter,
            ", ".join(f"{k}={v:.5g}" for k, v in losses.items()),
        )

    def compute_losses(self) -> dict[str, float]:
        """Run the model over the loader now and return the mean losses over all ranks.

        A collective in a multi-process job: call it on every rank.

        Returns:
            ``{"validation_loss": mean total, "validation_<name>": mean of each loss}``.

        Raises:
            ValueError: the loader yielded no batch on any rank.
            TypeError: the model returned neither a dict of scalar losses nor a scalar.
        """
        model = unwrap_model(self._model)
        # A sharded (FSDP2) model's forward is a collective: every rank runs as many passes.
        loader = self._data_loader
        total = len(loader) if isinstance(loader, Sized) else None
        lockstep = _lockstep_batches(model, total)
        modes = [(m, m.training) for m in model.modules()]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        rng = capture_rng_state()
        sums: dict[str, torch.Tensor] = {}
        summed: torch.Tensor | None = None
        num_batches = 0
        named = True
        try:
            for m, _ in modes:
                if isinstance(m, _MODE_DEPENDENT_LAYERS):
                    m.training = False
            # What the model logs while computing validation losses stays out of the training's
            # storage (detectron2-style models put scalars in training mode).
            with torch.no_grad(), EventStorage():
                for inputs in self._data_loader:
                    out = model(inputs)
                    named = named and not isinstance(out, torch.Tensor)
                    try:  # every loss a scalar tensor
                        loss_dict, loss = SimpleTrainer._as_loss_dict(out)
                    except TypeError as e:
                        raise TypeError(
                            f"LossEvalHook: the model returned {_describe(out)}, not scalar "
                            "losses. HINT: the model must return its losses in training mode "
                            "(LossEvalHook runs it so); check that it is training."
                        ) from e
                    for k, v in loss_dict.items():
                        v = v.detach().float()
                        sums[k] = sums[k] + v if k in sums else v
                    loss = loss.detach().float()
                    summed = loss if summed is None else summed + loss
                    num_batches += 1
                for _ in range(num_batches, lockstep):  # in step with ranks that have more
                    model(inputs if num_batches else _first_sample_batch(self._data_loader))
        finally:
            for m, training in modes:
                m.training = training
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            restore_rng_state(rng)
        local = {k: float(v) for k, v in sums.items()}  # one read per evaluation
        local["validation_loss"] = float(summed) if summed is not None else 0.0
        gathered = comm.all_gather((local, num_batches))
        count = sum(n for _, n in gathered)
        if count == 0:
            raise ValueError(
                "LossEvalHook: the validation data loader yielded no batch (on any rank). HINT: "
                "check DATASETS.TEST (or the loader given to LossEvalHook)."
            )
        keys = ["validation_loss"] + ([k for k in local if k != "validation_loss"] if named else [])
        means = {}
        for key in keys:
            name = key if key == "validation_loss" else f"validation_{key}"
            means[name] = sum(values.get(key, 0.0) for values, n in gathered if n) / count
        return means


class EarlyStopping(HookBase):
    """Stop training when a metric has not improved for ``patience`` evaluations.

    Runs ``after_step`` after the evaluations of the evaluation hooks registered before it
    (:class:`~d2engine.engine.hooks.EvalHook`, :class:`LossEvalHook`: register it after them), at
    no cost in the other iterations. It reads the latest value of ``metric`` from the main
    process's event storage; a value put in this iteration is an improvement when it beats the
    best by more than ``min_delta`` (a NaN or infinite value never is; the first finite value
    is). After ``patience`` evaluations in a row without improvement it calls
    ``trainer.request_stop``: training ends after this iteration, the hooks' ``after_train`` run
    and the ``PeriodicCheckpointer`` hook writes the final checkpoint. In a multi-process job the
    main process decides and every rank receives the decision (one small ``all_gather`` per
    evaluation), so all ranks stop at the same iteration: register it on every rank.

    State: the best value, its iteration and the evaluations without improvement, so a resumed run
    keeps counting. For exact resume register it, with the evaluation hooks it follows, before the
    ``PeriodicCheckpointer`` (DefaultTrainer does when early stopping is on): a checkpoint then
    includes the evaluation of its own iteration (a warning says so otherwise).

    Args:
        metric: the name in the storage, e.g. ``"accuracy/top1"`` or ``"validation_loss"``.
        mode: ``"max"`` (higher is better) or ``"min"``.
        patience: the number of evaluations without improvement that stops training.
        min_delta: the margin an improvement must exceed (>= 0).

    Raises:
        ValueError: an empty metric, a mode other than "max"/"min", a patience that is not a
            positive integer, or a negative or non-finite ``min_delta``.
    """

    def __init__(
        self, metric: str, mode: str = "max", patience: int = 3, min_delta: float = 0.0
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(
                f"EarlyStopping needs the name of a metric, got {metric!r}. HINT: e.g. "
                "'validation_loss' (mode 'min') or an EvalHook result such as 'accuracy/top1'."
            )
        if mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping mode must be 'max' or 'min', got {mode!r}.")
        if not (
            isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0
        ):
            raise ValueError(f"EarlyStopping min_delta must be a number >= 0, got {min_delta!r}.")
        self.metric = metric
        self.mode = mode
        self.patience = check_positive_int(patience, "patience", "EarlyStopping")
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_iter: int | None = None
        self.num_bad_evals = 0
        self._sources: list[Any] = []

    def before_train(self) -> None:
        hooks = list(self.trainer._hooks)
        position = next((i for i, h in enumerate(hooks) if h is self), len(hooks))
        self._sources = [h for h in hooks[:position] if hasattr(h, "last_eval_iter")]
        if not self._sources:
            raise ValueError(
                f"EarlyStopping({self.metric!r}) found no evaluation hook registered before it. "
                "HINT: register it after the EvalHook or LossEvalHook that computes the metric "
                "(any hook with a 'last_eval_iter' attribute counts)."
            )
        warn_if_saved_before(self, "the early-stopping count")
        if self.num_bad_evals >= self.patience:
            logger.info(
                "EarlyStopping: the run resumed from had stopped early (%s: %d evaluations "
                "without improvement); it stops at the next evaluation that does not improve.",
                self.metric,
                self.num_bad_evals,
            )

    def _better(self, value: float, best: float) -> bool:
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta

    def after_step(self) -> None:
        it = self.trainer.iter
        if any(s.last_eval_iter == it for s in self._sources):
            self._after_evaluation(it)

    def _after_evaluation(self, it: int) -> None:
        decision = self._judge(it) if comm.is_main_process() else None
        decision = comm.all_gather(decision)[0]  # the main process's, on every rank
        kind = decision[0]
        if kind == "error":
            raise KeyError(decision[1])
        if kind == "skip":
            return
        _, self.best, self.best_iter, self.num_bad_evals = decision
        if self.num_bad_evals >= self.patience:
            best = "no finite value" if self.best is None else f"best {self.best:.6g}"
            at = "" if self.best_iter is None else f" at iteration {self.best_iter}"
            self.trainer.request_stop(
                f"Early stopping: {self.metric} did not improve for {self.num_bad_evals} "
                f"evaluations ({best}{at})"
            )

    def _judge(self, it: int) -> tuple[Any, ...]:
        """The main process's decision after an evaluation at ``it`` (see ``_after_evaluation``)."""
        latest = self.trainer.storage.latest()
        entry = latest.get(self.metric)
        if entry is None:
            periodic = [s for s in self._sources if getattr(s, "eval_period", 1) > 0]
            if all(s.last_eval_iter is not None for s in periodic):
                return (
                    "error",
                    f"EarlyStopping: the metric {self.metric!r} is not in the event storage after "
                    f"the evaluations of iteration {it}. The metrics there are: "
                    f"{sorted(latest)}. HINT: set the metric (TEST.EARLY_STOPPING.METRIC) to one "
                    "of them, and register EarlyStopping after the hook that computes it.",
                )
            return ("skip",)  # an evaluation hook that has not run yet may produce it
        value, metric_iter = float(entry[0]), int(entry[1])
        if metric_iter != it:
            return ("skip",)  # another hook evaluated; the metric is from an earlier evaluation
        best, best_iter, bad = self.best, self.best_iter, self.num_bad_evals
        if math.isfinite(value) and (best is None or self._better(value, best)):
            return ("judged", value, it, 0)
        if not math.isfinite(value):
            logger.warning(
                "EarlyStopping: %s = %s is not finite: no improvement.", self.metric, value
            )
        else:
            logger.info(
                "EarlyStopping: %s = %.6g does not improve on %.6g (iteration %s): %d of %d.",
                self.metric,
                value,
                best,
                best_iter,
                bad + 1,
                self.patience,
            )
        return ("judged", best, best_iter, bad + 1)

    def state_dict(self) -> dict[str, Any]:
        """``{"best", "best_iter", "num_bad_evals"}``."""
        return {"best": self.best, "best_iter": self.best_iter, "num_bad_evals": self.num_bad_evals}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best value, its iteration and the evaluations without improvement."""
        best = state_dict.get("best")
        self.best = None if best is None else float(best)
        best_iter = state_dict.get("best_iter")
        self.best_iter = None if best_iter is None else int(best_iter)
        self.num_bad_evals = int(state_dict.get("num_bad_evals", 0))
