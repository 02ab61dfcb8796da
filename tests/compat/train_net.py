#!/usr/bin/env python
"""A port of detectron2's ``tools/train_net.py``: the same calls, d2engine's prefix.

``DefaultTrainer`` subclassed for its evaluator, test-time augmentation behind
``cfg.TEST.AUG.ENABLED``, ``verify_results`` in evaluation-only runs. Only the import prefix
differs from detectron2's script; the detection evaluators and ``GeneralizedRCNNWithTTA`` are
swapped for the tiny model's (``tiny.py``)::

    python tests/compat/train_net.py --config-file tests/compat/configs/tiny.yaml \
        OUTPUT_DIR /tmp/train_net
"""

import logging
import os
from collections import OrderedDict

import tiny  # registers TinyClassifier, tiny_train and tiny_test

import d2engine.utils.comm as comm
from d2engine.checkpoint import DetectionCheckpointer
from d2engine.config import get_cfg
from d2engine.data import MetadataCatalog
from d2engine.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch
from d2engine.evaluation import ClassificationEvaluator, DatasetEvaluators, verify_results


def build_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator(s) named by the dataset's metadata ``evaluator_type``."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluators = []
    evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
    if evaluator_type == "classification":
        evaluators.append(ClassificationEvaluator(dataset_name))
    if not evaluators:
        raise NotImplementedError(f"no evaluator for {dataset_name} of type {evaluator_type}")
    elif len(evaluators) == 1:
        return evaluators[0]
    return DatasetEvaluators(evaluators)


class Trainer(DefaultTrainer):
    """DefaultTrainer with this script's evaluators and a test-time-augmentation evaluation."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):  # noqa: N802 (detectron2's name)
        logger = logging.getLogger("detectron2.trainer")
        logger.info("Running inference with test-time augmentation ...")
        model = tiny.TinyTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
            )
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        res = OrderedDict({k + "_TTA": v for k, v in res.items()})
        return res


def setup(args):
    """Create the config and do the basic set-up."""
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
