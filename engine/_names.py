"""How the engine names functions and errors in logs and statistics (private)."""

from __future__ import annotations

import functools
from collections.abc import Callable


def callable_name(fn: Callable[..., object]) -> str:
    """``fn.__qualname__``; for a partial, what it wraps; for an object, its class."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    qualname = getattr(target, "__qualname__", None)
    return qualname if isinstance(qualname, str) else type(target).__qualname__


def describe_error(error: BaseException) -> str:
    """``"ExceptionType: message"``, the form every ``last_error`` field uses."""
    return f"{type(error).__name__}: {error}"
