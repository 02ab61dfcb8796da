"""FSDP2 training, sharded checkpoints and elastic resume in real 2-process gloo jobs.

Spawning costs seconds, so one 2-process job (``_job_worker``, run once per module) trains every
reference run and the resumes from one process; the tests assert on what it wrote. The runs are
``DefaultTrainer`` runs of a small registered model (``_Net``: a stem, two ``_Block`` s sharded as
units, a head; dropout and BatchNorm optional) on shuffled data:

- ``fsdp_drop``: FSDP with dropout, BatchNorm + PreciseBN, clipping by the global gradient norm and
  evaluations on 37 test samples (uneven shards) -- the reference of the preempted / killed /
  resumed chain;
- ``fsdp`` and ``ddp``: FSDP and DDP without dropout or BatchNorm, clipping each parameter's
  gradient norm, compared with one process on the same global batches (``allclose``) and resumed
  on one process (2 -> 1);
- ``fsdp_from1`` and ``ddp_from1``: a one-process checkpoint resumed on 2 processes (1 -> 2).

The chain (SIGTERM preemption, then SIGKILL, then resume) runs ``launch`` in subprocesses.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dist_helpers import python_env
from torch import nn

from d2engine.checkpoint import Checkpointer
from d2engine.checkpoint import sharded as sharded_module
from d2engine.config import get_cfg
from d2engine.data import DatasetCatalog, MetadataCatalog, build_test_loader, build_train_loader
from d2engine.engine import hooks
from d2engine.engine.ddp import create_fsdp_model
from d2engine.engine.defaults import DefaultPredictor, DefaultTrainer
from d2engine.engine.launch import launch
from d2engine.engine.preemption import PREEMPTION_EXIT_CODE
from d2engine.engine.train_loop import HookBase, SimpleTrainer
from d2engine.evaluation import DatasetEvaluator, inference_on_dataset
from d2engine.modeling import META_ARCH_REGISTRY
from d2engine.utils import comm

HERE = Path(__file__).resolve().parent
MAX_ITER = 12
PERIOD = 4  # checkpoints after iterations 3, 7, 11 (and model_final)
RESUME_FROM = 7  # the checkpoint the elastic resumes start from
TEST_SIZE = 37  # 19 + 18 test samples on 2 ranks


# ------------------------------------------------------------------ model, data, evaluator
class _Block(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.relu(self.linear(x)))


class _Net(nn.Module):
    """Records the ids of the training samples it sees (not those of PreciseBN's passes)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        dropout = float(cfg.MODEL.get("TEST_DROPOUT", 0.0))
        self.stem = nn.Linear(4, 16)
        self.norm = nn.BatchNorm1d(16) if cfg.MODEL.get("TEST_BN", False) else nn.Identity()
        self.blocks = nn.Sequential(_Block(dropout), _Block(dropout))
        self.head = nn.Linear(16, 2)
        self.seen: list[list[int]] = []

    def forward(self, batch: list[dict[str, Any]]) -> Any:
        # DefaultPredictor gives a 1 x 2 x 2 gray image: its 4 pixels are the features.
        x = torch.stack([d["x"] if "x" in d else d["image"].reshape(4) for d in batch])
        logits = self.head(self.blocks(self.norm(torch.relu(self.stem(x)))))
        if not self.training:
            return [{"scores": s, "image_id": d.get("image_id")} for s, d in zip(logits, batch)]
        if torch.is_grad_enabled():
            self.seen.append([int(d["image_id"]) for d in batch])
        labels = torch.tensor([d["label"] for d in batch])
        return {"loss_cls": nn.functional.cross_entropy(logits, labels)}


def _points(n: int, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "label": int(x[i, 0] + x[i, 1] > 0), "image_id": i} for i in range(n)]


def _register() -> None:
    if "_FSDPTestNet" not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_Net, name="_FSDPTestNet")
    if "_fsdp_train" not in DatasetCatalog.list():
        DatasetCatalog.register("_fsdp_train", lambda: _points(64, 1))
        DatasetCatalog.register("_fsdp_test", lambda: _points(TEST_SIZE, 2))
        MetadataCatalog.get("_fsdp_test").set(thing_classes=["neg", "pos"])


