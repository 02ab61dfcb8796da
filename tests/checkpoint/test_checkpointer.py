"""Tests for Checkpointer and DetectionCheckpointer (synchronous saving and loading)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from d2engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    DetectionCheckpointer,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
)


class Net(nn.Module):
    def __init__(self, out: int = 2) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, out)


class Counter:
    """A small checkpointable."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trained_pair() -> tuple[Net, torch.optim.Optimizer]:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.backbone(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_load_round_trip(tmp_path: Path) -> None:
    model, optimizer = _trained_pair()
    counter = Counter()
    counter.count = 7
    ckpt = Checkpointer(model, str(tmp_path), optimizer=optimizer, counter=counter)
    ckpt.save("model_0000009", iteration=9, note="hello")

    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    raw = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    assert set(raw) == {"model", "optimizer", "counter", "iteration", "note"}

    model2 = Net()
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    counter2 = Counter()
    ckpt2 = Checkpointer(model2, str(tmp_path), optimizer=optimizer2, counter=counter2)
    assert ckpt2.has_checkpoint()
    assert ckpt2.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")
    assert ckpt2.get_all_checkpoint_files() == [str(tmp_path / "model_0000009.pth")]
    rest = ckpt2.resume_or_load("", resume=True)
    assert rest == {"iteration": 9, "note": "hello"}
    assert _same(model, model2) and counter2.count == 7
    assert optimizer2.state_dict()["param_groups"][0]["lr"] == 0.1
    assert ckpt2.last_load_report is not None and ckpt2.last_load_report.ok


def test_load_selected_checkpointables_returns_the_rest(tmp_path: Path) -> None:
    model, optimizer = _trained_pair()
    counter = Counter()
    counter.count = 3
    Checkpointer(model, str(tmp_path), optimizer=optimizer, counter=counter).save("a", iteration=1)
    counter2 = Counter()
    ckpt = Checkpointer(
        Net(), optimizer=torch.optim.SGD(Net().parameters(), lr=1), counter=counter2
    )
    rest = ckpt.load(str(tmp_path / "a.pth"), checkpointables=["counter"])
    assert set(rest) == {"optimizer", "iteration"} and counter2.count == 3
    with pytest.raises(KeyError, match="not registered checkpointables"):
        ckpt.load(str(tmp_path / "a.pth"), checkpointables=["scheduler"])


def test_resume_false_loads_only_the_weights(tmp_path: Path) -> None:
    model, optimizer = _trained_pair()
    Checkpointer(model, str(tmp_path / "old"), optimizer=optimizer).save("init", iteration=5)
    Checkpointer(Net(), str(tmp_path / "run")).save("model_0000001", iteration=1)
    model2 = Net()
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    ckpt = Checkpointer(model2, str(tmp_path / "run"), optimizer=optimizer2)
    rest = ckpt.resume_or_load(str(tmp_path / "old" / "init.pth"), resume=False)
    assert _same(model, model2)
    assert "optimizer" in rest and rest["iteration"] == 5
    assert optimizer2.state_dict()["param_groups"][0]["lr"] == 0.5


def test_empty_path_and_missing_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = Checkpointer(Net(), str(tmp_path))
    with caplog.at_level(logging.INFO, logger="d2engine.checkpoint"):
        assert ckpt.load("") == {}
        assert ckpt.load(None) == {}
        assert ckpt.resume_or_load("", resume=True) == {}
    assert "No checkpoint found" in caplog.text
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt.load(str(tmp_path / "missing.pth"))
    assert not ckpt.has_checkpoint() and ckpt.get_checkpoint_file() == ""


def test_no_save_dir_or_not_save_to_disk_writes_nothing(tmp_path: Path) -> None:
    assert Checkpointer(Net(), str(tmp_path)).writes
    assert not Checkpointer(Net()).writes
    assert not Checkpointer(Net(), str(tmp_path), save_to_disk=False).writes
    Checkpointer(Net()).save("x")
    Checkpointer(Net(), str(tmp_path), save_to_disk=False).save("x")
    Checkpointer(Net(), str(tmp_path), save_to_disk=False, async_save=True).save("y")
    assert os.listdir(tmp_path) == []


