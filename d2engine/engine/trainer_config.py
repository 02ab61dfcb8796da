"""What :class:`~d2engine.engine.defaults.DefaultTrainer` reads from the config, checked.

The ``SOLVER`` schedule and batch split (:func:`check_solver`, :func:`micro_batch_config`), its
scaling to the number of processes (:func:`auto_scale_workers`) and the resume check that goes with
it (:func:`check_elastic_schedule`), the AMP precision (:func:`amp_dtype`), FSDP2 sharding
(:func:`fsdp_from_config`) and the EMA of the weights (:func:`build_model_ema`). The hooks a config
asks for are in :mod:`d2engine.engine.default_hooks`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from d2engine.config import CfgNode
from d2engine.engine.ddp import create_fsdp_model
from d2engine.modeling import ModelEMA
from d2engine.utils import comm
from d2engine.utils.validation import check_positive_int

__all__ = [
    "amp_dtype",
    "auto_scale_workers",
    "build_model_ema",
    "check_elastic_schedule",
    "check_solver",
    "fsdp_from_config",
    "micro_batch_config",
]

logger = logging.getLogger(__name__)


def amp_dtype(name: str | None) -> torch.dtype:
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


def fsdp_from_config(cfg: CfgNode, model: nn.Module) -> nn.Module:
    """:func:`create_fsdp_model` as ``MODEL.FSDP`` says; ``SOLVER.AMP`` becomes FSDP2's mixed
    precision (parameters in the AMP dtype for compute, gradients reduced in float32)."""
    mp_policy = None
    if cfg.SOLVER.AMP.ENABLED:
        from torch.distributed.fsdp import MixedPrecisionPolicy  # only FSDP jobs pay its import

        dtype = amp_dtype(cfg.SOLVER.AMP.get("PRECISION"))
        mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    fsdp = cfg.MODEL.FSDP
    return create_fsdp_model(
        model,
        shard_modules=list(fsdp.SHARD_MODULES),
        mp_policy=mp_policy,
        reshard_after_forward=bool(fsdp.RESHARD_AFTER_FORWARD),
        activation_checkpointing=bool(fsdp.ACTIVATION_CHECKPOINTING),
    )


def check_elastic_schedule(cfg: CfgNode, data_state: Any) -> None:
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


def build_model_ema(cfg: CfgNode, model: nn.Module) -> ModelEMA | None:
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


_MAX_ITER_LIMIT = 2**63 - 1


def check_solver(cfg: CfgNode, world_size: int) -> int:
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


def micro_batch_config(cfg: CfgNode, accum: int) -> CfgNode:
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


def auto_scale_workers(cfg: CfgNode, num_workers: int) -> CfgNode:
    """Scale a config written for ``SOLVER.REFERENCE_WORLD_SIZE`` processes to ``num_workers``.

    The per-process batch size stays ``IMS_PER_BATCH // REFERENCE_WORLD_SIZE``: with
    ``scale = num_workers / REFERENCE_WORLD_SIZE``, IMS_PER_BATCH and BASE_LR are multiplied
    by ``scale`` (the linear scaling rule of "Accurate, Large Minibatch SGD"); MAX_ITER,
    WARMUP_ITERS, STEPS, TEST.EVAL_PERIOD, TEST.LOSS_EVAL_PERIOD and CHECKPOINT_PERIOD are
    divided by it (rounded); REFERENCE_WORLD_SIZE becomes ``num_workers``. For example
    IMS_PER_BATCH 16, BASE_LR 0.1, REFERENCE_WORLD_SIZE 8, MAX_ITER 5000, STEPS (4000,),
    CHECKPOINT_PERIOD 1000 on 16 workers gives 32, 0.2, 16, 2500, (2000,), 500.

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
