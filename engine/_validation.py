"""Argument checks that fail early and name the parameter (trio's and attrs' habit)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar

E = TypeVar("E", bound=str)


def check_duration(name: str, value: float, *, allow_zero: bool = False) -> float:
    """A number of seconds: positive (or >= 0 with ``allow_zero``), ``math.inf`` allowed.

    Returns:
        ``value`` as a float.

    Raises:
        TypeError: not a number (a bool is not one), naming ``name``.
        ValueError: NaN, negative, or zero without ``allow_zero``, naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    if allow_zero:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    elif value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def check_finite_duration(name: str, value: float) -> float:
    """A positive, finite number of seconds (for a setting sent to a server as a number).

    Raises:
        TypeError, ValueError: as :func:`check_duration`, and ``ValueError``
            for ``math.inf``, naming ``name``.
    """
    seconds = check_duration(name, value)
    if math.isinf(seconds):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return seconds


def check_count(name: str, value: int, *, minimum: int = 0) -> int:
    """A whole number of at least ``minimum``.

    Raises:
        TypeError: not an int (a bool is not one), naming ``name``.
        ValueError: below ``minimum``, naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: str, choices: Iterable[E]) -> E:
    """One of a fixed set of names (a ``StrEnum``'s members, typically).

    Returns:
        The matching member of ``choices`` (so a ``StrEnum`` member for a plain string).

    Raises:
        ValueError: no member matches; the message lists them.
    """
    options = list(choices)
    for option in options:
        if value == option:
            return option
    listed = ", ".join(repr(str(o)) for o in options)
    raise ValueError(f"{name} must be one of {listed}, got {value!r}")


def check_name(name: str, value: str) -> str:
    """A non-empty string used to name something in logs and statistics.

    Raises:
        ValueError: not a string, or empty, naming ``name``.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value
