"""Measure trio time exactly, for assertions under pytest-trio's virtual clocks."""

from __future__ import annotations

from types import TracebackType

import attrs
import trio


@attrs.define
class Stopwatch:
    """Measures how much trio time a block takes.

    ``with Stopwatch() as sw: ...`` reads ``trio.current_time()`` on entry and
    on exit. Under pytest-trio's ``autojump_clock`` the clock is virtual and
    jumps straight to the next deadline, so a block that waits out a 60 s
    deadline runs in milliseconds and ``sw.elapsed == 60`` holds exactly.

    Exactness is floating point's: times that are sums of integers, halves
    or quarters compare exactly; ``0.1 + 0.2`` does not (use ``pytest.approx``).

    Attributes:
        started_at: trio time on entry; ``None`` before.
        stopped_at: trio time on exit; ``None`` while running.
    """

    started_at: float | None = attrs.field(default=None, init=False)
    stopped_at: float | None = attrs.field(default=None, init=False)

    def __enter__(self) -> Stopwatch:
        if self.started_at is not None:
            raise RuntimeError("a Stopwatch measures one block; make a new one")
        self.started_at = trio.current_time()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopped_at = trio.current_time()

    @property
    def elapsed(self) -> float:
        """Seconds of trio time from entry to exit, or to now while running.

        Raises:
            RuntimeError: if the stopwatch was never entered.
        """
        if self.started_at is None:
            raise RuntimeError("the Stopwatch was never started: use `with Stopwatch() as sw:`")
        end = trio.current_time() if self.stopped_at is None else self.stopped_at
        return end - self.started_at
