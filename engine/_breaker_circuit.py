"""One circuit's state machine, as plain arithmetic on times it is given (no trio)."""

from __future__ import annotations

import collections
import enum

import attrs


class CircuitState(enum.StrEnum):
    """Where a key's circuit is."""

    CLOSED = "closed"
    """Calls go through; failures are counted."""
    OPEN = "open"
    """Calls are refused until the cooldown has passed."""
    HALF_OPEN = "half_open"
    """One probe call goes through; the others are refused until it is settled."""


@attrs.define(eq=False)
class Circuit:
    """The state of one key: its recent failures, and when an open circuit half-opens.

    Every method takes the current time, so the rules are tested without a
    clock. A circuit left open past ``retry_at`` half-opens when the next
    call is admitted (:meth:`admit`), not on its own.
    """

    threshold: int
    window: float
    cooldown: float
    state: CircuitState = CircuitState.CLOSED
    retry_at: float = 0.0
    probing: bool = False
    failures: collections.deque[float] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # Only the latest ``threshold`` failures can ever decide anything.
        self.failures = collections.deque(maxlen=self.threshold)

    @property
    def idle(self) -> bool:
        """Closed with no probe in flight: safe to forget."""
        return self.state is CircuitState.CLOSED and not self.probing

    def state_at(self, now: float) -> CircuitState:
        """The state as a caller arriving at ``now`` would find it."""
        if self.state is CircuitState.OPEN and now >= self.retry_at:
            return CircuitState.HALF_OPEN
        return self.state

    def admit(self, now: float) -> bool | None:
        """Admit a call at ``now``: ``False`` (a normal call), ``True`` (the probe) or ``None``."""
        if self.state is CircuitState.OPEN:
            if now < self.retry_at:
                return None
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN:
            if self.probing:
                return None
            self.probing = True
            return True
        return False

    def succeed(self, probe: bool) -> None:
        """A call succeeded: a probe closes the circuit and clears its failures."""
        if probe and self.state is CircuitState.HALF_OPEN:
            self.probing = False
            self.state = CircuitState.CLOSED
            self.failures.clear()

    def fail(self, probe: bool, now: float) -> None:
        """A call failed at ``now``: a probe reopens; enough recent failures open."""
        if probe and self.state is CircuitState.HALF_OPEN:
            self.probing = False
            self._open(now)
        elif self.state is CircuitState.CLOSED:
            self.failures.append(now)
            if len(self.failures) == self.threshold and now - self.failures[0] < self.window:
                self._open(now)

    def release(self, probe: bool) -> None:
        """A call ended without a verdict: a probe frees its slot for the next caller."""
        if probe and self.state is CircuitState.HALF_OPEN:
            self.probing = False

    def _open(self, now: float) -> None:
        self.state = CircuitState.OPEN
        self.retry_at = now + self.cooldown
        self.failures.clear()
