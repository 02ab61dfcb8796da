"""Tests for d2engine.engine.defaults: argument parser, default_setup, writers, DefaultTrainer."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import random
import re
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from d2engine.checkpoint import DetectionCheckpointer
from d2engine.config import CfgNode, get_cfg
from d2engine.data import DatasetCatalog, MetadataCatalog
from d2engine.engine.defaults import (
    DefaultTrainer,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
)
from d2engine.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer
from d2engine.evaluation import ClassificationEvaluator, DatasetEvaluator, ResultsVerificationError
from d2engine.modeling import META_ARCH_REGISTRY
from d2engine.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter


# --------------------------------------------------------------------------- toy model and data
class _ToyClassifier(nn.Module):
    """Two-class linear classifier on 2-D points ("x"), optionally with a BatchNorm layer."""

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        self.use_bn = cfg.MODEL.META_ARCHITECTURE == "_TestToyBNClassifier"
        self.bn = nn.BatchNorm1d(2) if self.use_bn else nn.Identity()
        self.linear = nn.Linear(2, 2)

    def forward(self, batch: list[dict[str, Any]]) -> Any:
        x = torch.stack([d["x"] for d in batch])
        logits = self.linear(self.bn(x))
        if self.training:
            labels = torch.tensor([d["label"] for d in batch])
            return {"loss_cls": nn.functional.cross_entropy(logits, labels)}
        scores = logits.softmax(1)
        return [{"scores": s, "pred_class": int(s.argmax())} for s in scores]


for _name, _cls in [
    ("_TestToyClassifier", _ToyClassifier),
    ("_TestToyBNClassifier", _ToyClassifier),
]:
    if _name not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_cls, name=_name)


def _points(n: int, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    labels = (x[:, 0] + x[:, 1] > 0).long().tolist()
    return [{"x": x[i], "label": labels[i], "image_id": i} for i in range(n)]


_DATASETS = {
    "_test_points_train": (64, 0),
    "_test_points_test": (32, 1),
    "_test_points_val": (16, 2),
}
for _ds, (_n, _seed) in _DATASETS.items():
    if _ds not in DatasetCatalog.list():
        DatasetCatalog.register(_ds, lambda n=_n, s=_seed: _points(n, s))
        MetadataCatalog.get(_ds).set(thing_classes=["neg", "pos"])


class ToyTrainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator:
        return ClassificationEvaluator(dataset_name)


class Recorder(HookBase):
    """Records the iterations it sees and counts after_backward calls."""

    def __init__(self) -> None:
        self.iters: list[int] = []
        self.backward_calls = 0

    def before_step(self) -> None:
        self.iters.append(self.trainer.iter)

    def after_backward(self) -> None:
        self.backward_calls += 1


def _toy_cfg(output_dir: str, **overrides: Any) -> CfgNode:
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "_TestToyClassifier"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ("_test_points_train",)
    cfg.DATASETS.TEST = ("_test_points_test",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.SOLVER.BASE_LR = 0.5
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.MAX_ITER = 20
    cfg.SOLVER.CHECKPOINT_PERIOD = 10
    cfg.TEST.EVAL_PERIOD = 10
    cfg.OUTPUT_DIR = output_dir
    cfg.SEED = 0
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.fixture
def quiet_d2_logger() -> Iterator[None]:
    """Restore the d2engine logger after a test that sets it up (default_setup, trainers)."""
    log = logging.getLogger("d2engine")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    for h in log.handlers:
        if h not in handlers:
            h.close()
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 20-iteration training run shared by the trainer tests."""
    out = str(tmp_path_factory.mktemp("trained"))
    log = logging.getLogger("d2engine")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    cfg = _toy_cfg(out)
    trainer = ToyTrainer(cfg)
    recorder = Recorder()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate
    return {"cfg": cfg, "trainer": trainer, "results": results, "recorder": recorder, "out": out}


