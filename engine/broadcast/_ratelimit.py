"""A token bucket for one client's control messages: arithmetic only, no trio.

The bucket holds up to ``burst`` tokens and gains ``rate`` per second; each
message takes one. A message that finds no token is refused, and still takes
one: the bucket goes into debt, so a client that keeps sending while refused
is not let through again the moment a token comes back. When the debt
reaches ``burst`` the client is to be closed. A client that stops sending
pays its debt back at ``rate``.
"""

from __future__ import annotations

import enum
import math

import attrs


class Verdict(enum.Enum):
    """What to do with one message."""

    ALLOW = "allow"
    """Handle it."""
    REFUSE = "refuse"
    """Answer it with an error, and do nothing else."""
    CLOSE = "close"
    """Close the connection: the client kept sending while refused."""


@attrs.define
class TokenBucket:
    """The rate limit of one client (private to the broadcast).

    Args:
        rate: tokens gained per second; ``math.inf`` allows everything.
        burst: tokens held at most, and the debt at which ``take`` says close.
    """

    rate: float
    burst: int
    _level: float = attrs.field(init=False)
    _stamp: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._level = float(self.burst)

    def take(self, now: float) -> Verdict:
        """Take a token for a message that arrives at ``now`` (seconds, never decreasing)."""
        if math.isinf(self.rate):
            return Verdict.ALLOW
        if self._stamp is not None:
            self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        self._level -= 1
        if self._level >= 0:
            return Verdict.ALLOW
        if self._level <= -self.burst:
            return Verdict.CLOSE
        return Verdict.REFUSE
