"""Printing, flattening and checking evaluation results."""

from __future__ import annotations

import logging
import math
import pprint
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ResultsVerificationError",
    "flatten_results_dict",
    "print_csv_format",
    "verify_results",
]

logger = logging.getLogger(__name__)


class ResultsVerificationError(RuntimeError):
    """Raised by :func:`verify_results` when a result is missing or outside its tolerance."""


def print_csv_format(results: Mapping[str, Any]) -> None:
    """Log results as comma-separated lines that can be pasted into a spreadsheet.

    For each task with a dict of metrics, three lines prefixed with "copypaste:" are logged: the
    task, the metric names, and the values with 4 decimals. Metrics whose name contains "-" (such
    as per-class values) are left out. A task with a single value is logged as ``task=value``.

    Args:
        results: ``{task: {metric: value}}`` as returned by an evaluator.

    Raises:
        TypeError: if ``results`` is not a mapping.
    """
    if not isinstance(results, Mapping):
        raise TypeError(
            f"print_csv_format expects a dict {{task: {{metric: value}}}}, got "
            f"{type(results).__name__}."
        )
    for task, res in results.items():
        if isinstance(res, Mapping):
            important = [(k, v) for k, v in res.items() if "-" not in k]
            logger.info("copypaste: Task: %s", task)
            logger.info("copypaste: %s", ",".join(str(k) for k, _ in important))
            logger.info("copypaste: %s", ",".join(_fmt(v) for _, v in important))
        else:
            logger.info("copypaste: %s=%s", task, res)


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def flatten_results_dict(results: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a nested dict: ``{"a": {"b": 1}}`` becomes ``{"a/b": 1}``.

    Args:
        results: a dict whose values may be dicts.

    Returns:
        A dict whose keys are the "/"-joined paths of the leaves.
    """
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            for sub_key, sub_value in flatten_results_dict(value).items():
                flat[f"{key}/{sub_key}"] = sub_value
        else:
            flat[str(key)] = value
    return flat


def verify_results(cfg: Any, results: Mapping[str, Any]) -> bool:
    """Check results against ``cfg.TEST.EXPECTED_RESULTS``.

    ``cfg.TEST.EXPECTED_RESULTS`` is a list of ``[task, metric, expected, tolerance]``; each
    ``results[task][metric]`` must be finite and within ``tolerance`` of ``expected``.

    Args:
        cfg: a config.
        results: ``{task: {metric: value}}``.

    Returns:
        True when every expectation holds (also when there are none).

    Raises:
        ValueError: if an entry of ``cfg.TEST.EXPECTED_RESULTS`` is not a 4-item list.
        ResultsVerificationError: if a result is missing, not finite, or off by more than its
            tolerance (the message lists every failure).
    """
    expected_results = list(cfg.TEST.EXPECTED_RESULTS)
    if not expected_results:
        return True
    failures = []
    for entry in expected_results:
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise ValueError(
                f"cfg.TEST.EXPECTED_RESULTS entries must be [task, metric, expected, tolerance], "
                f"got {entry!r}."
            )
        task, metric, expected, tolerance = entry
        actual = (
            results.get(task, {}).get(metric) if isinstance(results.get(task), Mapping) else None
        )
        if actual is None:
            failures.append(f"{task}/{metric}: missing")
            continue
        actual = float(actual)
        if not math.isfinite(actual):
            failures.append(f"{task}/{metric}: {actual} is not finite")
        elif abs(actual - float(expected)) > float(tolerance):
            failures.append(f"{task}/{metric}: {actual} is not within {tolerance} of {expected}")
    if failures:
        logger.error("Result verification failed: %s", "; ".join(failures))
        raise ResultsVerificationError(
            "Result verification failed: "
            + "; ".join(failures)
            + ". Actual results:\n"
            + pprint.pformat(dict(results))
        )
    logger.info("Results verification passed.")
    return True