# --------------------------------------------------------------------------- argument parser
def test_argument_parser_flags_and_opts() -> None:
    parser = default_argument_parser()
    args = parser.parse_args(
        [
            "--config-file",
            "a.yaml",
            "--resume",
            "--eval-only",
            "--num-gpus",
            "2",
            "--num-machines",
            "3",
            "--machine-rank",
            "1",
            "--dist-url",
            "tcp://10.0.0.1:2345",
            "SOLVER.BASE_LR",
            "0.1",
            "OUTPUT_DIR",
            "out",
        ]
    )
    assert args.config_file == "a.yaml" and args.resume and args.eval_only
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (2, 3, 1)
    assert args.dist_url == "tcp://10.0.0.1:2345"
    assert args.opts == ["SOLVER.BASE_LR", "0.1", "OUTPUT_DIR", "out"]

    defaults = parser.parse_args([])
    assert defaults.config_file == "" and not defaults.resume and not defaults.eval_only
    assert (defaults.num_gpus, defaults.num_machines, defaults.machine_rank) == (1, 1, 0)
    assert defaults.dist_url == "auto" and defaults.opts == []
    assert default_argument_parser(epilog="my epilog").epilog == "my epilog"


# --------------------------------------------------------------------------- default_setup
@pytest.fixture
def keep_cudnn_benchmark() -> Iterator[None]:
    value = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = value


