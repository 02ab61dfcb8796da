"""The ``d2engine-train`` command: train (or evaluate) a model described by a YAML config.

In the form of detectron2's ``tools/train_net.py``::

    d2engine-train --config-file configs/digits/convnet.yaml OUTPUT_DIR output/demo
    d2engine-train --config-file cfg.yaml --num-gpus 2                 # 2 processes (gloo on CPU)
    d2engine-train --config-file cfg.yaml --resume                     # continue in OUTPUT_DIR
    d2engine-train --config-file cfg.yaml --eval-only MODEL.WEIGHTS output/demo/model_final.pth
    d2engine-train --config-file cfg.yaml --no-progress                # no progress bar

It uses :func:`~d2engine.engine.launch.launch`, :func:`~d2engine.engine.defaults.default_setup`
and a :class:`~d2engine.engine.defaults.DefaultTrainer` whose evaluator is chosen from the
``evaluator_type`` in each test dataset's metadata. Also runnable as
``python -m d2engine.tools.train_net``. Copy it to start a script for your own project.

Signals (through :func:`~d2engine.engine.launch.launch`): on SIGTERM training stops with a
checkpoint in OUTPUT_DIR and the command exits with code 75
(:data:`d2engine.engine.PREEMPTION_EXIT_CODE`; also during start-up, with nothing to save); the
first Ctrl-C does the same with code 130, a second one aborts at once. Run it again with
``--resume``. ``docs/resume.md`` tells the whole story.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import d2engine.data.datasets  # noqa: F401  (registers the built-in datasets)
from d2engine.checkpoint import DetectionCheckpointer
from d2engine.config import CfgNode, get_cfg
from d2engine.data import MetadataCatalog
from d2engine.engine.defaults import DefaultTrainer, default_argument_parser, default_setup
from d2engine.engine.launch import launch
from d2engine.evaluation import ClassificationEvaluator, DatasetEvaluator, verify_results
from d2engine.modeling import load_ema_weights
from d2engine.modeling.classifier import add_classifier_config
from d2engine.utils import comm

__all__ = ["Trainer", "build_parser", "cli", "format_results", "main", "setup"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """DefaultTrainer with evaluators chosen by the test datasets' ``evaluator_type`` metadata."""

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator:
        """Build the evaluator named by ``MetadataCatalog.get(dataset_name).evaluator_type``.

        Args:
            cfg: the config.
            dataset_name: a test dataset.

        Returns:
            The evaluator (``"classification"``: a ClassificationEvaluator).

        Raises:
            NotImplementedError: the dataset's evaluator type is unknown or unset.
        """
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "classification":
            return ClassificationEvaluator(dataset_name)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}. "
            "HINT: set MetadataCatalog.get(name).evaluator_type = 'classification', or subclass "
            "Trainer and override build_evaluator."
        )


def setup(args: argparse.Namespace) -> CfgNode:
    """Build the frozen config from the command line and run :func:`default_setup`.

    ``--no-progress`` sets ``OUTPUT.PROGRESS_BAR`` to False.

    Args:
        args: parsed by :func:`build_parser` (or
            :func:`~d2engine.engine.defaults.default_argument_parser`).

    Returns:
        The config.
    """
    cfg = get_cfg()
    add_classifier_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    if getattr(args, "no_progress", False):
        cfg.OUTPUT.PROGRESS_BAR = False
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def format_results(results: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Flatten nested results into ``"path/to/metric: value"`` lines.

    Args:
        results: the (nested) results of :meth:`DefaultTrainer.test`.
        prefix: prepended to every path.

    Returns:
        One line per metric.
    """
    lines = []
    for key, value in results.items():
        if isinstance(value, Mapping):
            lines += format_results(value, f"{prefix}{key}/")
        elif isinstance(value, float):
            lines.append(f"{prefix}{key}: {value:.4f}")
        else:
            lines.append(f"{prefix}{key}: {value}")
    return lines


def _print_summary(cfg: CfgNode, results: Mapping[str, Any] | None, eval_only: bool) -> None:
    out = cfg.OUTPUT_DIR
    print("\n" + "=" * 60, flush=True)
    if results:
        print("Final results:")
        for line in format_results(results):
            print(f"  {line}")
    else:
        print("No evaluation results (DATASETS.TEST is empty or has no evaluator).")
    print(f"Outputs in {os.path.abspath(out)}:")
    if not eval_only:
        checkpoints = (
            sorted(n for n in os.listdir(out) if n.endswith(".pth")) if os.path.isdir(out) else []
        )
        print(f"  checkpoints:  {', '.join(checkpoints) or '(none)'}")
        print(f"  metrics:      {os.path.join(out, 'metrics.json')}")
        print(f"  TensorBoard:  tensorboard --logdir {out}")
    print(f"  log / config: {os.path.join(out, 'log.txt')}, {os.path.join(out, 'config.yaml')}")
    print("=" * 60, flush=True)


def main(args: argparse.Namespace) -> Any:
    """Train, or with ``--eval-only`` evaluate, in one process of the job.

    Args:
        args: the parsed command line.

    Returns:
        The evaluation results (on the main process; ``{}`` elsewhere, and when training was
        stopped by a signal: :func:`~d2engine.engine.launch.launch` then exits with 75, or 130
        for Ctrl-C).
    """
    cfg = setup(args)
    results: Mapping[str, Any] | None
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        unused = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY:  # evaluate the checkpoint's EMA weights
            resumed = args.resume and checkpointer.has_checkpoint()
            source = checkpointer.get_checkpoint_file() if resumed else cfg.MODEL.WEIGHTS
            load_ema_weights(model, unused, source=source or "MODEL.WEIGHTS (empty)")
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
        if trainer.preempted:  # stopped by a signal, with a checkpoint: launch sets the code
            return {}
    if comm.is_main_process():
        _print_summary(cfg, results, args.eval_only)
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command line: :func:`~d2engine.engine.defaults.default_argument_parser` and
    ``--no-progress``.

    Returns:
        The parser.
    """
    parser = default_argument_parser()
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="never draw a progress bar (also: OUTPUT.PROGRESS_BAR False, or the environment "
        "variable D2ENGINE_PROGRESS=0); without a terminal none is drawn anyway",
    )
    return parser


def cli(argv: Sequence[str] | None = None) -> None:
    """The ``d2engine-train`` entry point.

    Exits with :data:`d2engine.engine.PREEMPTION_EXIT_CODE` (75) when the job was preempted
    (SIGTERM), 130 when it was interrupted (Ctrl-C), see :func:`~d2engine.engine.launch.launch`;
    0 on success.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config_file and "://" not in args.config_file and not os.path.isfile(args.config_file):
        parser.error(
            f"--config-file {args.config_file}: no such file (working directory "
            f"{os.getcwd()}). HINT: the demo's config is configs/digits/convnet.yaml; "
            "d2engine-train --help lists the options."
        )
    print("Command Line Args:", args, flush=True)
    # Refer to main by its module path so that spawned workers can unpickle it, also when this
    # file runs as __main__ (python -m d2engine.tools.train_net).
    from d2engine.tools import train_net

    launch(
        train_net.main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