def test_gather_states_calls_the_collective_checkpointables(tmp_path: Path) -> None:
    calls: list[str] = []

    class Gathers:
        def state_dict(self) -> dict:
            return {"gathered": len(calls)}

        def load_state_dict(self, state_dict: dict) -> None:
            pass

        def gather_state(self) -> None:
            calls.append("gather")

    opt = torch.optim.SGD(Net().parameters(), lr=0.1)
    ckpt = Checkpointer(Net(), str(tmp_path), optimizer=opt, ranks=Gathers())
    ckpt.save("before")  # save() itself never gathers (it may run on one rank only)
    ckpt.gather_states()
    ckpt.save("after")
    assert calls == ["gather"]
    assert torch.load(tmp_path / "before.pth", weights_only=True)["ranks"] == {"gathered": 0}
    assert torch.load(tmp_path / "after.pth", weights_only=True)["ranks"] == {"gathered": 1}


def test_wrappers_are_unwrapped_and_module_prefix_stripped(tmp_path: Path) -> None:
    source = Net()
    wrapped = nn.DataParallel(Net())
    ckpt = Checkpointer(wrapped, str(tmp_path))
    assert ckpt.model is wrapped.module
    ckpt.save("unwrapped")
    assert all(not k.startswith("module.") for k in torch.load(tmp_path / "unwrapped.pth")["model"])

    prefixed = OrderedDict(("module." + k, v) for k, v in source.state_dict().items())
    torch.save({"model": prefixed}, tmp_path / "prefixed.pth")
    ckpt.load(str(tmp_path / "prefixed.pth"))
    assert _same(source, wrapped.module) and ckpt.last_load_report.ok

    partly = OrderedDict(prefixed)
    partly["extra.weight"] = torch.zeros(1)  # not every key has the prefix: nothing stripped
    torch.save({"model": partly}, tmp_path / "partly.pth")
    ckpt.load(str(tmp_path / "partly.pth"))
    assert "module.head.weight" in ckpt.last_load_report.unexpected_keys


def test_shape_mismatch_table_and_grouped_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = Net(out=2)
    state = source.state_dict()
    state["neck.conv.weight"] = torch.zeros(1)
    state["neck.conv.bias"] = torch.zeros(1)
    del state["backbone.1.running_mean"], state["backbone.1.running_var"]
    torch.save({"model": state, "iteration": 3}, tmp_path / "c.pth")

    target = Net(out=5)
    head_before = target.head.weight.detach().clone()
    ckpt = Checkpointer(target)
    with caplog.at_level(logging.WARNING, logger="d2engine.checkpoint"):
        rest = ckpt.load(str(tmp_path / "c.pth"))
    assert rest == {"iteration": 3}
    report = ckpt.last_load_report
    assert [(m.key, m.checkpoint_shape, m.model_shape) for m in report.shape_mismatches] == [
        ("head.weight", (2, 4), (5, 4)),
        ("head.bias", (2,), (5,)),
    ]
    assert sorted(report.missing_keys) == ["backbone.1.running_mean", "backbone.1.running_var"]
    assert sorted(report.unexpected_keys) == ["neck.conv.bias", "neck.conv.weight"]
    assert torch.equal(target.head.weight, head_before)  # skipped, not loaded
    assert torch.equal(target.backbone[0].weight, source.backbone[0].weight)

    table = report.shape_table()
    assert table.count("\n") == 4  # title, header, rule, two rows
    assert "| head.weight | (2, 4)" in table and "(5, 4)" in table and "(2,)" in table
    assert table in caplog.text
    assert "backbone.1.{running_mean, running_var}" in caplog.text
    assert "neck.conv.{bias, weight}" in caplog.text


def test_bare_state_dict(tmp_path: Path) -> None:
    source = Net()
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    model = Net()
    assert Checkpointer(model).load(str(tmp_path / "bare.pth")) == {}
    assert _same(source, model)

    torch.save({"weights": source.state_dict()}, tmp_path / "nested.pth")
    with pytest.raises(
        CheckpointError, match=r"nested\.pth.*no 'model' entry.*DetectionCheckpointer"
    ):
        Checkpointer(Net()).load(str(tmp_path / "nested.pth"))
    report = None
    det = DetectionCheckpointer(Net())
    det.load(str(tmp_path / "nested.pth"))
    report = det.last_load_report
    assert report.unexpected_keys == ["weights"]