def test_default_setup_cfgnode(tmp_path, quiet_d2_logger, keep_cudnn_benchmark) -> None:
    config_file = tmp_path / "my.yaml"
    config_file.write_text("SOLVER:\n  BASE_LR: 0.25\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(config_file))
    out = tmp_path / "out" / "nested"
    cfg.OUTPUT_DIR = str(out)
    cfg.SEED = 7
    cfg.CUDNN_BENCHMARK = True
    cfg.freeze()
    args = default_argument_parser().parse_args(["--config-file", str(config_file)])
    torch.backends.cudnn.benchmark = False

    default_setup(cfg, args)

    assert out.is_dir()
    assert (out / "config.yaml").read_text() == cfg.dump()
    reloaded = get_cfg()
    reloaded.merge_from_file(str(out / "config.yaml"))
    assert reloaded == cfg
    log = (out / "log.txt").read_text()
    for text in (
        "Rank of current process: 0. World size: 1",
        "Environment info",
        "PyTorch",
        "Command line arguments",
        "BASE_LR: 0.25",
        "Full config saved to",
    ):
        assert text in log, text
    # Seeded with SEED + rank.
    got = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert got[0] == random.random() and got[1] == np.random.rand()
    assert torch.equal(got[2], torch.rand(2))
    assert torch.backends.cudnn.benchmark is True


def test_default_setup_random_seed_is_logged_and_eval_only_keeps_cudnn(
    tmp_path, quiet_d2_logger, keep_cudnn_benchmark
) -> None:
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.SEED = -1
    cfg.CUDNN_BENCHMARK = True
    torch.backends.cudnn.benchmark = False
    default_setup(cfg, default_argument_parser().parse_args(["--eval-only"]))
    drawn = torch.rand(3)
    match = re.search(r"using the random seed (\d+)", (tmp_path / "log.txt").read_text())
    assert match, "the random seed must be logged"
    torch.manual_seed(int(match.group(1)))
    assert torch.equal(drawn, torch.rand(3))
    assert torch.backends.cudnn.benchmark is False  # eval-only leaves it alone


def test_default_setup_lazy_config(tmp_path, quiet_d2_logger, keep_cudnn_benchmark) -> None:
    from omegaconf import OmegaConf

    from d2engine.config import LazyConfig

    out = tmp_path / "lazy_out"
    cfg = OmegaConf.create(
        {
            "train": {"output_dir": str(out), "seed": 11, "cudnn_benchmark": True},
            "model": {"depth": 3},
        }
    )
    default_setup(cfg, default_argument_parser().parse_args([]))
    assert (out / "log.txt").is_file()
    saved = LazyConfig.load(str(out / "config.yaml"))
    assert saved.model.depth == 3 and saved.train.seed == 11
    drawn = torch.rand(2)
    torch.manual_seed(11)
    assert torch.equal(drawn, torch.rand(2))
    assert torch.backends.cudnn.benchmark is True


def test_default_writers(tmp_path) -> None:
    out = tmp_path / "w"
    writers = default_writers(str(out), max_iter=100)
    assert [type(w) for w in writers] == [CommonMetricPrinter, JSONWriter, TensorboardXWriter]
    assert out.is_dir()
    for w in writers:
        w.close()


def test_trainer_draws_curves_and_uses_the_configured_writers(
    tmp_path: Path, quiet_d2_logger: None
) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    cfg = _toy_cfg(str(tmp_path), **{"OUTPUT.WRITERS": ["json", "csv"]})
    trainer = ToyTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    names = set(os.listdir(tmp_path))
    assert {"metrics.json", "metrics.csv", "curves.png"} <= names
    assert not any(n.startswith("events.out.tfevents") for n in names)  # no "tensorboard"
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "iteration" and "accuracy/top1" in header


def test_trainer_without_plot_or_bar(tmp_path: Path, quiet_d2_logger: None) -> None:
    cfg = _toy_cfg(str(tmp_path), **{"OUTPUT.PLOT": False, "OUTPUT.PROGRESS_BAR": False})
    trainer = ToyTrainer(cfg)
    names = [type(h).__name__ for h in trainer._hooks]
    assert "PlotCurves" not in names and "ProgressBar" not in names


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_trainer_shows_bars_on_a_terminal(
    tmp_path: Path, quiet_d2_logger: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv("D2ENGINE_PROGRESS", raising=False)
    cfg = _toy_cfg(str(tmp_path), **{"SOLVER.MAX_ITER": 5, "OUTPUT.PLOT": False})
    trainer = ToyTrainer(cfg)
    assert [type(h).__name__ for h in trainer._hooks][-1] == "ProgressBar"
    trainer.train()
    out = tty.getvalue()
    assert "train: 100%" in out and "5/5" in out and "eval:" in out  # training, then evaluation
    tty.seek(0)
    tty.truncate()
    off = _toy_cfg(str(tmp_path), **{"OUTPUT.PROGRESS_BAR": False})
    ToyTrainer.test(off, trainer.model)
    assert "eval:" not in tty.getvalue()  # the config switch reaches inference_on_dataset


def test_create_ddp_model_is_reexported() -> None:
    from d2engine.engine.ddp import create_ddp_model as original

    assert create_ddp_model is original
    model = nn.Linear(2, 2)
    assert create_ddp_model(model) is model  # one process: no wrapping


# --------------------------------------------------------------------------- auto_scale_workers
def test_auto_scale_workers_reference_example() -> None:
    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 8
    cfg.SOLVER.MAX_ITER = 5000
    cfg.SOLVER.STEPS = (4000,)
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.SOLVER.WARMUP_ITERS = 100
    cfg.TEST.EVAL_PERIOD = 300
    cfg.freeze()
    before = cfg.dump()

    new = DefaultTrainer.auto_scale_workers(cfg, 16)

    s = new.SOLVER
    assert (s.IMS_PER_BATCH, s.REFERENCE_WORLD_SIZE, s.MAX_ITER) == (32, 16, 2500)
    assert abs(s.BASE_LR - 0.2) < 1e-12
    assert s.STEPS == (2000,) and s.CHECKPOINT_PERIOD == 500
    assert s.WARMUP_ITERS == 50 and new.TEST.EVAL_PERIOD == 150
    assert new.is_frozen()
    assert cfg.dump() == before and cfg.is_frozen()  # the input is unchanged

    # Down-scaling rounds; an unfrozen input gives an unfrozen output.
    cfg2 = cfg.clone()
    cfg2.defrost()
    small = DefaultTrainer.auto_scale_workers(cfg2, 3)
    assert not small.is_frozen()
    assert (small.SOLVER.IMS_PER_BATCH, small.SOLVER.MAX_ITER) == (6, 13333)
    assert small.SOLVER.STEPS == (10667,) and small.TEST.EVAL_PERIOD == 800


def test_auto_scale_workers_noop_and_errors() -> None:
    cfg = get_cfg()
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0
    assert DefaultTrainer.auto_scale_workers(cfg, 4) is cfg
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 4
    cfg.SOLVER.IMS_PER_BATCH = 16
    assert DefaultTrainer.auto_scale_workers(cfg, 4) is cfg
    cfg.SOLVER.IMS_PER_BATCH = 10
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH \(10\) must be a multiple of it"):
        DefaultTrainer.auto_scale_workers(cfg, 8)
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        DefaultTrainer.auto_scale_workers(cfg, 0)


# --------------------------------------------------------------------------- DefaultTrainer
def test_train_returns_eval_results(trained: dict[str, Any]) -> None:
    results = trained["results"]
    assert set(results) == {"accuracy"}
    assert results["accuracy"]["top1"] >= 90.0
    trainer = trained["trainer"]
    assert trainer.iter == trainer.max_iter == 20
    # The last evaluation ran on the final model: test() gives the same numbers.
    assert ToyTrainer.test(trained["cfg"], trainer.model) == results


def test_train_writes_metrics_and_events(trained: dict[str, Any]) -> None:
    out = trained["out"]
    lines = [json.loads(line) for line in Path(out, "metrics.json").read_text().splitlines()]
    loss_lines = [line for line in lines if "total_loss" in line]
    assert loss_lines[-1]["iteration"] == 19 and "lr" in loss_lines[-1]
    # Evaluations at iteration 9 (period 10) and after training (logged at max_iter).
    assert [line["iteration"] for line in lines if "accuracy/top1" in line] == [9, 20]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))


