"""Live progress bars on the console (tqdm), and when to draw them.

A bar is drawn only where a person watches: on the main process, when standard error is a
terminal, unless it was switched off (an argument, a config key, or the environment variable
``D2ENGINE_PROGRESS=0``). Elsewhere (a file, CI, Slurm) nothing changes: the periodic console log
lines stay as they are. While a bar is shown, :func:`console_logs_above_bars` makes log lines
print above it instead of through it; files receive every line as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

from tqdm import tqdm

from d2engine.utils import comm

__all__ = ["PROGRESS_ENV_VAR", "console_logs_above_bars", "progress_bar", "progress_bar_enabled"]

PROGRESS_ENV_VAR = "D2ENGINE_PROGRESS"
"""Set it to ``0`` (or ``false``, ``no``, ``off``) to never draw a progress bar."""

_OFF = {"0", "false", "no", "off"}


def progress_bar_enabled(enabled: bool = True) -> bool:
    """Whether a progress bar should be drawn by this process now.

    Args:
        enabled: the caller's switch (e.g. ``cfg.OUTPUT.PROGRESS_BAR``); False always wins.

    Returns:
        True when ``enabled``, :data:`PROGRESS_ENV_VAR` is not set to an "off" value, this is the
        main process and ``sys.stderr`` is a terminal.
    """
    if not enabled:
        return False
    if os.environ.get(PROGRESS_ENV_VAR, "").strip().lower() in _OFF:
        return False
    if not comm.is_main_process():
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    *, total: int | None, initial: int = 0, desc: str = "", leave: bool = True, **kwargs: Any
) -> tqdm:
    """A tqdm bar on ``sys.stderr`` with d2engine's settings.

    It redraws at most twice a second and fits the terminal's width (100 columns when the
    terminal does not tell its size), so that ``update()`` costs a counter increment between
    redraws.

    Args:
        total: the count at which the bar is full (None: no ETA).
        initial: the count it starts at (e.g. the iteration a resumed run starts from).
        desc: the text before the bar.
        leave: keep the finished bar on the screen (False: erase it when closed).
        **kwargs: more tqdm options; they override the defaults.

    Returns:
        The bar; close it when done.
    """
    options: dict[str, Any] = {
        "total": total,
        "initial": initial,
        "desc": desc,
        "leave": leave,
        "file": sys.stderr,
        "mininterval": 0.5,
        "smoothing": 0.1,
        "dynamic_ncols": True,
    }
    if not _terminal_size_known():  # tqdm would draw nothing in a 0 x 0 terminal
        options.update(dynamic_ncols=False, ncols=100, nrows=24)
    options.update(kwargs)
    return tqdm(**options)


def _terminal_size_known() -> bool:
    """Whether the terminal on stderr tells a size (a pseudo-terminal may be 0 x 0)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


class _AboveBars:
    """A stream whose writes go through ``tqdm.write``: bars are cleared, the text printed, the
    bars redrawn below it."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


def _console_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()]
    loggers += [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    found: list[logging.StreamHandler] = []
    for lg in loggers:
        for handler in lg.handlers:
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and any(handler.stream is s for s in consoles if s is not None)
                and handler not in found
            ):
                found.append(handler)
    return found


@contextlib.contextmanager
def console_logs_above_bars() -> Iterator[None]:
    """Within the block, log records on the console are printed above the progress bars.

    Every logging handler that writes to ``sys.stdout`` or ``sys.stderr`` writes through
    ``tqdm.write`` instead; its level, format and filters are kept, and file handlers are not
    touched. The handlers get their streams back at the end. Nested uses are harmless (a handler
    already redirected is left alone).

    Yields:
        Nothing.
    """
    swapped = [(h, h.stream) for h in _console_handlers()]
    for handler, stream in swapped:
        handler.setStream(_AboveBars(stream))
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)
