"""detectron2's tools/*.py, ported by changing the import prefix, train, resume and evaluate.

Each script in this folder follows its detectron2 original call for call (see its docstring);
the detection model and datasets are swapped for the tiny ones of ``tiny.py``. Each test runs a
script as a user would, in a subprocess: a short training run, a resumed run that continues to
the end, and an evaluation-only run of the final weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
YAML = str(HERE / "configs" / "tiny.yaml")
LAZY = str(HERE / "configs" / "tiny_lazy.py")

pytestmark = pytest.mark.slow


def _run(script: str, *args: str) -> str:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=str(HERE),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _iterations(out: Path) -> list[int]:
    lines = (out / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines]


def test_plain_train_net(tmp_path: Path) -> None:
    out = str(tmp_path / "plain")
    first = _run(
        "plain_train_net.py", "--config-file", YAML, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "20"
    )
    assert "Starting training from iteration 0" in first
    assert "detectron2 INFO: Evaluation results for tiny_test in csv format:" in first
    resumed = _run("plain_train_net.py", "--config-file", YAML, "--resume", "OUTPUT_DIR", out)
    assert "Starting training from iteration 20" in resumed  # after model_final of iteration 19
    assert (Path(out) / "model_0000039.pth").is_file()
    evaluated = _run(
        "plain_train_net.py",
        "--config-file",
        YAML,
        "--eval-only",
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
        "MODEL.WEIGHTS",
        str(Path(out) / "model_final.pth"),
    )
    assert "copypaste: 100.0000" in evaluated


def test_train_net(tmp_path: Path) -> None:
    out = tmp_path / "train_net"
    _run("train_net.py", "--config-file", YAML, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "20")
    assert max(_iterations(out)) == 20  # evaluation results are logged at max_iter
    resumed = _run(
        "train_net.py",
        "--config-file",
        YAML,
        "--resume",
        "OUTPUT_DIR",
        str(out),
        "TEST.AUG.ENABLED",
        "True",
    )
    assert "Running inference with test-time augmentation" in resumed  # a detectron2.trainer line
    assert "Results verification passed" in resumed
    assert (
        sorted(set(_iterations(out)))[-1] == 40
    )  # trained on to SOLVER.MAX_ITER (evaluation at 40)
    evaluated = _run(
        "train_net.py",
        "--config-file",
        YAML,
        "--eval-only",
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
        "TEST.AUG.ENABLED",
        "True",
    )
    assert "detectron2.trainer INFO: Running inference with test-time augmentation" in evaluated
    assert evaluated.count("copypaste: 100.0000") == 2  # plain and TTA evaluation
    assert "Results verification passed" in evaluated


def test_lazyconfig_train_net(tmp_path: Path) -> None:
    out = tmp_path / "lazy"
    _run(
        "lazyconfig_train_net.py",
        "--config-file",
        LAZY,
        f"train.output_dir={out}",
        "train.max_iter=20",
    )
    assert (out / "config.yaml").is_file() and max(_iterations(out)) <= 20
    resumed = _run(
        "lazyconfig_train_net.py", "--config-file", LAZY, "--resume", f"train.output_dir={out}"
    )
    assert "Saving checkpoint to" in resumed and (out / "model_0000039.pth").is_file()
    assert min(i for i in _iterations(out) if i > 20) > 20
    evaluated = _run(
        "lazyconfig_train_net.py",
        "--config-file",
        LAZY,
        "--eval-only",
        f"train.output_dir={tmp_path / 'eval'}",
        f"train.init_checkpoint={out / 'model_final.pth'}",
    )
    assert "copypaste: 100.0000" in evaluated
