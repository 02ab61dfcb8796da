"""d2engine.evaluation.testing: print_csv_format, flatten_results_dict, verify_results."""

from __future__ import annotations

import logging
import math

import pytest

from d2engine.config import get_cfg
from d2engine.evaluation import (
    ResultsVerificationError,
    flatten_results_dict,
    print_csv_format,
    verify_results,
)


def test_print_csv_format(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="d2engine.evaluation.testing")
    print_csv_format({"accuracy": {"top1": 91.5, "top5": 99, "AP-cat": 3.0}, "loss": 0.25})
    assert [r.getMessage() for r in caplog.records] == [
        "copypaste: Task: accuracy",
        "copypaste: top1,top5",
        "copypaste: 91.5000,99.0000",
        "copypaste: loss=0.25",
    ]
    with pytest.raises(TypeError, match=r"expects a dict \{task: \{metric: value\}\}, got list"):
        print_csv_format([1, 2])  # type: ignore[arg-type]


def test_flatten_results_dict() -> None:
    nested = {"accuracy": {"top1": 1.0, "per": {"a": 2}}, "x": 3}
    assert flatten_results_dict(nested) == {"accuracy/top1": 1.0, "accuracy/per/a": 2, "x": 3}


def test_verify_results(caplog: pytest.LogCaptureFixture) -> None:
    cfg = get_cfg()
    assert verify_results(cfg, {})  # nothing expected
    cfg.TEST.EXPECTED_RESULTS = [["accuracy", "top1", 90.0, 0.5]]
    assert verify_results(cfg, {"accuracy": {"top1": 90.4}})
    with pytest.raises(
        ResultsVerificationError, match=r"accuracy/top1: 91.0 is not within 0.5 of 90.0"
    ):
        verify_results(cfg, {"accuracy": {"top1": 91.0}})
    assert "Result verification failed" in caplog.text
    with pytest.raises(ResultsVerificationError, match="accuracy/top1: missing"):
        verify_results(cfg, {"other": {"top1": 90.0}})
    with pytest.raises(ResultsVerificationError, match="accuracy/top1: nan is not finite"):
        verify_results(cfg, {"accuracy": {"top1": math.nan}})
    cfg.TEST.EXPECTED_RESULTS = [["accuracy", "top1", 90.0]]
    with pytest.raises(ValueError, match=r"entries must be \[task, metric, expected, tolerance\]"):
        verify_results(cfg, {"accuracy": {"top1": 90.0}})
