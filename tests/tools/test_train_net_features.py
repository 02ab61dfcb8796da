"""d2engine-train with the training features: EMA results, and --eval-only on the EMA weights."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from test_train_net import CONFIG, SHORT, _run  # noqa: E402  (after the skip)


def _metric(stdout: str, name: str) -> float:
    match = re.search(rf"^\s*{re.escape(name)}: ([0-9.]+)$", stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))


def test_train_with_ema_then_eval_only_on_the_ema_weights(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ema = ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5"]
    train = _run(["--config-file", CONFIG, *SHORT, *ema, "OUTPUT_DIR", str(out)])
    assert train.returncode == 0, train.stderr[-3000:]
    trained, averaged = (
        _metric(train.stdout, "accuracy/top1"),
        _metric(train.stdout, "accuracy_ema/top1"),
    )
    assert trained != averaged  # the two weights tell apart in this short run

    def eval_only(use_ema: bool, weights: str) -> subprocess.CompletedProcess:
        return _run(
            [
                "--config-file",
                CONFIG,
                "--eval-only",
                "MODEL.WEIGHTS",
                weights,
                "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY",
                str(use_ema),
                "TEST.EXPECTED_RESULTS",
                "[]",
                "OUTPUT_DIR",
                str(tmp_path / "eval"),
            ]
        )

    final = str(out / "model_final.pth")
    with_ema, without = eval_only(True, final), eval_only(False, final)
    assert with_ema.returncode == 0 and without.returncode == 0, with_ema.stderr[-3000:]
    assert _metric(with_ema.stdout, "accuracy/top1") == pytest.approx(averaged, abs=1e-3)
    assert _metric(without.stdout, "accuracy/top1") == pytest.approx(trained, abs=1e-3)
