"""The hook that keeps a :class:`~d2engine.modeling.ModelEMA` up to date: :class:`EMAHook`.
Re-exported by :mod:`d2engine.engine.hooks`; ``docs/features.md`` shows the config.
"""

from __future__ import annotations

import logging

from torch import nn

from d2engine.engine.checkpoint_hooks import warn_if_saved_before
from d2engine.engine.train_loop import HookBase
from d2engine.modeling.ema import ModelEMA

__all__ = ["EMAHook"]

logger = logging.getLogger(__name__)


class EMAHook(HookBase):
    """Average the model's weights into a :class:`~d2engine.modeling.ModelEMA` after each step.

    Runs ``after_step`` (after the iteration's optimizer step): ``ema.update(model)``, two
    ``torch._foreach`` kernels, no host-device sync. ``before_train``: an average without updates
    (a new run) restarts at the model's current weights, which by then include ``MODEL.WEIGHTS``
    or other loaded weights; a resumed run (``start_iter > 0``) whose average was not restored
    gets a warning, and the average restarts there; otherwise the average follows the model's
    current tensors (:meth:`~d2engine.modeling.ModelEMA.follow`).

    Stateless: the average is saved by the checkpointer, as a checkpointable named ``"ema"``
    (``Checkpointer(model, dir, trainer=trainer, ema=ema)``; DefaultTrainer does so), which puts
    an ``"ema"`` entry into every checkpoint. Register the hook before the
    ``PeriodicCheckpointer`` so that a checkpoint holds the average of its own iteration (resume is
    then exact; a warning says so otherwise). Evaluate with the averaged weights inside
    ``with ema.swap(model): ...``, e.g. in an ``EvalHook`` function.

    Args:
        ema: the average.
        model: the model it averages; default ``trainer.model``.

    Raises:
        TypeError: ``ema`` is not a ModelEMA.
    """

    def __init__(self, ema: ModelEMA, model: nn.Module | None = None) -> None:
        if not isinstance(ema, ModelEMA):
            raise TypeError(
                f"EMAHook takes a d2engine.modeling.ModelEMA, got {type(ema).__name__}. HINT: "
                "EMAHook(ModelEMA(model, decay=0.9999))."
            )
        self.ema = ema
        self._model_given = model
        self._model: nn.Module | None = model

    def before_train(self) -> None:
        model = self._model_given
        if model is None:
            model = self.trainer.model  # type: ignore[attr-defined]
        self._model = model
        warn_if_saved_before(self, "the EMA update")
        if self.ema.updates == 0:
            if self.trainer.start_iter > 0:
                logger.warning(
                    "EMAHook: training resumes at iteration %d but the EMA has no updates: it "
                    "was not restored from the checkpoint and restarts from the current weights. "
                    "HINT: register it with the checkpointer (Checkpointer(..., ema=ema)).",
                    self.trainer.start_iter,
                )
            self.ema.reset(self._model)
        else:
            self.ema.follow(self._model)  # the model may have moved since the EMA was built

    def after_step(self) -> None:
        self.ema.update(self._model)  # type: ignore[arg-type]