def test_train_writes_checkpoints(trained: dict[str, Any]) -> None:
    out = trained["out"]
    names = set(os.listdir(out))
    assert {"model_0000009.pth", "model_final.pth", "last_checkpoint"} <= names
    assert Path(out, "last_checkpoint").read_text().strip() == "model_final.pth"


def test_hooks_order_and_after_backward(trained: dict[str, Any]) -> None:
    trainer, recorder = trained["trainer"], trained["recorder"]
    names = [type(h).__name__ for h in trainer._hooks]
    expected = [
        "HangWatchdog",  # first (SOLVER.HANG_TIMEOUT): its after_train stops it before the others
        "IterationTimer",
        "LRScheduler",
        "PeriodicCheckpointer",
        "EvalHook",
        "PeriodicWriter",
        "PlotCurves",  # after the writers: it draws what they wrote (no ProgressBar: no terminal)
    ]
    expected.append("Recorder")
    assert names == expected
    assert recorder.iters == list(range(20))
    # after_backward of a hook registered on the DefaultTrainer fires once per step.
    assert recorder.backward_calls == 20


def test_state_dict_and_properties(trained: dict[str, Any]) -> None:
    trainer = trained["trainer"]
    state = trainer.state_dict()
    assert state["iteration"] == trainer.iter == 20
    assert "_trainer" in state and "optimizer" in state["_trainer"]
    assert isinstance(trainer._trainer, SimpleTrainer) and not isinstance(
        trainer._trainer, AMPTrainer
    )
    assert trainer.model is trainer._trainer.model
    assert trainer.optimizer is trainer._trainer.optimizer
    assert trainer.data_loader is trainer._trainer.data_loader


def test_property_setters(tmp_path, quiet_d2_logger) -> None:
    trainer = ToyTrainer(_toy_cfg(str(tmp_path), **{"TEST.EVAL_PERIOD": 0}))
    new_model = _ToyClassifier(trainer.cfg)
    new_opt = torch.optim.SGD(new_model.parameters(), lr=0.1)
    new_loader = [[{"x": torch.zeros(2), "label": 0}]]
    trainer.model, trainer.optimizer, trainer.data_loader = new_model, new_opt, new_loader
    assert trainer._trainer.model is new_model
    assert trainer._trainer.optimizer is new_opt
    assert trainer._trainer.data_loader is new_loader


def test_resume_continues_at_next_iteration(
    trained: dict[str, Any], tmp_path, quiet_d2_logger
) -> None:
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(trained["out"], out)
    cfg = _toy_cfg(str(out), **{"SOLVER.MAX_ITER": 25})
    trainer = ToyTrainer(cfg)
    recorder = Recorder()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 20
    # Everything was restored: model weights and optimizer state equal the finished run's.
    final = trained["trainer"]
    for a, b in zip(trainer.model.parameters(), final.model.parameters()):
        assert torch.equal(a, b)
    assert (
        trainer.optimizer.state_dict()["state"].keys()
        == final.optimizer.state_dict()["state"].keys()
    )
    trainer.train()
    assert recorder.iters == [20, 21, 22, 23, 24]
    assert trainer.iter == 25

    # Without resume (or with nothing to resume from) training starts at 0.
    fresh = ToyTrainer(_toy_cfg(str(tmp_path / "fresh")))
    fresh.resume_or_load(resume=True)
    assert fresh.start_iter == 0


