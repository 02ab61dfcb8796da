"""The hooks :class:`~d2engine.engine.defaults.DefaultTrainer` registers, and the config keys that
ask for each one: :func:`default_hooks` (``DefaultTrainer.build_hooks``) and
:func:`hang_watchdog` (``SOLVER.HANG_TIMEOUT``).
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

from torch import nn

from d2engine.config import CfgNode
from d2engine.engine import hooks
from d2engine.engine.job_setup import try_get_key
from d2engine.engine.train_loop import HookBase
from d2engine.engine.trainer_config import micro_batch_config
from d2engine.engine.watchdog import HangWatchdog
from d2engine.utils import comm
from d2engine.utils.watchdog import check_hang_timeout

if TYPE_CHECKING:  # a cycle: defaults imports this module
    from d2engine.engine.defaults import DefaultTrainer

__all__ = ["WRITER_PERIOD", "default_hooks", "hang_watchdog"]


def _has_training_bn(model: nn.Module) -> bool:
    bn_types = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) and m.training for m in model.modules())


_CURVES_FILES = ("metrics.json", "curves.png")  # what PlotCurves reads and draws


def hang_watchdog(cfg: CfgNode) -> HangWatchdog | None:
    """The HangWatchdog hook of ``SOLVER.HANG_TIMEOUT``, registered first by DefaultTrainer so
    that it stops first.

    Args:
        cfg: the config.

    Returns:
        The hook, or None when the timeout is 0 or absent.
    """
    timeout = check_hang_timeout(
        try_get_key(cfg, "SOLVER.HANG_TIMEOUT", default=0), "SOLVER.HANG_TIMEOUT"
    )
    return HangWatchdog(timeout) if timeout > 0 else None


WRITER_PERIOD = 20
"""The PeriodicWriter's period in DefaultTrainer, and the inner trainer's gather_metric_period."""


def default_hooks(trainer: DefaultTrainer) -> list[HookBase | None]:
    """The hooks of ``DefaultTrainer.build_hooks``, in this order.

    IterationTimer; LRScheduler; EMAHook (when ``MODEL_EMA.ENABLED``); PreciseBN (when
    ``TEST.PRECISE_BN.ENABLED`` and the model has BN layers in training mode);
    PeriodicCheckpointer (every process: only the main process writes, but all take part in
    gathering the RNG states); the evaluation hooks, every process (evaluation is
    collective): EvalHook, LossEvalHook (when ``TEST.LOSS_EVAL_PERIOD > 0``), EarlyStopping
    (when ``TEST.EARLY_STOPPING.ENABLED``); PeriodicWriter (main process, after them so that it
    writes what the other hooks logged); then on the main process ProgressBar
    (``OUTPUT.PROGRESS_BAR``, drawn only on a terminal) and PlotCurves (``OUTPUT.PLOT``:
    ``OUTPUT_DIR/curves.png``). With early stopping the evaluation hooks come before the
    PeriodicCheckpointer, so that a checkpoint holds the early-stopping count of its own
    iteration's evaluation (exact resume); otherwise after it, as in detectron2 (a failing
    evaluation leaves that iteration's checkpoint to debug with).

    Args:
        trainer: the trainer they are for, built up to its hooks; its ``build_train_loader``,
            ``build_loss_eval_loader``, ``build_writers`` and ``test`` (overridable) are used.

    Returns:
        The hooks (``None`` entries are skipped by ``register_hooks``).
    """
    cfg = micro_batch_config(trainer.cfg, trainer._trainer.grad_accum_steps).clone()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0  # PreciseBN runs few iterations: workers cost more

    ret: list[HookBase | None] = [hooks.IterationTimer(), hooks.LRScheduler()]
    if trainer.model_ema is not None:
        ret.append(hooks.EMAHook(trainer.model_ema))
    if cfg.TEST.PRECISE_BN.ENABLED and _has_training_bn(trainer.model):
        ret.append(
            hooks.PreciseBN(
                cfg.TEST.EVAL_PERIOD,
                trainer.model,
                trainer.build_train_loader(cfg),
                cfg.TEST.PRECISE_BN.NUM_ITER,
            )
        )
    # On every rank: only the main process writes (DetectionCheckpointer), but all ranks
    # gather their RNG states at the save points and take part in preemption saves.
    checkpoint_hook = hooks.PeriodicCheckpointer(trainer.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD)

    # The closure holds the trainer weakly: the hook is owned by the trainer.
    trainer_ref = weakref.ref(trainer)

    def test_and_save_results() -> Any:
        owner = trainer_ref()
        if owner is None:  # pragma: no cover - the hook only runs while the trainer lives
            return {}
        if owner.model_ema is None:
            results = owner.test(owner.cfg, owner.model)
        else:  # the EMA's results too, keys suffixed "_ema"
            results = owner.test(owner.cfg, owner.model, ema=owner.model_ema)
        owner._last_eval_results = results  # what DefaultTrainer.train returns
        return results

    evaluation: list[HookBase] = [hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results)]
    if cfg.TEST.LOSS_EVAL_PERIOD > 0:
        evaluation.append(
            hooks.LossEvalHook(
                cfg.TEST.LOSS_EVAL_PERIOD,
                trainer.model,
                trainer.build_loss_eval_loader(trainer.cfg),
            )
        )
    stopping = cfg.TEST.EARLY_STOPPING
    if stopping.ENABLED:
        evaluation.append(
            hooks.EarlyStopping(
                stopping.METRIC, stopping.MODE, stopping.PATIENCE, stopping.MIN_DELTA
            )
        )
        ret += [*evaluation, checkpoint_hook]
    else:
        ret += [checkpoint_hook, *evaluation]
    if comm.is_main_process():
        ret.append(hooks.PeriodicWriter(trainer.build_writers(), period=WRITER_PERIOD))
        # (d2engine) What a person watches: the live bar and the curves, after the writers.
        bar = hooks.ProgressBar(period=20, enabled=cfg.OUTPUT.PROGRESS_BAR)
        ret.append(bar if bar.enabled else None)
        if cfg.OUTPUT.PLOT:
            metrics, curves = (os.path.join(cfg.OUTPUT_DIR, f) for f in _CURVES_FILES)
            ret.append(hooks.PlotCurves(metrics, curves, cfg.TEST.EVAL_PERIOD, write_period=20))
    return ret
