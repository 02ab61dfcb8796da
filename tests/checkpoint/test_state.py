"""Tests for d2engine.checkpoint.state: RNG capture/restore, the Stateful and CollectiveStateful
protocols, per-rank RNG states, snapshots."""

from __future__ import annotations

import random
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from d2engine.checkpoint import state as state_module
from d2engine.checkpoint.state import (
    CollectiveStateful,
    RankRNGStates,
    RNGState,
    Stateful,
    capture_rng_state,
    derive_rng_state,
    gather_rng_states,
    restore_rng_state,
    snapshot_to_cpu,
)


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


@pytest.fixture
def _restore_global_rngs():
    state = capture_rng_state()
    yield
    restore_rng_state(state)


@pytest.mark.usefixtures("_restore_global_rngs")
def test_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    random.gauss(0, 1)  # leaves a cached gaussian in python's generator
    np.random.standard_normal()  # numpy's legacy generator caches one too
    state = capture_rng_state()
    expected = _draws()

    torch.save({"rng": state}, tmp_path / "rng.pth")
    loaded = torch.load(tmp_path / "rng.pth", weights_only=True)["rng"]
    _draws()  # move every generator on
    restore_rng_state(loaded)
    assert _draws() == expected


@pytest.mark.usefixtures("_restore_global_rngs")
def test_state_is_made_of_plain_types() -> None:
    state = capture_rng_state()

    def check(obj: object) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                assert isinstance(key, str)
                check(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                check(value)
        else:
            assert obj is None or isinstance(obj, (int, float, str, torch.Tensor)), type(obj)

    check(state)
    assert state["cuda"] == []  # CUDA is never initialised in these tests
    assert state["numpy"]["keys"].dtype == torch.int64


@pytest.mark.usefixtures("_restore_global_rngs")
def test_rng_state_checkpointable_and_gather() -> None:
    rng = RNGState()
    assert isinstance(rng, Stateful)
    state = rng.state_dict()
    expected = _draws()
    rng.load_state_dict(state)
    assert _draws() == expected
    gathered = gather_rng_states()
    assert len(gathered) == 1 and torch.equal(gathered[0]["torch"], torch.get_rng_state())


def test_restore_rejects_other_dicts() -> None:
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"torch": torch.get_rng_state()})


def test_cuda_true_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        capture_rng_state(cuda=True)


def test_stateful_protocol() -> None:
    model = nn.Linear(2, 2)
    assert isinstance(torch.optim.SGD(model.parameters(), lr=0.1), Stateful)
    assert isinstance(model, Stateful)
    assert not isinstance(object(), Stateful)


def test_collective_stateful_protocol() -> None:
    class Gathers:
        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state_dict: dict) -> None:
            pass

        def gather_state(self) -> None:
            pass

    assert isinstance(Gathers(), CollectiveStateful) and isinstance(Gathers(), Stateful)
    assert not isinstance(RNGState(), CollectiveStateful)  # no gather_state


@pytest.mark.usefixtures("_restore_global_rngs")
def test_rank_rng_states_single_process() -> None:
    rng = RankRNGStates()
    rng.gather("iteration 3")  # nothing to gather alone
    states = rng.states("iteration 3")
    assert len(states) == 1 and torch.equal(states[0]["torch"], torch.get_rng_state())
    expected = _draws()
    rng.restore(states)
    assert _draws() == expected


@pytest.mark.usefixtures("_restore_global_rngs")
def test_rank_rng_states_as_rank_1_of_2(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only states gathered at the same save point are used; others hold this rank's only."""
    other = capture_rng_state()
    torch.manual_seed(5)
    monkeypatch.setattr(state_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(state_module.comm, "get_rank", lambda: 1)
    monkeypatch.setattr(state_module.comm, "all_gather", lambda obj, group=None: [other, obj])
    rng = RankRNGStates()
    rng.gather("iteration 4")
    gathered = rng.states("iteration 4")
    assert torch.equal(gathered[0]["torch"], other["torch"])
    assert torch.equal(gathered[1]["torch"], torch.get_rng_state())
    with caplog.at_level("WARNING"):
        stale = rng.states("iteration 9")  # gathered at another point: not used
        rng.states("iteration 10")
    assert stale[0] is None and torch.equal(stale[1]["torch"], torch.get_rng_state())
    assert caplog.text.count("without the other ranks' RNG states") == 1  # warned once
    expected = _draws()
    rng.restore(gathered)  # rank 1 takes its own entry
    assert _draws() == expected


@pytest.mark.usefixtures("_restore_global_rngs")
def test_ranks_without_a_saved_state_derive_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A job resumed on more processes: the new ranks' generators depend on the checkpoint only."""
    torch.manual_seed(1)
    saved = [capture_rng_state()]  # written by one process
    monkeypatch.setattr(state_module.comm, "get_world_size", lambda: 2)
    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(state_module.comm, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(100 + rank)  # whatever the process had before
        with caplog.at_level("WARNING"):
            RankRNGStates().restore(saved)
        draws[rank] = _draws()
    restore_rng_state(saved[0])
    assert draws[0] == _draws()  # rank 0 restores its own
    derive_rng_state(saved, 1)
    assert draws[1] == _draws() != draws[0]  # rank 1's is derived, the same every time
    derive_rng_state(saved, 2)
    assert _draws() != draws[1]  # and depends on the rank
    # Logged once, by the main process, saying what happened.
    assert caplog.text.count("RNG states of 1 rank(s); this job has 2") == 1
    assert "ranks 1-1 get generators derived from the checkpoint" in caplog.text
    with pytest.raises(ValueError, match="at least one saved RNG state"):
        derive_rng_state([None], 1)


def test_snapshot_is_independent_of_later_updates() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    pair = namedtuple("pair", "a b")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "extra": [1, "x", pair(torch.ones(1), None), (2, 3)],
    }
    snap = snapshot_to_cpu(state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = snap["optimizer"]["state"][0]["exp_avg"].clone()

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()

    for key, value in snap["model"].items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(snap["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert isinstance(snap["model"], OrderedDict)
    assert snap["model"]._metadata == state["model"]._metadata
    assert isinstance(snap["extra"][2], pair) and snap["extra"][3] == (2, 3)


def test_snapshot_keeps_shared_tensors_shared() -> None:
    weight = torch.ones(2)
    snap = snapshot_to_cpu({"a": weight, "b": weight})
    assert snap["a"] is snap["b"] and snap["a"] is not weight


def test_snapshot_reuses_buffers_of_the_previous_snapshot() -> None:
    weight = torch.ones(4, 4)
    buffers: dict = {}
    first = snapshot_to_cpu({"w": weight, "v": [torch.zeros(2)]}, buffers=buffers)
    assert set(buffers) == {("w",), ("v", 0)}
    weight.add_(1.0)
    second = snapshot_to_cpu({"w": weight, "v": [torch.zeros(3)]}, buffers=buffers)
    assert second["w"].data_ptr() == first["w"].data_ptr()  # copied into the old memory
    assert torch.equal(second["w"], torch.full((4, 4), 2.0))
    assert second["v"][0].shape == (3,) and second["v"][0].data_ptr() != first["v"][0].data_ptr()
    assert buffers[("v", 0)] is second["v"][0]