@pytest.mark.parametrize("content", [b"", b"\n  ", b"\xff\xfe"], ids=["empty", "blank", "binary"])
def test_unusable_last_checkpoint_resumes_from_the_newest_file(
    trained: dict[str, Any], tmp_path, quiet_d2_logger, content: bytes
) -> None:
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(trained["out"], out)
    (out / "last_checkpoint").write_bytes(content)
    trainer = ToyTrainer(_toy_cfg(str(out), **{"SOLVER.MAX_ITER": 22}))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 20  # model_final.pth (iteration 19), not a restart at 1
    for a, b in zip(trainer.model.parameters(), trained["trainer"].model.parameters()):
        assert torch.equal(a, b)


def test_fresh_start_is_iteration_zero(tmp_path, quiet_d2_logger) -> None:
    trainer = ToyTrainer(_toy_cfg(str(tmp_path), **{"SOLVER.MAX_ITER": 2}))
    recorder = Recorder()
    trainer.register_hooks([recorder])
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0
    trainer.train()
    assert recorder.iters == [0, 1]


def test_eval_only_with_model_weights(trained: dict[str, Any], tmp_path, quiet_d2_logger) -> None:
    weights = os.path.join(trained["out"], "model_final.pth")
    cfg = _toy_cfg(str(tmp_path / "eval"), **{"MODEL.WEIGHTS": weights})
    # What tools/train_net.py does with --eval-only.
    model = ToyTrainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False
    )
    assert ToyTrainer.test(cfg, model) == trained["results"]
    # A trainer given MODEL.WEIGHTS loads only the weights and starts at iteration 0.
    trainer = ToyTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0
    for a, b in zip(trainer.model.parameters(), trained["trainer"].model.parameters()):
        assert torch.equal(a, b)


def test_test_results_keyed_by_dataset(trained: dict[str, Any]) -> None:
    cfg = trained["cfg"].clone()
    model = trained["trainer"].model
    cfg.DATASETS.TEST = ("_test_points_test", "_test_points_val")
    results = ToyTrainer.test(cfg, model)
    assert list(results) == ["_test_points_test", "_test_points_val"]
    assert results["_test_points_test"] == trained["results"]
    assert set(results["_test_points_val"]["accuracy"]) == {"top1"}

    # Explicit evaluators: one per dataset, or a single one for a single dataset.
    explicit = ToyTrainer.test(cfg, model, [ClassificationEvaluator(), None])
    assert explicit["_test_points_val"] == {}
    assert ToyTrainer.test(trained["cfg"], model, ClassificationEvaluator()) == trained["results"]
    with pytest.raises(ValueError, match="got 1 evaluators for 2 test datasets"):
        ToyTrainer.test(cfg, model, [ClassificationEvaluator()])


def test_build_evaluator_not_implemented(trained: dict[str, Any]) -> None:
    with pytest.raises(NotImplementedError, match="override build_evaluator"):
        DefaultTrainer.build_evaluator(trained["cfg"], "_test_points_test")
    # test() without an evaluator warns and returns {} for that dataset.
    assert DefaultTrainer.test(trained["cfg"], trained["trainer"].model) == {}


def test_expected_results_checked(tmp_path, quiet_d2_logger) -> None:
    base = {"SOLVER.MAX_ITER": 4, "TEST.EVAL_PERIOD": 0, "SOLVER.CHECKPOINT_PERIOD": 100}
    bad = ToyTrainer(
        _toy_cfg(
            str(tmp_path / "a"),
            **base,
            **{"TEST.EXPECTED_RESULTS": [["accuracy", "top1", -50.0, 1.0]]},
        )
    )
    with pytest.raises(ResultsVerificationError, match="accuracy/top1"):
        bad.train()
    good = ToyTrainer(
        _toy_cfg(
            str(tmp_path / "b"),
            **base,
            **{"TEST.EXPECTED_RESULTS": [["accuracy", "top1", 50.0, 50.0]]},
        )
    )
    assert "accuracy" in good.train()
    # No test datasets: nothing to return.
    none = ToyTrainer(_toy_cfg(str(tmp_path / "c"), **base, **{"DATASETS.TEST": ()}))
    assert none.train() is None