def test_detection_checkpointer_saves_on_main_process(tmp_path: Path) -> None:
    det = DetectionCheckpointer(
        Net(), str(tmp_path), optimizer=torch.optim.SGD(Net().parameters(), lr=1)
    )
    assert det.save_to_disk  # no process group: this is the main process
    det.save("m")
    assert (tmp_path / "m.pth").exists()
    assert not DetectionCheckpointer(Net(), str(tmp_path), save_to_disk=False).save_to_disk


def test_safetensors_weights(tmp_path: Path) -> None:
    source = Net()
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    model = Net()
    Checkpointer(model).resume_or_load(str(tmp_path / "w.safetensors"), resume=False)
    assert _same(source, model)


def test_malicious_checkpoint_refused_even_when_resuming(tmp_path: Path) -> None:
    class _Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    marker = tmp_path / "pwned"
    Checkpointer(Net(), str(tmp_path)).save("model_0000001")
    torch.save({"model": Net().state_dict(), "x": _Evil()}, tmp_path / "model_0000002.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000002.pth")
    ckpt = Checkpointer(Net(), str(tmp_path))
    with pytest.raises(UnsafeCheckpointError, match=r"model_0000002\.pth.*weights_only=False"):
        ckpt.resume_or_load("", resume=True)
    with pytest.raises(UnsafeCheckpointError):
        ckpt.load(str(tmp_path / "model_0000002.pth"))
    assert not marker.exists()


def test_weights_only_opt_in(tmp_path: Path) -> None:
    from fractions import Fraction

    torch.save({"model": Net().state_dict(), "ratio": Fraction(2, 3)}, tmp_path / "t.pth")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        Checkpointer(Net()).load(str(tmp_path / "t.pth"))
    assert Checkpointer(Net()).load(str(tmp_path / "t.pth"), weights_only=False) == {
        "ratio": Fraction(2, 3)
    }
    assert Checkpointer(Net(), weights_only=False).load(str(tmp_path / "t.pth"))[
        "ratio"
    ] == Fraction(2, 3)


