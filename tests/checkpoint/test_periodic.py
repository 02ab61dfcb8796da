"""Tests for d2engine.checkpoint.PeriodicCheckpointer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer, PeriodicCheckpointer


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix == ".pth")


def test_naming_and_final(tmp_path: Path) -> None:
    ckpt = Checkpointer(nn.Linear(2, 2), str(tmp_path))
    periodic = PeriodicCheckpointer(ckpt, period=3, max_iter=8)
    for it in range(8):
        periodic.step(it, epoch=1)
    assert _files(tmp_path) == ["model_0000002.pth", "model_0000005.pth", "model_final.pth"]
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == 7 and final["epoch"] == 1
    assert torch.load(tmp_path / "model_0000005.pth", weights_only=True)["iteration"] == 5
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    periodic.save("custom", iteration=99)
    assert "custom.pth" in _files(tmp_path)


def test_max_to_keep_deletes_only_its_own_periodic_files(tmp_path: Path) -> None:
    ckpt = Checkpointer(nn.Linear(2, 2), str(tmp_path))
    (tmp_path / "model_0000000.pth").write_bytes(b"not ours")  # written by someone else
    (tmp_path / "other_0000001.pth").write_bytes(b"other prefix")
    periodic = PeriodicCheckpointer(ckpt, period=2, max_iter=10, max_to_keep=2)
    for it in range(10):
        periodic.step(it)
        if it == 4:
            periodic.save("model_best")
    assert _files(tmp_path) == [
        "model_0000000.pth",
        "model_0000007.pth",
        "model_0000009.pth",
        "model_best.pth",
        "model_final.pth",
        "other_0000001.pth",
    ]
    assert periodic.state_dict() == {
        "recent_checkpoints": ["model_0000007.pth", "model_0000009.pth"],
        "to_delete": [],
    }


def test_state_dict_lets_a_resumed_run_delete_the_right_files(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    periodic = PeriodicCheckpointer(Checkpointer(model, str(tmp_path)), period=1, max_to_keep=2)
    for it in range(3):
        periodic.step(it)
    state = periodic.state_dict()
    assert state == {
        "recent_checkpoints": ["model_0000001.pth", "model_0000002.pth"],
        "to_delete": [],
    }
    torch.save({"p": state}, tmp_path / "state.pt")

    resumed = PeriodicCheckpointer(Checkpointer(model, str(tmp_path)), period=1, max_to_keep=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["p"])
    resumed.step(3)
    assert _files(tmp_path) == ["model_0000002.pth", "model_0000003.pth"]

    fresh = PeriodicCheckpointer(Checkpointer(model, str(tmp_path)), period=1, max_to_keep=2)
    fresh.step(4)
    fresh.step(5)
    fresh.step(6)  # without the state it only knows its own files: 2 and 3 stay
    assert _files(tmp_path) == [
        "model_0000002.pth",
        "model_0000003.pth",
        "model_0000005.pth",
        "model_0000006.pth",
    ]


def test_state_saved_in_each_checkpoint_names_the_file_being_written(tmp_path: Path) -> None:
    ckpt = Checkpointer(nn.Linear(2, 2), str(tmp_path))
    periodic = PeriodicCheckpointer(ckpt, period=1, max_to_keep=2)
    ckpt.add_checkpointable("periodic", periodic)
    for it in range(3):
        periodic.step(it)
    saved = torch.load(tmp_path / "model_0000002.pth", weights_only=True)["periodic"]
    assert saved == {
        "recent_checkpoints": ["model_0000001.pth", "model_0000002.pth"],
        "to_delete": ["model_0000000.pth"],
    }
    # A run killed before it deleted model_0000000 resumes from model_0000002 ...
    torch.save({"model": {}}, tmp_path / "model_0000000.pth")
    resumed = PeriodicCheckpointer(
        Checkpointer(nn.Linear(2, 2), str(tmp_path)), period=1, max_to_keep=2
    )
    resumed.checkpointer.add_checkpointable("periodic", resumed)
    assert resumed.checkpointer.resume_or_load("") == {"iteration": 2}
    resumed.step(3)  # ... and finishes that deletion along with its own
    assert _files(tmp_path) == ["model_0000002.pth", "model_0000003.pth"]


def test_remove_checkpoint_never_deletes_the_file_last_checkpoint_points_to(tmp_path: Path) -> None:
    ckpt = Checkpointer(nn.Linear(2, 2), str(tmp_path))
    ckpt.save("model_0000000")
    ckpt.save("model_0000001")
    ckpt.tag_last_checkpoint("model_0000000.pth")
    ckpt.remove_checkpoint(ckpt.checkpoint_path("model_0000000"))
    ckpt.remove_checkpoint(ckpt.checkpoint_path("model_0000001"))
    assert _files(tmp_path) == ["model_0000000.pth"]


def test_non_writing_rank_tracks_nothing(tmp_path: Path) -> None:
    periodic = PeriodicCheckpointer(
        Checkpointer(nn.Linear(2, 2), str(tmp_path), save_to_disk=False), period=1, max_to_keep=1
    )
    periodic.step(0)
    periodic.step(1)
    assert periodic.state_dict() == {"recent_checkpoints": [], "to_delete": []}
    assert os.listdir(tmp_path) == []


def test_every_save_goes_through_save(tmp_path: Path) -> None:
    """Subclasses (the PeriodicCheckpointer hook) hook into one method for every file."""
    saved: list[tuple[str, int]] = []

    class Recording(PeriodicCheckpointer):
        def save(self, name: str, **kwargs: object) -> None:
            saved.append((name, kwargs["iteration"]))  # type: ignore[arg-type]
            super().save(name, **kwargs)

    periodic = Recording(Checkpointer(nn.Linear(2, 2), str(tmp_path)), period=2, max_iter=4)
    for it in range(4):
        periodic.step(it)
    assert saved == [("model_0000001", 1), ("model_0000003", 3), ("model_final", 3)]
    assert _files(tmp_path) == ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"period": 0}, "PeriodicCheckpointer: period must be a positive integer"),
        ({"period": 1, "max_to_keep": 0}, "max_to_keep"),
    ],
)
def test_arguments_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PeriodicCheckpointer(Checkpointer(nn.Linear(1, 1)), **kwargs)


def test_plain_periodic_checkpointer_with_an_fvcore_checkpointer(tmp_path) -> None:
    # a plain training loop ported from detectron2 keeps its fvcore checkpointer
    from fvcore.common.checkpoint import Checkpointer as FvcoreCheckpointer

    model = torch.nn.Linear(2, 2)
    periodic = PeriodicCheckpointer(
        FvcoreCheckpointer(model, str(tmp_path)), period=2, max_iter=7, max_to_keep=2
    )
    for iteration in range(7):
        periodic.step(iteration)
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["model_0000003.pth", "model_0000005.pth", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
