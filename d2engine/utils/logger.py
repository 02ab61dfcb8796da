"""Logging setup for d2engine jobs and log-rate helpers.

:func:`setup_logger` sends a logger's records to the console (rank 0 only) and to a file (every
rank, one file each); :func:`forward_logger` sends another logger's records (those of code ported
from detectron2, which logs to ``"detectron2"`` and ``"fvcore"``) to the same places.
:func:`log_first_n`, :func:`log_every_n` and :func:`log_every_n_seconds` keep repeated messages
from flooding the log; :func:`create_small_table` formats a few results.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from types import FrameType
from typing import Any

__all__ = [
    "PORTED_LOGGER_NAMES",
    "create_small_table",
    "forward_logger",
    "log_every_n",
    "log_every_n_seconds",
    "log_first_n",
    "setup_logger",
]

_PLAIN_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"
_DATE_FORMAT = "%m/%d %H:%M:%S"
_HANDLER_TAG = "_d2engine_setup_logger"

_GREEN = "\x1b[32m"
_YELLOW = "\x1b[33m"
_RED = "\x1b[31m"
_BLINK_RED = "\x1b[5m\x1b[31m"
_RESET = "\x1b[0m"


class _ColorfulFormatter(logging.Formatter):
    """A console formatter: green time and short logger name, coloured WARNING/ERROR prefix."""

    def __init__(self, *, root_name: str, abbrev_name: str) -> None:
        super().__init__(
            f"{_GREEN}[%(asctime)s %(name)s]:{_RESET} %(message)s", datefmt=_DATE_FORMAT
        )
        self._root_name = root_name + "."
        self._abbrev_name = abbrev_name + "." if abbrev_name else ""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        record = copy.copy(record)  # other handlers must still see the full name
        record.name = record.name.replace(self._root_name, self._abbrev_name)
        log = super().formatMessage(record)
        if record.levelno == logging.WARNING:
            prefix = f"{_YELLOW}WARNING{_RESET}"
        elif record.levelno >= logging.ERROR:
            prefix = f"{_BLINK_RED}ERROR{_RESET}"
        else:
            return log
        return prefix + " " + log


def setup_logger(
    output: str | os.PathLike[str] | None = None,
    distributed_rank: int = 0,
    *,
    color: bool = True,
    name: str = "d2engine",
    abbrev_name: str | None = None,
) -> logging.Logger:
    """Make logger ``name`` print to the console (rank 0) and write to a file.

    The logger gets level DEBUG and stops propagating to the root logger. Calling this again for
    the same ``name`` replaces the handlers installed by the previous call (no duplicated lines).

    Args:
        output: where to write the log. A path ending in ``.txt`` or ``.log`` is the file itself;
            any other path is a directory holding ``log.txt``. Ranks above 0 append
            ``.rank{N}`` to the file name. None: no file.
        distributed_rank: the rank of this process; only rank 0 logs to the console.
        color: colour the console output (when the console is a terminal).
        name: the logger to set up.
        abbrev_name: a short name shown on the console in place of ``name`` (default: "d2"
            for "d2engine", else ``name``).

    Returns:
        The configured logger.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
            handler.close()

    if abbrev_name is None:
        abbrev_name = "d2" if name == "d2engine" else name
    plain = logging.Formatter(_PLAIN_FORMAT, datefmt=_DATE_FORMAT)

    if distributed_rank == 0:
        console = logging.StreamHandler(stream=sys.stdout)
        console.setLevel(logging.DEBUG)
        isatty = getattr(sys.stdout, "isatty", lambda: False)()
        if color and isatty:
            console.setFormatter(_ColorfulFormatter(root_name=name, abbrev_name=abbrev_name))
        else:
            console.setFormatter(plain)
        setattr(console, _HANDLER_TAG, True)
        logger.addHandler(console)

    if output is not None:
        output = os.fspath(output)
        if output.endswith((".txt", ".log")):
            filename = output
        else:
            filename = os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = f"{filename}.rank{distributed_rank}"
        parent = os.path.dirname(filename)
        if parent:
            os.makedirs(parent, exist_ok=True)
        file_handler = logging.FileHandler(filename, mode="a", encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(plain)
        setattr(file_handler, _HANDLER_TAG, True)
        logger.addHandler(file_handler)
    return logger


PORTED_LOGGER_NAMES = ("detectron2", "fvcore")
"""The loggers that code written for detectron2 logs to; ``default_setup`` forwards them."""


class _ForwardHandler(logging.Handler):
    """Hand every record to another logger's handlers (the record keeps its own name)."""

    def __init__(self, target: str) -> None:
        super().__init__(logging.DEBUG)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(self.target).handle(record)


def forward_logger(name: str, to: str = "d2engine") -> logging.Logger:
    """Send the records of logger ``name`` (and its children) to the handlers of logger ``to``.

    After ``default_setup`` (which does this for :data:`PORTED_LOGGER_NAMES`), a ported script's
    ``logging.getLogger("detectron2").info(...)`` appears on the console and in ``log.txt`` like
    d2engine's own lines, under its own name. Calling it again, or calling
    :func:`setup_logger` for ``name`` afterwards, replaces the forwarding (no duplicated lines).

    Args:
        name: the logger whose records to forward.
        to: the logger whose handlers write them (set up with :func:`setup_logger`).

    Returns:
        The logger ``name``, at level DEBUG and no longer propagating to the root logger.

    Raises:
        ValueError: if ``name`` and ``to`` are the same logger.
    """
    if name == to:
        raise ValueError(f"forward_logger: cannot forward logger {name!r} to itself.")
    source = logging.getLogger(name)
    source.setLevel(logging.DEBUG)
    source.propagate = False
    for handler in list(source.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            source.removeHandler(handler)
            handler.close()
    forward = _ForwardHandler(to)
    setattr(forward, _HANDLER_TAG, True)
    source.addHandler(forward)
    return source


_LOG_COUNTER: Counter[tuple[object, ...]] = Counter()
_LOG_TIMER: dict[tuple[object, ...], float] = {}


def _find_caller() -> tuple[str, tuple[str, int, str]]:
    """The module name and (file, line, function) of the first frame outside this module."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if os.path.normcase(code.co_filename) != os.path.normcase(__file__):
            module = frame.f_globals.get("__name__", "__main__")
            if module == "__main__":
                module = "d2engine"
            return module, (code.co_filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return "d2engine", ("", 0, "")


def _key(caller: tuple[str, int, str], msg: str, key: str | tuple[str, ...]) -> tuple[object, ...]:
    keys = (key,) if isinstance(key, str) else tuple(key)
    unknown = set(keys) - {"caller", "message"}
    if not keys or unknown:
        raise ValueError(
            f"key must be 'caller', 'message' or both, got {key!r}. "
            "HINT: key=('caller', 'message')."
        )
    out: tuple[object, ...] = ()
    if "caller" in keys:
        out += caller
    if "message" in keys:
        out += (msg,)
    return out


def log_first_n(
    lvl: int,
    msg: str,
    n: int = 1,
    *,
    name: str | None = None,
    key: str | tuple[str, ...] = "caller",
) -> None:
    """Log ``msg`` only the first ``n`` times (per calling line, by default).

    Args:
        lvl: the logging level.
        msg: the message.
        n: how many times to log it.
        name: the logger; default the caller's module.
        key: what identifies "the same" message: "caller" (the calling line), "message" (the
            text), or both as a tuple.
    """
    module, caller = _find_caller()
    hash_key = _key(caller, msg, key)
    _LOG_COUNTER[hash_key] += 1
    if _LOG_COUNTER[hash_key] <= n:
        logging.getLogger(name or module).log(lvl, msg)


def log_every_n(lvl: int, msg: str, n: int = 1, *, name: str | None = None) -> None:
    """Log ``msg`` once every ``n`` calls from the same line (the 1st, the n+1-th, ...).

    Args:
        lvl: the logging level.
        msg: the message.
        n: the period in calls.
        name: the logger; default the caller's module.
    """
    module, caller = _find_caller()
    _LOG_COUNTER[caller] += 1
    if n == 1 or _LOG_COUNTER[caller] % n == 1:
        logging.getLogger(name or module).log(lvl, msg)


def log_every_n_seconds(lvl: int, msg: str, n: float = 1, *, name: str | None = None) -> None:
    """Log ``msg`` from the same line at most once every ``n`` seconds.

    Args:
        lvl: the logging level.
        msg: the message.
        n: the minimum interval in seconds.
        name: the logger; default the caller's module.
    """
    module, caller = _find_caller()
    last = _LOG_TIMER.get(caller)
    now = time.monotonic()
    if last is None or now - last >= n:
        logging.getLogger(name or module).log(lvl, msg)
        _LOG_TIMER[caller] = now


def create_small_table(small_dict: Mapping[str, Any]) -> str:
    """Format a few named values as a one-row Markdown ("pipe") table, keys as the header.

    Floats are shown with 3 decimals; cells are centred::

        |  AP   |  AP50  |  n  |
        |:-----:|:------:|:---:|
        | 0.512 | 70.100 |  3  |

    Args:
        small_dict: the values, in the order they should appear.

    Returns:
        The table (three lines, no trailing newline).

    Raises:
        ValueError: if ``small_dict`` is empty.
    """
    if not small_dict:
        raise ValueError("create_small_table needs at least one value, got an empty mapping.")
    headers = [str(k) for k in small_dict]
    cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in small_dict.values()]
    widths = [max(len(h) + 2, len(c)) for h, c in zip(headers, cells)]

    def center(text: str, width: int) -> str:
        left = (width - len(text)) // 2
        return " " * left + text + " " * (width - len(text) - left)

    def line(texts: list[str]) -> str:
        return "|" + "|".join(f" {center(t, w)} " for t, w in zip(texts, widths)) + "|"

    rule = "|" + "|".join(":" + "-" * w + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, line(cells)])