def test_truncated_latest_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = Net()
    counter = Counter()
    ckpt = Checkpointer(model, str(tmp_path), counter=counter)
    expected = {}
    for it in (99, 199, 299):
        with torch.no_grad():
            model.head.bias.fill_(it)
        counter.count = it
        ckpt.save(f"model_{it:07d}", iteration=it)
        expected[it] = model.head.bias.detach().clone()
    latest = tmp_path / "model_0000299.pth"
    latest.write_bytes(latest.read_bytes()[:1000])
    (tmp_path / "model_0000199.pth").write_bytes(b"")  # the next newest is broken too

    model2, counter2 = Net(), Counter()
    ckpt2 = Checkpointer(model2, str(tmp_path), counter=counter2)
    with caplog.at_level(logging.WARNING, logger="d2engine.checkpoint"):
        rest = ckpt2.resume_or_load("", resume=True)
    assert rest == {"iteration": 99} and counter2.count == 99
    assert torch.equal(model2.head.bias, expected[99])
    assert "model_0000299.pth cannot be loaded" in caplog.text
    assert "model_0000199.pth cannot be loaded either" in caplog.text

    (tmp_path / "model_0000099.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"No checkpoint in .* can be loaded"):
        Checkpointer(Net(), str(tmp_path)).resume_or_load("", resume=True)


def test_last_checkpoint_pointing_to_a_deleted_file_falls_back(tmp_path: Path) -> None:
    ckpt = Checkpointer(Net(), str(tmp_path))
    ckpt.save("model_0000000", iteration=0)
    ckpt.save("model_0000001", iteration=1)
    os.remove(tmp_path / "model_0000001.pth")
    assert Checkpointer(Net(), str(tmp_path)).resume_or_load("") == {"iteration": 0}


def test_extra_keys_and_checkpointable_names_are_checked(tmp_path: Path) -> None:
    ckpt = Checkpointer(Net(), str(tmp_path), counter=Counter())
    with pytest.raises(KeyError, match="clash"):
        ckpt.save("x", counter=1)
    with pytest.raises(KeyError, match="already used"):
        ckpt.add_checkpointable("counter", Counter())
    with pytest.raises(KeyError, match="already used"):
        ckpt.add_checkpointable("model", Counter())
    with pytest.raises(TypeError, match="'thing' must have state_dict"):
        ckpt.add_checkpointable("thing", object())
    with pytest.raises(TypeError, match="nn.Module"):
        Checkpointer({"not": "a model"})  # type: ignore[arg-type]
    ckpt.add_checkpointable("second", Counter())
    ckpt.save("x")
    assert "second" in torch.load(tmp_path / "x.pth", weights_only=True)


def test_memory_fsspec_save_dir() -> None:
    fs = fsspec.filesystem("memory")
    root = "/d2e-ckpt-test"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    try:
        model, optimizer = _trained_pair()
        ckpt = Checkpointer(model, f"memory://{root}/run", optimizer=optimizer)
        ckpt.save("model_0000004", iteration=4)
        ckpt.save("model_0000009", iteration=9)
        assert ckpt.get_checkpoint_file() == f"memory://{root}/run/model_0000009.pth"
        assert ckpt.get_all_checkpoint_files() == [
            f"memory://{root}/run/model_0000004.pth",
            f"memory://{root}/run/model_0000009.pth",
        ]
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/run", detail=False))
        assert names == ["last_checkpoint", "model_0000004.pth", "model_0000009.pth"]
        model2 = Net()
        ckpt2 = Checkpointer(
            model2, f"memory://{root}/run", optimizer=torch.optim.SGD(model2.parameters(), lr=1)
        )
        assert ckpt2.resume_or_load("") == {"iteration": 9}
        assert _same(model, model2)
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_stale_temp_files_are_cleaned_on_first_save(tmp_path: Path) -> None:
    stale = tmp_path / ".model_0000001.pth.424242.deadbeef.tmp"
    stale.write_bytes(b"half")
    ckpt = Checkpointer(Net(), str(tmp_path))
    assert ckpt.get_all_checkpoint_files() == []
    ckpt.save("model_0000002")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000002.pth"]


def test_tag_last_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpointer(Net(), str(tmp_path))
    ckpt.save("a")
    ckpt.save("b")
    ckpt.tag_last_checkpoint("a.pth")
    assert ckpt.get_checkpoint_file() == str(tmp_path / "a.pth")


def test_typical_training_state_loads_with_weights_only(tmp_path: Path) -> None:
    from d2engine.checkpoint import RNGState, restore_rng_state

    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 6], gamma=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model.backbone(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    rng = RNGState()
    saved_rng = rng.state_dict()
    ckpt = Checkpointer(
        model, str(tmp_path), optimizer=optimizer, scheduler=scheduler, scaler=scaler, rng=rng
    )
    try:
        ckpt.save("model_0000000", iteration=0)
        model2 = Net()
        optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
        scheduler2 = torch.optim.lr_scheduler.MultiStepLR(optimizer2, milestones=[1], gamma=0.5)
        scaler2 = torch.amp.GradScaler("cpu")
        ckpt2 = Checkpointer(
            model2,
            str(tmp_path),
            optimizer=optimizer2,
            scheduler=scheduler2,
            scaler=scaler2,
            rng=RNGState(),
        )
        assert ckpt2.weights_only
        assert ckpt2.resume_or_load("") == {"iteration": 0}
        assert scheduler2.state_dict() == scheduler.state_dict()
        assert scaler2.get_scale() == 1024.0
        assert torch.equal(
            optimizer2.state_dict()["state"][0]["exp_avg"],
            optimizer.state_dict()["state"][0]["exp_avg"],
        )
    finally:
        restore_rng_state(saved_rng)


@pytest.mark.parametrize("async_save", [False, True])
def test_save_untagged_leaves_last_checkpoint(tmp_path: Path, async_save: bool) -> None:
    with Checkpointer(Net(), str(tmp_path), async_save=async_save) as ckpt:
        ckpt.save("model_0000009", iteration=9)
        ckpt.save_untagged("model_best", iteration=4)
        ckpt.wait()
        assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")
    assert torch.load(tmp_path / "model_best.pth", weights_only=True)["iteration"] == 4


def test_path_manager_reads_paths_of_an_iopath_handler(tmp_path) -> None:
    # detectron2's form: an iopath PathManager with a custom handler, assigned to the
    # checkpointer's path_manager attribute.
    from iopath.common.file_io import PathHandler
    from iopath.common.file_io import PathManager as IopathPathManager

    from d2engine.utils.file_io import PathManager

    class Handler(PathHandler):
        PREFIX = "d2engine_test://"

        def _get_supported_prefixes(self):
            return [self.PREFIX]

        def _get_local_path(self, path, **kwargs):
            return str(tmp_path / path[len(self.PREFIX) :])

        def _open(self, path, mode="r", **kwargs):
            return open(self._get_local_path(path), mode)

    source = torch.nn.Linear(2, 3)
    torch.save({"model": source.state_dict()}, tmp_path / "checkpoint.pth")
    target = torch.nn.Linear(2, 3)
    checkpointer = Checkpointer(target, str(tmp_path / "out"))
    assert checkpointer.path_manager is PathManager  # d2engine's, by default
    manager = IopathPathManager()
    manager.register_handler(Handler())
    checkpointer.path_manager = manager
    checkpointer.load("d2engine_test://checkpoint.pth")
    assert torch.equal(target.weight, source.weight)


def _adam_run(out: int, save_dir: Path) -> None:
    model = Net(out=out)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.head(model.backbone(torch.randn(8, 4))).sum().backward()
    optimizer.step()
    Checkpointer(model, str(save_dir), optimizer=optimizer).save("model_0000009", iteration=9)


def test_changed_shapes_crash_the_first_step_without_the_check(tmp_path: Path) -> None:
    """The failure being detected: loading the old optimizer state 'works', the step crashes."""
    _adam_run(2, tmp_path)
    model = Net(out=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    checkpoint = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    optimizer.load_state_dict(checkpoint["optimizer"])
    model.head(model.backbone(torch.randn(8, 4))).sum().backward()
    with pytest.raises(RuntimeError, match="must match the size"):
        optimizer.step()


def test_resume_into_changed_shapes_is_refused_at_load(tmp_path: Path) -> None:
    _adam_run(2, tmp_path)
    model = Net(out=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = Checkpointer(model, str(tmp_path), optimizer=optimizer)
    with pytest.raises(IncompatibleCheckpointError) as info:
        ckpt.resume_or_load("", resume=True)
    message = str(info.value)
    assert "model_0000009.pth" in message and "optimizer" in message
    assert "head.weight" in message and "(2, 4)" in message and "(3, 4)" in message
    assert "head.bias" in message and "MODEL.WEIGHTS" in message and "--resume" in message
    assert "backbone" not in message  # only the parameters that changed

    # The documented way out, in a new process: the weights only (MODEL.WEIGHTS, no --resume).
    model = Net(out=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    rest = Checkpointer(model, str(tmp_path / "new_run"), optimizer=optimizer).resume_or_load(
        str(tmp_path / "model_0000009.pth"), resume=True
    )
    assert set(rest) == {"optimizer", "iteration"}  # not restored
    model.head(model.backbone(torch.randn(8, 4))).sum().backward()
    optimizer.step()


def test_changed_shapes_inside_a_trainer_state_are_refused(tmp_path: Path) -> None:
    from d2engine.engine.train_loop import SimpleTrainer

    def job(out: int) -> tuple[SimpleTrainer, Checkpointer]:
        model = Net(out=out)
        model.forward = lambda x: model.head(model.backbone(x)).sum()  # type: ignore[method-assign]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        trainer = SimpleTrainer(model, [torch.randn(8, 4)] * 3, optimizer)
        return trainer, Checkpointer(model, str(tmp_path), trainer=trainer)

    trainer, ckpt = job(2)
    trainer.train(0, 2)
    ckpt.save("model_0000001", iteration=1)
    _, ckpt2 = job(5)
    with pytest.raises(IncompatibleCheckpointError, match=r"head\.weight.*\(2, 4\).*\(5, 4\)"):
        ckpt2.resume_or_load("", resume=True)


def test_changed_shapes_without_optimizer_state_still_resume(tmp_path: Path) -> None:
    model = Net(out=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no per-parameter state
    Checkpointer(model, str(tmp_path), optimizer=optimizer).save("model_0000001", iteration=1)
    model2 = Net(out=3)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    rest = Checkpointer(model2, str(tmp_path), optimizer=optimizer2).resume_or_load("")
    assert rest == {"iteration": 1}