def test_amp_selects_amp_trainer(tmp_path, quiet_d2_logger) -> None:
    cfg = _toy_cfg(
        str(tmp_path), **{"SOLVER.MAX_ITER": 3, "TEST.EVAL_PERIOD": 0, "DATASETS.TEST": ()}
    )
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    trainer = ToyTrainer(cfg)
    assert isinstance(trainer._trainer, AMPTrainer)
    trainer.train()
    assert trainer.iter == 3


def test_precise_bn_hook_only_with_bn(tmp_path, quiet_d2_logger) -> None:
    overrides = {"TEST.PRECISE_BN.ENABLED": True, "TEST.PRECISE_BN.NUM_ITER": 2}
    with_bn = ToyTrainer(
        _toy_cfg(
            str(tmp_path / "a"), **overrides, **{"MODEL.META_ARCHITECTURE": "_TestToyBNClassifier"}
        )
    )
    assert any(type(h).__name__ == "PreciseBN" for h in with_bn._hooks)
    without_bn = ToyTrainer(_toy_cfg(str(tmp_path / "b"), **overrides))
    assert not any(type(h).__name__ == "PreciseBN" for h in without_bn._hooks)
    disabled = ToyTrainer(
        _toy_cfg(str(tmp_path / "c"), **{"MODEL.META_ARCHITECTURE": "_TestToyBNClassifier"})
    )
    assert not any(type(h).__name__ == "PreciseBN" for h in disabled._hooks)


def test_trainer_scales_config_and_keeps_input(tmp_path, quiet_d2_logger) -> None:
    cfg = _toy_cfg(str(tmp_path), **{"SOLVER.REFERENCE_WORLD_SIZE": 2, "SOLVER.IMS_PER_BATCH": 16})
    cfg.freeze()
    before = cfg.dump()
    trainer = ToyTrainer(cfg)
    assert trainer.cfg.SOLVER.IMS_PER_BATCH == 8 and trainer.cfg.SOLVER.MAX_ITER == 40
    assert trainer.max_iter == 40
    assert cfg.dump() == before and cfg.is_frozen()


def test_close_and_no_metrics_thread_left(tmp_path, quiet_d2_logger) -> None:
    import threading

    trainer = ToyTrainer(_toy_cfg(str(tmp_path), **{"SOLVER.MAX_ITER": 3, "TEST.EVAL_PERIOD": 0}))
    trainer._trainer.async_write_metrics = True
    trainer.train()
    assert [t for t in threading.enumerate() if t.name.startswith("d2engine-metrics")] == []
    assert trainer.storage.history("total_loss").values()[-1][1] == 2
    trainer.close()  # releases what train() may have left (idempotent)
    trainer.close()


def test_trainer_has_no_reference_cycles(tmp_path, quiet_d2_logger) -> None:
    trainer = ToyTrainer(_toy_cfg(str(tmp_path), **{"SOLVER.MAX_ITER": 2, "TEST.EVAL_PERIOD": 0}))
    trainer.train()
    ref = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert ref() is None, "DefaultTrainer is kept alive by a reference cycle"
    finally:
        gc.enable()


# ------------------------------------------------------------- code ported from detectron2
@pytest.fixture
def restore_ported_loggers() -> Iterator[None]:
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name in ("detectron2", "fvcore")
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def test_default_setup_shows_detectron2_and_fvcore_log_lines(
    tmp_path, capsys, quiet_d2_logger, keep_cudnn_benchmark, restore_ported_loggers
) -> None:
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    default_setup(cfg, default_argument_parser().parse_args([]))
    logging.getLogger("detectron2").info("a line of a ported script")
    logging.getLogger("fvcore.common.checkpoint").warning("a line of fvcore")
    log = (tmp_path / "out" / "log.txt").read_text()
    console = capsys.readouterr().out
    for text in (log, console):
        assert "detectron2 INFO: a line of a ported script" in text
        assert "fvcore.common.checkpoint WARNING: a line of fvcore" in text
    assert log.count("a line of a ported script") == 1  # not duplicated by a second handler


