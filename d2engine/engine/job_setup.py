"""The start of a training or evaluation script: its command line and the job's set-up.

:func:`default_argument_parser` parses what ``d2engine-train`` (and detectron2's ``train_net.py``)
accept; :func:`default_setup` prepares the output directory, logging, the environment report, the
config backup and the seeds. Both are re-exported by :mod:`d2engine.engine.defaults`, detectron2's
path for them. :func:`try_get_key` reads a setting from either kind of config (a
:class:`~d2engine.config.CfgNode` or a lazy ``DictConfig``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from d2engine.config import LazyConfig
from d2engine.utils import comm
from d2engine.utils.collect_env import collect_env_info
from d2engine.utils.env import seed_all_rng, set_float32_precision
from d2engine.utils.logger import PORTED_LOGGER_NAMES, forward_logger, setup_logger

__all__ = ["default_argument_parser", "default_setup", "try_get_key"]

logger = logging.getLogger(__name__)


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
    (machine0)$ {prog} --machine-rank 0 --num-machines 2 \\
                    --dist-url tcp://<machine0>:29500 [--other-flags]
    (machine1)$ {prog} --machine-rank 1 --num-machines 2 \\
                    --dist-url tcp://<machine0>:29500 [--other-flags]
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


def _is_lazy_config(cfg: Any) -> bool:
    return isinstance(cfg, DictConfig)


def try_get_key(cfg: Any, *keys: str, default: Any = None) -> Any:
    """The value of the first dotted key that ``cfg`` (CfgNode or DictConfig) has.

    Args:
        cfg: a :class:`~d2engine.config.CfgNode`, a mapping, or an omegaconf ``DictConfig``.
        keys: dotted keys (``"SOLVER.HANG_TIMEOUT"``), tried in order.
        default: the value when ``cfg`` has none of them.

    Returns:
        The value of the first key found, else ``default``.
    """
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
    output_dir = try_get_key(cfg, "OUTPUT_DIR", "output_dir", "train.output_dir")
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

    seed = int(try_get_key(cfg, "SEED", "train.seed", "seed", default=-1))
    if seed < 0:
        seed = int.from_bytes(os.urandom(4), "big") % 2**31
        logger.info(f"SEED is negative: using the random seed {seed} (set SEED {seed} to repeat)")
    seed_all_rng(seed + rank)
    logger.info(f"Seeded python, numpy and torch with {seed + rank} (seed {seed} + rank {rank})")

    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = bool(
            try_get_key(cfg, "CUDNN_BENCHMARK", "train.cudnn_benchmark", default=False)
        )
    precision = try_get_key(cfg, "FLOAT32_PRECISION", "train.float32_precision", default="")
    if precision:
        set_float32_precision(precision)
