"""Default boilerplate for training and inference jobs: :class:`DefaultTrainer`, and detectron2's
path for argument parsing and job set-up (:mod:`d2engine.engine.job_setup`), writers
(:mod:`d2engine.engine.writers`) and :class:`DefaultPredictor` (:mod:`d2engine.engine.predictor`).

What DefaultTrainer reads from the config is checked in :mod:`d2engine.engine.trainer_config`; the
hooks it registers, and the keys that ask for them, are in :mod:`d2engine.engine.default_hooks`.

These mirror ``detectron2.engine.defaults``. They encode common defaults that suit many jobs but
not every job: when one does not fit, subclass it, or build your own loop from
:class:`~d2engine.engine.train_loop.SimpleTrainer` and the hooks.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from d2engine.checkpoint import DetectionCheckpointer
from d2engine.config import CfgNode
from d2engine.data import build_detection_test_loader, build_detection_train_loader
from d2engine.engine.ddp import create_ddp_model
from d2engine.engine.default_hooks import WRITER_PERIOD, default_hooks, hang_watchdog
from d2engine.engine.job_setup import default_argument_parser, default_setup, try_get_key
from d2engine.engine.predictor import DefaultPredictor
from d2engine.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer, TrainerBase
from d2engine.engine.trainer_config import (
    amp_dtype,
    auto_scale_workers,
    build_model_ema,
    check_elastic_schedule,
    check_solver,
    fsdp_from_config,
    micro_batch_config,
)
from d2engine.engine.writers import default_writers
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
from d2engine.utils.events import EventWriter
from d2engine.utils.logger import setup_logger

__all__ = [
    "DefaultPredictor",
    "DefaultTrainer",
    "create_ddp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
]

logger = logging.getLogger(__name__)


class _Chained:
    """Iterates over several loaders one after the other, each time from their start."""

    def __init__(self, loaders: list[Iterable]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[Any]:
        for loader in self.loaders:
            yield from loader


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
        accum = check_solver(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        if try_get_key(cfg, "MODEL.FSDP.ENABLED", default=False):
            # Sharding replaces the parameters by DTensors: before the optimizer is built. The
            # sharded model is not wrapped in DDP below.
            model = fsdp_from_config(cfg, model)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(micro_batch_config(cfg, accum))
        self.model_ema = build_model_ema(cfg, model)
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
                precision=amp_dtype(cfg.SOLVER.AMP.get("PRECISION")),
                gather_metric_period=WRITER_PERIOD,
                grad_accum_steps=accum,
            )
        else:
            self._trainer = SimpleTrainer(
                model,
                data_loader,
                optimizer,
                gather_metric_period=WRITER_PERIOD,
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
        self.register_hooks([hang_watchdog(cfg)])
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
        """The default hooks of the config, in their order: see
        :func:`~d2engine.engine.default_hooks.default_hooks` for which hook each config key asks
        for. Override it to change them (e.g. ``super().build_hooks()`` plus your own).

        Returns:
            The hooks (``None`` entries are skipped by ``register_hooks``).
        """
        return default_hooks(self)

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
        check_elastic_schedule(self.cfg, state_dict.get("_trainer", {}).get("data"))
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
            ``{dataset_name: results}`` in the order of ``DATASETS.TEST``; with a single test
            dataset,
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
            show_bar = bool(try_get_key(cfg, "OUTPUT.PROGRESS_BAR", default=True))
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
        """Scale a config written for ``SOLVER.REFERENCE_WORLD_SIZE`` processes to ``num_workers``
        (the linear scaling rule): see :func:`d2engine.engine.trainer_config.auto_scale_workers`.

        Args:
            cfg: the config; not modified.
            num_workers: the number of processes that will train.

        Returns:
            ``cfg`` itself, or a scaled clone.

        Raises:
            ValueError: ``num_workers`` < 1, or IMS_PER_BATCH is not divisible by
                REFERENCE_WORLD_SIZE.
        """
        return auto_scale_workers(cfg, num_workers)

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
