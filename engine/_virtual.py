"""Keeping trio's virtual clock honest while real work runs outside the event loop.

Under ``trio.testing.MockClock(autojump_threshold=0)`` the clock jumps to the
next deadline as soon as every task is blocked. A task waiting for a thread
or a worker process *is* blocked, so without care a 0.3 s thread call inside
``fail_after(60)`` makes the clock jump to 60 and the call "time out". While
any bridge call is in flight, the bridges therefore switch autojumping off
(virtual time then stands still, as the clock's rate is 0) and switch it back
on when the last call returns.

Consequence, documented for users: under a virtual clock, a deadline can
never fire while a real thread or process call is in flight; a hung call
hangs the test. Test deadline logic with :class:`engine.testing.VirtualBridge`
(declared virtual durations) instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio


@attrs.define
class _Pin:
    depth: int = 0
    saved_threshold: float = math.inf


_PIN: trio.lowlevel.RunVar[_Pin] = trio.lowlevel.RunVar("engine_clock_pin")


@contextmanager
def real_work_in_flight() -> Iterator[None]:
    """Hold autojumping of a ``MockClock`` off for the length of the block."""
    clock = trio.lowlevel.current_clock()
    # Duck-typed: only trio.testing.MockClock autojumps, and importing
    # trio.testing would import pytest into every service.
    if not hasattr(clock, "autojump_threshold"):
        yield
        return
    try:
        pin = _PIN.get()
    except LookupError:
        pin = _Pin()
        _PIN.set(pin)
    if pin.depth == 0:
        pin.saved_threshold = clock.autojump_threshold
        clock.autojump_threshold = math.inf
    pin.depth += 1
    try:
        yield
    finally:
        pin.depth -= 1
        if pin.depth == 0:
            clock.autojump_threshold = pin.saved_threshold
