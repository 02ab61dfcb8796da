"""Tests for d2engine.utils.progress: when a bar is drawn, and log lines printed above it."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest

from d2engine.utils import progress
from d2engine.utils.progress import (
    PROGRESS_ENV_VAR,
    console_logs_above_bars,
    progress_bar,
    progress_bar_enabled,
)


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal (of unknown size: fileno() is unsupported)."""

    def isatty(self) -> bool:
        return True


def use_terminal(monkeypatch: pytest.MonkeyPatch) -> FakeTerminal:
    """Make sys.stderr a fake terminal (in the test body: pytest's capture resets sys.stderr
    between a fixture's set-up and the test)."""
    tty = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv(PROGRESS_ENV_VAR, raising=False)
    return tty


def test_enabled_only_on_a_terminal_of_the_main_process(monkeypatch: pytest.MonkeyPatch) -> None:
    use_terminal(monkeypatch)
    assert progress_bar_enabled()
    assert not progress_bar_enabled(False)  # the caller's switch (config key, --no-progress)
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(PROGRESS_ENV_VAR, off)
        assert not progress_bar_enabled()
    monkeypatch.setenv(PROGRESS_ENV_VAR, "1")
    assert progress_bar_enabled()
    monkeypatch.setattr(progress.comm, "is_main_process", lambda: False)
    assert not progress_bar_enabled()


def test_not_enabled_when_stderr_is_a_pipe_or_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(PROGRESS_ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_bar_enabled()
    with open(tmp_path / "err.txt", "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        assert not progress_bar_enabled()


def test_bar_draws_in_a_terminal_of_unknown_size(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = use_terminal(monkeypatch)
    # tqdm draws nothing in a 0 x 0 terminal; the bar falls back to 100 columns.
    bar = progress_bar(total=4, initial=1, desc="train")
    bar.update(3)
    bar.close()
    assert bar.ncols == 100
    assert "train: 100%" in terminal.getvalue() and "4/4" in terminal.getvalue()


def test_console_logs_print_above_the_bar_and_files_are_untouched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    terminal = use_terminal(monkeypatch)
    log = logging.getLogger("d2engine.test_progress")
    console = logging.StreamHandler(sys.stderr)
    file_handler = logging.FileHandler(tmp_path / "log.txt")
    for handler in (console, file_handler):
        handler.setFormatter(logging.Formatter("LOG %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        bar = progress_bar(total=10, desc="train")
        bar.update(5)
        bar.refresh()
        with console_logs_above_bars():
            assert console.stream is not terminal and file_handler.stream is not terminal
            with console_logs_above_bars():  # nested: nothing wrapped twice
                log.info("hello")
        bar.close()
        assert console.stream is terminal  # given back
        out = terminal.getvalue()
        # tqdm.write cleared the bar (carriage return) before the line, which starts a line.
        before, _, after = out.partition("LOG hello\n")
        assert after, out
        assert before.endswith("\r") or before.endswith("\n"), repr(before[-40:])
        assert "train:" in after  # the bar is redrawn below the line
        assert (tmp_path / "log.txt").read_text() == "LOG hello\n"
    finally:
        for handler in (console, file_handler):
            log.removeHandler(handler)
            handler.close()
