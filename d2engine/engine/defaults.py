"""Default boilerplate for training and inference jobs: argument parsing, job set-up, writers,
:class:`DefaultPredictor` (from :mod:`d2engine.engine.predictor`) and :class:`DefaultTrainer`.

These mirror ``detectron2.engine.defaults``. They encode common defaults that suit many jobs but
not every job: when one does not fit, subclass it, or build your own loop from
:class:`~d2engine.engine.train_loop.SimpleTrainer` and the hooks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from d2engine.checkpoint import DetectionCheckpointer
from d2engine.config import CfgNode, LazyConfig
from d2engine.data import build_detection_test_loader, build_detection_train_loader
from d2engine.engine import hooks
from d2engine.engine.ddp import create_ddp_model, create_fsdp_model
from d2engine.engine.predictor import DefaultPredictor
from d2engine.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase
from d2engine.engine.watchdog import HangWatchdog
from d2engine.engine.writers import writers_from_config
from d2engine.evaluation import (
    DatasetEvaluator,
    ResultsVerificationError,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)
from d2engine.modeling import ModelEMA, build_model, compile_model
from d2engine.solver import build_lr_scheduler, build_optimizer
from d2engine.utils import comm
from d2engine.utils.collect_env import collect_env_info
from d2engine.utils.env import seed_all_rng, set_float32_precision
from d2engine.utils.events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter
from d2engine.utils.logger import PORTED_LOGGER_NAMES, forward_logger, setup_logger
from d2engine.utils.validation import check_positive_int
from d2engine.utils.watchdog import check_hang_timeout

__all__ = [
    "DefaultPredictor",
    "DefaultTrainer",
    "create_ddp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- command line
def default_argument_parser(epilog: str | None = None) -> argparse.ArgumentParser:
    """Create the argument parser of a d2engine training script.

    Arguments: ``--config-file``, ``--resume``, ``--eval-only``, ``--num-gpus`` (processes per
    machine: GPUs, or CPU processes on gloo when CUDA is unavailable), ``--num-machines``,
    ``--machine-rank``, ``--dist-url`` (default ``"auto"``: a free port on this machine; give
    machine 0's ``tcp://host:port`` for several machines) and trailing ``opts``: config overrides
    as ``KEY VALUE`` pairs (``SOLVER.BASE_LR 0.01``) for YAML configs, or ``key=value`` for lazy
    Python configs.

    Args:
        epilog: text shown after the arguments in ``--help``; a usage example by default.

    Returns:
        The parser.
    """
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train_net.py"
    epilog = (
        epilog
        or f"""
Examples:

Run on a single machine:
    $ {prog} --num-gpus 2 --config-file cfg.yaml

Change some config options:
    $ {prog} --config-file cfg.yaml MODEL.WEIGHTS /path/to/weight.pth SOLVER.BASE_LR 0.001

Run on multiple machines:
    (machine0)$ {prog} --machine-rank 0 --num-machines 2 --dist-url tcp://<machine0>:29500 [--other-flags]
    (machine1)$ {prog} --machine-rank 1 --num-machines 2 --dist-url tcp://<machine0>:29500 [--other-flags]
"""
    )
    parser = argparse.ArgumentParser(
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Whether to attempt to resume from the checkpoint directory (OUTPUT_DIR). "
        "See DefaultTrainer.resume_or_load for what it means.",
    )
    parser.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="number of processes per machine (one per GPU; CPU processes on gloo without CUDA)",
    )
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument(
        "--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)"
    )
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="initialization URL for the process group: 'auto' picks a free port on this machine "
        "(single machine only); for several machines give machine 0's tcp://host:port.",
    )
    parser.add_argument(
        "opts",
        help="""
Modify config options at the end of the command. For YAML configs, use space-separated
"PATH.KEY VALUE" pairs. For python-based LazyConfig, use "path.key=value".
        """.strip(),
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


# --------------------------------------------------------------------------- job set-up
def _is_lazy_config(cfg: Any) -> bool:
    return isinstance(cfg, DictConfig)


def _try_get_key(cfg: Any, *keys: str, default: Any = None) -> Any:
    """Return the value of the first dotted key that ``cfg`` (CfgNode or DictConfig) has."""
    if _is_lazy_config(cfg):
        missing = object()
        for key in keys:
            value = OmegaConf.select(cfg, key, default=missing)
            if value is not missing:
                return value
        return default
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return node
    return default


def default_setup(cfg: Any, args: argparse.Namespace) -> None:
    """Prepare a job: output directory, logging, environment report, config backup and seeding.

    In order:

    1. creates the output directory (``OUTPUT_DIR`` of a CfgNode, ``train.output_dir`` or
       ``output_dir`` of a lazy config; nothing when unset or empty);
    2. sets up the ``d2engine`` logger: console on the main process, ``OUTPUT_DIR/log.txt``
       (``log.txt.rank{N}`` for rank N > 0), and forwards the ``detectron2`` and ``fvcore``
       loggers of ported code to it;
    3. logs the rank and world size, :func:`~d2engine.utils.collect_env.collect_env_info`, the
       command line and parsed arguments, the config file's text and the full config;
    4. on the main process, saves the full config to ``OUTPUT_DIR/config.yaml`` (a lazy config
       with values YAML cannot hold is saved as far as it can be, see ``LazyConfig.save``);
    5. seeds python, numpy and torch with ``SEED + rank`` (``train.seed`` for lazy configs); a
       negative seed draws a random one, which is logged so that the run can be repeated;
    6. unless ``args.eval_only``, sets ``torch.backends.cudnn.benchmark`` to ``CUDNN_BENCHMARK``
       (``train.cudnn_benchmark``);
    7. applies ``FLOAT32_PRECISION`` (``train.float32_precision``) on CUDA when it is set.

    Args:
        cfg: the full config, a :class:`~d2engine.config.CfgNode` or an omegaconf ``DictConfig``.
        args: the parsed command line (e.g. from :func:`default_argument_parser`).
    """
    output_dir = _try_get_key(cfg, "OUTPUT_DIR", "output_dir", "train.output_dir")
    rank = comm.get_rank()
    if output_dir:
        # Every process creates it: ranks on other machines need it for their own log file.
        os.makedirs(output_dir, exist_ok=True)

    setup_logger(output_dir or None, distributed_rank=rank)
    for name in PORTED_LOGGER_NAMES:  # "detectron2" and "fvcore" lines of ported code
        forward_logger(name)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + collect_env_info())
    logger.info(f"Command line: {' '.join(sys.argv)}")
    logger.info(f"Command line arguments: {args}")
    config_file = getattr(args, "config_file", "")
    if config_file:
        with open(config_file, encoding="utf-8") as f:
            logger.info(f"Contents of args.config_file={config_file}:\n{f.read()}")

    if _is_lazy_config(cfg):
        logger.info(f"Running with full config:\n{LazyConfig.to_py(cfg)}")
    else:
        logger.info(f"Running with full config:\n{cfg.dump()}")
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        if _is_lazy_config(cfg):
            LazyConfig.save(cfg, path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(cfg.dump())
        logger.info(f"Full config saved to {path}")

    seed = int(_try_get_key(cfg, "SEED", "train.seed", "seed", default=-1))
    if seed < 0:
        seed = int.from_bytes(os.urandom(4), "big") % 2**31
        logger.info(f"SEED is negative: using the random seed {seed} (set SEED {seed} to repeat)")
    seed_all_rng(seed + rank)
    logger.info(f"Seeded python, numpy and torch with {seed + rank} (seed {seed} + rank {rank})")

    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = bool(
            _try_get_key(cfg, "CUDNN_BENCHMARK", "train.cudnn_benchmark", default=False)
        )
    precision = _try_get_key(cfg, "FLOAT32_PRECISION", "train.float32_precision", default="")
    if precision:
        set_float32_precision(precision)


def default_writers(
    output_dir: str, max_iter: int | None = None, cfg: CfgNode | None = None
) -> list[EventWriter]:
    """The default event writers: console, ``metrics.json`` and TensorBoard.

    Args:
        output_dir: directory for ``metrics.json`` and the TensorBoard event files (created).
        max_iter: the total number of iterations, for the console ETA.
        cfg: (d2engine) a config: then the writers named by its ``OUTPUT.WRITERS`` (csv, mlflow,
            wandb too), see :func:`d2engine.engine.writers.writers_from_config`.

    Returns:
        ``[CommonMetricPrinter(max_iter), JSONWriter(output_dir/metrics.json),
        TensorboardXWriter(output_dir)]`` without ``cfg``.
    """
    if cfg is not None:
        return writers_from_config(cfg, output_dir, max_iter)
    os.makedirs(output_dir, exist_ok=True)
    return [
        CommonMetricPrinter(max_iter),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
        TensorboardXWriter(output_dir),
    ]


# --------------------------------------------------------------------------- trainer
def _has_training_bn(model: nn.Module) -> bool:
    bn_types = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) and m.training for m in model.modules())


def _amp_dtype(name: str | None) -> torch.dtype:
    """The autocast dtype named by ``SOLVER.AMP.PRECISION`` (default float16)."""
    dtypes = {
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    key = str(name or "float16").lower()
    if key not in dtypes:
        raise ValueError(
            f"SOLVER.AMP.PRECISION must be 'float16' or 'bfloat16', got {name!r}. HINT: use "
            "'bfloat16' on CPU."
        )
    return dtypes[key]


_CURVES_FILES = ("metrics.json", "curves.png")  # what PlotCurves reads and draws


# --------------------------------------------------------------------------- sharding (FSDP2)
def _fsdp_from_config(cfg: CfgNode, model: nn.Module) -> nn.Module:
    """:func:`create_fsdp_model` as ``MODEL.FSDP`` says; ``SOLVER.AMP`` becomes FSDP2's mixed
    precision (parameters in the AMP dtype for compute, gradients reduced in float32)."""
    mp_policy = None
    if cfg.SOLVER.AMP.ENABLED:
        from torch.distributed.fsdp import MixedPrecisionPolicy  # only FSDP jobs pay its import

        dtype = _amp_dtype(cfg.SOLVER.AMP.get("PRECISION"))
        mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    fsdp = cfg.MODEL.FSDP
    return create_fsdp_model(
        model,
        shard_modules=list(fsdp.SHARD_MODULES),
        mp_policy=mp_policy,
        reshard_after_forward=bool(fsdp.RESHARD_AFTER_FORWARD),
        activation_checkpointing=bool(fsdp.ACTIVATION_CHECKPOINTING),
    )


def _check_elastic_schedule(cfg: CfgNode, data_state: Any) -> None:
    """Refuse a resume on another number of processes when ``auto_scale_workers`` scaled the
    schedule to the world size: the saved iteration would mean another point of it."""
    if not isinstance(data_state, Mapping) or "world_size" not in data_state:
        return
    saved_world, world = int(data_state["world_size"]), comm.get_world_size()
    if saved_world == world or int(cfg.SOLVER.REFERENCE_WORLD_SIZE) <= 0:
        return  # the same job shape, or IMS_PER_BATCH fixed: the data loader checks the batch
    saved_batch = saved_world * int(data_state.get("batch_size", 0))
    raise ValueError(
        f"The checkpoint was written by {saved_world} process(es) with a global batch of "
        f"{saved_batch}; this job has {world}, and SOLVER.REFERENCE_WORLD_SIZE "
        f"(auto_scale_workers) scales the config to it: SOLVER.IMS_PER_BATCH "
        f"{cfg.SOLVER.IMS_PER_BATCH}, MAX_ITER {cfg.SOLVER.MAX_ITER}, so the saved iteration would "
        f"mean another point of the schedule. HINT: resume with SOLVER.REFERENCE_WORLD_SIZE 0 and "
        f"SOLVER.IMS_PER_BATCH {saved_batch} (and the BASE_LR, MAX_ITER, STEPS, WARMUP_ITERS, "
        f"CHECKPOINT_PERIOD and TEST.EVAL_PERIOD the checkpointed run used: see its config.yaml), "
        f"or on {saved_world} process(es)."
    )


def _hang_watchdog(cfg: CfgNode) -> HangWatchdog | None:
    """The HangWatchdog hook of ``SOLVER.HANG_TIMEOUT`` (None when 0 or absent)."""
    timeout = check_hang_timeout(
        _try_get_key(cfg, "SOLVER.HANG_TIMEOUT", default=0), "SOLVER.HANG_TIMEOUT"
    )
    return HangWatchdog(timeout) if timeout > 0 else None


def _build_model_ema(cfg: CfgNode, model: nn.Module) -> ModelEMA | None:
    """The EMA of ``MODEL_EMA`` (None when disabled)."""
    if not cfg.MODEL_EMA.ENABLED:
        return None
    factor = float(cfg.MODEL_EMA.DECAY_WARM_UP_FACTOR)
    return ModelEMA(
        model,
        decay=cfg.MODEL_EMA.DECAY,
        device=cfg.MODEL_EMA.DEVICE or None,
        warmup=factor if factor >= 0 else None,
    )


class _Chained:
    """Iterates over several loaders one after the other, each time from their start."""

    def __init__(self, loaders: list[Iterable]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[Any]:
        for loader in self.loaders:
            yield from loader


_WRITER_PERIOD = 20
"""The PeriodicWriter's period in DefaultTrainer, and the inner trainer's gather_metric_period."""

_MAX_ITER_LIMIT = 2**63 - 1


def _check_solver(cfg: CfgNode, world_size: int) -> int:
    """Check SOLVER.MAX_ITER and the batch split; return SOLVER.GRAD_ACCUM_STEPS."""
    max_iter = cfg.SOLVER.MAX_ITER
    if isinstance(max_iter, bool) or not isinstance(max_iter, int):
        raise ValueError(
            f"SOLVER.MAX_ITER must be an integer, got {max_iter!r} ({type(max_iter).__name__}). "
            "HINT: e.g. SOLVER.MAX_ITER 90000."
        )
    if not 0 <= max_iter <= _MAX_ITER_LIMIT:
        raise ValueError(
            f"SOLVER.MAX_ITER must be an integer in [0, 2**63 - 1], got {max_iter}. HINT: give "
            "the number of optimizer steps to train, e.g. SOLVER.MAX_ITER 90000."
        )
    accum = check_positive_int(cfg.SOLVER.get("GRAD_ACCUM_STEPS", 1), "SOLVER.GRAD_ACCUM_STEPS")
    ims = cfg.SOLVER.IMS_PER_BATCH
    if isinstance(ims, int) and ims % (world_size * accum) != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({ims}) must be a multiple of the number of processes "
            f"({world_size}) times SOLVER.GRAD_ACCUM_STEPS ({accum}): each process loads "
            f"IMS_PER_BATCH // ({world_size} * {accum}) images per micro-batch. HINT: set "
            f"SOLVER.IMS_PER_BATCH to a multiple of {world_size * accum}, or change "
            "SOLVER.GRAD_ACCUM_STEPS."
        )
    return accum


def _micro_batch_config(cfg: CfgNode, accum: int) -> CfgNode:
    """``cfg`` for the data loaders: IMS_PER_BATCH is the images of one micro-batch (over all
    processes), ``IMS_PER_BATCH // accum``; ``cfg`` itself when ``accum`` is 1."""
    if accum == 1:
        return cfg
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.SOLVER.IMS_PER_BATCH //= accum
    if frozen:
        cfg.freeze()
    return cfg


class _InnerHookDispatch(HookBase):
    """Forwards the inner trainer's ``after_backward`` to the hooks of a :class:`DefaultTrainer`.

    Registered on the inner :class:`SimpleTrainer` (which runs the backward pass), it runs
    ``after_backward`` of the DefaultTrainer's hooks, in their order. It holds the DefaultTrainer
    through a weak proxy: DefaultTrainer -> inner trainer -> this hook -> DefaultTrainer would
    otherwise be a reference cycle. Stateless.
    """

    def __init__(self, outer: DefaultTrainer) -> None:
        self._outer = weakref.proxy(outer)

    def after_backward(self) -> None:
        self._outer.after_backward()


class DefaultTrainer(TrainerBase):
    """A trainer with the default training logic, built from a config.

    It

    1. builds the model, optimizer, LR scheduler and data loader from the config (the ``build_*``
       class methods; override them to change one part), wraps the model for DDP when there are
       several processes (or shards it with FSDP2 when ``MODEL.FSDP.ENABLED``), and trains with a
       :class:`SimpleTrainer` (an :class:`AMPTrainer` when ``SOLVER.AMP.ENABLED``) held as
       ``self._trainer``, which reads the losses once per writer period (20 iterations: no
       host-device sync in between) and accumulates ``SOLVER.GRAD_ACCUM_STEPS`` micro-batches per
       iteration (``build_train_loader`` gets a config whose ``SOLVER.IMS_PER_BATCH`` is the
       micro-batch: ``IMS_PER_BATCH // GRAD_ACCUM_STEPS`` over all processes);
    2. loads the last checkpoint of ``OUTPUT_DIR`` or ``MODEL.WEIGHTS`` in :meth:`resume_or_load`;
    3. registers the hooks of :meth:`build_hooks`: timing, LR schedule, precise BN, checkpoints,
       evaluation and event writing.

    Hooks registered on it (including ``after_backward`` hooks) run as on any trainer. Its
    ``state_dict()`` holds the iteration, the hooks' state (LR scheduler, ...), the RNG states of
    every rank (``"rng"``) and, under ``"_trainer"``, the inner trainer's state (optimizer, data
    position, grad scaler): resuming is exact, and SIGTERM stops training with a checkpoint (see
    ``docs/resume.md``).

    Attributes:
        cfg: the config, scaled by :meth:`auto_scale_workers` to the world size.
        scheduler: the LR scheduler.
        checkpointer: a :class:`~d2engine.checkpoint.DetectionCheckpointer` saving to
            ``OUTPUT_DIR``.
        model_ema: the :class:`~d2engine.modeling.ModelEMA` of the weights when
            ``MODEL_EMA.ENABLED``, else None.

    Training features (``docs/features.md``): ``MODEL_EMA`` (an EMA of the weights, evaluated too),
    ``TEST.LOSS_EVAL_PERIOD`` (validation loss), ``TEST.EARLY_STOPPING`` and ``MODEL.COMPILE``.

    Example::

        trainer = DefaultTrainer(cfg)
        trainer.resume_or_load()  # the last checkpoint of OUTPUT_DIR, or MODEL.WEIGHTS
        trainer.train()
    """

    def __init__(self, cfg: CfgNode) -> None:
        """Build everything the training needs.

        Args:
            cfg: the config; not modified.

        Raises:
            ValueError: SOLVER.MAX_ITER is not an integer in [0, 2**63 - 1], or SOLVER.IMS_PER_BATCH
                is not a multiple of the number of processes times SOLVER.GRAD_ACCUM_STEPS.
        """
        super().__init__()
        d2_logger = logging.getLogger("d2engine")
        if not d2_logger.isEnabledFor(logging.INFO):  # no set-up done: at least log to console
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        accum = _check_solver(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        if _try_get_key(cfg, "MODEL.FSDP.ENABLED", default=False):
            # Sharding replaces the parameters by DTensors: before the optimizer is built. The
            # sharded model is not wrapped in DDP below.
            model = _fsdp_from_config(cfg, model)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(_micro_batch_config(cfg, accum))
        self.model_ema = _build_model_ema(cfg, model)
        if cfg.MODEL.COMPILE.ENABLED:  # before DDP wrapping, as PyTorch recommends
            model = compile_model(model, cfg.MODEL.COMPILE.MODE)
        model = create_ddp_model(model, broadcast_buffers=False)
        # The losses are read once per writer period: no host-device sync in between.
        self._trainer: SimpleTrainer
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = AMPTrainer(
                model,
                data_loader,
                optimizer,
                precision=_amp_dtype(cfg.SOLVER.AMP.get("PRECISION")),
                gather_metric_period=_WRITER_PERIOD,
                grad_accum_steps=accum,
            )
        else:
            self._trainer = SimpleTrainer(
                model,
                data_loader,
                optimizer,
                gather_metric_period=_WRITER_PERIOD,
                grad_accum_steps=accum,
            )
        self._trainer.register_hooks([_InnerHookDispatch(self)])
        self._trainer.checkpoint_rng = False  # the RNG states are saved once, by this trainer

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # The proxy lets the checkpointer save the trainer's state without a reference cycle.
        # The EMA, when on, is saved as the checkpoints' "ema" entry.
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        if self.model_ema is not None:
            self.checkpointer.add_checkpointable("ema", self.model_ema)
        self.start_iter = 0
        self.max_iter = int(cfg.SOLVER.MAX_ITER)
        self.cfg = cfg
        self._last_eval_results: OrderedDict | dict | None = None  # set by the EvalHook
        # Hang diagnostics (docs/distributed.md): registered first, so that it stops first.
        self.register_hooks([_hang_watchdog(cfg)])
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True) -> None:
        """Load the last checkpoint of ``OUTPUT_DIR`` (resume) or only ``MODEL.WEIGHTS``.

        With ``resume=True`` and a ``last_checkpoint`` in ``OUTPUT_DIR``, everything is restored
        (model, optimizer, scheduler, hooks, iteration, ...) and training continues at the saved
        iteration + 1; ``MODEL.WEIGHTS`` is not used. A bad last checkpoint falls back to the
        newest one that loads (see :meth:`~d2engine.checkpoint.Checkpointer.resume_or_load`). A
        run resumed after its last iteration trains nothing: :meth:`train` writes the final
        checkpoint if it is missing and runs the final evaluation. Otherwise only the model weights
        are loaded from ``MODEL.WEIGHTS`` (when set) and training starts at iteration 0.

        Args:
            resume: whether to resume from ``OUTPUT_DIR``.
        """
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if self.checkpointer.resumed_from:  # not merely a last_checkpoint file: a checkpoint
            # The checkpoint's "iteration" is the last finished one: continue with the next.
            self.start_iter = self.iter + 1
            if self.start_iter >= self.max_iter:
                logger.info(
                    f"Resumed after iteration {self.iter}: training is already complete "
                    f"(SOLVER.MAX_ITER {self.max_iter}); train() only finishes the final "
                    "artefacts (the final checkpoint if it is missing, the final evaluation)."
                )

    def build_hooks(self) -> list[HookBase | None]:
        """The default hooks, in this order.

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

        Returns:
            The hooks (``None`` entries are skipped by ``register_hooks``).
        """
        cfg = _micro_batch_config(self.cfg, self._trainer.grad_accum_steps).clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # PreciseBN runs few iterations: workers cost more

        ret: list[HookBase | None] = [hooks.IterationTimer(), hooks.LRScheduler()]
        if self.model_ema is not None:
            ret.append(hooks.EMAHook(self.model_ema))
        if cfg.TEST.PRECISE_BN.ENABLED and _has_training_bn(self.model):
            ret.append(
                hooks.PreciseBN(
                    cfg.TEST.EVAL_PERIOD,
                    self.model,
                    self.build_train_loader(cfg),
                    cfg.TEST.PRECISE_BN.NUM_ITER,
                )
            )
        # On every rank: only the main process writes (DetectionCheckpointer), but all ranks
        # gather their RNG states at the save points and take part in preemption saves.
        checkpoint_hook = hooks.PeriodicCheckpointer(
            self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD
        )

        # The closure holds the trainer weakly: the hook is owned by the trainer.
        trainer_ref = weakref.ref(self)

        def test_and_save_results() -> Any:
            trainer = trainer_ref()
            if trainer is None:  # pragma: no cover - the hook only runs while the trainer lives
                return {}
            if trainer.model_ema is None:
                results = trainer.test(trainer.cfg, trainer.model)
            else:  # the EMA's results too, keys suffixed "_ema"
                results = trainer.test(trainer.cfg, trainer.model, ema=trainer.model_ema)
            trainer._last_eval_results = results
            return results

        evaluation: list[HookBase] = [hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results)]
        if cfg.TEST.LOSS_EVAL_PERIOD > 0:
            evaluation.append(
                hooks.LossEvalHook(
                    cfg.TEST.LOSS_EVAL_PERIOD, self.model, self.build_loss_eval_loader(self.cfg)
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
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=_WRITER_PERIOD))
            # (d2engine) What a person watches: the live bar and the curves, after the writers.
            bar = hooks.ProgressBar(period=20, enabled=cfg.OUTPUT.PROGRESS_BAR)
            ret.append(bar if bar.enabled else None)
            if cfg.OUTPUT.PLOT:
                metrics, curves = (os.path.join(cfg.OUTPUT_DIR, f) for f in _CURVES_FILES)
                ret.append(hooks.PlotCurves(metrics, curves, cfg.TEST.EVAL_PERIOD, write_period=20))
        return ret

    @classmethod
    def build_loss_eval_loader(cls, cfg: CfgNode) -> Iterable:
        """The data of the LossEvalHook (``TEST.LOSS_EVAL_PERIOD``): every dataset of
        ``DATASETS.TEST``, each from :meth:`build_test_loader`. Override it when the test
        loaders drop what the loss needs (e.g. annotations).

        Args:
            cfg: the config.

        Returns:
            A re-iterable over the batches of all test datasets (this process's shard).

        Raises:
            ValueError: ``DATASETS.TEST`` is empty.
        """
        names = list(cfg.DATASETS.TEST)
        if not names:
            raise ValueError(
                "TEST.LOSS_EVAL_PERIOD is set but DATASETS.TEST is empty. HINT: name the "
                "validation datasets in DATASETS.TEST, or set TEST.LOSS_EVAL_PERIOD 0."
            )
        loaders = [cls.build_test_loader(cfg, name) for name in names]
        return loaders[0] if len(loaders) == 1 else _Chained(loaders)

    def build_writers(self) -> list[EventWriter]:
        """The event writers of the PeriodicWriter hook: :func:`default_writers` of the config
        (``OUTPUT.WRITERS``).

        Returns:
            The writers, writing to ``OUTPUT_DIR``.
        """
        return default_writers(self.cfg.OUTPUT_DIR, self.max_iter, cfg=self.cfg)

    def train(self) -> OrderedDict | dict | None:  # type: ignore[override]  # detectron2's API
        """Train from ``start_iter`` to ``max_iter``.

        A preemption signal (SIGTERM by default, see ``preemption``) stops training after the
        current iteration with a checkpoint in ``OUTPUT_DIR``; then ``self.preempted`` is True,
        None is returned and the script should exit with
        :data:`~d2engine.engine.preemption.PREEMPTION_EXIT_CODE` (``d2engine-train`` does);
        ``resume_or_load(resume=True)`` continues bit-identically. The inner trainer's
        background metrics thread is stopped at the end.

        Returns:
            The results of the last evaluation (as :meth:`test` returns them) when the config has
            test datasets; otherwise None (also when preempted).

        Raises:
            ResultsVerificationError: the results do not match ``TEST.EXPECTED_RESULTS`` (see
                :func:`d2engine.evaluation.verify_results`).
        """
        try:
            super().train(self.start_iter, self.max_iter)
        finally:
            self._trainer.close()
        if self.preempted:  # a checkpoint was saved; the caller exits with PREEMPTION_EXIT_CODE
            return None
        results = self._last_eval_results if self.cfg.DATASETS.TEST else None
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            if results is None:
                raise ResultsVerificationError(
                    "TEST.EXPECTED_RESULTS is set but no evaluation ran during training. HINT: "
                    "set DATASETS.TEST, or clear TEST.EXPECTED_RESULTS."
                )
            verify_results(self.cfg, results)
        return results

    def flush_metrics(self) -> None:
        """Read, check and log the inner trainer's pending losses (see
        :meth:`SimpleTrainer.flush_metrics`; a collective in a multi-process job)."""
        self._trainer.flush_metrics()

    def close(self) -> None:
        """Release the background threads: the inner trainer's metrics thread and the
        checkpointer's writer (both restart when needed). Pending saves are completed first.

        Raises:
            AsyncSaveError: a pending asynchronous save failed.
        """
        self._trainer.close()
        self.checkpointer.close()

    def run_step(self) -> None:
        """Run one step of the inner trainer at the current iteration."""
        self._trainer.iter = self.iter
        self._trainer.run_step()

    def gather_state(self) -> None:
        """Gather every rank's random generators and data position for the next ``state_dict()``
        (a collective, called on every rank before each save by the PeriodicCheckpointer hook)."""
        super().gather_state()
        self._trainer.gather_state()

    def state_dict(self) -> dict[str, Any]:
        """The trainer's state: iteration, hooks and the inner trainer's state (``"_trainer"``).

        Returns:
            A dict for :meth:`load_state_dict`.
        """
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`.

        A state saved by another number of processes resumes (see "Elastic resume" in
        ``docs/resume.md``) unless ``auto_scale_workers`` would change the global batch for it.

        Args:
            state_dict: the saved state.

        Raises:
            ValueError: the state was saved by another number of processes and
                ``SOLVER.REFERENCE_WORLD_SIZE`` scales the schedule to the world size.
        """
        _check_elastic_schedule(self.cfg, state_dict.get("_trainer", {}).get("data"))
        super().load_state_dict(state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])

    # ------------------------------------------------------------ builders
    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        """Build the model with :func:`d2engine.modeling.build_model`; override to change it.

        Args:
            cfg: the config.

        Returns:
            The model.
        """
        model = build_model(cfg)
        num_params = sum(p.numel() for p in model.parameters())
        logger.info(f"Model ({num_params:,} parameters):\n{model}")
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        """Build the optimizer with :func:`d2engine.solver.build_optimizer`; override to change it.

        Args:
            cfg: the config.
            model: the model.

        Returns:
            The optimizer.
        """
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer) -> Any:
        """Build the LR scheduler with :func:`d2engine.solver.build_lr_scheduler`.

        Args:
            cfg: the config.
            optimizer: the optimizer it schedules.

        Returns:
            The scheduler.
        """
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Iterable:
        """Build the training loader with :func:`d2engine.data.build_detection_train_loader`.

        Args:
            cfg: the config.

        Returns:
            An infinite iterable of batches (lists of dataset dicts).
        """
        return build_detection_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str) -> Iterable:
        """Build a test loader with :func:`d2engine.data.build_detection_test_loader`.

        Args:
            cfg: the config.
            dataset_name: a name in ``DATASETS.TEST``.

        Returns:
            An iterable over the dataset, each item seen once across processes.
        """
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator | None:
        """Build the evaluator of a test dataset. Not implemented: override it.

        Args:
            cfg: the config.
            dataset_name: a name in ``DATASETS.TEST``.

        Returns:
            The evaluator.

        Raises:
            NotImplementedError: always, unless overridden.
        """
        raise NotImplementedError(
            f"{cls.__name__}.build_evaluator is not implemented: DefaultTrainer cannot know how to "
            f"evaluate dataset {dataset_name!r}. HINT: subclass DefaultTrainer and override "
            "build_evaluator(cls, cfg, dataset_name) to return a DatasetEvaluator (e.g. "
            "d2engine.evaluation.ClassificationEvaluator), or pass evaluators= to test()."
        )

    @classmethod
    def test(
        cls,
        cfg: CfgNode,
        model: nn.Module,
        evaluators: DatasetEvaluator | list[DatasetEvaluator | None] | None = None,
        *,
        ema: ModelEMA | None = None,
    ) -> OrderedDict | dict:
        """Evaluate ``model`` on every dataset of ``cfg.DATASETS.TEST``.

        Args:
            cfg: the config.
            model: the model to evaluate.
            evaluators: one evaluator per test dataset (a single evaluator for a single dataset);
                when None, :meth:`build_evaluator` is called for each dataset. A dataset without an
                evaluator is skipped with a warning and gets ``{}``.
            ema: evaluate the model a second time with these averaged weights swapped in
                (:meth:`~d2engine.modeling.ModelEMA.swap`); its results are added under the same
                top-level keys suffixed ``"_ema"`` (e.g. ``accuracy_ema``).

        Returns:
            ``{dataset_name: results}`` in the order of ``DATASETS.TEST``; with a single test dataset,
            its results alone (unwrapped), as detectron2 does.

        Raises:
            ValueError: the number of evaluators differs from the number of test datasets.
        """
        if ema is not None:
            trained = cls.test(cfg, model, evaluators)
            with ema.swap(model):
                averaged = cls.test(cfg, model, evaluators)
            for key, value in averaged.items():
                trained[f"{key}_ema"] = value
            return trained
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        test_sets = list(cfg.DATASETS.TEST)
        if evaluators is not None and len(evaluators) != len(test_sets):
            raise ValueError(
                f"DefaultTrainer.test got {len(evaluators)} evaluators for {len(test_sets)} test "
                f"datasets {test_sets}: give one evaluator per dataset of DATASETS.TEST."
            )
        results: OrderedDict[str, Any] = OrderedDict()
        for idx, dataset_name in enumerate(test_sets):
            if evaluators is not None:
                evaluator = evaluators[idx]
            else:
                try:
                    evaluator = cls.build_evaluator(cfg, dataset_name)
                except NotImplementedError:
                    evaluator = None
            if evaluator is None:
                logger.warning(
                    f"No evaluator for {dataset_name!r}: skipped. HINT: pass evaluators= to "
                    "DefaultTrainer.test, or implement build_evaluator in your trainer."
                )
                results[dataset_name] = {}
                continue
            data_loader = cls.build_test_loader(cfg, dataset_name)
            show_bar = bool(_try_get_key(cfg, "OUTPUT.PROGRESS_BAR", default=True))
            results_i = inference_on_dataset(model, data_loader, evaluator, progress_bar=show_bar)
            results[dataset_name] = results_i
            if comm.is_main_process():
                if not isinstance(results_i, Mapping):
                    raise TypeError(
                        f"The evaluator of {dataset_name!r} returned {type(results_i).__name__}; "
                        "evaluate() must return a dict of results."
                    )
                logger.info(f"Evaluation results for {dataset_name} in csv format:")
                print_csv_format(results_i)
        if len(results) == 1:
            return next(iter(results.values()))
        return results

    @staticmethod
    def auto_scale_workers(cfg: CfgNode, num_workers: int) -> CfgNode:
        """Scale a config written for ``SOLVER.REFERENCE_WORLD_SIZE`` processes to ``num_workers``.

        The per-process batch size stays ``IMS_PER_BATCH // REFERENCE_WORLD_SIZE``: with
        ``scale = num_workers / REFERENCE_WORLD_SIZE``, IMS_PER_BATCH and BASE_LR are multiplied
        by ``scale`` (the linear scaling rule of "Accurate, Large Minibatch SGD"); MAX_ITER,
        WARMUP_ITERS, STEPS, TEST.EVAL_PERIOD, TEST.LOSS_EVAL_PERIOD and CHECKPOINT_PERIOD are
        divided by it (rounded); REFERENCE_WORLD_SIZE becomes ``num_workers``. For example IMS_PER_BATCH 16, BASE_LR 0.1,
        REFERENCE_WORLD_SIZE 8, MAX_ITER 5000, STEPS (4000,), CHECKPOINT_PERIOD 1000 on 16
        workers gives 32, 0.2, 16, 2500, (2000,), 500.

        Args:
            cfg: the config; not modified.
            num_workers: the number of processes that will train.

        Returns:
            ``cfg`` itself when REFERENCE_WORLD_SIZE is 0 or equals ``num_workers``; otherwise a
            scaled clone, frozen if ``cfg`` was.

        GRAD_ACCUM_STEPS is unchanged, so the micro-batch of each process stays the same too.

        Raises:
            ValueError: ``num_workers`` < 1, or IMS_PER_BATCH is not divisible by
                REFERENCE_WORLD_SIZE.
        """
        if num_workers < 1:
            raise ValueError(f"auto_scale_workers: num_workers must be >= 1, got {num_workers}.")
        old_world_size = int(cfg.SOLVER.REFERENCE_WORLD_SIZE)
        if old_world_size == 0 or old_world_size == num_workers:
            return cfg
        if old_world_size < 0 or cfg.SOLVER.IMS_PER_BATCH % old_world_size != 0:
            raise ValueError(
                f"Invalid SOLVER.REFERENCE_WORLD_SIZE {old_world_size}: SOLVER.IMS_PER_BATCH "
                f"({cfg.SOLVER.IMS_PER_BATCH}) must be a multiple of it. HINT: set it to the "
                "number of processes the config was written for, or 0 to disable scaling."
            )
        cfg = cfg.clone()
        frozen = cfg.is_frozen()
        cfg.defrost()
        scale = num_workers / old_world_size
        solver = cfg.SOLVER
        solver.IMS_PER_BATCH = bs = int(round(solver.IMS_PER_BATCH * scale))
        solver.BASE_LR = lr = solver.BASE_LR * scale
        solver.MAX_ITER = max_iter = int(round(solver.MAX_ITER / scale))
        solver.WARMUP_ITERS = warmup_iter = int(round(solver.WARMUP_ITERS / scale))
        solver.STEPS = tuple(int(round(s / scale)) for s in solver.STEPS)
        cfg.TEST.EVAL_PERIOD = int(round(cfg.TEST.EVAL_PERIOD / scale))
        cfg.TEST.LOSS_EVAL_PERIOD = int(round(cfg.TEST.LOSS_EVAL_PERIOD / scale))
        solver.CHECKPOINT_PERIOD = int(round(solver.CHECKPOINT_PERIOD / scale))
        solver.REFERENCE_WORLD_SIZE = num_workers  # the scaled config is "for" num_workers
        logger.info(
            f"Auto-scaling the config to batch_size={bs}, learning_rate={lr}, "
            f"max_iter={max_iter}, warmup={warmup_iter}."
        )
        if frozen:
            cfg.freeze()
        return cfg

    # ------------------------------------------------------------ inner trainer's members
    @property
    def model(self) -> nn.Module:
        """The model being trained (DDP-wrapped in a multi-process job)."""
        return self._trainer.model

    @model.setter
    def model(self, value: nn.Module) -> None:
        self._trainer.model = value

    @property
    def data_loader(self) -> Iterable:
        """The training data loader."""
        return self._trainer.data_loader

    @data_loader.setter
    def data_loader(self, value: Iterable) -> None:
        self._trainer.data_loader = value

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer."""
        return self._trainer.optimizer

    @optimizer.setter
    def optimizer(self, value: torch.optim.Optimizer) -> None:
        self._trainer.optimizer = value