class _CountingEvaluator(DatasetEvaluator):
    """Counts the test samples evaluated over all ranks, and how many are distinct."""

    def reset(self) -> None:
        self.ids: list[int] = []
        self.correct = 0

    def process(self, inputs: Any, outputs: Any) -> None:
        for d, out in zip(inputs, outputs):
            self.ids.append(int(d["image_id"]))
            self.correct += int(int(out["scores"].argmax()) == d["label"])

    def evaluate(self) -> dict[str, Any]:
        """The counts on the main process; ``{}`` on the others (as most evaluators do)."""
        ids = sum(comm.all_gather(self.ids), [])
        correct = sum(comm.all_gather(self.correct))
        if not comm.is_main_process():
            return {}
        return {"count": {"samples": len(ids), "distinct": len(set(ids)), "correct": correct}}


class _Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg: Any, dataset_name: str) -> DatasetEvaluator:
        return _CountingEvaluator()

    def build_hooks(self) -> list[HookBase | None]:
        """With evaluations, a BestCheckpointer on every rank (only rank 0 has the metric)."""
        ret = super().build_hooks()
        if self.cfg.TEST.EVAL_PERIOD > 0:
            best = hooks.BestCheckpointer(
                self.cfg.TEST.EVAL_PERIOD, self.checkpointer, "count/correct"
            )
            ret.insert(len(ret) - int(comm.is_main_process()), best)  # before the writer
        return ret


def _cfg(out: str, *, fsdp: bool, dropout: float = 0.0, full: bool = False) -> Any:
    """The config of a run; ``full``: BatchNorm + PreciseBN and evaluations too."""
    _register()
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "_FSDPTestNet"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TEST_DROPOUT = dropout
    cfg.MODEL.TEST_BN = full
    cfg.MODEL.FSDP.ENABLED = fsdp
    cfg.MODEL.FSDP.SHARD_MODULES = ["_Block"]
    cfg.DATASETS.TRAIN = ("_fsdp_train",)
    cfg.DATASETS.TEST = ("_fsdp_test",) if full else ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 8
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.STEPS = (8,)
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.MAX_ITER = MAX_ITER
    cfg.SOLVER.CHECKPOINT_PERIOD = PERIOD
    # Clipping of sharded gradients: by the global norm, or by each parameter's whole norm (the
    # runs compared with one process; 0.05 clips most steps).
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model" if full else "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5 if full else 0.05
    cfg.TEST.EVAL_PERIOD = 6 if full else 0
    cfg.TEST.PRECISE_BN.ENABLED = full
    cfg.TEST.PRECISE_BN.NUM_ITER = 2
    cfg.OUTPUT_DIR = out
    cfg.SEED = 3
    return cfg


def _seed_like_default_setup(seed: int) -> None:
    """default_setup seeds each rank with SEED + rank: the ranks start from different models."""
    seed += comm.get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[key.removeprefix("module.")] = full.detach().clone()
    return out


def run(cfg: Any, *, resume: bool, report: str | None = None, extra: Any = None) -> Any:
    """Train one DefaultTrainer run; the main process writes ``report`` (JSON + weights)."""
    _seed_like_default_setup(cfg.SEED)
    trainer = _Trainer(cfg)
    if extra is not None:
        trainer.register_hooks(extra(trainer))
    trainer.resume_or_load(resume=resume)
    results = trainer.train()
    net = _net_of(trainer.model)
    seen = comm.all_gather(net.seen)  # rank r's batches, per iteration
    weights = _full_weights(trainer.model)  # a collective for a sharded model
    if report and comm.is_main_process():
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        torch.save(weights, f"{report}.weights")
        Path(f"{report}.json").write_text(
            json.dumps(
                {
                    "start_iter": trainer.start_iter,
                    "iter": trainer.iter,
                    "preempted": trainer.preempted,
                    "seen": seen,
                    "results": results,
                    "sharded": comm.is_sharded_module(trainer.model),
                }
            )
        )
    trainer.close()
    return trainer