def test_default_setup_with_a_lazy_config_that_defines_classes(
    tmp_path, quiet_d2_logger, keep_cudnn_benchmark, restore_ported_loggers
) -> None:
    # detectron2's "train an ImageNet classifier" config shape: classes and functions defined in
    # the config file, an object instance as a value. Saving it must not stop the job.
    from d2engine.config import LazyConfig

    config_file = tmp_path / "cls.py"
    config_file.write_text(
        "from torch import nn\n"
        "from d2engine.config import LazyCall as L\n"
        "from d2engine.model_zoo import get_config\n"
        "class ClassificationNet(nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(width, 2)\n"
        "def build_data_loader(n):\n"
        "    return list(range(n))\n"
        "model = L(ClassificationNet)(width=4)\n"
        "dataloader = dict(train=L(build_data_loader)(n=2), transform=nn.Identity())\n"
        "train = get_config('common/train.py').train\n"
        f"train.output_dir = {str(tmp_path / 'out')!r}\n"
        "train.seed = 3\n"
    )
    cfg = LazyConfig.load(str(config_file))
    args = default_argument_parser().parse_args(["--config-file", str(config_file)])
    default_setup(cfg, args)
    out = tmp_path / "out"
    saved = LazyConfig.load(str(out / "config.yaml"))
    assert saved.train.seed == 3 and saved.model.width == 4
    assert (out / "config_sources" / "cls.py").read_text() == config_file.read_text()
    log = (out / "log.txt").read_text()
    assert log.count("LazyConfig.save wrote") == 1  # one warning, in the job's log
    assert "cfg.model._target_" in log and "cfg.dataloader.transform" in log
    assert "cfg.model = d2engine._cfg_loader." in log  # the full config, as Python


def test_default_setup_float32_precision(
    tmp_path, quiet_d2_logger, keep_cudnn_benchmark, restore_ported_loggers
) -> None:
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "o")
    cfg.FLOAT32_PRECISION = "fastest"
    with pytest.raises(ValueError, match="FLOAT32_PRECISION must be one of"):
        default_setup(cfg, default_argument_parser().parse_args([]))
    cfg.FLOAT32_PRECISION = "high"
    precision = torch.get_float32_matmul_precision()
    default_setup(cfg, default_argument_parser().parse_args([]))  # applied on CUDA only
    if not torch.cuda.is_available():
        assert torch.get_float32_matmul_precision() == precision


# --------------------------------------------------------------------------- issue 11 and 12
class _NaNAtClassifier(_ToyClassifier):
    """The toy classifier whose loss is NaN in its 8th training forward (iteration 7)."""

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        self.calls = 0

    def forward(self, batch: list[dict[str, Any]]) -> Any:
        out = super().forward(batch)
        if self.training:
            self.calls += 1
            if self.calls == 8:
                out = {k: v * float("nan") for k, v in out.items()}
        return out


if "_TestNaNAtClassifier" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(_NaNAtClassifier, name="_TestNaNAtClassifier")


