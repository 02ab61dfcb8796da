"""The training engine: train loops, hooks, launch and the default trainer (detectron2.engine)."""

from d2engine.engine import hooks
from d2engine.engine.ddp import create_ddp_model, create_fsdp_model
from d2engine.engine.defaults import (
    DefaultPredictor,
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
)
from d2engine.engine.hooks import *  # noqa: F403  (every hook, as detectron2.engine does)
from d2engine.engine.launch import DEFAULT_TIMEOUT, WorkerError, launch
from d2engine.engine.preemption import PREEMPTION_EXIT_CODE
from d2engine.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase

__all__ = [
    "AMPTrainer",
    "DEFAULT_TIMEOUT",
    "DefaultPredictor",
    "DefaultTrainer",
    "HookBase",
    "PREEMPTION_EXIT_CODE",
    "SimpleTrainer",
    "TrainerBase",
    "WorkerError",
    "create_ddp_model",
    "create_fsdp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
    "hooks",
    "launch",
    *hooks.__all__,
]
