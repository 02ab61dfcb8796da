"""Tests for d2engine.engine.monitoring: the ProgressBar and PlotCurves hooks, and the bar of
``d2engine-train`` seen in a pseudo-terminal and through a pipe."""

from __future__ import annotations

import fcntl
import importlib.util
import io
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from d2engine.engine import hooks, monitoring
from d2engine.engine.train_loop import SimpleTrainer
from d2engine.utils.events import JSONWriter
from d2engine.utils.progress import PROGRESS_ENV_VAR

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "digits" / "convnet.yaml")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def use_terminal(monkeypatch: pytest.MonkeyPatch) -> FakeTerminal:
    """sys.stderr as a terminal (set in the test body: pytest's capture resets it after set-up)."""
    tty = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv(PROGRESS_ENV_VAR, raising=False)
    return tty


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.fc(x).pow(2).mean()}


def _batches() -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(4, 3, generator=g)


def _trainer() -> SimpleTrainer:
    model = _Model()
    trainer = SimpleTrainer(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.01))
    put_lr = hooks.CallbackHook(after_step=lambda t: t.storage.put_scalar("lr", 0.25))
    trainer.register_hooks([put_lr])
    return trainer


# --------------------------------------------------------------------------- ProgressBar
def test_progress_bar_counts_to_max_iter_and_reads_metrics_every_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = use_terminal(monkeypatch)
    bar = hooks.ProgressBar(period=3)
    assert bar.enabled
    reads: list[int] = []
    show = bar._show_metrics
    monkeypatch.setattr(bar, "_show_metrics", lambda: (reads.append(bar.trainer.iter), show()))
    trainer = _trainer()
    trainer.register_hooks([bar])
    trainer.train(0, 7)
    # The storage is read every `period` iterations and after the last one, never in between
    # (those are the iterations a PeriodicWriter of the same period reads it: no extra syncs).
    assert reads == [2, 5, 6]
    out = terminal.getvalue()
    final = out.rsplit("\r", 1)[-1]
    assert "train: 100%" in final and "7/7" in final, repr(out[-300:])
    loss = trainer.storage.history("total_loss").median(20)
    assert f"loss={loss:.4g}" in final and "lr=0.25" in final
    assert bar._bar is None  # closed after the last iteration


def test_progress_bar_of_a_resumed_run_starts_at_start_iter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = use_terminal(monkeypatch)
    trainer = _trainer()
    trainer.register_hooks([hooks.ProgressBar(period=20)])
    trainer.train(5, 8)
    out = terminal.getvalue()
    assert "5/8" in out and "8/8" in out and "0/8" not in out


def test_progress_bar_closes_when_training_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = use_terminal(monkeypatch)
    log = logging.getLogger("d2engine.test_monitoring")
    console = logging.StreamHandler(sys.stderr)
    log.addHandler(console)
    trainer = _trainer()
    bar = hooks.ProgressBar()

    def crash(t: SimpleTrainer) -> None:
        if t.iter == 3:
            raise RuntimeError("boom")

    trainer.register_hooks([bar, hooks.CallbackHook(after_step=crash)])
    try:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.train(0, 10)
    finally:
        log.removeHandler(console)
    assert bar._bar is None
    assert console.stream is terminal  # the console handler got its stream back
    assert "4/10" in terminal.getvalue().rsplit("\r", 1)[-1]


def test_progress_bar_off_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe, not a terminal
    bar = hooks.ProgressBar()
    assert not bar.enabled
    trainer = _trainer()
    trainer.register_hooks([bar])
    dispatched = [c for calls in trainer._stage_calls.values() for c in calls]
    assert not any(getattr(call, "__self__", None) is bar for call in dispatched)
    terminal = use_terminal(monkeypatch)
    assert not hooks.ProgressBar(enabled=False).enabled  # the config switch wins on a terminal
    monkeypatch.setenv(PROGRESS_ENV_VAR, "0")
    assert not hooks.ProgressBar().enabled
    trainer.train(0, 3)
    assert terminal.getvalue() == ""


def test_progress_bar_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="ProgressBar: period must be a positive integer"):
        hooks.ProgressBar(period=0)


# --------------------------------------------------------------------------- PlotCurves
def test_curves_are_drawn_at_the_first_write_after_each_evaluation_and_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = tmp_path / "metrics.json"
    drawn: list[tuple[int, list[int]]] = []

    def fake_plot(runs: list[str], out: str) -> str:
        lines = [json.loads(x) for x in Path(runs[0]).read_text().splitlines()]
        drawn.append((trainer.iter, [x["iteration"] for x in lines if "acc" in x]))
        return out

    monkeypatch.setattr(monitoring, "plot_metrics", fake_plot)
    trainer = _trainer()
    trainer.register_hooks(
        [
            hooks.EvalHook(5, lambda: {"acc": float(trainer.iter)}),
            hooks.PeriodicWriter([JSONWriter(metrics)], period=4),
            hooks.PlotCurves(metrics, tmp_path / "curves.png", eval_period=5, write_period=4),
        ]
    )
    trainer.train(0, 16)
    # Evaluations after iterations 4, 9, 14 and after training; the writer writes after 3, 7,
    # 11, 15: each drawing comes at the first write after an evaluation and shows its result.
    assert drawn == [(7, [4]), (11, [4, 9]), (15, [4, 9, 14]), (16, [4, 9, 14, 16])]


