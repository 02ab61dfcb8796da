"""Tests for d2engine.tools.train_net: the d2engine-train command on the shipped digits config."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from d2engine.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from d2engine.engine.preemption import PREEMPTION_EXIT_CODE  # noqa: E402
from d2engine.evaluation import ClassificationEvaluator  # noqa: E402
from d2engine.tools.train_net import Trainer, format_results  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "digits" / "convnet.yaml")
# A few iterations only; the demo's accuracy target is checked by TEST.EXPECTED_RESULTS in the
# config itself, which these short runs clear.
SHORT = [
    "SOLVER.MAX_ITER",
    "12",
    "SOLVER.WARMUP_ITERS",
    "2",
    "SOLVER.CHECKPOINT_PERIOD",
    "100",
    "TEST.EVAL_PERIOD",
    "0",
    "TEST.EXPECTED_RESULTS",
    "[]",
]


def _run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "d2engine.tools.train_net", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def _top1(stdout: str) -> float:
    match = re.search(r"accuracy/top1: ([0-9.]+)", stdout)
    assert match, stdout
    return float(match.group(1))


def test_cli_train_then_eval_only(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train = _run(["--config-file", CONFIG, *SHORT, "OUTPUT_DIR", str(out)])
    assert "Final results:" in train.stdout
    top1 = _top1(train.stdout)
    names = set(os.listdir(out))
    assert {"config.yaml", "log.txt", "metrics.json", "model_final.pth", "last_checkpoint"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 11
    assert metrics[-1] == {"iteration": 12, "accuracy/top1": pytest.approx(top1, abs=1e-3)}
    assert "MAX_ITER: 12" in (out / "config.yaml").read_text()

    evaluated = _run(
        [
            "--config-file",
            CONFIG,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
            "TEST.EXPECTED_RESULTS",
            "[]",
            "OUTPUT_DIR",
            str(tmp_path / "eval"),
        ]
    )
    assert _top1(evaluated.stdout) == pytest.approx(top1, abs=1e-3)


def test_cli_two_processes_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = _run(
        [
            "--config-file",
            CONFIG,
            "--num-gpus",
            "2",
            *SHORT,
            "SOLVER.MAX_ITER",
            "4",
            "OUTPUT_DIR",
            str(out),
        ],
        timeout=240,
    )
    assert "Final results:" in proc.stdout
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    assert (out / "log.txt.rank1").is_file()
    assert (out / "model_final.pth").is_file()


_PREEMPTED_CLI = r"""
import os, signal, sys
from d2engine.engine import hooks
from d2engine.engine.defaults import DefaultTrainer
from d2engine.tools import train_net

def build_hooks(self):
    def send(trainer):
        if trainer.iter == 5:
            os.kill(os.getpid(), signal.SIGTERM)
    return DefaultTrainer.build_hooks(self) + [hooks.CallbackHook(after_step=send)]

train_net.Trainer.build_hooks = build_hooks  # SIGTERM to the job after iteration 5
train_net.cli(sys.argv[1:])
"""


def test_cli_exits_with_preemption_code_after_saving(tmp_path: Path) -> None:
    out = tmp_path / "preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _PREEMPTED_CLI,
            "--config-file",
            CONFIG,
            *SHORT,
            "OUTPUT_DIR",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == PREEMPTION_EXIT_CODE == 75, proc.stdout + proc.stderr
    log = (out / "log.txt").read_text()
    assert log.count("Preempted by SIGTERM: stopped after iteration 5") == 1
    assert (out / "last_checkpoint").read_text() == "model_0000005.pth"
    assert not (out / "model_final.pth").exists()
    assert "Final results:" not in proc.stdout


def test_cli_two_processes_sigterm_to_the_launcher(tmp_path: Path) -> None:
    """SIGTERM to the launching process reaches the workers, which stop together and save."""
    import signal
    import time

    out = tmp_path / "ddp-preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "d2engine.tools.train_net",
            "--config-file",
            CONFIG,
            "--num-gpus",
            "2",
            *SHORT,
            "SOLVER.MAX_ITER",
            "100000",
            "OUTPUT_DIR",
            str(out),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.json").exists():  # written after 20 iterations: training runs
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTION_EXIT_CODE, output
    name = (out / "last_checkpoint").read_text()
    iteration = int(name[len("model_") : -len(".pth")])
    assert (
        f"Preempted by SIGTERM: stopped after iteration {iteration}"
        in (out / "log.txt").read_text()
    )
    # Both ranks stopped at that iteration (the flag is combined every 10 iterations).
    assert (iteration + 1) % 10 == 0
    assert f"stopped after iteration {iteration}" in (out / "log.txt.rank1").read_text()


def test_build_evaluator_follows_metadata() -> None:
    import d2engine.data.datasets  # noqa: F401

    cfg = None  # not used by the classification evaluator
    assert isinstance(Trainer.build_evaluator(cfg, "digits_test"), ClassificationEvaluator)
    name = "_test_train_net_no_evaluator"
    DatasetCatalog.register(name, lambda: [])
    try:
        with pytest.raises(NotImplementedError, match="evaluator_type None"):
            Trainer.build_evaluator(cfg, name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_no_progress_turns_the_bar_off_in_the_config(tmp_path: Path) -> None:
    from d2engine.tools.train_net import build_parser, setup

    log = logging.getLogger("d2engine")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    try:
        for flag, expected in (([], True), (["--no-progress"], False)):
            args = build_parser().parse_args(
                [*flag, "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path / str(expected))]
            )
            assert setup(args).OUTPUT.PROGRESS_BAR is expected
    finally:
        for h in log.handlers:
            if h not in handlers:
                h.close()
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


def test_format_results() -> None:
    lines = format_results({"accuracy": {"top1": 97.5, "top5": 100}, "n": 3})
    assert lines == ["accuracy/top1: 97.5000", "accuracy/top5: 100", "n: 3"]


@pytest.mark.slow
def test_demo_config_reaches_95_percent(tmp_path: Path) -> None:
    # The full shipped config (what `make demo` runs); its TEST.EXPECTED_RESULTS would already
    # make the command fail below 95%.
    proc = _run(["--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path / "demo")], timeout=300)
    assert _top1(proc.stdout) >= 95.0
    assert "Results verification passed" in proc.stdout + proc.stderr
