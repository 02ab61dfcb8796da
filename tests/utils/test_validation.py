"""One rule for integer arguments: every owner refuses a float period alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from d2engine.checkpoint import Checkpointer, PeriodicCheckpointer
from d2engine.engine.hooks import PeriodicWriter
from d2engine.engine.train_loop import SimpleTrainer
from d2engine.utils.validation import check_non_negative_int, check_positive_int


def test_accepts_python_and_numpy_ints() -> None:
    assert check_positive_int(5, "period") == 5
    value = check_positive_int(np.int64(3), "period")
    assert value == 3 and type(value) is int
    assert check_non_negative_int(0, "period") == 0


@pytest.mark.parametrize("bad", [0, -1, True, 5.0, "5", None])
def test_positive_int_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match=r"Owner: period must be a positive integer, got"):
        check_positive_int(bad, "period", "Owner")


def test_float_gets_a_hint() -> None:
    with pytest.raises(ValueError, match=r"got 5\.0 \(float\)\. HINT: use integer division"):
        check_positive_int(5.0, "period")


def test_non_negative_int_refuses_negative() -> None:
    with pytest.raises(ValueError, match=r"period must be an integer >= 0, got -1"):
        check_non_negative_int(-1, "period")


def test_every_period_refuses_a_float_alike() -> None:
    # gather_metric_period=5.0 used to be accepted where PeriodicWriter(period=5.0) was not.
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="gather_metric_period must be a positive integer"):
        SimpleTrainer(model, [], opt, gather_metric_period=5.0)
    with pytest.raises(ValueError, match="PeriodicWriter: period must be a positive integer"):
        PeriodicWriter([], period=5.0)
    with pytest.raises(ValueError, match="PeriodicCheckpointer: period must be a positive integer"):
        PeriodicCheckpointer(Checkpointer(model), period=5.0)
