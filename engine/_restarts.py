"""A supervisor's restart policy as plain decisions: whether, which children, how often.

Nothing here touches trio: the supervisor hands in what it knows (a child's
restart type, its siblings in start order, the current time) and carries out
what comes back.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable
from typing import Literal, Protocol, TypeVar

import attrs

from ._exceptions import FailureRecord, RestartIntensityExceeded

# Failures kept for the intensity report; more would only repeat themselves.
_MAX_FAILURE_RECORDS = 50


class Strategy(enum.StrEnum):
    """Which children a supervisor restarts when one of them ends abnormally."""

    ONE_FOR_ONE = "one_for_one"
    """Only the child that ended."""
    ONE_FOR_ALL = "one_for_all"
    """Every live child: all are stopped, then started again in order."""
    REST_FOR_ONE = "rest_for_one"
    """The child that ended and every live child started after it."""


class Restart(enum.StrEnum):
    """When a child that ended is started again."""

    PERMANENT = "permanent"
    """Always, whether it failed or returned."""
    TRANSIENT = "transient"
    """Only when it failed (raised or stalled)."""
    TEMPORARY = "temporary"
    """Never; a group restart stops it and leaves it stopped."""


# The enum's values again as a Literal (a type checker cannot derive one from
# the other; tests/test_quality.py holds the two equal). Every option enum is
# declared with this shape.
StrategyName = Literal["one_for_one", "one_for_all", "rest_for_one"]
"""The values of :class:`Strategy`, as the strings ``open_supervisor`` also accepts."""

RestartName = Literal["permanent", "transient", "temporary"]
"""The values of :class:`Restart`, as the strings ``start`` also accepts."""


def wants_restart(restart: Restart, *, failed: bool) -> bool:
    """Whether a child of this restart type is started again after it ended."""
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return failed
    return False


class Member(Protocol):
    """What :func:`restart_group` needs to know of a child."""

    @property
    def order(self) -> int:
        """Its rank in start order."""

    @property
    def live(self) -> bool:
        """Whether it is starting, running or backing off."""

    @property
    def restart(self) -> Restart:
        """Its restart type."""


M = TypeVar("M", bound=Member)


def restart_group(strategy: Strategy, failed: M, children: Iterable[M]) -> tuple[list[M], list[M]]:
    """The children to restart, and the temporary ones to stop, in start order.

    Args:
        strategy: the supervisor's strategy.
        failed: the child whose end calls for the restart; always in the group.
        children: every child of the supervisor, in start order.
    """
    if strategy is Strategy.ONE_FOR_ONE:
        return [failed], []
    siblings = [
        c
        for c in children
        if c is failed or (c.live and (strategy is Strategy.ONE_FOR_ALL or c.order > failed.order))
    ]
    group = [c for c in siblings if c is failed or c.restart is not Restart.TEMPORARY]
    stop_only = [c for c in siblings if c is not failed and c.restart is Restart.TEMPORARY]
    return group, stop_only


@attrs.define
class RestartIntensity:
    """The restarts of the last ``period`` seconds, and the failures that led to them."""

    max_restarts: int
    period: float
    _times: collections.deque[float] = attrs.Factory(collections.deque)
    _failures: collections.deque[FailureRecord] = attrs.Factory(
        lambda: collections.deque(maxlen=_MAX_FAILURE_RECORDS)
    )

    def record_failure(self, failure: FailureRecord) -> None:
        """Keep ``failure`` for the report, should the limit be broken."""
        self._failures.append(failure)

    def admit(self, now: float) -> bool:
        """Count a restart at ``now``; whether it stays within ``max_restarts``."""
        horizon = now - self.period
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        self._times.append(now)
        return len(self._times) <= self.max_restarts

    def in_period(self, now: float) -> int:
        """Restarts counted against the limit at ``now``."""
        return sum(1 for t in self._times if t > now - self.period)

    def exceeded(self, supervisor: str, child: str, now: float) -> RestartIntensityExceeded:
        """The error for a restart of ``child`` at ``now`` that :meth:`admit` refused."""
        recent = [f for f in self._failures if f.at > now - self.period]
        return RestartIntensityExceeded(supervisor, child, self.max_restarts, self.period, recent)
