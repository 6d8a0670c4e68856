"""What a supervisor's graceful shutdown did, child by child (see ``Supervisor.shutdown``)."""

from __future__ import annotations

import attrs

RETURNED = "returned"
FAILED = "failed"
CANCELLED = "cancelled"
NOT_RUNNING = "not_running"


@attrs.frozen
class ChildShutdown:
    """How one child stopped.

    Attributes:
        name: the child's name.
        outcome: ``"returned"`` (it stopped on its own within its budget),
            ``"failed"`` (it raised while stopping), ``"cancelled"`` (it was
            cancelled: at once, because it never asked for its stop request,
            or at the end of its ``shutdown`` budget) or ``"not_running"``
            (it had already ended, or was backing off).
        seconds: from its stop request until its task had ended.
        budget: its ``shutdown`` budget, in seconds.
        dropped: what it still held once stopped, as counted by its
            ``holds`` callable; ``None`` if it declared none.
        error: ``"Type: message"`` of what it raised while stopping, if it did.
    """

    name: str
    outcome: str
    seconds: float
    budget: float
    dropped: int | None = None
    error: str | None = None


@attrs.frozen
class ShutdownReport:
    """What :meth:`engine.Supervisor.shutdown` did, in the order it stopped the children.

    Attributes:
        supervisor: the supervisor's name.
        reason: the reason given to every child's stop request.
        children: one :class:`ChildShutdown` per child, last started first.
        seconds: how long the whole shutdown took.
    """

    supervisor: str
    reason: str
    children: tuple[ChildShutdown, ...]
    seconds: float

    @property
    def dropped(self) -> int:
        """What the children still held once stopped, summed over those that count it."""
        return sum(c.dropped or 0 for c in self.children)

    @property
    def graceful(self) -> bool:
        """Whether every child stopped on its own and nothing was dropped."""
        return self.dropped == 0 and all(
            c.outcome in (RETURNED, NOT_RUNNING) for c in self.children
        )