def _net_of(model: nn.Module) -> _Net:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _copy_until(src: Path, dst: Path, iteration: int) -> None:
    """A copy of an output directory as it was after the checkpoint of ``iteration``."""
    shutil.copytree(src, dst)
    name = f"model_{iteration:07d}"
    (dst / "last_checkpoint").write_text(name if (dst / name).is_dir() else f"{name}.pth")


# ------------------------------------------------------------------ the 2-process job
def _memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters + optimizer state held by this rank, and by an unsharded copy."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(model.parameters())
    states = [v for p in params for v in optimizer.state[p].values() if torch.is_tensor(v)]
    held = sum(local(t).numel() * t.element_size() for t in params + states)
    full = sum(t.numel() * t.element_size() for t in params + states)
    return {"rank": held, "unsharded": full}


def _units_and_broadcast(out: Path) -> dict[str, Any]:
    """create_fsdp_model on its own: units, one starting model, memory, AMP, checkpointing."""
    from torch.distributed.fsdp import FSDPModule

    _register()
    report: dict[str, Any] = {}
    cfg = _cfg("", fsdp=True)
    _seed_like_default_setup(0)  # the ranks' initial weights differ
    net = _Net(cfg)
    model = create_fsdp_model(net, shard_modules=[_Block])
    report["units"] = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    report["initial"] = {k: v.sum().item() for k, v in _full_weights(model).items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = _points(8, 5)[comm.get_rank() :: 2]
    model(batch)["loss_cls"].backward()
    optimizer.step()
    report["memory"] = _memory(model, optimizer)

    # Evaluation keeps the ranks in step: 37 samples (10 + 9 batches), 1 sample (rank 1 has none).
    report["eval"] = {
        n: inference_on_dataset(
            model, build_test_loader(dataset=_points(n, 2), batch_size=2), _CountingEvaluator()
        ).get("count")
        for n in (TEST_SIZE, 1)
    }

    # AMP: the parameters are gathered in bfloat16 for the forward pass (FSDP2 mixed precision).
    amp_cfg = _cfg(str(out / "amp"), fsdp=True)
    amp_cfg.SOLVER.AMP.ENABLED = True
    amp_cfg.SOLVER.AMP.PRECISION = "bfloat16"
    amp_cfg.SOLVER.MAX_ITER = 1
    dtypes: list[str] = []
    trainer = _Trainer(amp_cfg)
    trainer.model.head.register_forward_pre_hook(
        lambda m, args: dtypes.append(str(m.weight.dtype).removeprefix("torch."))
    )
    trainer.train()
    trainer.close()
    report["amp_compute_dtype"] = dtypes
    report["amp_master_dtype"] = str(next(trainer.model.parameters()).dtype)

    # Activation checkpointing replays the dropout masks: the same weights, bit for bit.
    for ac in (False, True):
        ac_cfg = _cfg(str(out / f"ac{int(ac)}"), fsdp=True, dropout=0.3)
        ac_cfg.MODEL.FSDP.ACTIVATION_CHECKPOINTING = ac
        ac_cfg.SOLVER.MAX_ITER = 3
        _seed_like_default_setup(0)
        trainer = _Trainer(ac_cfg)
        trainer.train()
        trainer.close()
        report[f"ac{int(ac)}"] = {k: v.tolist() for k, v in _full_weights(trainer.model).items()}
    return report


def _async_saves(out: Path) -> dict[str, Any]:
    """Asynchronous sharded saves (on their own process group) while FSDP trains."""
    cfg = _cfg("", fsdp=True, dropout=0.3)
    _seed_like_default_setup(0)
    model = create_fsdp_model(_Net(cfg), shard_modules=[_Block])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = build_train_loader(dataset=_points(64, 1), total_batch_size=8, num_workers=0)
    trainer = SimpleTrainer(model, loader, optimizer)
    checkpointer = Checkpointer(model, str(out), async_save=True, optimizer=optimizer)
    saved: dict[int, dict[str, torch.Tensor]] = {}

    class Record(HookBase):
        def after_step(self) -> None:
            if (self.trainer.iter + 1) % 2 == 0:
                saved[self.trainer.iter] = _full_weights(model)

    trainer.register_hooks([Record(), hooks.PeriodicCheckpointer(checkpointer, 2)])
    trainer.train(0, 6)
    checkpointer.close()
    restored = {}
    for it, weights in saved.items():
        fresh = create_fsdp_model(_Net(cfg), shard_modules=[_Block])
        Checkpointer(fresh, "").load(str(out / f"model_{it:07d}"))
        restored[it] = all(torch.equal(weights[k], v) for k, v in _full_weights(fresh).items())
    return {"restored": restored, "files": sorted(os.listdir(out / "model_0000005"))}


def _job_worker(out_dir: str) -> None:
    out = Path(out_dir)
    rank = comm.get_rank()
    report = _units_and_broadcast(out / "units")
    report["async"] = _async_saves(out / "async")
    # Reference runs (every checkpoint kept), then 1 -> 2 resumes of the parent's runs.
    run(_cfg(str(out / "fsdp_drop"), fsdp=True, dropout=0.3, full=True), resume=False,
        report=str(out / "reports/fsdp_drop"))  # fmt: skip
    run(_cfg(str(out / "fsdp"), fsdp=True), resume=False, report=str(out / "reports/fsdp"))
    run(_cfg(str(out / "ddp"), fsdp=False), resume=False, report=str(out / "reports/ddp"))
    for name, fsdp in (("fsdp_from1", True), ("ddp_from1", False)):
        run(_cfg(str(out / name), fsdp=fsdp), resume=True, report=str(out / f"reports/{name}"))
    (out / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the one-process reference, then the 2-process job; returns its output directory."""
    out = tmp_path_factory.mktemp("fsdp_job")
    run(_cfg(str(out / "one"), fsdp=True), resume=False, report=str(out / "reports/one"))
    for name in ("fsdp_from1", "ddp_from1"):
        _copy_until(out / "one", out / name, RESUME_FROM)
    launch(_job_worker, 2, args=(str(out),))
    return out


def _report(job: Path, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    data = json.loads((job / f"reports/{name}.json").read_text())
    return data, torch.load(job / f"reports/{name}.weights", weights_only=True)


def _global_batches(seen: list[list[list[int]]]) -> list[list[int]]:
    """Per iteration, the sorted ids all ranks read together (``seen[rank][iteration]``)."""
    return [sorted(sum(parts, [])) for parts in zip(*seen)]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------ tests on the job
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_create_fsdp_model_units_broadcast_memory_amp_checkpointing(job: Path) -> None:
    reports = [json.loads((job / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["units"] == ["", "blocks.0", "blocks.1"]  # the blocks, then the root
        assert report["initial"] == reports[0]["initial"]  # rank 0's weights on every rank
        memory = report["memory"]  # parameters + momentum: exactly half with even shards
        assert memory["rank"] * 2 == memory["unsharded"], memory
        assert report["amp_compute_dtype"] == ["bfloat16"]
        assert report["amp_master_dtype"] == "torch.float32"
        assert report["ac1"] == report["ac0"]
    _register()
    torch.manual_seed(0)
    rank0 = {k: v.sum().item() for k, v in _Net(_cfg("", fsdp=True)).state_dict().items()}
    assert reports[0]["initial"] == rank0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_match_one_on_the_same_global_batches(job: Path) -> None:
    one, one_weights = _report(job, "one")
    for name in ("fsdp", "ddp"):
        two, weights = _report(job, name)
        assert two["sharded"] == (name == "fsdp")
        assert _global_batches(two["seen"]) == _global_batches(one["seen"])
        _assert_close(weights, one_weights)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sharded_checkpoints_async_saves_and_uneven_evaluation(job: Path) -> None:
    listing = sorted(os.listdir(job / "fsdp_drop"))
    assert {"model_0000003", "model_0000007", "model_0000011", "model_final"} <= set(listing)
    assert not [n for n in listing if n.startswith(".")]  # no temporary directory left
    assert (job / "fsdp_drop/last_checkpoint").read_text() == "model_final"
    shards = sorted(os.listdir(job / "fsdp_drop/model_0000007"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    state = torch.load(job / "fsdp_drop/model_0000007/state.pt", weights_only=True)
    trainer_state = state["trainer"]
    assert trainer_state["iteration"] == 7 and len(trainer_state["rng"]) == 2
    assert trainer_state["_trainer"]["data"]["world_size"] == 2
    assert state["model"]["head.weight"] == {"dcp": "model/head.weight", "placements": ["S0"]}
    optimizer_state = trainer_state["_trainer"]["optimizer"]["state"]
    assert all(v["momentum_buffer"]["placements"] == ["S0"] for v in optimizer_state.values())

    drop, _ = _report(job, "fsdp_drop")
    count = drop["results"]["count"]  # 37 samples on 2 ranks (19 + 18): each counted once
    assert count["samples"] == TEST_SIZE and count["distinct"] == TEST_SIZE

    main_eval = json.loads((job / "rank0.json").read_text())["eval"]
    for n, count in main_eval.items():
        assert count["samples"] == count["distinct"] == int(n), main_eval
    assert sharded_module.is_sharded_checkpoint(str(job / "fsdp_drop/model_best"))
    best = json.loads((job / "fsdp_drop/model_best.json").read_text())
    assert best["metric"] == "count/correct" and best["iteration"] in (5, MAX_ITER)
    for report in (json.loads((job / f"rank{r}.json").read_text()) for r in range(2)):
        assert report["async"]["restored"] == {"1": True, "3": True, "5": True}
        assert report["async"]["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["fsdp", "ddp"])
def test_elastic_resume_two_to_one(
    job: Path, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    two, two_weights = _report(job, name)
    out = tmp_path / name
    _copy_until(job / name, out, RESUME_FROM)
    with caplog.at_level("INFO"):
        run(_cfg(str(out), fsdp=name == "fsdp"), resume=True, report=str(tmp_path / "one"))
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["start_iter"] == RESUME_FROM + 1 and one["iter"] == MAX_ITER
    # The one process reads, batch by batch, what the two ranks read together.
    assert _global_batches(one["seen"]) == _global_batches(two["seen"])[RESUME_FROM + 1 :]
    _assert_close(torch.load(tmp_path / "one.weights", weights_only=True), two_weights)
    assert "RNG states of 2 rank(s); this job has 1" in caplog.text  # logged once
    assert caplog.text.count("RNG states of 2 rank(s)") == 1
    assert "Resuming the data stream of 2 process(es) on 1 at the same global sample" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_elastic_resume_one_to_two(job: Path) -> None:
    one, one_weights = _report(job, "one")
    for name in ("fsdp_from1", "ddp_from1"):
        two, weights = _report(job, name)
        assert two["start_iter"] == RESUME_FROM + 1 and two["sharded"] == (name == "fsdp_from1")
        resumed = _global_batches(two["seen"])
        assert resumed == _global_batches(one["seen"])[RESUME_FROM + 1 :]
        _assert_close(weights, one_weights)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_export_and_default_predictor(job: Path, tmp_path: Path) -> None:
    from d2engine.tools.export import main as export_main

    _, weights = _report(job, "fsdp_drop")
    image = np.arange(4, dtype=np.uint8).reshape(2, 2, 1) * 40
    cfg = _cfg("", fsdp=True, dropout=0.3, full=True)
    cfg.INPUT.FORMAT = "L"
    cfg.INPUT.MIN_SIZE_TEST = 0
    expected = _Net(cfg).eval()
    expected.load_state_dict(weights)
    with torch.no_grad():
        want = expected([{"image": torch.from_numpy(image).permute(2, 0, 1).float()}])[0]
    checkpoint = str(job / "fsdp_drop/model_final")
    exported = []
    for name in ("model_final.pth", "model_final.safetensors"):
        target = str(tmp_path / name)
        assert export_main([checkpoint, target]) == 0
        exported.append(target)
    for weights_path in (checkpoint, *exported):  # the directory itself loads too
        cfg.MODEL.WEIGHTS = weights_path
        got = DefaultPredictor(cfg)(image)
        torch.testing.assert_close(got["scores"], want["scores"])


# ------------------------------------------------------------------ preemption and SIGKILL
class _Act(HookBase):
    """In iteration ``at``: SIGTERM to the launcher (rank 0), or SIGKILL to every rank."""

    def __init__(self, at: int, action: str) -> None:
        self.at, self.action = at, action

    def after_backward(self) -> None:
        if self.trainer.iter != self.at:
            return
        if self.action == "sigterm" and comm.is_main_process():
            os.kill(os.getppid(), signal.SIGTERM)  # the launcher forwards it to both workers
        elif self.action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)


def chain_worker(out: str, action: str, at: int, report: str) -> None:
    def extra(trainer: Any) -> list[HookBase]:
        trainer.preemption.check_period = 2
        return [_Act(at, action)] if action != "none" else []

    run(_cfg(out, fsdp=True, dropout=0.3, full=True), resume=True, report=report, extra=extra)


_CHAIN = (
    "import sys; sys.path.insert(0, sys.argv[1]); import test_fsdp as t; "
    "from d2engine.engine.launch import launch; "
    "launch(t.chain_worker, 2, args=(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))"
)


def _chain(out: Path, action: str, at: int, report: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHAIN, str(HERE), str(out), action, str(at), str(report)],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_preempted_then_killed_then_resumed_is_bit_identical(job: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # SIGTERM during iteration 2: the ranks agree every 2 iterations and stop after 3.
    first = _chain(out, "sigterm", 2, tmp_path / "first")
    assert first.returncode == PREEMPTION_EXIT_CODE, first.stdout + first.stderr
    log = first.stdout + first.stderr
    assert log.count("Preempted by SIGTERM: stopped after iteration 3") == 2, log  # both ranks
    assert (out / "last_checkpoint").read_text() == "model_0000003"
    assert sorted(os.listdir(out / "model_0000003")) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "state.pt",
    ]
    # Resumed, then killed (SIGKILL, every rank) in iteration 9, after the checkpoint of 7.
    second = _chain(out, "sigkill", 9, tmp_path / "second")
    assert second.returncode not in (0, PREEMPTION_EXIT_CODE), second.stdout + second.stderr
    assert (out / "last_checkpoint").read_text() == "model_0000007"
    third = _chain(out, "none", -1, tmp_path / "third")
    assert third.returncode == 0, third.stdout + third.stderr

    resumed = json.loads((tmp_path / "third.json").read_text())
    reference, reference_weights = _report(job, "fsdp_drop")
    assert resumed["start_iter"] == 8 and resumed["results"] == reference["results"]
    weights = torch.load(tmp_path / "third.weights", weights_only=True)
    assert weights.keys() == reference_weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, reference_weights[key]), key


def test_resume_on_another_world_size_with_auto_scaling_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(str(tmp_path), fsdp=False)
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 1  # auto_scale_workers scales the schedule to the job
    trainer = _Trainer(cfg)
    state = trainer.state_dict()
    state["_trainer"]["data"]["world_size"] = 2  # as written by 2 processes, 8 samples each
    with pytest.raises(
        ValueError, match="written by 2 process.*global batch of 16; this job has 1"
    ):
        trainer.load_state_dict(state)
    with pytest.raises(ValueError, match="REFERENCE_WORLD_SIZE 0 and SOLVER.IMS_PER_BATCH 16"):
        trainer.load_state_dict(state)
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0  # IMS_PER_BATCH fixed: resumes (the loader warns)
    _Trainer(cfg).load_state_dict(state)
    trainer.close()
