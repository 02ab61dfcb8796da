"""Tests for d2engine.engine.metrics: the losses kept unread between reads, read in one go."""

from __future__ import annotations

import math

import pytest
import torch

from d2engine.engine.metrics import MAX_PENDING_ITERATIONS, PendingLosses, write_losses
from d2engine.utils.events import EventStorage


def test_write_losses_logs_each_iteration_at_its_iteration() -> None:
    pending = PendingLosses()
    for it in range(3):
        pending.add(it, ("a", "b"), (torch.tensor(1.0 + it), torch.tensor(2.0)), 0.01 * it)
    pending.add(3, ("a",), (torch.tensor(5.0),), 0.5, prefix="val_")  # a prefixed extra entry
    assert len(pending) == 4
    with EventStorage(99) as storage:
        write_losses(pending.take(), storage)
    assert len(pending) == 0
    assert storage.history("total_loss").values() == [(3.0, 0), (4.0, 1), (5.0, 2)]
    assert storage.history("a").values() == [(1.0, 0), (2.0, 1), (3.0, 2)]
    assert storage.history("val_total_loss").values() == [(5.0, 3)]
    assert "val_a" not in storage.histories()  # one loss: only its total
    assert storage.history("data_time").values() == [(0.0, 0), (0.01, 1), (0.02, 2), (0.5, 3)]
    assert storage.history("rank_data_time").values() == storage.history("data_time").values()


def test_micro_batches_are_averaged() -> None:
    pending = PendingLosses()
    # two losses, three micro-batches: (a, b) per micro-batch
    values = tuple(torch.tensor(v) for v in (1.0, 10.0, 2.0, 20.0, 6.0, 60.0))
    pending.add(7, ("a", "b"), values, 0.3)
    with EventStorage() as storage:
        write_losses(pending.take(), storage)
    assert storage.latest()["a"] == (3.0, 7) and storage.latest()["b"] == (30.0, 7)
    assert storage.latest()["total_loss"] == (33.0, 7)


def test_the_first_non_finite_iteration_is_named_and_those_before_are_logged() -> None:
    pending = PendingLosses()
    for it, v in enumerate([1.0, 2.0, math.inf, math.nan]):
        pending.add(it, ("a", "b"), (torch.tensor(v), torch.tensor(0.5)), 0.0)
    with EventStorage() as storage, pytest.raises(FloatingPointError) as info:
        write_losses(pending.take(), storage)
    message = str(info.value)
    assert message.startswith("Loss became infinite or NaN at iteration=2!\nloss_dict = ")
    assert "'a': inf" in message and "HINT: no checkpoint of this iteration" in message
    assert [it for _, it in storage.history("total_loss").values()] == [0, 1]


def test_write_losses_of_nothing_does_nothing() -> None:
    with EventStorage() as storage:
        write_losses([], storage)
    assert storage.histories() == {}
    assert MAX_PENDING_ITERATIONS >= 100


def test_finite_losses_whose_sum_overflows_are_all_logged() -> None:
    pending = PendingLosses()
    for it in range(3):
        pending.add(it, ("a",), (torch.tensor(1e308, dtype=torch.float64),), 0.0)
    with EventStorage() as storage:
        write_losses(pending.take(), storage)
    assert [it for _, it in storage.history("total_loss").values()] == [0, 1, 2]


def _storage_after(items: list, monkeypatch: pytest.MonkeyPatch, columns: bool) -> tuple:
    """What write_losses logs (and the error it raises) with or without the column path."""
    from d2engine.engine import metrics

    if not columns:
        monkeypatch.setattr(metrics, "_write_columns", lambda items, storage: False)
    error = None
    with EventStorage() as storage:
        try:
            write_losses(items, storage)
        except FloatingPointError as e:
            error = str(e)
    monkeypatch.undo()
    logged = {k: [(v.hex(), it) for v, it in b.values()] for k, b in storage.histories().items()}
    return logged, error


@pytest.mark.parametrize("keys", [("a",), ("a", "b", "c")])
@pytest.mark.parametrize("bad", [None, 17])
def test_the_column_path_logs_what_the_general_path_logs(
    monkeypatch: pytest.MonkeyPatch, keys: tuple[str, ...], bad: int | None
) -> None:
    # One process, one prefix and one set of keys (the common case): written column by column;
    # the same bits, the same first non-finite iteration, as item by item.
    g = torch.Generator().manual_seed(0)

    def items() -> list:
        pending = PendingLosses()
        for it in range(25):
            values = torch.rand(len(keys), generator=g, dtype=torch.float64) * 3 - 1
            if it == bad:
                values[-1] = math.nan
            assert pending.add(it, keys, tuple(values.unbind()), 0.001 * it) == it + 1
        return pending.take()

    taken = items()
    fast = _storage_after(taken, monkeypatch, columns=True)
    general = _storage_after(taken, monkeypatch, columns=False)
    assert fast == general
    assert len(fast[0]["total_loss"]) == (25 if bad is None else bad)
    assert (fast[1] is None) == (bad is None)
