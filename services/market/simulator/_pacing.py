"""A drift-free send schedule: message ``k`` is due at ``start + k / rate``.

Due counts are computed from ``trio.current_time()`` against that grid, never
by adding sleeps, so neither the sender's work nor the scheduler's lateness
accumulates. Messages are released in bursts (at least a millisecond's worth,
at most ``max_burst``) so a fast rate costs one wakeup and one socket write
per burst rather than per message.
"""

from __future__ import annotations

import math

import attrs
import trio

# The shortest wait between bursts: finer pacing only costs wakeups.
MIN_INTERVAL = 0.001
# How far behind the grid a sender may fall before the backlog is skipped:
# after a pause (a slow client, a busy loop) it catches up this much at most.
MAX_LAG = 0.25


@attrs.define(eq=False)
class Pacer:
    """How many messages are due now, at ``rate`` per second (private).

    ``rate`` may be ``math.inf``: every burst is then ``max_burst`` and the
    pacer only checkpoints. Messages the sender was too slow to send within
    :data:`MAX_LAG` of their time are skipped and counted in ``skipped``.
    """

    rate: float
    max_burst: int
    skipped: int = 0
    _start: float = attrs.field(init=False, default=0.0)
    _sent: int = attrs.field(init=False, default=0)

    def restart(self) -> None:
        """Start a fresh grid now: nothing is due yet (after a stall, say)."""
        self._start = trio.current_time()
        self._sent = 0

    async def next_burst(self) -> int:
        """Wait until at least one message is due; return how many to send now."""
        if math.isinf(self.rate):
            await trio.lowlevel.checkpoint()
            return self.max_burst
        batch = max(1, math.ceil(self.rate * MIN_INTERVAL))
        await trio.sleep_until(self._start + (self._sent + batch) / self.rate)
        return min(max(self.due(), batch), self.max_burst)

    def due(self) -> int:
        """How many messages are due now and not yet sent, without waiting.

        A backlog beyond :data:`MAX_LAG` is skipped here. With no rate limit
        nothing is ever owed: 0.
        """
        if math.isinf(self.rate):
            return 0
        due = math.floor((trio.current_time() - self._start) * self.rate) - self._sent
        backlog = max(self.max_burst, math.ceil(self.rate * MAX_LAG))
        if due > backlog:
            self.skipped += due - backlog
            self._sent += due - backlog
            due = backlog
        return max(due, 0)

    def sent(self, count: int) -> None:
        """Record that ``count`` messages went out."""
        self._sent += count