def test_default_trainer_reads_the_losses_once_per_writer_period(
    tmp_path, quiet_d2_logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    cfg = _toy_cfg(
        str(tmp_path),
        **{"SOLVER.MAX_ITER": 40, "TEST.EVAL_PERIOD": 0, "DATASETS.TEST": ()},
    )
    trainer = ToyTrainer(cfg)
    assert trainer._trainer.gather_metric_period == 20
    reads: dict[int, int] = {}
    data_dir = os.path.join("d2engine", "data", "")
    for name in ("item", "tolist", "__float__", "__bool__", "numpy", "cpu"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):  # type: ignore[no-untyped-def]
            # The data loader reads its seed and the sampler its permutation once per pass over
            # the data: not the engine's reads.
            frame = sys._getframe(1)
            while frame is not None and data_dir not in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is None:
                reads[trainer.iter] = reads.get(trainer.iter, 0) + 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class Done(HookBase):  # counted reads after the last iteration land on iteration 40
        def after_train(self) -> None:
            self.trainer.iter = 40

    trainer.register_hooks([Done()])
    trainer.train()
    monkeypatch.undo()
    # reads at each writer period (20) and checkpoint (CHECKPOINT_PERIOD 10), none in between
    assert {it for it in reads if it < 40} == {9, 19, 29, 39}
    # every iteration's losses are logged, at their iteration; metrics.json as detectron2 writes
    assert [it for _, it in trainer.storage.history("total_loss").values()] == list(range(40))
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [x["iteration"] for x in lines if "total_loss" in x] == [19, 39]


def test_default_trainer_never_checkpoints_after_a_nan_loss(tmp_path, quiet_d2_logger) -> None:
    cfg = _toy_cfg(
        str(tmp_path),
        **{
            "MODEL.META_ARCHITECTURE": "_TestNaNAtClassifier",
            "SOLVER.CHECKPOINT_PERIOD": 4,
            "TEST.EVAL_PERIOD": 0,
        },
    )
    trainer = ToyTrainer(cfg)
    with pytest.raises(FloatingPointError, match=r"^Loss became infinite or NaN at iteration=7!"):
        trainer.train()
    names = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert names == ["model_0000003.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"


def test_grad_accum_steps_splits_the_batch_and_keeps_images_per_step(
    tmp_path, quiet_d2_logger
) -> None:
    cfg = _toy_cfg(
        str(tmp_path),
        **{"SOLVER.GRAD_ACCUM_STEPS": 4, "SOLVER.MAX_ITER": 3, "TEST.EVAL_PERIOD": 0},
    )
    trainer = ToyTrainer(cfg)
    assert trainer.cfg.SOLVER.IMS_PER_BATCH == 8  # images per optimizer step
    assert trainer._trainer.grad_accum_steps == 4
    trainer.train()
    state = trainer.data_loader.state_dict()
    assert state["batch_size"] == 2 and state["num_batches"] == 3 * 4


def test_grad_accum_steps_must_divide_the_batch(tmp_path, quiet_d2_logger) -> None:
    cfg = _toy_cfg(str(tmp_path), **{"SOLVER.GRAD_ACCUM_STEPS": 4, "SOLVER.IMS_PER_BATCH": 6})
    with pytest.raises(
        ValueError,
        match=r"SOLVER.IMS_PER_BATCH \(6\) must be a multiple of the number of processes \(1\) "
        r"times SOLVER.GRAD_ACCUM_STEPS \(4\).*HINT",
    ):
        ToyTrainer(cfg)
    with pytest.raises(ValueError, match="SOLVER.GRAD_ACCUM_STEPS must be a positive integer"):
        ToyTrainer(_toy_cfg(str(tmp_path), **{"SOLVER.GRAD_ACCUM_STEPS": 0}))


def test_auto_scale_workers_keeps_grad_accum_steps() -> None:
    cfg = get_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.SOLVER.GRAD_ACCUM_STEPS = 4
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 2
    new = DefaultTrainer.auto_scale_workers(cfg, 4)
    assert (new.SOLVER.IMS_PER_BATCH, new.SOLVER.GRAD_ACCUM_STEPS) == (32, 4)
    # the micro-batch of each process is unchanged: 16 // (2 * 4) == 32 // (4 * 4)
    assert new.SOLVER.IMS_PER_BATCH // (4 * new.SOLVER.GRAD_ACCUM_STEPS) == 16 // (2 * 4)


def test_max_iter_beyond_an_int64_is_a_config_error(tmp_path, quiet_d2_logger) -> None:
    cfg = _toy_cfg(str(tmp_path))
    cfg.merge_from_list(["SOLVER.MAX_ITER", "99999999999999999999999"])  # as on the command line
    with pytest.raises(
        ValueError,
        match=r"SOLVER.MAX_ITER must be an integer in \[0, 2\*\*63 - 1\], got "
        r"99999999999999999999999. HINT",
    ):
        ToyTrainer(cfg)
    cfg.SOLVER.MAX_ITER = 2.5
    with pytest.raises(ValueError, match=r"SOLVER.MAX_ITER must be an integer, got 2.5 \(float\)"):
        ToyTrainer(cfg)


def test_gathering_states_before_a_save_gathers_the_data_position(
    tmp_path, quiet_d2_logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint hook's gather reaches the train loader (every rank's grouped position)."""
    trainer = ToyTrainer(_toy_cfg(str(tmp_path), **{"TEST.EVAL_PERIOD": 0}))
    calls: list[int] = []
    monkeypatch.setattr(trainer.data_loader, "gather_state", lambda: calls.append(1))
    trainer.checkpointer.gather_states()
    assert calls == [1]
