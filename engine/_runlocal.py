"""One value per trio run, made on first use."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


def run_local(var: trio.lowlevel.RunVar[T], factory: Callable[[], T]) -> T:
    """The current run's value of ``var``, set to ``factory()`` on first use.

    Raises:
        RuntimeError: called outside a trio run.
    """
    try:
        return var.get()
    except LookupError:
        value = factory()
        var.set(value)
        return value
