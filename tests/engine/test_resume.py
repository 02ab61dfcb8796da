"""Exact resume: a run killed (SIGKILL) at any iteration and resumed from its last checkpoint ends
with bit-identical weights to an uninterrupted run (SimpleTrainer + Checkpointer, DefaultTrainer).

The runs use a model with dropout, shuffled data from build_train_loader (TrainingSampler,
num_workers=0) with a mapper drawing from python's, numpy's and torch's generators, SGD with
momentum and an LR schedule. The killed runs are subprocesses that SIGKILL themselves in the middle
of a chosen iteration (after the backward pass, before the optimizer step).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer
from d2engine.data import TrainingSampler, build_train_loader
from d2engine.engine import hooks
from d2engine.engine.train_loop import AMPTrainer, HookBase, SimpleTrainer
from d2engine.utils.events import EventStorage

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MAX_ITER = 20
PERIOD = 5


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))

    def forward(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        x = torch.stack([d["x"] for d in batch])
        y = torch.tensor([d["y"] for d in batch])
        return {"loss_cls": nn.functional.cross_entropy(self.net(x), y)}


def _augment(sample: dict[str, Any]) -> dict[str, Any]:
    """A random augmentation drawing from torch, numpy and python generators (main process)."""
    noise = torch.randn(4) * 0.1 + float(np.random.uniform(-0.1, 0.1)) * random.random()
    return {"x": sample["x"] + noise, "y": sample["y"]}


def _dataset() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(40, 4, generator=g)
    return [{"x": x[i], "y": int(x[i].sum() > 0)} for i in range(40)]


class _Kill(HookBase):
    """Sends ``sig`` to its own process in the middle of iteration ``at`` (after backward)."""

    def __init__(self, at: int, sig: int) -> None:
        self.at, self.sig = at, sig

    def after_backward(self) -> None:
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), self.sig)


def build(
    out: str, *, async_save: bool = False, ddp: bool = False
) -> tuple[SimpleTrainer, Checkpointer]:
    """The training job: everything seeded, a trainer with LR schedule and checkpoint hooks."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model: nn.Module = _DropoutNet()
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dataset = _dataset()
    loader = build_train_loader(
        dataset=dataset,
        mapper=_augment,
        sampler=TrainingSampler(len(dataset), seed=7),
        total_batch_size=4,
        num_workers=0,
    )
    trainer = SimpleTrainer(model, loader, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    checkpointer = Checkpointer(model, out, async_save=async_save, trainer=trainer)
    trainer.register_hooks(
        [hooks.LRScheduler(optimizer, scheduler), hooks.PeriodicCheckpointer(checkpointer, PERIOD)]
    )
    return trainer, checkpointer


def run(
    out: str,
    *,
    resume: bool,
    kill_at: int | None = None,
    sig: int = signal.SIGKILL,
    async_save: bool = False,
) -> SimpleTrainer:
    """Train to MAX_ITER (resuming from ``out`` when asked); used in-process and by subprocesses."""
    trainer, checkpointer = build(out, async_save=async_save)
    if kill_at is not None:
        trainer.register_hooks([_Kill(kill_at, sig)])
    if resume:
        checkpointer.resume_or_load("", resume=True)
    trainer.train(trainer.start_iter, MAX_ITER)
    checkpointer.close()
    return trainer


def spawn(out: Path, kill_at: int, sig: int, async_save: bool = False) -> subprocess.Popen:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_resume as t; "
        "from d2engine.engine.train_loop import PREEMPTION_EXIT_CODE; "
        "tr = t.run(sys.argv[2], resume=False, kill_at=int(sys.argv[3]), sig=int(sys.argv[4]), "
        "async_save=sys.argv[5] == '1'); "
        "sys.exit(PREEMPTION_EXIT_CODE if tr.preempted else 0)"
    )
    args = [str(HERE), str(out), str(kill_at), str(int(sig)), "1" if async_save else "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run's final weights."""
    trainer = run(str(tmp_path_factory.mktemp("reference")), resume=False)
    assert trainer.iter == MAX_ITER
    return _weights(trainer)


def test_reference_is_sensitive(reference: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """Resuming without the RNG or data position gives different weights: the test has teeth."""
    out = str(tmp_path)
    trainer, checkpointer = build(out)
    trainer.train(0, 10)
    checkpointer.close()
    for drop in ("rng", "data"):
        trainer, checkpointer = build(out)
        path = os.path.join(out, "model_0000009.pth")
        checkpointer.load(path, checkpointables=[])
        state = torch.load(path, weights_only=True)["trainer"]
        del state[drop]
        trainer.load_state_dict(state)
        trainer.train(trainer.start_iter, MAX_ITER)
        assert trainer.start_iter == 10
        assert not all(
            torch.equal(a, b) for a, b in zip(_weights(trainer).values(), reference.values())
        ), f"resuming without '{drop}' should change the result"


def test_sigkill_and_resume_bit_identical(
    reference: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Kill just after a checkpoint (iteration 4 saved, killed in 5), between checkpoints (12),
    # in the last iteration (19), and with an asynchronous save in flight (5, async).
    cases = [(5, False), (12, False), (19, False), (6, True)]
    procs = []
    for kill_at, async_save in cases:
        out = tmp_path / f"kill{kill_at}{'a' if async_save else ''}"
        procs.append((kill_at, async_save, out, spawn(out, kill_at, signal.SIGKILL, async_save)))
    for kill_at, async_save, out, proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, output
        trainer = run(str(out), resume=True, async_save=async_save)
        last_saved = (kill_at // PERIOD) * PERIOD  # start_iter of the newest checkpoint
        if async_save:  # the write in flight may or may not have completed
            assert trainer.start_iter in (last_saved, last_saved - PERIOD), trainer.start_iter
        else:
            assert trainer.start_iter == last_saved
        assert trainer.iter == MAX_ITER
        assert_bit_identical(_weights(trainer), reference)


def test_checkpoint_contents(tmp_path: Path) -> None:
    trainer, checkpointer = build(str(tmp_path))
    trainer.train(0, PERIOD)
    state = torch.load(tmp_path / "model_final.pth", weights_only=True)["trainer"]
    assert set(state) == {"iteration", "hooks", "rng", "optimizer", "data"}
    assert state["iteration"] == PERIOD - 1
    assert set(state["hooks"]) == {"LRScheduler", "PeriodicCheckpointer"}
    assert state["data"]["num_batches"] == PERIOD
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"python", "numpy", "torch"}
    # Loading continues at the next iteration, with the data position restored in O(1).
    trainer2, checkpointer2 = build(str(tmp_path))
    checkpointer2.resume_or_load("", resume=True)
    assert trainer2.start_iter == PERIOD and trainer2.iter == PERIOD - 1
    assert trainer2.data_loader.num_batches == PERIOD


def test_resume_cost_does_not_grow_with_iterations() -> None:
    """The data position is restored without replaying the samples consumed before it."""
    calls = []

    def counting(sample: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return sample

    dataset = _dataset()
    loader = build_train_loader(
        dataset=dataset,
        mapper=counting,
        total_batch_size=4,
        sampler=TrainingSampler(len(dataset), seed=7),
        num_workers=0,
    )
    model = _DropoutNet()
    trainer = SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.1))
    state = trainer.state_dict()
    state["iteration"] = 10**9 - 1
    state["data"]["num_batches"] = 10**9
    state["data"]["sampler"]["position"] = 4 * 10**9
    trainer.load_state_dict(state)
    assert trainer.start_iter == 10**9
    with EventStorage(trainer.start_iter):
        trainer.run_step()
    assert trainer.data_loader.num_batches == 10**9 + 1
    assert len(calls) == 4  # one batch was mapped, nothing was replayed


def test_amp_trainer_saves_grad_scaler() -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = AMPTrainer(
        model,
        [torch.zeros(1)],
        opt,
        grad_scaler=torch.amp.GradScaler("cpu", init_scale=8.0),
        precision=torch.bfloat16,
    )
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == 8.0
    assert "data" not in state  # a plain list has no data position
    state["grad_scaler"]["scale"] = 2.0
    trainer.load_state_dict(state)
    assert trainer.grad_scaler.get_scale() == 2.0


def test_load_without_rng_for_this_rank_warns(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(2, 2)
    trainer = SimpleTrainer(model, [torch.zeros(1)], torch.optim.SGD(model.parameters(), lr=0.1))
    state = trainer.state_dict()
    state["rng"] = [None, state["rng"][0]]  # saved by 2 ranks; rank 0's state missing
    with caplog.at_level("WARNING"):
        trainer.load_state_dict(state)
    assert "RNG states of 2 rank(s); this job has 1" in caplog.text
    assert "no RNG state for rank 0" in caplog.text


# ------------------------------------------------------------------ DefaultTrainer
class _DropoutClassifier(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

    def forward(self, batch: list[dict[str, Any]]) -> Any:
        logits = self.net(torch.stack([d["x"] for d in batch]))
        if self.training:
            labels = torch.tensor([d["label"] for d in batch])
            return {"loss_cls": nn.functional.cross_entropy(logits, labels)}
        return [{"scores": s, "pred_class": int(s.argmax())} for s in logits.softmax(1)]


def _register_default_trainer_job() -> None:
    from d2engine.data import DatasetCatalog, MetadataCatalog
    from d2engine.modeling import META_ARCH_REGISTRY

    if "_ResumeDropoutClassifier" not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_DropoutClassifier, name="_ResumeDropoutClassifier")
    if "_resume_points" not in DatasetCatalog.list():

        def points() -> list[dict[str, Any]]:
            return [{"x": d["x"], "label": d["y"], "image_id": i} for i, d in enumerate(_dataset())]

        DatasetCatalog.register("_resume_points", points)
        MetadataCatalog.get("_resume_points").set(thing_classes=["neg", "pos"])


def default_trainer_cfg(out: str, max_iter: int, checkpoint_period: int) -> Any:
    """DefaultTrainer's config of the resume tests: the dropout classifier on the registered
    points, a warm-up and a step, evaluations every 4 iterations (they draw random numbers)."""
    from d2engine.config import get_cfg

    _register_default_trainer_job()
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "_ResumeDropoutClassifier"
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ("_resume_points",)
    cfg.DATASETS.TEST = ("_resume_points",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.BASE_LR = 0.2
    cfg.SOLVER.STEPS = (10,)
    cfg.SOLVER.WARMUP_ITERS = 3
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.CHECKPOINT_PERIOD = checkpoint_period
    cfg.TEST.EVAL_PERIOD = 4
    cfg.OUTPUT_DIR = out
    cfg.SEED = 3
    return cfg


def _default_trainer(out: str) -> Any:
    from d2engine.engine.defaults import DefaultTrainer
    from d2engine.evaluation import ClassificationEvaluator

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg: Any, dataset_name: str) -> Any:
            return ClassificationEvaluator(dataset_name)

    cfg = default_trainer_cfg(out, MAX_ITER, PERIOD)  # evaluations between checkpoints
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    return Trainer(cfg)


@pytest.fixture
def _restore_d2_logger() -> Any:
    import logging

    log = logging.getLogger("d2engine")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    for h in log.handlers:
        if h not in handlers:
            h.close()
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate


def test_default_trainer_preempted_and_resumed_is_bit_identical(
    tmp_path: Path, _restore_d2_logger: Any
) -> None:
    reference = _default_trainer(str(tmp_path / "reference"))
    reference.resume_or_load(resume=True)
    ref_results = reference.train()
    assert ref_results and not reference.preempted

    out = str(tmp_path / "run")
    first = _default_trainer(out)
    first.resume_or_load(resume=True)
    first.register_hooks([_Kill(12, signal.SIGTERM)])  # SIGTERM in the middle of iteration 12
    assert first.train() is None and first.preempted and first.iter == 12
    state = torch.load(os.path.join(out, "model_0000012.pth"), weights_only=True)["trainer"]
    assert {"iteration", "hooks", "rng", "_trainer"} <= set(state)
    assert {"optimizer", "data"} <= set(state["_trainer"]) and "rng" not in state["_trainer"]
    assert {"LRScheduler", "PeriodicCheckpointer"} <= set(state["hooks"])

    resumed = _default_trainer(out)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 13
    assert resumed.train() == ref_results
    assert_bit_identical(_weights(resumed), _weights(reference))


def test_default_trainer_killed_before_the_final_checkpoint_finishes_on_resume(
    tmp_path: Path, _restore_d2_logger: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL after model_0000019.pth, before model_final.pth (MAX_ITER a multiple of the
    period): --resume writes model_final.pth and runs the final evaluation."""
    reference = _default_trainer(str(tmp_path / "reference"))
    reference.resume_or_load(resume=True)
    ref_results = reference.train()

    out = tmp_path / "run"
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import test_resume as t; "
        "tr = t._default_trainer(sys.argv[2]); tr.resume_or_load(resume=True); "
        "save = tr.checkpointer.save; "
        "kill = lambda: os.kill(os.getpid(), signal.SIGKILL); "
        "tr.checkpointer.save = lambda name, **kw: kill() if name == 'model_final' "
        "else save(name, **kw); "
        "tr.train()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(HERE), str(out)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert (out / "last_checkpoint").read_text() == "model_0000019.pth"
    assert not (out / "model_final.pth").exists()

    resumed = _default_trainer(str(out))
    d2_logger = logging.getLogger("d2engine")  # set up by the trainer: it does not propagate
    d2_logger.addHandler(caplog.handler)
    try:
        resumed.resume_or_load(resume=True)
        assert resumed.start_iter == MAX_ITER
        results = resumed.train()
    finally:
        d2_logger.removeHandler(caplog.handler)
    assert results == ref_results  # the final evaluation ran
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == final["trainer"]["iteration"] == MAX_ITER - 1
    assert_bit_identical(final["model"], _weights(reference))
    assert "already complete" in caplog.text
    assert "wrote the missing final checkpoint" in caplog.text
