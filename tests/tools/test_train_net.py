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


# -- signals at any time: exit codes 75 (SIGTERM) and 130 (Ctrl-C) (issue 11, points 6-8) -----
_SIGNALS_CLI = r"""
import atexit, os, signal, sys, time
from d2engine.checkpoint.checkpointer import Checkpointer
from d2engine.engine import hooks
from d2engine.engine.checkpoint_hooks import PeriodicCheckpointer
from d2engine.engine.defaults import DefaultTrainer
from d2engine.tools import train_net

mode, argv = sys.argv[1], sys.argv[2:]

def send(sig=signal.SIGTERM, then_sleep=0.2):
    os.kill(os.getpid(), sig)
    time.sleep(then_sleep)  # the handler runs meanwhile (or raises)

if mode == "repeated":  # SIGTERM at iteration 5, then again at every later step of the exit
    save = PeriodicCheckpointer.save_for_preemption
    def save_for_preemption(self):
        send()
        path = save(self)
        send()
        return path
    PeriodicCheckpointer.save_for_preemption = save_for_preemption
    def build_hooks(self):
        def at_5(trainer):
            if trainer.iter == 5:
                send()
        return DefaultTrainer.build_hooks(self) + [
            hooks.CallbackHook(after_step=at_5, after_train=lambda trainer: send())
        ]
    train_net.Trainer.build_hooks = build_hooks
    main = train_net.main
    def main_then_signal(args):
        out = main(args)
        send()  # after train() returned
        return out
    train_net.main = main_then_signal
    atexit.register(send)  # while the interpreter exits
elif mode == "build":  # SIGTERM while the model is built
    def build_model(cls, cfg):
        print("BUILDING", flush=True)
        send(then_sleep=60)
        raise AssertionError("start-up went on after SIGTERM")
    train_net.Trainer.build_model = classmethod(build_model)
elif mode == "resume":  # SIGTERM while the checkpoint is loaded
    load = Checkpointer._load_file
    def load_file(self, path, **kwargs):
        out = load(self, path, **kwargs)
        send(then_sleep=60)
        raise AssertionError("resuming went on after SIGTERM")
    Checkpointer._load_file = load_file
elif mode in ("ctrl-c", "ctrl-c-twice"):
    if mode == "ctrl-c-twice":
        save = PeriodicCheckpointer.save_for_preemption
        def save_for_preemption(self):
            send(signal.SIGINT)
            return save(self)
        PeriodicCheckpointer.save_for_preemption = save_for_preemption
    def build_hooks(self):
        def at_5(trainer):
            if trainer.iter == 5:
                send(signal.SIGINT, then_sleep=0)
        return DefaultTrainer.build_hooks(self) + [hooks.CallbackHook(after_step=at_5)]
    train_net.Trainer.build_hooks = build_hooks
train_net.cli(argv)
"""


def _signals_cli(mode: str, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNALS_CLI, mode, *extra, "--config-file", CONFIG, *SHORT]
        + ["OUTPUT_DIR", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc, time.monotonic() - start


def test_cli_repeated_sigterm_keeps_exit_code_75(tmp_path: Path) -> None:
    out = tmp_path / "repeated"
    proc, _ = _signals_cli("repeated", out)
    assert proc.returncode == PREEMPTION_EXIT_CODE, proc.stdout + proc.stderr
    log = (out / "log.txt").read_text()
    assert log.count("Preempted by SIGTERM: stopped after iteration 5") == 1
    assert (out / "last_checkpoint").read_text() == "model_0000005.pth"


def test_cli_sigterm_while_building_exits_75_at_once(tmp_path: Path) -> None:
    proc, seconds = _signals_cli("build", tmp_path / "build")
    assert proc.returncode == PREEMPTION_EXIT_CODE, proc.stdout + proc.stderr
    assert "BUILDING" in proc.stdout and "start-up went on" not in proc.stderr
    assert seconds < 50  # not after the 60 s the start-up would have taken
    assert not list((tmp_path / "build").glob("*.pth"))


def test_cli_sigterm_while_resuming_exits_75_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "resume"
    _run(["--config-file", CONFIG, *SHORT, "SOLVER.CHECKPOINT_PERIOD", "4", "OUTPUT_DIR", str(out)])
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pth"}
    last = (out / "last_checkpoint").read_text()
    proc, seconds = _signals_cli("resume", out, "--resume")
    assert proc.returncode == PREEMPTION_EXIT_CODE, proc.stdout + proc.stderr
    assert seconds < 50 and "resuming went on" not in proc.stderr
    assert (out / "last_checkpoint").read_text() == last
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pth"} == files


def test_cli_ctrl_c_stops_with_a_checkpoint_and_exit_code_130(tmp_path: Path) -> None:
    out = tmp_path / "ctrl-c"
    proc, _ = _signals_cli("ctrl-c", out)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "Interrupted by SIGINT: stopped after iteration 5" in (out / "log.txt").read_text()
    assert (out / "last_checkpoint").read_text() == "model_0000005.pth"


def test_cli_second_ctrl_c_aborts_at_once(tmp_path: Path) -> None:
    out = tmp_path / "ctrl-c-twice"
    proc, _ = _signals_cli("ctrl-c-twice", out)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "aborted at once" in proc.stdout + proc.stderr
    assert not (out / "model_0000005.pth").exists() and not (out / "last_checkpoint").exists()


def test_cli_names_a_missing_config_file_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from d2engine.tools.train_net import cli

    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit) as info:
        cli(["--config-file", str(missing)])
    assert info.value.code == 2  # a usage error, as argparse's own
    err = capsys.readouterr().err
    assert f"--config-file {missing}: no such file" in err and "HINT" in err
    assert "Traceback" not in err