def test_curves_without_matplotlib_log_how_to_install_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(monitoring, "plotting_available", lambda: False)
    metrics = tmp_path / "metrics.json"
    trainer = _trainer()
    trainer.register_hooks(
        [
            hooks.EvalHook(2, lambda: {"acc": 1.0}),
            hooks.PeriodicWriter([JSONWriter(metrics)], period=2),
            hooks.PlotCurves(metrics, tmp_path / "curves.png", eval_period=2, write_period=2),
        ]
    )
    with caplog.at_level(logging.INFO, logger="d2engine.engine.monitoring"):
        trainer.train(0, 8)
    lines = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(lines) == 1 and "pip install 'd2engine[plot]'" in lines[0]
    assert not (tmp_path / "curves.png").exists()


def test_curves_png_is_written_after_training(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.json"
    trainer = _trainer()
    trainer.register_hooks(
        [
            hooks.PeriodicWriter([JSONWriter(metrics)], period=2),
            hooks.PlotCurves(metrics, tmp_path / "curves.png"),
        ]
    )
    trainer.train(0, 6)
    from PIL import Image

    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 0


# --------------------------------------------------------------------------- in a terminal
SHORT = [
    "SOLVER.MAX_ITER", "45", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
    "TEST.EVAL_PERIOD", "0", "TEST.EXPECTED_RESULTS", "[]", "OUTPUT.PLOT", "False",
]  # fmt: skip


def _run_in_terminal(args: list[str], env: dict[str, str], timeout: float = 240) -> str:
    """Run a command with a 120 x 40 pseudo-terminal as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; output so far:\n{b''.join(chunks)!r}")
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(master)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, out[-3000:]
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PROGRESS_ENV_VAR}
    env.update(OMP_NUM_THREADS="1", TERM="xterm", **extra)
    return env


_LOG_LINE = re.compile(r"\[\d\d/\d\d \d\d:\d\d:\d\d")


def _segments(out: str) -> list[str]:
    """What each redraw leaves on a line: the text between carriage returns and newlines."""
    return [s for s in re.split(r"[\r\n]+", out) if s.strip()]


# Not importorskip: importing scikit-learn here would set KMP_* variables in this process.
needs_digits = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="the digits demo needs scikit-learn"
)


@pytest.mark.slow
@needs_digits
def test_train_command_shows_bars_in_a_terminal(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "d2engine.tools.train_net", "--config-file", CONFIG]
    out = _run_in_terminal([*cmd, *SHORT, "OUTPUT_DIR", str(out_dir)], _env())
    segments = _segments(out)
    bars = [s for s in segments if s.startswith("train:")]
    assert bars, out[-2000:]
    assert "100%" in bars[-1] and "45/45" in bars[-1] and "loss=" in bars[-1], bars[-1]
    assert any(s.startswith("eval:") for s in segments)  # evaluation has its own bar
    # Log lines (the periodic metrics, checkpoints, ...) are printed above the bar, not into it.
    logged = [s for s in segments if _LOG_LINE.search(s)]
    assert any("iter: 19" in s for s in logged) and any("iter: 39" in s for s in logged)
    garbled = [s for s in logged if "train:" in s or "it/s" in s or "eval:" in s]
    assert not garbled, garbled
    log = (out_dir / "log.txt").read_text()
    assert "iter: 39" in log and "train:" not in log  # log.txt in full, without the bar


@pytest.mark.slow
@needs_digits
def test_no_bar_through_a_pipe_or_with_no_progress(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "d2engine.tools.train_net", "--config-file", CONFIG, *SHORT]
    piped = subprocess.run(
        [*cmd, "OUTPUT_DIR", str(tmp_path / "piped")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "train:" not in piped.stderr + piped.stdout
    assert "eval:" not in piped.stderr + piped.stdout
    assert "iter: 39" in piped.stdout  # the periodic console lines stay as they were

    # In a terminal, switched off on the command line (the environment variable and the config
    # key are tested in tests/utils/test_progress.py and tests/engine/test_defaults.py).
    off = _run_in_terminal(
        [*cmd[:3], "--no-progress", *cmd[3:], "OUTPUT_DIR", str(tmp_path / "off")], _env()
    )
    assert "iter: 39" in off and "train:" not in off and "eval:" not in off
