"""Checks of user-supplied arguments, shared so that every class answers the same input alike.

A period, a count or a size is an integer: ``5`` and ``numpy.int64(5)`` are accepted, ``True``,
``5.0`` and ``"5"`` are refused with a message naming the argument (and its owner), what was
expected and what arrived.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["check_non_negative_int", "check_positive_int"]


def _check_int(value: Any, name: str, owner: str | None, minimum: int, expected: str) -> int:
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = " HINT: use integer division (//) or int(...)." if isinstance(value, float) else ""
        raise ValueError(
            f"{where}{name} must be {expected}, got {value!r} ({type(value).__name__}).{hint}"
        )
    if value < minimum:
        raise ValueError(f"{where}{name} must be {expected}, got {value!r}.")
    return int(value)


def check_positive_int(value: Any, name: str, owner: str | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1.

    Args:
        value: the value to check.
        name: the argument's name, for the message.
        owner: the class or function taking it, for the message.

    Raises:
        ValueError: if ``value`` is not an integer (bools and floats included) or is < 1.
    """
    return _check_int(value, name, owner, 1, "a positive integer")


def check_non_negative_int(value: Any, name: str, owner: str | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 0 (e.g. a period where 0 means off).

    Args:
        value: the value to check.
        name: the argument's name, for the message.
        owner: the class or function taking it, for the message.

    Raises:
        ValueError: if ``value`` is not an integer (bools and floats included) or is < 0.
    """
    return _check_int(value, name, owner, 0, "an integer >= 0")
